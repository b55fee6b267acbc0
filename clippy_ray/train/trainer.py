"""TorchTrainer assembly: scaling, storage (local or s3://), checkpoints, failure policy, datasets.
Running again with the same run name and storage resumes from the latest checkpoint."""

from __future__ import annotations

import contextlib
import copy
import json
import os

from clippy_ray import config, storage
from clippy_ray.console import EventQueue
from clippy_ray.data.pipeline import build_dataset
from clippy_ray.data.plan import DataFile, dump_manifest, list_files, load_manifest
from clippy_ray.data.schema import check_dataset
from clippy_ray.errors import InputError
from clippy_ray.model.pretrained import check_pretrained
from clippy_ray.train.checkpoint import check_init


def run_storage(uri: str) -> tuple[str, object | None]:
    """(storage_path, storage_filesystem) for RunConfig: with a filesystem, Ray wants bucket/prefix."""
    if storage.is_s3(uri):
        fs, path = storage.resolve(uri)
        return path, fs
    return os.path.abspath(uri), None


def checkpoint_uri(cfg: config.Config, checkpoint) -> str | None:
    """The URI of a Ray Checkpoint (or None): with an S3 filesystem Ray reports bucket/prefix only."""
    if checkpoint is None:
        return None
    return f"s3://{checkpoint.path}" if storage.is_s3(cfg.train.storage) else checkpoint.path


# Ray Train's record of a run's registered checkpoints, in the run folder. Its latest entry is the
# checkpoint Ray hands the workers of the next attempt, with the metrics reported beside it.
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
MANIFEST = "data/train_files.json"  # the run's training files and their rows: fixes what a position means


def train_files(cfg: config.Config) -> list[DataFile]:
    """The run's training files: listed once when the run starts and stored with it, so a resumed
    run reads the same files in the same order even if the prefix has changed since."""
    uri = storage.join(cfg.train.storage, cfg.train.run_name, MANIFEST)
    if storage.exists(uri):
        return load_manifest(storage.read_bytes(uri))
    files = list_files(cfg.data.train)
    if not sum(f.rows for f in files):
        raise InputError(f"data.train={cfg.data.train}: its parquet files hold no rows; point it at the training data")
    storage.write_bytes(uri, dump_manifest(files))
    return files


def resume_point(cfg: config.Config, init_from: str | None = None, init_mode: str = "weights") -> tuple[int, int]:
    """(step, data position) the next attempt of the run starts from: the checkpoint Ray registered
    last (the one it restores the workers from), else the --from checkpoint in full mode, else 0."""
    snapshot = storage.join(cfg.train.storage, cfg.train.run_name, RAY_SNAPSHOT)
    if storage.exists(snapshot):
        metrics = (json.loads(storage.read_bytes(snapshot)).get("latest_checkpoint_result") or {}).get("metrics") or {}
        if "data_position" in metrics:
            return int(metrics["step"]), int(metrics["data_position"])
    if init_from and init_mode == "full":
        state = json.loads(storage.read_bytes(storage.join(init_from, "train_state.json")))
        return int(state.get("step", 0)), int(state.get("data_position", 0))
    return 0, 0


class TrainStream:
    """The training dataset, built again at every start of the worker group (Ray Train calls a
    dataset factory then): it begins at the data position of the checkpoint the workers are about
    to restore, so a restarted run reads on from there without reading or decoding what came
    before. It covers the rows the remaining steps need, twice over (bad rows are dropped)."""

    def __init__(self, cfg: config.Config, files: list[DataFile], init_from: str | None, init_mode: str):
        self.cfg, self.files, self.init_from, self.init_mode = cfg, files, init_from, init_mode
        self.started_at: list[tuple[int, int]] = []  # (step, position) of each build, for the driver's log

    def __call__(self):
        cfg = self.cfg
        step, position = resume_point(cfg, self.init_from, self.init_mode)
        self.started_at.append((step, position))
        t = cfg.train
        buffers = t.num_workers * (cfg.data.shuffle_buffer + t.micro_batch_size + cfg.data.decode_batch_size)
        rows = 2 * max(t.steps - step, 1) * t.global_batch_size + buffers
        size = cfg.model.image.img_size
        return build_dataset(cfg.data.train, cfg.data, cfg.model.text, size, True, position, rows, self.files)


def val_rows(cfg: config.Config) -> int:
    """The validation subset: the same first rows of data.val (files in sorted order) every time."""
    return cfg.train.val_batches * cfg.train.micro_batch_size * cfg.train.num_workers


def describe(cfg: config.Config) -> list[str]:
    """The start-up summary a person reads before the first step (driver side)."""
    from clippy_ray.data.commands import parquet_size

    t, m = cfg.train, cfg.model
    data = []
    for name, uri in (("train", cfg.data.train), ("val", cfg.data.val)):
        if uri:
            rows, files = parquet_size(uri)
            data.append(f"{name} {uri} ({rows} rows, {files} file{'s' * (files != 1)})")
    keep = m.token_keep_ratio if m.token_keep_ratio is not None else m.token_keep_count
    per_worker = f"{t.cpus_per_worker:g} CPU" + (" + 1 GPU" if t.use_gpu else "")
    return [
        f"model: {m.image.name} {m.image.timm_kwargs or ''} at {m.image.img_size} px + {m.text.model_type} text "
        f"encoder, {m.aggregation} pooling, token keep {keep or 'all'}, embedding {m.embed_dim}",
        "data: " + "; ".join(data),
        f"workers: {t.num_workers} x ({per_worker}); batch {t.micro_batch_size} per worker x {t.grad_accum_steps} "
        f"accumulation = {t.global_batch_size} pairs per step, {t.steps} steps"
        + (f", torch.compile ({t.compile_backend}; the first steps compile)" if t.compile else ""),
        f"storage: {storage.join(t.storage, t.run_name)} (checkpoint every {t.checkpoint_every} steps, "
        f"last {t.keep_checkpoints} kept)",
    ]


