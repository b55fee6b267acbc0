"""What evaluating each checkpoint beside training costs the training: the same run with and
without `eval.during_training`, interleaved, its images/s per log window (the first, which holds
the start-up, left out), and the time from each checkpoint landing on disk to its results."""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

from clippy_ray import config


def images_per_s(result) -> float:
    """The run's mean images/s over its log windows after the first."""
    frame = result.metrics_dataframe
    rates = frame["images_per_s"].dropna().tolist() if "images_per_s" in frame else []
    return statistics.mean(rates[1:] or rates)


def result_delays(run: Path) -> list[float]:
    """Seconds from each checkpoint's train_state.json on disk to its evaluation's results.json."""
    delays = []
    for results in sorted(run.glob("eval/step_*/results.json")):
        state = run / results.parent.name / "train_state.json"
        if state.exists():
            delays.append(results.stat().st_mtime - state.stat().st_mtime)
    return delays


def run_once(cfg: config.Config, storage: str, name: str, evaluate: bool, eval_data: str):
    from clippy_ray.train.trainer import fit

    cfg = config.from_dict(config.to_dict(cfg))
    cfg.train.storage, cfg.train.run_name = storage, name
    cfg.eval.during_training.data = eval_data if evaluate else None
    return fit(cfg)


def measure(cfg: config.Config, eval_data: str, reps: int, log=print) -> dict:
    """`reps` pairs of runs (with and without), each pair in alternating order."""
    rates: dict[str, list[float]] = {"off": [], "on": []}
    delays: list[float] = []
    with tempfile.TemporaryDirectory(prefix="clippy-ray-bench-") as tmp:
        for rep in range(reps):
            for mode in ("off", "on") if rep % 2 == 0 else ("on", "off"):
                name = f"{mode}-{rep}"
                result = run_once(cfg, tmp, name, mode == "on", eval_data)
                rates[mode].append(images_per_s(result))
                if mode == "on":
                    delays += result_delays(Path(tmp) / name)
                log(f"rep {rep + 1}/{reps} eval {mode}: {rates[mode][-1]:.1f} images/s")
    ratios = [on / off for on, off in zip(rates["on"], rates["off"])]
    return {"images_per_s": rates, "ratio": ratios, "results_after_s": delays, "cpus": os.cpu_count()}
