"""What a person follows, made on rank 0: one event per log step (step, loss, images/s, ETA), one
per validation, a start and an end; the driver's console shows them (`clippy_ray.console`). The
same metrics go to W&B on world rank 0 only (offline unless configured otherwise)."""

from __future__ import annotations

import time
from collections.abc import Callable

from clippy_ray import config, tracking


def duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


_STEP_FIELDS = (
    ("loss", "loss {:.4f}"),
    ("temperature", "temp {:.4f}"),
    ("lr", "lr {:.2e}"),
    ("images_per_s", "{:.1f} img/s"),
    ("data_wait_frac", "data wait {:.0%}"),
    ("rows_skipped", "skipped {:.0f}"),
)


class Progress:
    """Rank 0's events; every other rank's calls are no-ops. `emit` sends one event dict
    ({kind, text, step, total, status}) to whoever shows it."""

    def __init__(self, cfg: config.Config, enabled: bool, emit: Callable[[dict], None], start_step: int = 0):
        self.cfg = cfg
        self.enabled = enabled
        self.emit = emit
        self.total = cfg.train.steps
        self.start_step = start_step
        self.started = time.perf_counter()
        self.window_start = self.started
        self.window_images = 0
        self.window_wait = 0.0
        self.wandb = tracking.open_run(cfg) if enabled and cfg.train.wandb.mode != "disabled" else None

    def _send(self, kind: str, text: str, step: int, status: str = "") -> None:
        if self.enabled:
            self.emit({"kind": kind, "text": text, "step": step, "total": self.total, "status": status})

    def start(self, device: str, precision_reason: str, resumed: str = "", resized: str = "") -> None:
        """The run's first lines: `resumed` says what the attempt restored (empty for a new run),
        `resized` how it changed to another number of workers (empty if it did not)."""
        t = self.cfg.train
        self._send(
            "start",
            f"run {t.run_name}: {self.total} steps of {t.global_batch_size} pairs on {t.num_workers} "
            f"{device} worker(s), ZeRO-{t.zero_stage}" + (f", {resumed}" if resumed else ""),
            self.start_step,
        )
        if resized:
            self._send("start", resized, self.start_step)
        self._send(
            "start",
            f"precision {t.precision} ({precision_reason}); loss matmul {self.cfg.loss.matmul_dtype}, softmax float32",
            self.start_step,
        )

    def checkpoint(self, step: int, why: str = "") -> None:
        self._send("checkpoint", f"step {step}/{self.total} checkpoint saved" + (f" ({why})" if why else ""), step)
        self.sync_wandb()

    def data_problem(self, step: int, text: str) -> None:
        """A shard that could not be read (wholly or to its end): its samples are skipped, counted."""
        self._send(
            "data", f"step {step}/{self.total}: {text} (the samples it did not give are skipped and counted)", step
        )

    def data_wait(self, seconds: float) -> None:
        self.window_wait += seconds

    def step_done(self, images: int) -> None:
        self.window_images += images

    def rates(self) -> dict[str, float]:
        """images/s and the fraction of time spent waiting for data since the last call."""
        now = time.perf_counter()
        elapsed = max(now - self.window_start, 1e-9)
        out = {"images_per_s": self.window_images / elapsed, "data_wait_frac": min(1.0, self.window_wait / elapsed)}
        self.window_start, self.window_images, self.window_wait = now, 0, 0.0
        return out

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        done = step - self.start_step
        eta = (time.perf_counter() - self.started) / max(done, 1) * (self.total - step)
        fields = [fmt.format(metrics[key]) for key, fmt in _STEP_FIELDS if key in metrics]
        if "loss" in metrics:
            self._send(
                "step",
                " | ".join([f"step {step}/{self.total}", *fields, f"ETA {duration(eta)}"]),
                step,
                status=" | ".join(fields[:1] + fields[3:4]),
            )
        if "val_loss" in metrics:
            self._send(
                "val",
                f"step {step}/{self.total} validation: loss {metrics['val_loss']:.4f}, retrieval "
                f"top-1 image->text {metrics.get('val_i2t_top1', float('nan')):.3f} / text->image "
                f"{metrics.get('val_t2i_top1', float('nan')):.3f} over "
                f"{metrics.get('val_pairs', 0):.0f} pairs",
                step,
            )
        if self.wandb is not None:
            if self.cfg.eval.during_training.data:  # a checkpoint's evaluation that has landed, if any
                tracking.log_evaluations(self.wandb, self.cfg, step=step, limit=1)
            self.wandb.log(metrics, step=step)

    def sync_wandb(self) -> None:
        if self.wandb is not None:
            tracking.sync(self.wandb, self.cfg)

    def finish(self) -> None:
        self._send("done", f"training done in {duration(time.perf_counter() - self.started)}", self.total)
        if self.wandb is not None:
            if self.cfg.eval.during_training.data:  # what landed; later ones the evaluation logs itself
                tracking.close_training_run(self.wandb, self.cfg)
            self.wandb.finish()
            self.sync_wandb()
