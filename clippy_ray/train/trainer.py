"""TorchTrainer assembly: scaling, storage (local or s3://), checkpoints, failure policy, datasets.
Running again with the same run name and storage resumes from the latest checkpoint."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re

from clippy_ray import config, storage
from clippy_ray.console import EventQueue
from clippy_ray.data.formats import Layout, check_dataset, detect
from clippy_ray.data.pipeline import build_dataset
from clippy_ray.data.plan import DataFile, dump_manifest, list_files, load_manifest
from clippy_ray.errors import InputError
from clippy_ray.model.pretrained import check_pretrained
from clippy_ray.train.checkpoint import check_init, legacy_shards
from clippy_ray.train.shards import INDEX, check_model, read_index
from clippy_ray.train.state import TrainState, read_train_state, require_train_state, resume_source

MANIFEST = "data/train_files.json"  # the run's training files and their rows: fixes what a position means


def train_files(cfg: config.Config, emit=None) -> tuple[list[DataFile], Layout]:
    """The run's training shards and how they are read: listed (and counted) once when the run
    starts and stored with it, so a resumed run reads the same shards in the same order even if
    the prefix has changed since."""
    uri = storage.join(cfg.train.storage, cfg.train.run_name, MANIFEST)
    d = cfg.data
    if storage.exists(uri):
        files, layout = load_manifest(storage.read_bytes(uri))
        if layout is None:  # written before formats: parquet with the configured columns
            layout = Layout("parquet", tuple(f.uri for f in files), d.image_column, d.caption_column, "parquet")
        return files, layout
    layout = detect(d.train, "data.train", d.format, d.image_column, d.caption_column)
    problems: list[str] = []
    files = list_files(d.train, layout, problems)
    for problem in problems:  # a shard cut short: its whole samples are trained, the rest is not there
        (emit or print)(f"data.train: {problem}; its whole samples are used")
    if not sum(f.rows for f in files):
        raise InputError(
            f"data.train={d.train}: its {layout.format} shards hold no samples; point it at the training data"
        )
    storage.write_bytes(uri, dump_manifest(files, layout))
    return files, layout


class TrainStream:
    """The training dataset, built again at every start of the worker group (Ray Train calls a
    dataset factory then, before it hands the workers the checkpoint they restore): it reads
    exactly the rows that checkpoint records as not trained on yet, first those below its
    watermark (in shuffle buffers or not yet read when it was taken), then on from there, so a
    restarted run neither skips a row nor trains one twice, and decodes nothing already trained
    on. It covers the rows the remaining steps need, twice over (bad rows are dropped)."""

    def __init__(
        self, cfg: config.Config, files: list[DataFile], layout: Layout, init_from: str | None, init_mode: str
    ):
        self.cfg, self.files, self.layout, self.init_from, self.init_mode = cfg, files, layout, init_from, init_mode

    def __call__(self):
        cfg, t = self.cfg, self.cfg.train
        source = resume_source(cfg, self.init_from, self.init_mode)
        state = TrainState.from_dict(read_train_state(source) if source else None)
        buffers = t.max_workers * (cfg.data.shuffle_buffer + t.micro_batch_size + cfg.data.decode_batch_size)
        rows = 2 * max(t.steps - state.step, 1) * t.global_batch_size + buffers
        size = cfg.model.image.img_size
        spans = state.rows.untrained(rows)
        return build_dataset(
            cfg.data.train, cfg.data, cfg.model.text, size, True, files=self.files, spans=spans, layout=self.layout
        )


def model_sizes(cfg: config.Config) -> dict[str, int]:
    """{parameter name: numel} of the model `cfg` builds (on the meta device: no memory, no weights)."""
    import torch

    from clippy_ray.model import build_model
    from clippy_ray.model.pretrained import text_encoder_config
    from clippy_ray.tokenizer import build_tokenizer

    text = cfg.model.text
    # a pretrained text folder defines the encoder: its config.json, not its weights
    encoder = text_encoder_config(text.pretrained, text.hf_config) if text.pretrained else None
    with torch.device("meta"):
        model = build_model(cfg.model, build_tokenizer(text).vocab_size, load_pretrained=False, encoder_config=encoder)
    return {name: param.numel() for name, param in model.named_parameters()}


def check_resume(cfg: config.Config, init_from: str | None = None, init_mode: str = "weights") -> str | None:
    """Driver side, before Ray starts: the checkpoint the run goes on from (None for a new run) can
    be resumed with this config; a change it cannot take is one line saying what to do."""
    source = resume_source(cfg, init_from, init_mode)
    if source is None:
        return None
    saved = require_train_state(source)
    optimizer = saved.get("optimizer")
    if optimizer and optimizer != cfg.train.optimizer:
        raise InputError(
            f"{source}: its optimizer state is {optimizer}'s and train.optimizer is {cfg.train.optimizer}; resume "
            f"with train.optimizer={optimizer}, or start a new run from its weights: --from {source} --from-mode "
            "weights train.run_name=NEW_NAME"
        )
    if storage.exists(storage.join(source, INDEX)):
        check_model(source, read_index(source), model_sizes(cfg))
    else:  # written before the resizable format
        ranks = {m.group(1) for f in legacy_shards(source) if (m := re.search(r"zero_pp_rank_(\d+)_", f))}
        if ranks and (cfg.train.elastic or len(ranks) != cfg.train.num_workers):
            raise InputError(
                f"{source}: written by an older clippy-ray in DeepSpeed's own format, which resumes only on the "
                f"{len(ranks)} workers that wrote it; set train.num_workers={len(ranks)} to finish the run, or "
                f"start a new run from its weights: --from {source} --from-mode weights train.run_name=NEW_NAME"
            )
    return source


def val_rows(cfg: config.Config) -> int:
    """The validation subset: the same first rows of data.val (files in sorted order) every time,
    val_batches micro-batches per worker; elastic, rounded up so that every size from min to max
    splits it into whole micro-batches (all of it is scored on any number of workers)."""
    t = cfg.train
    every = math.lcm(*range(t.min_workers, t.max_workers + 1))
    return -(-t.val_batches * t.max_workers // every) * every * t.micro_batch_size


def workers(t: config.TrainConfig) -> str:
    return f"{t.min_workers}-{t.max_workers} (elastic)" if t.elastic else str(t.num_workers)


def describe(cfg: config.Config, train: tuple[list[DataFile], Layout] | None = None) -> list[str]:
    """The start-up summary a person reads before the first step (driver side). `train`: the run's
    training shards and layout when `train_files` has listed them (not listed and read again)."""
    t, m = cfg.train, cfg.model
    data, detected = [], []
    for name, uri in (("train", cfg.data.train), ("val", cfg.data.val)):
        if uri:
            if name == "train" and train is not None:
                files, layout = train
            else:
                layout = detect(uri, f"data.{name}", cfg.data.format, cfg.data.image_column, cfg.data.caption_column)
                # counting a tar's samples can mean reading it: the run's manifest counts them once
                files = list_files(uri, layout) if layout.format == "parquet" else None
            n = len(layout.shards)
            if files is not None:
                unit = "rows" if layout.format == "parquet" else "samples"
                kind = "file" if layout.format == "parquet" else f"{layout.format} shard"
                data.append(f"{name} {uri} ({sum(f.rows for f in files)} {unit}, {n} {kind}{'s' * (n != 1)})")
            else:
                data.append(f"{name} {uri} ({n} {layout.format} shard{'s' * (n != 1)})")
            if cfg.data.format == "auto":
                detected.append(f"detected {layout.note}")
    keep = m.token_keep_ratio if m.token_keep_ratio is not None else m.token_keep_count
    per_worker = f"{t.cpus_per_worker:g} CPU" + (" + 1 GPU" if t.use_gpu else "")
    return [
        f"model: {m.image.name} {m.image.timm_kwargs or ''} at {m.image.img_size} px + {m.text.model_type} text "
        f"encoder, {m.aggregation} pooling, token keep {keep or 'all'}, embedding {m.embed_dim}",
        "data: " + "; ".join(data),
        *detected,
        f"workers: {workers(t)} x ({per_worker}); batch {t.micro_batch_size} per worker x {t.grad_accum_steps} "
        f"accumulation{' at max' if t.elastic else ''} = {t.global_batch_size} pairs per step, {t.steps} steps"
        + (f", torch.compile ({t.compile_backend}; the first steps compile)" if t.compile else ""),
        negatives_line(t, cfg.loss.negatives),
        f"storage: {storage.join(t.storage, t.run_name)} (checkpoint every {t.checkpoint_every} steps, "
        f"last {t.keep_checkpoints} kept)",
    ]


def negatives_line(t: config.TrainConfig, negatives: str = "global") -> str:
    """What the contrastive loss compares each pair against. Without accumulation, or with it under
    loss.negatives=global (feature caching), the whole global batch; under micro, every
    micro-batch's loss gathers that micro-batch from every worker: micro-batch x workers."""
    accumulates = t.grad_accum_steps > 1 or t.elastic
    if not accumulates:
        return f"negatives per loss: {t.global_batch_size} (the global batch)"
    if negatives == "global":
        return (
            f"negatives per loss: {t.global_batch_size} (the global batch: each step's micro-batches are embedded "
            "first, the loss runs once over all of them, then each is re-run with a graph; one extra forward "
            "per micro-batch)"
        )
    sizes = [t.min_workers, t.max_workers] if t.elastic else [t.num_workers]
    counts = " to ".join(str(t.micro_batch_size * n) for n in sizes)
    at_max = f": the global batch at {t.max_workers} workers" if t.grad_accum_steps == 1 else ""
    return (
        f"negatives per loss: {counts} (a micro-batch of {t.micro_batch_size} x workers{at_max}, loss.negatives=micro: "
        f"accumulated micro-batches are each a loss of their own, not one over the {t.global_batch_size}-pair "
        "global batch)"
    )


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


