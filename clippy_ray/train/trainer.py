"""TorchTrainer assembly: scaling, storage (local or s3://), checkpoints, failure policy, datasets.
Running again with the same run name and storage resumes from the latest checkpoint."""

from __future__ import annotations

import os

from clippy_ray import config, storage
from clippy_ray.data.pipeline import build_dataset


def run_storage(uri: str) -> tuple[str, object | None]:
    """(storage_path, storage_filesystem) for RunConfig: with a filesystem, Ray wants bucket/prefix."""
    if storage.is_s3(uri):
        fs, path = storage.resolve(uri)
        return path, fs
    return os.path.abspath(uri), None


def checkpoint_uri(cfg: config.Config, result) -> str | None:
    """The URI of a Result's checkpoint: with an S3 filesystem Ray reports bucket/prefix only."""
    if result.checkpoint is None:
        return None
    path = result.checkpoint.path
    return f"s3://{path}" if storage.is_s3(cfg.train.storage) else path


def fit(cfg: config.Config, init_from: str | None = None, init_mode: str = "weights", callbacks: list | None = None):
    """Train (or resume) the run `cfg.train.run_name`; returns Ray's Result. `callbacks`: Ray Train
    callbacks (a sweep passes Tune's report callback)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from clippy_ray.train.loop import train_loop

    if not cfg.data.train:
        raise config.ConfigError(["data.train: not set; give the training parquet URI (data.train=s3://... or a folder)"])
    if init_mode not in ("weights", "full"):
        raise ValueError(f"--from-mode {init_mode!r}: use weights or full")
    image_size = cfg.model.image.img_size
    datasets = {"train": build_dataset(cfg.data.train, cfg.data, cfg.model.text, image_size, train=True)}
    if cfg.data.val:
        datasets["val"] = build_dataset(cfg.data.val, cfg.data, cfg.model.text, image_size, train=False)

    path, fs = run_storage(cfg.train.storage)
    _write_resolved_config(cfg)
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config.to_dict(cfg), "init_from": init_from, "init_mode": init_mode,
                           "has_val": "val" in datasets},
        datasets=datasets,
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(name=cfg.train.run_name, storage_path=path, storage_filesystem=fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             callbacks=callbacks or []),
    )
    return trainer.fit()


def _write_resolved_config(cfg: config.Config) -> None:
    """Every run writes its resolved config next to its checkpoints (also inside each handoff)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "config.yaml")
        with open(local, "w") as f:
            f.write(config.dump(cfg))
        storage.upload(local, storage.join(cfg.train.storage, cfg.train.run_name, "config.yaml"))
