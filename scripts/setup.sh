#!/usr/bin/env bash
# Sets up align in a virtualenv outside the clone and reuses it while its inputs match.
#   bash scripts/setup.sh            -> prints nothing but progress; the venv is $ALIGN_VENV
# Inputs: pyproject.toml and this script (dependencies), the clone's path (editable install).
# Env: ALIGN_VENV (default ~/.cache/align/venv), PYTHON (default python3),
#      TORCH_SPEC (default "torch==2.14.1 torchvision==0.29.1": the wheels on this machine's disk;
#      set it to "" to let pip choose, e.g. a CUDA build on a GPU box), EXTRAS (default "dev").
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${ALIGN_VENV:-$HOME/.cache/align/venv}
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC-torch==2.14.1 torchvision==0.29.1}
extras=${EXTRAS:-dev}
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x "$venv/bin/python" ] || { echo "setup: creating $venv"; "$python" -m venv "$venv"; }
deps_key=$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -c1-16)-$extras-${torch_spec// /_}
if [ "$(cat "$venv/.align-deps" 2>/dev/null)" != "$deps_key" ]; then
  echo "setup: installing dependencies into $venv (once per change of pyproject.toml)"
  if [ -n "$torch_spec" ]; then
    # shellcheck disable=SC2086
    "$venv/bin/pip" install -q $torch_spec 2>&1 | grep -v "is ignored" || true
  fi
  "$venv/bin/pip" install -q -e "$root[$extras]" 2>&1 | grep -v "is ignored" || true
  "$venv/bin/python" -c "import torch, transformers, diffusers, open_clip, peft, accelerate" \
    || { echo "setup: the install failed (see above)"; exit 1; }
  echo "$deps_key" > "$venv/.align-deps"
  echo "$root" > "$venv/.align-root"
elif [ "$(cat "$venv/.align-root" 2>/dev/null)" != "$root" ]; then
  # same dependencies, another clone (CI): repoint the editable install only
  "$venv/bin/pip" install -q --no-deps -e "$root" 2>&1 | grep -v "is ignored" || true
  echo "$root" > "$venv/.align-root"
fi
echo "setup: ready ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'), venv $venv)"
