"""Image rewards importable as `image_rewards:NAME` in tests (tests/ is on sys.path under pytest)."""
import os

import torch


def brightness(prompts, images):
    """Mean pixel value in [0, 1]: a reward any image policy can learn."""
    return images.float().mean(dim=(1, 2, 3))


def nan_when_flagged(prompts, images):
    """brightness, but NaN for the first image while ALIGN_TEST_NAN_REWARD is set (a broken reward model)."""
    out = brightness(prompts, images)
    if os.environ.get("ALIGN_TEST_NAN_REWARD"):
        out[0] = float("nan")
    return out


def darkness(prompts, images):
    return -brightness(prompts, images)
