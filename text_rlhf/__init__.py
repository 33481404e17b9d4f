"""text_rlhf: the Instruct recipe on any Hugging Face causal LM — SFT, a pairwise reward model, PPO."""
