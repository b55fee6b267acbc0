"""What a checkpoint records besides its tensors (`train_state.json`), and which checkpoint a run
goes on from. The driver's dataset factory and the workers both read it here, so the stream a
restarted run reads and the state its workers restore come from the same record."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from clippy_ray import config, storage
from clippy_ray.data.plan import TrainedRows, epoch_of
from clippy_ray.errors import InputError

STATE_FILE = "train_state.json"
# train.record_batches: int64 [rows, 3] of (step, rank, data position), the rows each step since the
# previous checkpoint trained on, in training order (numpy's format, read with allow_pickle=False)
BATCHES_FILE = "data/batches.npy"


@dataclass
class TrainState:
    """The progress a checkpoint records. `rows`: exactly which data positions were trained on (or
    skipped as bad) over all epochs (`clippy_ray.data.plan.TrainedRows`); `data_position`: every
    row below it is among them."""

    step: int = 0  # optimizer steps done
    rows: TrainedRows = field(default_factory=TrainedRows)

    @property
    def data_position(self) -> int:
        return self.rows.low

    def epoch(self, rows_per_epoch: int) -> int:
        return epoch_of(self.rows.low, rows_per_epoch)

    def to_dict(self, rows_per_epoch: int) -> dict:
        return {
            "step": self.step,
            "data_position": self.data_position,
            "epoch": self.epoch(rows_per_epoch),
            "rows_consumed": self.rows.count,
            "rows": self.rows.to_dict(),
        }

    @classmethod
    def from_dict(cls, saved: dict | None) -> TrainState:
        """From a checkpoint's train_state.json; one written before the exact record holds only the
        position its stream had reached."""
        saved = saved or {}
        rows = TrainedRows.from_dict(saved["rows"]) if "rows" in saved else TrainedRows(saved.get("data_position", 0))
        return cls(int(saved.get("step", 0)), rows)


def checkpoint_uri(cfg: config.Config, checkpoint) -> str | None:
    """The URI of a Ray Checkpoint (or None): with an S3 filesystem Ray reports bucket/prefix only."""
    if checkpoint is None:
        return None
    return f"s3://{checkpoint.path}" if storage.is_s3(cfg.train.storage) else checkpoint.path


def read_train_state(uri: str) -> dict | None:
    """A checkpoint's train_state.json (None where it cannot be read)."""
    try:
        return json.loads(storage.read_bytes(storage.join(uri, STATE_FILE)))
    except (OSError, ValueError, storage.StorageError):
        return None


def saved_precision(train_state: dict | None) -> str | None:
    """The precision (bf16 / fp32) a checkpoint was trained in, from its train_state.json; None for
    a checkpoint that does not record it."""
    saved = (train_state or {}).get("precision")
    return saved if saved in ("bf16", "fp32") else None


def latest_checkpoint(cfg: config.Config) -> str | None:
    """The run's last registered checkpoint: the one Ray Train hands the workers of its next
    attempt (ray.train.get_checkpoint()), read through Ray's public Result API; None before the
    first. In the dataset factory this is the checkpoint the workers are about to restore: Ray
    calls the factory at each start of the worker group, before it hands them the checkpoint and
    with no report registered in between."""
    from ray.train import Result
    from ray.train.v2.api.exceptions import RayTrainError

    path, fs = storage.ray_storage(cfg.train.storage)
    run = f"{path.rstrip('/')}/{cfg.train.run_name}"
    # reading it, Ray's checkpoint manager announces at INFO that it found the snapshot, on stderr
    # when this runs on the driver before Ray's logging is routed to the run's log file
    quiet = logging.getLogger("ray.train")
    level = quiet.level
    quiet.setLevel(max(level, logging.WARNING))
    try:
        result = Result.from_path(run, storage_filesystem=fs)
    except RuntimeError:  # no run folder, or no checkpoint registered yet
        return None
    except RayTrainError as err:  # its record names a checkpoint folder that is gone
        raise InputError(
            f"{storage.join(cfg.train.storage, cfg.train.run_name)}: Ray's record of the run's checkpoints cannot be "
            f"read ({str(err).strip().splitlines()[0]}); put the missing checkpoint folders back, or start afresh "
            "with another train.run_name"
        ) from None
    finally:
        quiet.setLevel(level)
    return checkpoint_uri(cfg, result.checkpoint)


def resume_source(cfg: config.Config, init_from: str | None = None, init_mode: str = "weights") -> str | None:
    """The checkpoint whose full state the next attempt restores: the run's latest, else the
    `--from` checkpoint in full mode, else None (a new run)."""
    latest = latest_checkpoint(cfg)
    if latest:
        return latest
    return init_from if init_from and init_mode == "full" else None


def require_train_state(uri: str) -> dict:
    saved = read_train_state(uri)
    if saved is None:
        raise InputError(
            f"{uri}/{STATE_FILE}: cannot be read; it records the step and the rows trained, without which the "
            "run cannot go on from this checkpoint (check that it is complete and readable)"
        )
    return saved
