"""What a person follows: one line per log step on rank 0 (step, loss, images/s, ETA), and the
same metrics to W&B on world rank 0 only (offline unless configured otherwise)."""

from __future__ import annotations

import os
import re
import time

from clippy_ray import config, storage


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def open_wandb(cfg: config.Config):
    """The W&B run of `cfg.train.run_name` (resumed if it exists), offline unless configured."""
    import wandb

    wcfg = cfg.train.wandb
    root = (storage.join(cfg.train.storage, cfg.train.run_name)
            if not storage.is_s3(cfg.train.storage) else str(storage.cache_dir() / "wandb"))
    os.makedirs(root, exist_ok=True)
    run_id = re.sub(r"[^A-Za-z0-9_-]", "-", cfg.train.run_name)[:64]
    return wandb.init(project=wcfg.project, group=wcfg.group, name=cfg.train.run_name, id=run_id,
                      resume="allow", mode=wcfg.mode, dir=root, config=config.to_dict(cfg),
                      settings=wandb.Settings(console="off"))  # metrics are logged; don't echo stdout


class Progress:
    def __init__(self, cfg: config.Config, enabled: bool, start_step: int = 0):
        self.cfg = cfg
        self.enabled = enabled
        self.total = cfg.train.steps
        self.start_step = start_step
        self.started = time.perf_counter()
        self.window_start = self.started
        self.window_images = 0
        self.window_wait = 0.0
        self.wandb = open_wandb(cfg) if enabled and cfg.train.wandb.mode != "disabled" else None
        if enabled:
            resumed = f", resuming at step {start_step}" if start_step else ""
            print(f"[clippy-ray] run {cfg.train.run_name}: {self.total} steps, global batch "
                  f"{cfg.train.global_batch_size}, {cfg.train.num_workers} workers, ZeRO-{cfg.train.zero_stage} "
                  f"{cfg.train.precision}{resumed}", flush=True)

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
        parts = [f"step {step}/{self.total}"]
        for key, fmt in (("loss", "loss {:.4f}"), ("val_loss", "val_loss {:.4f}"), ("val_i2t_top1", "val_i2t {:.3f}"),
                         ("temperature", "temp {:.4f}"), ("lr", "lr {:.2e}"), ("images_per_s", "{:.1f} img/s"),
                         ("data_wait_frac", "data wait {:.0%}"), ("rows_skipped", "skipped {:.0f}")):
            if key in metrics:
                parts.append(fmt.format(metrics[key]))
        parts.append(f"ETA {_duration(eta)}")
        print("[clippy-ray] " + " | ".join(parts), flush=True)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def finish(self) -> None:
        if self.enabled:
            print(f"[clippy-ray] done in {_duration(time.perf_counter() - self.started)}", flush=True)
        if self.wandb is not None:
            self.wandb.finish()
