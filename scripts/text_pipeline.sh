#!/usr/bin/env bash
# The main job (for now): the whole text recipe — SFT -> reward model -> PPO — on the tiny CPU
# preset, with an offline example (tiny model + data) written to runs/text-example/.
# Each stage writes config.yaml, checkpoints/, metrics.jsonl, tb/, curves.png and report.md.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup.sh"
venv=${ALIGN_VENV:-$HOME/.cache/align/venv}
export OMP_WAIT_POLICY=PASSIVE PATH="$venv/bin:$PATH"
out=${1:-runs/text-example}
rm -rf "$out"
python "$root/scripts/make_text_example.py" "$out"
cfg="$root/configs/text/tiny.yaml"
align text sft --config "$cfg" --model "$out/base" --data "$out/demos.jsonl" --out "$out/sft" epochs=20
align text rm  --config "$cfg" --model "$out/sft" --data "$out/prefs.jsonl" --out "$out/rm" epochs=4
align text ppo --config "$cfg" --policy "$out/sft" --reward "$out/rm" --prompts "$out/prompts.jsonl" --out "$out/ppo"
# the next round: the aligned policy's candidates for new rankings (here ranked by the RM; people would rank them)
align sample --model "$out/ppo" --prompts "$out/prompts.jsonl" --k 4 --judge "$out/rm" --out "$out/next-round" \
  text.max_new_tokens=8 limit=32
echo "reports: $out/sft/report.md $out/rm/report.md $out/ppo/report.md $out/next-round/report.md"
