"""Every number docs/results/grouping.md quotes, from what docs/results/grouping.sh ran: writes
docs/results/grouping/numbers.md and docs/results/grouping/curve.png. Run from the repository root
after the script's runs and evaluations (the script runs it last)."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from clippy_ray.eval.datasets import load_shard, open_eval_set
from clippy_ray.tune.results import _num as fmt  # the sweeps' own number format
from clippy_ray.tune.results import paired_t

SWEEPS = Path("runs/sweeps")
EVALS = Path("runs/grouping/eval")
DATA = "runs/grouping/data"
OUT = Path("docs/results/grouping")
AGGS = ("max", "avg", "cls")
SEEDS = (0, 1, 2, 3, 4)  # 0, 1: configs/grouping_curve.yaml; 2-4: configs/grouping_seeds.yaml
CURVE_SEEDS = (0, 1)
CURVE_STEPS = (100, 200, 300, 400, 500, 600)  # 500, 600: the runs resumed (grouping.sh step 11)
SUB_SEEDS = (2, 3)
RANDOM_SEEDS = (0, 1, 2)  # configs/grouping_random.yaml
RESOLUTIONS = (112, 224, 336)
EVAL_ROWS = 128

# (key, column name): the numbers taken from each evaluation's results.json
METRICS = (
    ("seg", "seg mIoU"),
    ("fg", "foreground mIoU"),
    ("bg", "background IoU"),
    ("thr", "seg mIoU, threshold background"),
    ("unsup", "unsup Jaccard"),
    ("cls", "cls top-1"),
)


def flat(path: Path) -> dict[str, float] | None:
    """The page's numbers from one results.json (None when the evaluation is missing)."""
    if not path.is_file():
        return None
    r = json.loads(path.read_text())["results"]
    out: dict[str, float] = {}
    if "seg" in r:
        seg = r["seg"]
        out |= {"seg": seg["miou"], "fg": seg["foreground_miou"], "bg": seg["background_iou"]}
        out["thr"] = seg["other_mode"]["miou"]
        out["floor"] = seg["floor_largest_object"]["miou"]
        out["floor_fg"] = seg["floor_largest_object"]["foreground_miou"]
    if "unsup" in r:
        out["unsup"] = r["unsup"]["jaccard"]
    if "cls" in r:
        out["cls"] = r["cls"]["top1"]
    return out


def curve_eval(seed: int, agg: str, step: int) -> Path:
    return SWEEPS / f"grouping-curve/runs/seed{seed}_{agg}/eval/step_{step:08d}/results.json"


def at_200(seed: int, agg: str) -> dict | None:
    """Experiment 1's model: step 200 of seed `seed` (seeds 0, 1 from the curve runs)."""
    if seed in CURVE_SEEDS:
        return flat(curve_eval(seed, agg, 200))
    return flat(SWEEPS / f"grouping-seeds/eval/seed{seed}_{agg}/results.json")


def reports(sweep: str, label: str) -> list[dict]:
    """Every report Tune kept for one trial (its result.json lines), in order."""
    index = SWEEPS / sweep / "results.json"
    rows = json.loads(index.read_text())["rows"] if index.is_file() else []
    row = next((r for r in rows if r["label"] == label), None)
    if row is None or not row.get("path"):
        return []
    path = Path(row["path"]) / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def at_step(sweep: str, label: str, step: int, key: str) -> float | None:
    """A trial's reported number at a step: from Tune's reports, else (the steps a resumed run added
    outside Tune) from that step's checkpoint's train_state.json."""
    for rep in reports(sweep, label):
        if rep.get("step") == step and rep.get(key) is not None:
            return rep[key]
    state = SWEEPS / sweep / "runs" / label / f"step_{step:08d}/train_state.json"
    return json.loads(state.read_text()).get(key) if state.is_file() else None


def slope(steps: tuple[int, ...], values: list[float | None]) -> float:
    """Least-squares change per 100 steps over the points present (nan below two)."""
    got = [(x, y) for x, y in zip(steps, values) if y is not None]
    if len(got) < 2:
        return math.nan
    return 100 * statistics.linear_regression([x for x, _ in got], [y for _, y in got]).slope


