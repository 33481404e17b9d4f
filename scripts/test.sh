#!/usr/bin/env bash
# Sets up (or reuses) the venv, then runs the test suite. Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup.sh"
venv=${ALIGN_VENV:-$HOME/.cache/align/venv}
cd "$root"
export OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
