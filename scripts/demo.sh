#!/usr/bin/env bash
# The main job: `align demo` — the whole Instruct recipe on the two miniature worlds (text and
# image), base models trained here on first use and cached, report in runs/demo/report.md.
# Arguments go to `align demo` (e.g. --world text, --fresh, --out DIR).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup.sh"
venv=${ALIGN_VENV:-$HOME/.cache/align/venv}
export OMP_WAIT_POLICY=PASSIVE PATH="$venv/bin:$PATH"
exec align demo "$@"
