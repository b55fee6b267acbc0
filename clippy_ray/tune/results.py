"""A sweep's results: one row per trial -> a table in the shape of the paper's Table 3 (a column
per axis, whatever the axes are), a bar plot, and results.md / results.json / results.png."""

from __future__ import annotations

import json
import math

from clippy_ray import config, storage
from clippy_ray.tune.config import SweepConfig

METRICS = (
    ("cls_top1", "cls top-1 (%)"),
    ("seg_miou", "seg mIoU (%)"),
    ("unsup_jaccard", "unsup Jaccard (%)"),
    ("robust_gap", "robust gap (pts)"),
)


def _num(v, digits: int = 1) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def markdown_table(sweep: SweepConfig, rows: list[dict]) -> str:
    axes = list(sweep.axes)
    head = axes + [name for _, name in METRICS] + ["val loss", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["setting"].get(a)) for a in axes] + [_num(r.get(k)) for k, _ in METRICS]
        cells += [_num(r.get("val_loss"), 3), r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def seed_axes(sweep: SweepConfig) -> list[str]:
    """The axes that only repeat a trial with another seed (train.seed, data.seed, ...)."""
    return [a for a in sweep.axes if a.rsplit(".", 1)[-1] == "seed"]


def over_seeds(sweep: SweepConfig, rows: list[dict]) -> str:
    """One line per setting of the other axes: each metric's mean over the finished seeds, then
    every seed's value in the order of the seed axis ("—" for a seed that did not finish), so the
    spread is in plain sight. Empty when the sweep has no seed axis."""
    seeds = seed_axes(sweep)
    if not seeds:
        return ""
    others = [a for a in sweep.axes if a not in seeds]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(str(r["setting"].get(a)) for a in others), []).append(r)
    head = others + ["seeds"] + [name for _, name in METRICS] + ["val loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, members in groups.items():
        done = [r for r in members if r["status"] == "finished"]
        cells = list(key) + [f"{len(done)} of {len(members)}"]
        for metric, digits in [(k, 1) for k, _ in METRICS] + [("val_loss", 3)]:
            per_seed = [r.get(metric) if r in done else None for r in members]  # None: not finished / no value
            values = [v for v in per_seed if v is not None and not (isinstance(v, float) and math.isnan(v))]
            cells.append(
                _num(sum(values) / len(values), digits) + " (" + " / ".join(_num(v, digits) for v in per_seed) + ")"
                if values
                else "—"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_t(a: list[float], b: list[float]) -> dict | None:
    """Student's paired t-test of a - b (the same seeds in both lists, in the same order): the mean
    difference, the differences' sample SD, t, degrees of freedom and the two-sided p. None for
    fewer than 2 pairs; t is +-inf (p 0) when every difference is the same non-zero number."""
    from scipy import stats

    if len(a) != len(b):
        raise ValueError(f"paired_t: {len(a)} values against {len(b)}; pair them seed by seed")
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    if n < 2:
        return None
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if sd == 0:
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
        p = 1.0 if mean == 0 else 0.0
    else:
        t = mean / (sd / math.sqrt(n))
        p = float(2 * stats.t.sf(abs(t), n - 1))
    return {"n": n, "mean_diff": mean, "sd": sd, "t": t, "dof": n - 1, "p": p, "diffs": diffs}


def paired_tests(sweep: SweepConfig, rows: list[dict]) -> str:
    """For every two settings of the other axes, each metric's paired difference over the seeds
    that finished in both (a paired t-test: the seeds share their data and data seed, so the
    difference is what the setting changes). Empty without a seed axis or with one setting."""
    seeds = seed_axes(sweep)
    others = [a for a in sweep.axes if a not in seeds]
    if not seeds:
        return ""
    groups: dict[tuple, dict[tuple, dict]] = {}
    for r in rows:
        if r["status"] == "finished":
            key = tuple(str(r["setting"].get(a)) for a in others)
            groups.setdefault(key, {})[tuple(str(r["setting"].get(a)) for a in seeds)] = r
    keys = list(groups)
    if len(keys) < 2:
        return ""
    name = " / ".join(others)
    head = ["A", "B", "metric", "seeds", "mean A - B", "per seed", "SD", "t", "p (two-sided)"]
    lines = [f"A and B: {name}.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, ka in enumerate(keys):
        for kb in keys[i + 1 :]:
            for metric, metric_name in METRICS:
                a, b = groups[ka], groups[kb]
                common = [s for s in a if s in b and a[s].get(metric) is not None and b[s].get(metric) is not None]
                test = paired_t([a[s][metric] for s in common], [b[s][metric] for s in common])
                if test is None:
                    continue
                cells = [
                    " / ".join(ka),
                    " / ".join(kb),
                    metric_name,
                    str(test["n"]),
                    f"{test['mean_diff']:+.1f}",
                    " / ".join(f"{d:+.1f}" for d in test["diffs"]),
                    f"{test['sd']:.1f}",
                    f"{test['t']:.2f}",
                    f"{test['p']:.3f}",
                ]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], title: str) -> bytes:
    """Grouped bars: one group per trial, one bar per metric."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 4), 4))
    width = 0.8 / len(METRICS)
    for i, (key, name) in enumerate(METRICS):
        values = [r.get(key) if r.get(key) is not None else 0.0 for r in rows]
        ax.bar([x + (i - (len(METRICS) - 1) / 2) * width for x in range(len(rows))], values, width, label=name)
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=20, ha="right")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("%  (gap: points)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never on them
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_results(sweep: SweepConfig, rows: list[dict]) -> None:
    root = storage.join(sweep.storage, sweep.name)
    md = (
        f"# Sweep `{sweep.name}`\n\nbase: `{sweep.base}`, overrides: `{' '.join(sweep.overrides) or '-'}`, "
        f"eval data: `{sweep.eval_data}`\n\n" + markdown_table(sweep, rows) + "\n![results](results.png)\n"
    )
    if seed_axes(sweep):
        md += (
            f"\n## Over seeds ({', '.join(seed_axes(sweep))})\n\nmean over the finished seeds "
            "(each seed's value)\n\n" + over_seeds(sweep, rows)
        )
        if tests := paired_tests(sweep, rows):
            md += "\n## Paired differences over seeds\n\n" + tests
    storage.write_bytes(storage.join(root, "results.md"), md.encode())
    storage.write_bytes(
        storage.join(root, "results.json"),
        json.dumps({"sweep": config.to_dict(sweep), "rows": rows}, indent=2, default=str).encode(),
    )
    storage.write_bytes(storage.join(root, "results.png"), plot(rows, f"sweep {sweep.name}"))
