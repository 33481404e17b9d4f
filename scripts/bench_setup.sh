#!/usr/bin/env bash
# A benchmark venv with the *same torch build as the peer* (torch 2.13.0, CPU wheel), so peak RSS
# compares code, not CUDA libraries: `import torch` alone is ~508 MB with the cu130 wheel of the
# main venv and ~218 MB with the CPU wheel. No torchvision/open_clip (the benchmarks don't use them).
#   bash scripts/bench_setup.sh      -> $BENCH_VENV (default ~/.cache/align/bench-venv-cpu)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${BENCH_VENV:-$HOME/.cache/align/bench-venv-cpu}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0 transformers==5.24.0 accelerate peft safetensors diffusers omegaconf tqdm \
  tensorboard matplotlib psutil numpy pillow 2>&1 | grep -v "is ignored" || true
"$venv/bin/pip" install -q --no-deps -e "$root" 2>&1 | grep -v "is ignored" || true
"$venv/bin/python" -c "import torch, transformers, diffusers; print('bench venv:', torch.__version__, transformers.__version__, diffusers.__version__)"
