"""Run under `accelerate launch --num_processes 2`: trains, then each rank saves its own weights
so the test can check that DDP kept the ranks identical. Usage: dist_worker.py text|image OUT args..."""
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def main():
    kind, out, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    from accelerate import PartialState
    from align.config import load_config
    if kind == "text":
        from text_rlhf.ppo import PPOConfig, run_ppo
        cfg = load_config(PPOConfig, None, rest, out=out)
        model = run_ppo(cfg).policy
    else:
        from image_rlhf.ddpo import DDPOConfig, run_ddpo
        cfg = load_config(DDPOConfig, None, rest, out=out)
        model = run_ddpo(cfg).unet
    state = PartialState()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, os.path.join(out, f"rank{state.process_index}.pt"))


if __name__ == "__main__":
    main()
