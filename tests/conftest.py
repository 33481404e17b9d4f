import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "reverse the list 3 1 2 and sort the numbers 9 4 7",
    "Q: add 2 and 3 A: 5",
    "a red circle, a blue square, a green triangle",
    "count the words in this sentence please",
] * 4


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """A tiny random GPT-2 whose tokenizer has NO pad token (EOS doubles as pad), saved by path."""
    from text_rlhf.tiny import save_tiny
    return str(save_tiny(tmp_path_factory.mktemp("gpt2"), "gpt2", CORPUS, vocab_size=300, pad=False))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama-style model (RoPE, RMSNorm, SwiGLU) with a pad token, saved by path."""
    from text_rlhf.tiny import save_tiny
    return str(save_tiny(tmp_path_factory.mktemp("llama"), "llama", CORPUS, vocab_size=300, pad=True))


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    """A tiny random Stable Diffusion pipeline (latents 4×16×16 -> 32 px), saved by path."""
    from image_rlhf.tiny import tiny_sd_pipeline
    return str(tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd_session"), sample_size=16))
