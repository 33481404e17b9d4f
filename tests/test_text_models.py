"""Loading, padding and scoring: the places where RLHF code silently goes wrong."""
import logging

import pytest
import torch

from text_rlhf.models import (ModelLoadError, SequenceScorer, encode_pairs, load_causal_lm, load_seq_scorer,
                              load_tokenizer, pad_batch)
from text_rlhf.policy import PolicyWithValue, response_mask
from text_rlhf.ppo import token_rewards
from text_rlhf.sft import encode_sft


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
def test_tiny_models_load_by_path(arch, request):
    path = request.getfixturevalue(arch)
    tok = load_tokenizer(path)
    model = load_causal_lm(path)
    assert tok.pad_token_id is not None and model.config.vocab_size == len(tok)


def test_missing_pad_token_uses_eos_and_says_so(tiny_gpt2, caplog):
    with caplog.at_level(logging.WARNING):
        tok = load_tokenizer(tiny_gpt2)
    assert tok.pad_token_id == tok.eos_token_id
    assert "no pad token" in caplog.text


def test_nonexistent_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_causal_lm(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_causal_lm(str(tmp_path / "empty"))


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
def test_left_padding_does_not_change_log_probs(arch, request):
    """Position ids from the mask: a left-padded row scores exactly as the same row unpadded."""
    path = request.getfixturevalue(arch)
    tok = load_tokenizer(path)
    torch.manual_seed(0)
    policy = PolicyWithValue(load_causal_lm(path)).eval()
    torch.nn.init.normal_(policy.value_head.weight)
    short_ids = tok("red circle", add_special_tokens=True)["input_ids"]
    long_ids = tok("the quick brown fox jumps over", add_special_tokens=True)["input_ids"]
    resp = [5, 17, 33]
    ids, mask = pad_batch([short_ids + resp, long_ids + resp], tok.pad_token_id, side="left")
    with torch.no_grad():
        lp_b, v_b = policy(ids, mask, 3)
        lp_1, v_1 = policy(torch.tensor([short_ids + resp]), torch.ones(1, len(short_ids) + 3, dtype=torch.long), 3)
    torch.testing.assert_close(lp_b[0], lp_1[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_b[0], v_1[0], atol=1e-5, rtol=1e-5)


def test_reward_model_reads_last_real_token_even_when_pad_is_eos(tiny_gpt2):
    """pad == EOS here: HF's pooling by pad id would read the wrong position; ours goes by the mask."""
    tok = load_tokenizer(tiny_gpt2, padding_side="right")
    scorer = SequenceScorer(load_seq_scorer(tiny_gpt2, pad_token_id=tok.pad_token_id, new_head=True)).eval()
    ids, _ = encode_pairs(tok, ["red circle", "the quick brown fox"], [" blue", " jumps over the dog"], 64)
    assert all(seq[-1] == tok.eos_token_id for seq in ids)
    batch, mask = pad_batch(ids, tok.pad_token_id, side="right")
    with torch.no_grad():
        s_batch = scorer(batch, mask)
        s_single = torch.stack([scorer(torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long))[0] for x in ids])
        # the same ids left-padded score the same too
        left, lmask = pad_batch(ids, tok.pad_token_id, side="left")
        s_left = scorer(left, lmask)
    torch.testing.assert_close(s_batch, s_single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_left, s_single, atol=1e-5, rtol=1e-5)



def test_pad_batch_takes_lists_or_int32_tensors():
    """One scatter, either side: ids in order, pads (or `fill`) elsewhere; an empty row is all pad."""
    seqs = [[5, 6, 7], [], [8]]
    ids, mask = pad_batch(seqs, 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 0], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [0, 0, 0], [1, 0, 0]]
    ids, mask = pad_batch(seqs, 0, side="left", fill=-100)
    assert ids.tolist() == [[5, 6, 7], [-100] * 3, [-100, -100, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 1]]
    for side in ("left", "right"):
        want = pad_batch(seqs, 0, side=side)
        got = pad_batch([torch.tensor(s, dtype=torch.int32) for s in seqs], 0, side=side)
        assert all(torch.equal(a, b) and b.dtype == torch.long for a, b in zip(want, got))


