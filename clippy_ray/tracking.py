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


def _read(cfg: config.Config, name: str, default: dict) -> dict:
    try:
        return json.loads(storage.read_bytes(storage.join(cfg.train.storage, cfg.train.run_name, name)))
    except storage.StorageError:  # not written yet
        return default


def _record(cfg: config.Config, record: dict) -> None:
    storage.write_bytes(storage.join(cfg.train.storage, cfg.train.run_name, LOGGED), json.dumps(record).encode())


def log_evaluations(run, cfg: config.Config, step: int | None = None, limit: int | None = None) -> list[int]:
    """Log into `run` the evaluations in `<run>/eval/curve.json` not logged yet (at most `limit`);
    returns their steps. During training (`step`: training's current row) they go into that row
    (commit=False: training's own log commits it), so W&B's step count never runs ahead of
    training's; after training each goes at W&B step train.steps + its step, past every training
    row (a resumed offline run counts its steps afresh). The charts use `eval/step` either way."""
    points = _read(cfg, "eval/curve.json", {})
    record = _read(cfg, LOGGED, {"steps": [], "closed": False})
    new = sorted(int(s) for s in points if int(s) not in record["steps"])[:limit]
    for at in new:
        numbers = {"eval/step": at, **{f"eval/{k}": v for k, v in points[str(at)].items()}}
        if step is None:
            run.log(numbers, step=cfg.train.steps + at)
        else:
            run.log(numbers, step=step, commit=False)
    if new:
        _record(cfg, {**record, "steps": sorted(record["steps"] + new)})
    return new


def close_training_run(run, cfg: config.Config) -> list[int]:
    """Training's rank 0, before it finishes its W&B run: mark it closed first (an evaluation that
    lands from then on logs itself), then log those that have landed."""
    _record(cfg, {**_read(cfg, LOGGED, {"steps": []}), "closed": True})
    return log_evaluations(run, cfg)


def log_late_evaluations(cfg: config.Config) -> list[int]:
    """After training's rank 0 has closed its W&B run: resume it and log the evaluations that
    landed since (the last checkpoints'). Nothing while it is open (rank 0 logs them then)."""
    if cfg.train.wandb.mode == "disabled":
        return []
    record = _read(cfg, LOGGED, {"steps": [], "closed": False})
    points = _read(cfg, "eval/curve.json", {})
    if not record["closed"] or not {int(s) for s in points} - set(record["steps"]):
        return []
    run = open_run(cfg)
    try:
        return log_evaluations(run, cfg)
    finally:
        run.finish()
        sync(run, cfg)