def median_speed(sweep: str, label: str) -> float | None:
    """The trial's median images/s over its log windows (the first window holds the start-up)."""
    speeds = [rep["images_per_s"] for rep in reports(sweep, label) if rep.get("images_per_s")][1:]
    return statistics.median(speeds) if speeds else None


def spread(values: list[float | None], digits: int = 1) -> str:
    """mean ± SD (each value), over the values present."""
    got = [v for v in values if v is not None]
    if not got:
        return "—"
    sd = f" ± {statistics.stdev(got):.{digits}f}" if len(got) > 1 else ""
    return f"{statistics.mean(got):.{digits}f}{sd} ({' / '.join(fmt(v, digits) for v in values)})"


def test_cells(a: list[float | None], b: list[float | None]) -> list[str]:
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    t = paired_t([x for x, _ in pairs], [y for _, y in pairs])
    if t is None:
        return [str(len(pairs)), "—", "—", "—", "—"]
    return [
        str(t["n"]),
        f"{t['mean_diff']:+.1f}",
        " / ".join(f"{d:+.1f}" for d in t["diffs"]),
        f"{t['t']:.2f}",
        "< 0.001" if t["p"] < 0.001 else f"{t['p']:.3f}",
    ]


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def data_floors() -> tuple[float, float, float]:
    """From the evaluated rows, read once: zero-shot classification's chance (a row hits when its
    guess is any of the shapes it shows, so chance is the mean share of the foreground classes a
    row shows), and the seg mIoU and background IoU of painting every pixel background (at the
    rows' stored size: what a model that finds no object scores)."""
    import numpy as np

    from clippy_ray.eval import metrics

    data = open_eval_set(DATA, "auto", rows_per_shard=32, max_rows=EVAL_ROWS)
    n = len(data.class_names)
    n_fg = n - (1 if data.has_background else 0)
    shares, conf = [], np.zeros((n, n), np.int64)
    for shard in data.splits["eval"]:
        for s in load_shard(shard, data.has_background):
            shares.append(len({label for label in s.labels if not (data.has_background and label == 0)}) / n_fg)
            conf += metrics.confusion(np.zeros(s.mask.shape, np.int64), s.mask, n)
    chance = 100 * sum(shares) / len(shares)
    return chance, 100 * metrics.mean_iou(conf), 100 * float(metrics.iou_per_class(conf)[0])


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    md: list[str] = [
        "# The numbers of grouping.md",
        "",
        "Written by `docs/results/grouping_numbers.py` (the last step of `docs/results/grouping.sh`) from the",
        f"runs under `runs/`. Every evaluation: the first {EVAL_ROWS} evaluation images at 224 px unless a",
        "table says otherwise; all numbers in %, differences in points.",
        "",
    ]

    # ---------------------------------------------------------------- floors and chance
    chance, bg_miou, bg_iou = data_floors()
    first = next(v for s in SEEDS for a in AGGS if (v := at_200(s, a)))
    pairs = next(int(r["val_pairs"]) for r in reports("grouping-curve", "seed0_max") if r.get("val_pairs"))
    md += [
        "## Floors and chance",
        "",
        f"- cls top-1 chance (a guess hits any shape the image shows): {chance:.1f}",
        f"- every pixel the image's largest object's class (from the truth): seg mIoU {fmt(first['floor'])}, "
        f"foreground mIoU {fmt(first['floor_fg'])}, background IoU 0.0",
        f"- every pixel background: seg mIoU {fmt(bg_miou)}, background IoU {fmt(bg_iou)} "
        "(the background's share of the pixels), foreground 0.0",
        f"- validation loss at chance: ln {pairs} = {math.log(pairs):.2f} (validation scores {pairs} pairs at once)",
        "",
        "The step-0 models (the pretrained towers, fresh projections from train.seed 0, no training):",
        "",
    ]
    md += table(
        ["aggregation"] + [name for _, name in METRICS],
        [[a] + [fmt((flat(EVALS / f"step0_{a}/results.json") or {}).get(k)) for k, _ in METRICS] for a in AGGS],
    )

    md += [
        "",
        "Trained (step 200, the 5 seeds of section 1) against the step-0 model of the same aggregation "
        "(a one-sample t of the differences):",
        "",
    ]
    rows = []
    for a in AGGS:
        zero = flat(EVALS / f"step0_{a}/results.json") or {}
        for k, name in (("seg", "seg mIoU"), ("unsup", "unsup Jaccard")):
            trained = [(m or {}).get(k) for m in (at_200(s, a) for s in SEEDS)]
            got = [v for v in trained if v is not None]
            base = zero.get(k)
            rows.append([a, name] + (test_cells(got, [base] * len(got)) if base is not None else ["—"] * 5))
    md += table(["aggregation", "metric", "seeds", "mean trained - step 0", "per seed", "t", "p"], rows)

    # ---------------------------------------------------------------- experiment 1
    md += ["", "## 1. Aggregation, 5 seeds, step 200", "", "mean ± SD over the seeds (seeds 0 / 1 / 2 / 3 / 4)", ""]
    per = {a: [at_200(s, a) for s in SEEDS] for a in AGGS}
    val = {
        a: [
            at_step("grouping-curve" if s in CURVE_SEEDS else "grouping-seeds", f"seed{s}_{a}", 200, "val_loss")
            for s in SEEDS
        ]
        for a in AGGS
    }
    rows = []
    for a in AGGS:
        rows.append([a] + [spread([(m or {}).get(k) for m in per[a]]) for k, _ in METRICS] + [spread(val[a], 3)])
    md += table(["aggregation"] + [name for _, name in METRICS] + ["val loss"], rows)
    md += ["", "Paired differences (the same seed's two models; Student's paired t, two-sided):", ""]
    rows = []
    for x, y in (("max", "avg"), ("max", "cls"), ("cls", "avg")):
        for k, name in METRICS:
            rows.append(
                [f"{x} - {y}", name]
                + test_cells([(m or {}).get(k) for m in per[x]], [(m or {}).get(k) for m in per[y]])
            )
    md += table(["pair", "metric", "seeds", "mean diff", "per seed", "t", "p"], rows)

    # ---------------------------------------------------------------- experiment 2
    md += ["", "## 2. The training curve (seeds 0 / 1)", ""]
    curve = {(a, s, st): flat(curve_eval(s, a, st)) for a in AGGS for s in CURVE_SEEDS for st in CURVE_STEPS}
    rows = []
    for a in AGGS:
        for st in CURVE_STEPS:
            ms = [curve[a, s, st] for s in CURVE_SEEDS]
            vl = [at_step("grouping-curve", f"seed{s}_{a}", st, "val_loss") for s in CURVE_SEEDS]
            rows.append(
                [a, str(st)]
                + [" / ".join(fmt((m or {}).get(k)) for m in ms) for k in ("seg", "fg", "thr", "unsup", "cls")]
                + [" / ".join(fmt(v, 3) for v in vl)]
            )
    md += table(
        [
            "aggregation",
            "step",
            "seg mIoU",
            "foreground mIoU",
            "threshold mIoU",
            "unsup Jaccard",
            "cls top-1",
            "val loss",
        ],
        rows,
    )
    md += ["", f"Change from step {CURVE_STEPS[0]} to step {CURVE_STEPS[-1]} (seed 0 / seed 1):", ""]
    rows = []
    for a in AGGS:
        cells = [a]
        for k in ("seg", "unsup", "cls"):
            d = [
                (curve[a, s, CURVE_STEPS[-1]] or {}).get(k, math.nan)
                - (curve[a, s, CURVE_STEPS[0]] or {}).get(k, math.nan)
                for s in CURVE_SEEDS
            ]
            cells.append(" / ".join(f"{v:+.1f}" for v in d))
        rows.append(cells)
    md += table(["aggregation", "seg mIoU", "unsup Jaccard", "cls top-1"], rows)
    md += [
        "",
        f"Least-squares slope over the {len(CURVE_STEPS)} checkpoints, points per 100 steps (seed 0 / seed 1):",
        "",
    ]
    rows = []
    for a in AGGS:
        cells = [a]
        for k in ("seg", "unsup", "cls"):
            fits = [slope(CURVE_STEPS, [(curve[a, s, st] or {}).get(k) for st in CURVE_STEPS]) for s in CURVE_SEEDS]
            cells.append(" / ".join(f"{v:+.2f}" for v in fits))
        rows.append(cells)
    md += table(["aggregation", "seg mIoU", "unsup Jaccard", "cls top-1"], rows)
    plot_curve(curve, first["floor"])
    md += ["", "![curve](curve.png)"]

    # ---------------------------------------------------------------- experiment 3
    md += [
        "",
        "## 3. Token sub-sampling at equal compute, by evaluation resolution (max pooling, seeds 2 / 3)",
        "",
        "keep 0.5: 200 steps (configs/grouping_seeds.yaml's max runs); "
        "off: 150 steps (configs/grouping_subsampling.yaml, the issue's 1.3x) and 115 steps "
        "(configs/grouping_equal_compute.yaml, the measured speed ratio)",
        "",
    ]
    # (name, steps, sweep, trial label, the folder name of its 112 / 336 px evaluations)
    variants = (
        ("0.5", 200, "grouping-seeds", "seed{}_max", "seed{}_sub0.5"),
        ("off", 150, "grouping-subsampling", "seed{}_sub-off", "seed{}_sub-off"),
        ("off", 115, "grouping-equal-compute", "seed{}_sub-off", "seed{}_sub-off-115"),
    )

    def sub_eval(variant: tuple, seed: int, res: int) -> dict | None:
        _, _, sweep, label, folder = variant
        if res == 224:
            return flat(SWEEPS / sweep / "eval" / label.format(seed) / "results.json")
        return flat(EVALS / f"res{res}" / folder.format(seed) / "results.json")

    def metric_at(variant: tuple, res: int, key: str = "seg") -> list[float | None]:
        return [(sub_eval(variant, s, res) or {}).get(key) for s in SUB_SEEDS]

    rows = []
    for v in variants:
        keep, steps, sweep, label, _ = v
        speeds = [median_speed(sweep, label.format(s)) for s in SUB_SEEDS]
        for res in RESOLUTIONS:
            rows.append(
                [keep, str(steps), " / ".join(fmt(x) for x in speeds), str(res)]
                + [" / ".join(fmt(x) for x in metric_at(v, res, k)) for k in ("seg", "fg", "unsup")]
            )
    md += table(
        ["keep", "steps", "images/s (median)", "resolution", "seg mIoU", "foreground mIoU", "unsup Jaccard"], rows
    )
    sub, *offs = variants
    for off in offs:
        md += ["", f"keep 0.5 (200 steps) - off ({off[1]} steps), paired by seed:", ""]
        rows = []
        for res in RESOLUTIONS:
            for k, name in (("seg", "seg mIoU"), ("unsup", "unsup Jaccard")):
                rows.append([str(res), name] + test_cells(metric_at(sub, res, k), metric_at(off, res, k)))
        md += table(["resolution", "metric", "seeds", "mean diff", "per seed", "t", "p"], rows)
    md += [
        "",
        "Change of seg mIoU from the training resolution (112 px) to 2x and 3x of it (seed 2 / seed 3), and "
        "whether sub-sampling changes it (keep 0.5's change - off's, paired by seed; positive: sub-sampling "
        "loses less):",
        "",
    ]
    rows = []
    change = {}
    for v in variants:
        for res in (224, 336):
            d = [
                x - y if x is not None and y is not None else None for x, y in zip(metric_at(v, res), metric_at(v, 112))
            ]
            change[v[1], res] = d
            per_seed = " / ".join("—" if x is None else f"{x:+.1f}" for x in d)
            rows.append([f"{v[0]} ({v[1]} steps)", f"112 -> {res}", per_seed, "", "", ""])
    for off in offs:
        for res in (224, 336):
            cells = test_cells(change[sub[1], res], change[off[1], res])
            rows.append([f"0.5 - off ({off[1]} steps)", f"112 -> {res}", cells[2], cells[1], cells[3], cells[4]])
    md += table(["keep", "resolution", "per seed", "mean", "t", "p"], rows)

    # ---------------------------------------------------------------- pretraining
    md += [
        "",
        "## Pretraining: the image tower from random weights (max pooling, step 200)",
        "",
        "random: configs/grouping_random.yaml (every block trained); DINOv2: section 1's max runs, the same "
        f"seeds ({' / '.join(map(str, RANDOM_SEEDS))})",
        "",
    ]
    rand = [flat(SWEEPS / f"grouping-random/eval/seed{s}_image-random/results.json") for s in RANDOM_SEEDS]
    pre = [at_200(s, "max") for s in RANDOM_SEEDS]
    md += table(
        ["image tower"] + [name for _, name in METRICS],
        [
            [name] + [spread([(m or {}).get(k) for m in ms]) for k, _ in METRICS]
            for name, ms in (("DINOv2", pre), ("random", rand))
        ],
    )
    # training speed without an evaluation beside it: the seeds sweep's max runs for DINOv2
    fast = [median_speed("grouping-seeds", f"seed{s}_max") for s in SEEDS if s not in CURVE_SEEDS]
    slow = [median_speed("grouping-random", f"seed{s}_image-random") for s in RANDOM_SEEDS]
    md += [
        "",
        f"Training speed (median images/s): DINOv2 with 10 blocks frozen {spread(fast)} (section 1's seeds 2-4); "
        f"random, every block trained {spread(slow)}",
    ]
    md += ["", "DINOv2 - random, paired by seed:", ""]
    rows = []
    for k, name in METRICS:
        rows.append([name] + test_cells([(m or {}).get(k) for m in pre], [(m or {}).get(k) for m in rand]))
    md += table(["metric", "seeds", "mean diff", "per seed", "t", "p"], rows)

    # ---------------------------------------------------------------- experiment 4
    md += ["", "## 4. The fairness fixes (max pooling, seed 0, step 200)", ""]
    fixed, old = flat(curve_eval(0, "max", 200)), flat(EVALS / "unfair_seed0_max/results.json")
    md += table(
        ["crops / position grid"] + [name for _, name in METRICS],
        [
            ["min_crop_scale 1.0, DINOv2's 37x37 grid (the experiments)"]
            + [fmt((fixed or {}).get(k)) for k, _ in METRICS],
            ["min_crop_scale 0.5, grid resampled to 8x8 at load (before)"]
            + [fmt((old or {}).get(k)) for k, _ in METRICS],
        ],
    )

    (OUT / "numbers.md").write_text("\n".join(md) + "\n")
    print(f"wrote {OUT / 'numbers.md'}", file=sys.stderr)


def plot_curve(curve: dict, floor: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    colors = {"max": "tab:blue", "avg": "tab:orange", "cls": "tab:green"}
    for ax, (key, name) in zip(
        axes, (("seg", "seg mIoU (%)"), ("unsup", "unsup Jaccard (%)"), ("cls", "cls top-1 (%)"))
    ):
        for a in AGGS:
            for s, style in zip(CURVE_SEEDS, ("-", "--")):
                ys = [(curve[a, s, st] or {}).get(key, math.nan) for st in CURVE_STEPS]
                ax.plot(CURVE_STEPS, ys, style, color=colors[a], marker="o", label=f"{a} seed {s}")
        if key == "seg":
            ax.axhline(floor, color="grey", linestyle=":", label="largest-object floor")
        ax.set_xlabel("step (32 pairs each)")
        ax.set_title(name)
        ax.set_xticks(CURVE_STEPS)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(OUT / "curve.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