def test_sft_labels_mask_the_prompt(tiny_llama):
    tok = load_tokenizer(tiny_llama, padding_side="right")
    (ids, labels), = encode_sft(tok, [{"prompt": "add 2 and 3:", "response": " 5"}], 64)
    ids, labels = ids.tolist(), labels.tolist()
    n_prompt = len(tok("add 2 and 3:")["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id


def test_sft_encoding_is_compact_and_chunked(tiny_gpt2):
    """encode_sft kept Python lists of ints, ~36 bytes a token (0.73 GB for 20k HH demonstrations, ~6 GB for 160k):
    now int32 tensors, tokenized a chunk at a time; the same ids and labels, and an error still names its record."""
    tok = load_tokenizer(tiny_gpt2, padding_side="right")
    records = [{"prompt": f"add {i} and {i + 1}:" * (1 + i % 3), "response": f" {2 * i + 1}"} for i in range(7)]
    whole, chunked = encode_sft(tok, records, 64), encode_sft(tok, records, 64, chunk=2)
    assert all(ids.dtype == labels.dtype == torch.int32 for ids, labels in whole)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(whole, chunked))
    records[5]["prompt"] = "add 1 and 2: " * 40  # past max_length, in the third chunk
    with pytest.raises(ValueError, match="demos.jsonl:6: field 'prompt'"):
        encode_sft(tok, records, 64, where=[f"demos.jsonl:{i + 1}" for i in range(7)], chunk=2)


def test_encode_pairs_tokenizes_a_shared_prompt_once(tiny_gpt2):
    """A ranked group's K candidates share their prompt (HH's ~1.5k-character conversations): tokenized once for
    all K, not K times (a third of an HH RM's tokenizing time)."""
    tok = load_tokenizer(tiny_gpt2, padding_side="right")
    prompts, responses = ["add 2 and 3:"] * 4 + ["add 1 and 1:"] * 2, [" 5", " 6", " five", " 7", " 2", " 3"]
    want = [tok(p + r)["input_ids"] + [tok.eos_token_id] for p, r in zip(prompts, responses)]
    n_prompt = [len(tok(p)["input_ids"]) for p in prompts]
    calls, call = [], type(tok).__call__

    class Counting(type(tok)):  # records each batch the tokenizer is given
        def __call__(self, text, *a, **k):
            calls.append(list(text))
            return call(self, text, *a, **k)
    tok.__class__ = Counting
    assert encode_pairs(tok, prompts, responses, 64) == (want, n_prompt)
    assert calls[0] == ["add 2 and 3:", "add 1 and 1:"] and len(calls) == 2  # the prompts once, then prompt + response


def test_response_mask_stops_after_first_eos():
    eos = 0
    responses = torch.tensor([[5, 6, 0, 0, 0], [5, 0, 7, 0, 9], [1, 2, 3, 4, 5]])
    assert response_mask(responses, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert response_mask(responses, None).tolist() == [[1] * 5] * 3


def test_score_lands_on_eos_or_last_token_never_a_pad():
    # row 0 ends with EOS at t=2 then pads; row 1 is truncated (no EOS): the score goes on t=4
    resp_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0, 9.0], [0.1, 0.1, 0.1, 0.1, 0.1]])
    rewards = token_rewards(kl, kl_coef=0.5, scores=torch.tensor([2.0, -1.0]), resp_mask=resp_mask)
    expected = torch.tensor([[-0.05, -0.10, -0.15 + 2.0, 0.0, 0.0], [-0.05, -0.05, -0.05, -0.05, -0.05 - 1.0]])
    torch.testing.assert_close(rewards, expected)
    assert (rewards[resp_mask == 0] == 0).all()