def check_weights(cfg: config.Config) -> list[str]:
    """One line per pretrained file or tokenizer folder the config names, each checked to exist."""
    text = cfg.model.text
    weights = (
        ("model.image.pretrained", cfg.model.image.pretrained),
        ("model.text.pretrained", text.pretrained),
        ("model.text.tokenizer", None if text.tokenizer == "byte" else text.tokenizer),
    )
    lines = []
    for name, uri in weights:
        if not uri:
            continue
        storage.require(uri, name, "upload the weights there or fix the URI")
        if name != "model.text.tokenizer":
            check_pretrained(name, uri)  # tensors only: header or pickle records, not the weights
        lines.append(f"weights: {name} = {uri} (found)")
    return lines


def check_data(cfg: config.Config) -> None:
    """data.train (required) and data.val: parquet with the configured image and caption columns."""
    if not cfg.data.train:
        raise config.ConfigError(
            ["data.train: not set; give the training parquet URI (data.train=s3://... or a folder)"]
        )
    for field, uri in (("data.train", cfg.data.train), ("data.val", cfg.data.val)):
        if uri:
            check_dataset(uri, field, cfg.data.image_column, cfg.data.caption_column)


def check_storage(cfg: config.Config) -> None:
    """train.storage is a local folder (created when needed) or an s3:// bucket that exists."""
    storage.require_bucket(cfg.train.storage, "train.storage")


def check_inputs(cfg: config.Config, init_from: str | None = None, init_mode: str = "weights") -> None:
    """On the driver, before any Ray work: the data, the pretrained weights, the storage bucket and
    `init_from` are there, in the right format, and read as tensors only. The first problem is a
    one-line UserError naming the key or flag, the URI, the reason and the fix."""
    if init_mode not in ("weights", "full"):
        raise InputError(f"--from-mode {init_mode!r}: use weights or full")
    check_data(cfg)
    check_weights(cfg)
    check_storage(cfg)
    if init_from:
        check_init(init_from, init_mode)


def dry_run(cfg: config.Config) -> list[str]:
    """The plan of a run without starting it, after checking that its data, weights and storage are
    reachable (a StorageError names the first that is not): what a cluster user reads before paying."""
    check_data(cfg)
    lines = describe(cfg) + check_weights(cfg)  # describe reads the parquet footers: the data is readable
    check_storage(cfg)
    t = cfg.train
    root = storage.join(t.storage, t.run_name)
    resumes = storage.exists(storage.join(root, "config.yaml"))
    lines.append(
        f"run folder: {root} ({'exists: the run resumes from its latest checkpoint' if resumes else 'new run'})"
    )
    per_worker = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {}), **t.worker_resources}
    lines.append(
        f"resources: {t.num_workers} workers x {per_worker} (+ Ray Data decode tasks at {cfg.data.decode_cpus} CPU "
        f"each); precision {t.precision}, ZeRO-{t.zero_stage}, {t.steps} steps, checkpoint every "
        f"{t.checkpoint_every}, validation every {t.val_every or 'run end only'}"
    )
    return lines


def fit(
    cfg: config.Config,
    init_from: str | None = None,
    init_mode: str = "weights",
    callbacks: list | None = None,
    console=None,
):
    """Train (or resume) the run `cfg.train.run_name`; returns Ray's Result. `callbacks`: Ray Train
    callbacks (a sweep passes Tune's report callback). `console` (a `clippy_ray.console.Console`):
    show the start-up summary and rank 0's progress there; without one, rank 0 prints it."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from clippy_ray.train.loop import train_loop

    check_inputs(cfg, init_from, init_mode)
    image_size = cfg.model.image.img_size
    files = train_files(cfg)
    datasets = {"train": TrainStream(cfg, files, init_from, init_mode)}
    if cfg.data.val:
        datasets["val"] = build_dataset(
            cfg.data.val, cfg.data, cfg.model.text, image_size, train=False, rows=val_rows(cfg)
        )

    path, fs = run_storage(cfg.train.storage)
    _write_resolved_config(cfg)
    resources = {"CPU": cfg.train.cpus_per_worker, **cfg.train.worker_resources}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    if console is not None:
        for line in describe(cfg):
            console.line(line)
    events = EventQueue(console) if console is not None else contextlib.nullcontext()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            # the workers' working directory is not the driver's: local paths go to them absolute
            "config": config.to_dict(config.absolute_paths(copy.deepcopy(cfg))),
            "init_from": config.absolute_uri(init_from),
            "init_mode": init_mode,
            "has_val": "val" in datasets,
            "rows_per_epoch": sum(f.rows for f in files),
            "events": getattr(events, "queue", None),
        },
        datasets=datasets,
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.train.run_name,
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks or [],
        ),
    )
    with events:
        return trainer.fit()


def _write_resolved_config(cfg: config.Config) -> None:
    """Every run writes its resolved config next to its checkpoints (also inside each handoff)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "config.yaml")
        with open(local, "w") as f:
            f.write(config.dump(cfg))
        storage.upload(local, storage.join(cfg.train.storage, cfg.train.run_name, "config.yaml"))
