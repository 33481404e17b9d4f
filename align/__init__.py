"""align: the shared core of the RLHF toolkit.

Preference data (rankings -> pairs), pairwise reward training, the RL math (PPO clip, GAE,
whitening, KL estimators and controllers, stat trackers) and the training runner.
It imports torch (and accelerate in the runner) only: never transformers, diffusers or the
modality packages, so both `text_rlhf` and `image_rlhf` stand on it.
"""
import os

# torch's default OpenMP spin-wait makes 2-thread CPU runs erratic (the same step takes
# 0.06-1.3 s when another process is busy). It must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