def test_rollout_samples_from_the_raw_policy_whatever_the_checkpoint_says(tiny_gpt2):
    """A checkpoint's generation_config (top_k=1, a repetition penalty) and transformers' default
    top_k=50 must not shape PPO's samples: the processed scores equal the raw logits."""
    from text_rlhf.policy import raw_sampling
    from text_rlhf.ppo import PPOConfig, sampling_config
    tok = load_tokenizer(tiny_gpt2)
    lm = load_causal_lm(tiny_gpt2)
    lm.generation_config.top_k = 1
    lm.generation_config.repetition_penalty = 3.0
    gen = sampling_config(PPOConfig(max_new_tokens=6), tok)
    enc = tok(["red circle"] * 16, return_tensors="pt")
    torch.manual_seed(0)
    with torch.no_grad(), raw_sampling(lm):
        out = lm.generate(**enc, generation_config=gen, output_scores=True, output_logits=True,
                          return_dict_in_generate=True)
    for scores, logits in zip(out.scores, out.logits):
        torch.testing.assert_close(scores, logits)  # no warper: no -inf from top-k, no penalty
    assert len({tuple(r) for r in out.sequences.tolist()}) > 8  # top_k=1 would make all 16 identical
    assert lm.generation_config.top_k == 1  # restored afterwards


def test_no_stop_token_means_no_early_stop(tiny_gpt2):
    """stop_at_eos=False: EOS is an ordinary token; rows never stop early, nothing is padded."""
    from text_rlhf.policy import raw_sampling
    from text_rlhf.ppo import PPOConfig, sampling_config
    tok = load_tokenizer(tiny_gpt2)
    lm = load_causal_lm(tiny_gpt2)

    def favour_eos(module, inputs, logits):  # EOS gets ~half the probability mass at every step
        logits = logits.clone()
        logits[..., tok.eos_token_id] = logits.logsumexp(-1)
        return logits

    lm.get_output_embeddings().register_forward_hook(favour_eos)
    enc = tok(["red circle"] * 8, return_tensors="pt")
    for stop, expect_full in ((True, False), (False, True)):
        gen = sampling_config(PPOConfig(max_new_tokens=12, stop_at_eos=stop), tok)
        with torch.no_grad(), raw_sampling(lm):
            seq = lm.generate(**enc, generation_config=gen)
        resp = seq[:, enc["input_ids"].shape[1]:]
        assert (resp == tok.eos_token_id).any()
        assert (resp.shape[1] == 12) if expect_full else (response_mask(resp, tok.eos_token_id) == 0).any()


