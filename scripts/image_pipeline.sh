#!/usr/bin/env bash
# The image recipe from the command line — reward model on ranked samples -> DDPO against it ->
# plain vs engineered comparison -> the next round's candidates — on the tiny CPU preset, with an
# offline example written to runs/image-example/ (a small text-to-image model trained here, K = 4 of
# its samples per prompt ranked by the image world's noisy gold labeler; scripts/make_image_example.py).
# ~2 min on a 2-core Xeon (5.4 min on the earlier EPYC; README).
# Each stage writes config.yaml, checkpoints/, metrics.jsonl, tb/, curves.png and report.md; DDPO
# also sample grids in grids/ (before training, every grid_every epochs and at the end).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup.sh"
venv=${ALIGN_VENV:-$HOME/.cache/align/venv}
export OMP_WAIT_POLICY=PASSIVE PATH="$venv/bin:$PATH"
out=${1:-runs/image-example}
rm -rf "$out"
python "$root/scripts/make_image_example.py" "$out"
cfg="$root/configs/image/tiny.yaml"
align image rm   --config "$cfg" --clip tiny-clip --data "$out/prefs.jsonl" --out "$out/rm"
# DDPO at the image world's measured settings (image_rlhf/demo.py: 6 DDIM steps, guidance 3, LoRA r=8
# at lr 1e-2, the 4 noisiest steps), logging the gold judge as a monitor it never trains on
align image ddpo --config "$cfg" --pipeline "$out/base" --reward "$out/rm" --prompts "$out/prompts.txt" \
                 --out "$out/ddpo" num_steps=6 guidance_scale=3 lora.r=8 lora.alpha=8 lr=1e-2 clip_range=1e-3 \
                 min_std_dev=0.05 timestep_fraction=0.5 monitor=image_rlhf.world:gold_score log_kl=true
# plain vs engineered prompts, base vs aligned, judged by the gold judge (never trained on)
align compare --model base="$out/base" --model aligned="$out/ddpo" --prompts "$out/compare.jsonl" \
              --judge image_rlhf.world:gold_score --num-steps 6 image.guidance_scale=3 success_threshold=0.8 \
              --seeds 0,1,2,3 \
              --out "$out/compare"
# the next round: K = 4 samples per prompt of the aligned pipeline, for new rankings (here pre-ranked by the RM)
align sample --model "$out/ddpo" --prompts "$out/prompts.txt" --k 4 --judge "$out/rm" --out "$out/next-round" \
             image.num_steps=6 image.guidance_scale=3 limit=8
echo "reports: $out/rm/report.md $out/ddpo/report.md $out/compare/compare.md $out/next-round/report.md"
