"""The run's W&B run (offline unless configured): opened by training's rank 0, and resumed after
training by whoever logs more into it (a sweep's evaluation, the evaluations of the last
checkpoints). Evaluations of checkpoints (`eval.during_training`) are logged against their
checkpoint's step on W&B's `eval/step` axis, each once: `<run>/eval/logged.json` records which
were, and whether training's rank 0 has closed its run (after which the evaluation logs its own)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from clippy_ray import config, storage

LOGGED = "eval/logged.json"


def open_run(cfg: config.Config):
    """The W&B run of `cfg.train.run_name` (resumed if it exists), offline unless configured."""
    import wandb

    wcfg = cfg.train.wandb
    root = (
        storage.join(cfg.train.storage, cfg.train.run_name)
        if not storage.is_s3(cfg.train.storage)
        else str(storage.cache_dir() / "wandb" / cfg.train.run_name)  # copied to the run's storage: sync
    )
    os.makedirs(root, exist_ok=True)
    run_id = re.sub(r"[^A-Za-z0-9_-]", "-", cfg.train.run_name)[:64]
    run = wandb.init(
        project=wcfg.project,
        group=wcfg.group,
        name=cfg.train.run_name,
        id=run_id,
        resume="allow",
        mode=wcfg.mode,
        dir=root,
        config=config.to_dict(cfg),
        settings=wandb.Settings(console="off", silent=True),
    )  # metrics are logged; don't echo
    run.define_metric("eval/step")
    run.define_metric("eval/*", step_metric="eval/step")
    return run


def sync(run, cfg: config.Config) -> None:
    """With s3:// storage the W&B files are written on this node's disk, which an autoscaled node
    takes with it: copy them to `<storage>/<run>/wandb/` (at each checkpoint and at the end)."""
    if not storage.is_s3(cfg.train.storage):
        return
    local = Path(run.dir).parent  # wandb/<offline-run-...>/files -> the run's folder
    storage.upload(local, storage.join(cfg.train.storage, cfg.train.run_name, "wandb", local.name))


def _logged(cfg: config.Config) -> dict:
    path = storage.join(cfg.train.storage, cfg.train.run_name, LOGGED)
    return json.loads(storage.read_bytes(path)) if storage.exists(path) else {"steps": [], "closed": False}


def _new_evaluations(cfg: config.Config) -> tuple[dict, list[int], dict]:
    """(the curve's points, the steps not logged yet, the record of what was)."""
    curve = storage.join(cfg.train.storage, cfg.train.run_name, "eval", "curve.json")
    points = json.loads(storage.read_bytes(curve)) if storage.exists(curve) else {}
    record = _logged(cfg)
    return points, sorted(int(s) for s in points if int(s) not in record["steps"]), record


def log_evaluations(run, cfg: config.Config, closing: bool, after_training: bool = False) -> list[int]:
    """Log into `run` the evaluations in `<run>/eval/curve.json` not logged yet; `closing`: training's
    rank 0 is about to finish its run. Returns the steps logged now. After training (a resumed
    offline run starts its own step count again) each row goes at W&B step train.steps + its step,
    past every training row; the charts use `eval/step` either way."""
    points, new, record = _new_evaluations(cfg)
    for step in new:
        numbers = {"eval/step": step, **{f"eval/{k}": v for k, v in points[str(step)].items()}}
        run.log(numbers, step=cfg.train.steps + step if after_training else None)
    record = {"steps": sorted(record["steps"] + new), "closed": record["closed"] or closing}
    if new or closing:
        storage.write_bytes(storage.join(cfg.train.storage, cfg.train.run_name, LOGGED), json.dumps(record).encode())
    return new


def log_late_evaluations(cfg: config.Config) -> list[int]:
    """After training's rank 0 has closed its W&B run: resume it and log the evaluations that
    landed since (the last checkpoints'). Nothing while it is open (rank 0 logs them then)."""
    if cfg.train.wandb.mode == "disabled":
        return []
    _, new, record = _new_evaluations(cfg)
    if not record["closed"] or not new:
        return []
    run = open_run(cfg)
    try:
        return log_evaluations(run, cfg, closing=True, after_training=True)
    finally:
        run.finish()
        sync(run, cfg)