def test_responses_end_on_the_checkpoints_end_of_turn_token_too(tiny_gpt2, tmp_path):
    """Instruct checkpoints end a turn on a token of their generation_config's EOS list (Llama 3's <|eot_id|>,
    Phi-3's <|end|>) that is not the tokenizer's EOS; raw_sampling blanks that config, so rollouts and
    compare ran on to max_new_tokens and the reward scored text past the turn's end."""
    from text_rlhf.compare import TextGenerator
    from text_rlhf.policy import raw_sampling, stop_token_ids
    from text_rlhf.ppo import PPOConfig, sampling_config
    tok = load_tokenizer(tiny_gpt2)
    lm = load_causal_lm(tiny_gpt2)
    end = tok.convert_tokens_to_ids("a") if "a" in tok.get_vocab() else 5
    assert end != tok.eos_token_id
    lm.generation_config.eos_token_id = [tok.eos_token_id, end]
    assert stop_token_ids(tok, lm) == [tok.eos_token_id, end]

    def favour_end(module, inputs, logits):  # the end-of-turn token gets ~half the mass at every step
        logits = logits.clone()
        logits[..., end] = logits.logsumexp(-1)
        return logits

    lm.get_output_embeddings().register_forward_hook(favour_end)
    enc = tok(["red circle"] * 8, return_tensors="pt")
    gen = sampling_config(PPOConfig(max_new_tokens=12), tok, stop_token_ids(tok, lm))
    torch.manual_seed(0)
    with torch.no_grad(), raw_sampling(lm):
        resp = lm.generate(**enc, generation_config=gen)[:, enc["input_ids"].shape[1]:]
    mask = response_mask(resp, stop_token_ids(tok, lm))
    first_end = (resp == end).long().argmax(1)
    assert (resp == end).any(1).all() and (mask.sum(1) == first_end + 1).all()  # each row ends at its first `end`
    assert resp.shape[1] < 12
    # compare's generator reads the same list from a saved checkpoint
    lm.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    from text_rlhf.compare import CompareConfig
    assert TextGenerator(str(tmp_path / "m"), CompareConfig().text).stop_ids == [tok.eos_token_id, end]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_lora_generation_is_the_same_policy_and_restores_weights_exactly(tiny_gpt2, dtype):
    """PPO rolls out with the LoRA deltas merged (fewer kernels per token): inside the context the
    logits equal the unmerged adapters', after it every base weight is bit-identical (in bf16 a plain
    merge/unmerge round trip would not be) and the adapters are live again; adapters stay float32."""
    from align.rl.config import LoraParams
    from text_rlhf.models import apply_lora
    from text_rlhf.policy import merged_lora
    tok = load_tokenizer(tiny_gpt2)
    lm = load_causal_lm(tiny_gpt2).to(dtype)
    lm = apply_lora(lm, LoraParams(r=4, alpha=8.0), "CAUSAL_LM")
    torch.manual_seed(0)
    for name, p in lm.named_parameters():
        if "lora_B" in name:  # peft starts B at 0: make the delta real
            assert p.dtype == torch.float32
            p.data.normal_(0, 0.2)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    ids = tok(["red circle blue square"] * 3, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        unmerged = lm(input_ids=ids).logits.float()
        with merged_lora(lm):
            merged = lm(input_ids=ids).logits.float()
            base = lm.get_base_model().transformer.h[0].attn.c_attn
            assert not torch.equal(base.base_layer.weight, before["base_model.model.transformer.h.0.attn.c_attn"
                                                                    ".base_layer.weight"])
        after = lm(input_ids=ids).logits.float()
    assert (merged - unmerged).abs().max() < (1e-5 if dtype == torch.float32 else 0.1)  # bf16: rounding only
    assert torch.equal(after, unmerged)
    for k, v in lm.state_dict().items():
        assert torch.equal(v, before[k]), k
    with merged_lora(lm, enabled=False):  # switched off: nothing merged
        assert torch.equal(lm.get_base_model().transformer.h[0].attn.c_attn.base_layer.weight,
                           before["base_model.model.transformer.h.0.attn.c_attn.base_layer.weight"])


CASES = [("Q: add 2 and 3\nA:", "5"), ("say", "\n\nhello"), ("add 2 and 3:", " 5"), ("Q: add 2 and 3\nA: ", "5")]


@pytest.mark.parametrize("kind", ["sentencepiece", "bytelevel"])
def test_responses_are_tokenized_and_decoded_as_they_continue_the_prompt(kind):
    """Tokenized alone, a response gets the "▁" a SentencePiece tokenizer prepends to a text ("\\n" + "hello" trained
    as "\\n ▁hello"), and decoded alone it loses a leading space (" 5" -> "5"). The prompt's tokens stay exactly those
    generation starts from, also where a token would merge across the boundary (a prompt ending in a space)."""
    from tests.conftest import CORPUS
    from text_rlhf.models import decode_responses
    from text_rlhf.tiny import build_bpe_tokenizer, build_sp_tokenizer
    tok = build_sp_tokenizer(CORPUS + ["hello\n\nhello"], 200) if kind == "sentencepiece" else \
        build_bpe_tokenizer(CORPUS + ["hello\n\nhello"], 300)
    tok.pad_token = tok.eos_token
    encoded = encode_sft(tok, [{"prompt": p, "response": r} for p, r in CASES], 64)
    pairs, lengths = encode_pairs(tok, [p for p, _ in CASES], [r for _, r in CASES], 64)
    for (prompt, response), (ids, labels), pair, n in zip(CASES, encoded, pairs, lengths):
        ids, labels = ids.tolist(), labels.tolist()
        p_ids = tok(prompt)["input_ids"]
        assert ids == pair and n == len(p_ids) and ids[:n] == p_ids and labels[:n] == [-100] * n
        if prompt.endswith(" "):  # "A:▁" + "5" merges: the prompt keeps its own tokens, the response goes alone
            continue
        assert tok.decode(ids[:-1], skip_special_tokens=True) == prompt + response, (prompt, response)
        resp = torch.tensor([ids[n:]])
        text, = decode_responses(tok, torch.tensor([p_ids]), torch.ones(1, n), resp, torch.ones_like(resp))
        assert text == response