def check_data(cfg: config.Config) -> list[str]:
    """data.train (required) and data.val: data the pipeline reads (parquet with the image and
    caption columns, WebDataset shards, img2dataset output); one line each saying what was found."""
    if not cfg.data.train:
        raise config.ConfigError(
            ["data.train: not set; give the training parquet URI (data.train=s3://... or a folder)"]
        )
    d = cfg.data
    return [
        check_dataset(uri, field, d.image_column, d.caption_column, d.format)
        for field, uri in (("data.train", d.train), ("data.val", d.val))
        if uri
    ]


def check_eval_during_training(cfg: config.Config) -> None:
    """eval.during_training.data (when set) can serve the tasks it names, with these settings."""
    during = cfg.eval.during_training
    if not during.data:
        return
    from clippy_ray.eval.datasets import open_eval_set
    from clippy_ray.eval.evaluator import check_settings

    storage.require(during.data, "eval.during_training.data", "give evaluation data that `clippy-ray eval` reads")
    settings = cfg.eval.while_training()
    data = open_eval_set(during.data, during.format, settings.rows_per_shard, settings.max_rows)
    why = data.tasks_supported()
    blocked = [f"{t} ({why[t]})" for t in settings.tasks if why[t]]
    if blocked:
        raise InputError(
            f"eval.during_training.tasks: {during.data} cannot serve {'; '.join(blocked)}; name only tasks "
            f"it supports: {', '.join(t for t in why if not why[t]) or 'none'}"
        )
    check_settings(settings, data)


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
    check_eval_during_training(cfg)
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
    source = check_resume(cfg)
    if source:
        saved = read_train_state(source) or {}
        lines.append(
            f"run folder: {root} (the run resumes from {source}: step {saved.get('step', '?')}, written by "
            f"{saved.get('world_size', '?')} worker(s))"
        )
    else:
        lines.append(f"run folder: {root} (new run)")
    per_worker = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {}), **t.worker_resources}
    lines.append(
        f"resources: {workers(t)} workers x {per_worker} (+ Ray Data decode tasks at {cfg.data.decode_cpus} CPU "
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

    t = cfg.train
    check_inputs(cfg, init_from, init_mode)
    check_resume(cfg, init_from, init_mode)
    image_size = cfg.model.image.img_size
    files, layout = train_files(cfg, console.line if console is not None else None)
    # the factory runs in Ray Train's controller, whose working directory is not the driver's
    datasets = {
        "train": TrainStream(
            config.absolute_paths(copy.deepcopy(cfg)), files, layout, config.absolute_uri(init_from), init_mode
        )
    }
    if cfg.data.val:
        datasets["val"] = build_dataset(
            cfg.data.val, cfg.data, cfg.model.text, image_size, train=False, rows=val_rows(cfg)
        )

    path, fs = storage.ray_storage(cfg.train.storage)
    _write_resolved_config(cfg)
    resources = {"CPU": cfg.train.cpus_per_worker, **cfg.train.worker_resources}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    if console is not None:
        for line in describe(cfg, (files, layout)):
            console.line(line)
    events = EventQueue(console) if console is not None else contextlib.nullcontext()
    resize_lines = []
    if t.elastic:
        from clippy_ray.train.resize import WorkerCountLines

        resize_lines.append(WorkerCountLines(getattr(events, "queue", None), t.steps))
    trainer = TorchTrainer(
        train_loop,
        validation_config=validation_config(cfg, getattr(events, "queue", None)),
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
            num_workers=(t.min_workers, t.max_workers) if t.elastic else t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=t.resize_check_s,
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.train.run_name,
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[*(callbacks or []), *resize_lines],
        ),
    )
    with events:
        return trainer.fit()


def validation_config(cfg: config.Config, events=None):
    """Ray Train's validation task for `eval.during_training`: the evaluator on each checkpoint the
    run registers, on its own Ray actors (eval.during_training's resources), while training goes
    on; tried once more when it fails or its process is killed. None when it is off."""
    from ray.train import ValidationConfig, ValidationTaskConfig
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from clippy_ray.eval.curve import CheckpointEvaluator

    during = cfg.eval.during_training
    if not during.data:
        return None
    evaluator = CheckpointEvaluator(config.absolute_paths(copy.deepcopy(cfg)), events)
    return ValidationConfig(
        evaluator,
        task_config=ValidationTaskConfig(timeout_s=during.timeout_s),
        # the task only runs the evaluation's actors (which hold the resources), and retries once on
        # an error or a lost process; outside the trial's placement group inside a Tune sweep
        ray_remote_kwargs={
            "num_cpus": 0,
            "max_retries": 1,
            "retry_exceptions": True,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=None),
        },
    )


def _write_resolved_config(cfg: config.Config) -> None:
    """Every run writes its resolved config next to its checkpoints (also inside each handoff)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "config.yaml")
        with open(local, "w") as f:
            f.write(config.dump(cfg))
        storage.upload(local, storage.join(cfg.train.storage, cfg.train.run_name, "config.yaml"))
