"""One config tree (dataclasses). YAML files and `key=value` overrides only fill it.

Every bad field is reported on its own line, naming the field, the value and what is valid:

    config error: model.aggregation: 'maxx' is not one of max, avg, cls
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin

import yaml

from clippy_ray.errors import UserError


class ConfigError(UserError, ValueError):
    """Invalid configuration; the message has one line per bad field."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__(
            "config error: " + "\n  ".join(errors) if len(errors) == 1 else "config errors:\n  " + "\n  ".join(errors)
        )


AGGREGATIONS = ("max", "avg", "cls")
MATMUL_DTYPES = ("auto", "bfloat16", "float32")
_RULES = {">= 1": lambda v: v >= 1, "> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0}


def out_of_range(path: str, obj: Any, rule: str, names: tuple[str, ...]) -> list[str]:
    """One line per field of `obj` named in `names` that breaks `rule` (">= 1", "> 0" or ">= 0")."""
    return [f"{path}.{n}: {getattr(obj, n)} must be {rule}" for n in names if not _RULES[rule](getattr(obj, n))]


def bad_resources(path: str, resources: dict) -> list[str]:
    """One line per entry of a custom Ray resource map (name -> amount per worker) that Ray would
    refuse, or that names a resource another field sets (CPUs, GPUs, memory)."""
    errors = []
    for name, amount in resources.items():
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            errors.append(
                f"{path}.{name}: a built-in Ray resource (CPUs and GPUs come from cpus_per_worker and use_gpu); "
                "list custom resources only, e.g. {gpu_node: 1}"
            )
        elif isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
            errors.append(f"{path}.{name}: {amount!r} must be a number > 0")
    return errors


@dataclass
class ImageConfig:
    name: str = "vit_base_patch16_224"  # any timm ViT
    pretrained: str | None = None  # None: random init; else a timm .pth/.safetensors file URI
    img_size: int = 224  # training resolution; any multiple of the patch size works at eval
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {depth: 2, embed_dim: 64}
    grad_checkpointing: bool = False  # recompute each block's activations in the backward (less memory)
    frozen_blocks: int = 0  # not trained: the patch and position embeddings and the first N blocks
    #                         (-1: the whole ViT, its final norm too; the projection always trains)
    pos_embed_grid: int | None = None  # the position-embedding grid the ViT keeps (null: img_size / patch,
    #   the pretrained grid resampled to it once at load); e.g. 37 keeps DINOv2's own 518 px grid,
    #   resampled to each input's grid in every forward, so evaluating at 2x img_size resamples it once

    def check(self, path: str) -> list[str]:
        errors = []
        if self.pos_embed_grid is not None and self.pos_embed_grid < 1:
            errors.append(f"{path}.pos_embed_grid: {self.pos_embed_grid} must be >= 1 (or null: img_size / patch)")
        if self.frozen_blocks < -1:
            errors.append(f"{path}.frozen_blocks: {self.frozen_blocks} must be >= 0 (or -1: the whole ViT)")
        if self.img_size <= 0:
            errors.append(f"{path}.img_size: {self.img_size} must be a positive number of pixels")
        for bad in ("num_classes", "dynamic_img_size", "img_size", "pretrained"):
            if bad in self.timm_kwargs:
                errors.append(
                    f"{path}.timm_kwargs.{bad}: set by clippy-ray; remove it"
                    + (f" (use {path}.{bad})" if bad in ("img_size", "pretrained") else "")
                )
        return errors


@dataclass
class TextConfig:
    model_type: str = "t5"  # architecture for random init (t5 -> T5EncoderModel, else AutoModel)
    pretrained: str | None = None  # None: random init; else an HF model folder URI (Sentence-T5)
    hf_config: dict[str, Any] = field(default_factory=dict)  # overrides, e.g. {num_layers: 2}
    tokenizer: str = "byte"  # "byte" (ByT5, needs no file) or a tokenizer folder URI
    max_length: int = 64  # tokens per caption (longer ones are cut)
    grad_checkpointing: bool = False  # transformers' own: recompute each layer in the backward (less memory)
    frozen_layers: int = 0  # not trained: the token embedding and the first N layers (-1: the whole
    #                         encoder, run without dropout; the projection always trains)
    cache_embeddings: bool = False  # with frozen_layers -1: each distinct caption's pooled encoder output
    #                                 kept (up to 65,536 per worker), so a repeated caption skips the encoder

    def check(self, path: str) -> list[str]:
        errors = out_of_range(path, self, ">= 1", ("max_length",))
        if self.frozen_layers < -1:
            errors.append(f"{path}.frozen_layers: {self.frozen_layers} must be >= 0 (or -1: the whole encoder)")
        if self.cache_embeddings and self.frozen_layers != -1:
            errors.append(
                f"{path}.cache_embeddings: needs {path}.frozen_layers=-1 (a caption's embedding is fixed only "
                "while the whole encoder is)"
            )
        return errors


@dataclass
class ModelConfig:
    image: ImageConfig = field(default_factory=ImageConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 512  # the shared image-text embedding size both towers project to
    aggregation: str = "max"  # max (CLIPpy) | avg | cls
    token_keep_ratio: float | None = None  # train-time token sub-sampling, fraction of patches
    token_keep_count: int | None = None  # ... or a fixed number of patches (not both)
    init_temperature: float = 0.07  # the temperature the logit scale starts at: exp(logit_scale) = 1 / this
    max_logit_scale: float = 100.0  # CLIP clamps exp(logit_scale) at 100

    def check(self, path: str) -> list[str]:
        errors = self.image.check(f"{path}.image") + self.text.check(f"{path}.text")
        errors += out_of_range(path, self, ">= 1", ("embed_dim",))
        if self.aggregation not in AGGREGATIONS:
            errors.append(f"{path}.aggregation: {self.aggregation!r} is not one of {', '.join(AGGREGATIONS)}")
        if self.token_keep_ratio is not None and self.token_keep_count is not None:
            errors.append(f"{path}.token_keep_ratio / token_keep_count: set one, not both")
        if self.token_keep_ratio is not None and not 0 < self.token_keep_ratio <= 1:
            errors.append(f"{path}.token_keep_ratio: {self.token_keep_ratio} must be in (0, 1]")
        if self.token_keep_count is not None and self.token_keep_count < 1:
            errors.append(f"{path}.token_keep_count: {self.token_keep_count} must be >= 1")
        if not 0 < self.init_temperature < 1:
            errors.append(f"{path}.init_temperature: {self.init_temperature} must be in (0, 1)")
        if self.max_logit_scale <= 1:
            errors.append(f"{path}.max_logit_scale: {self.max_logit_scale} must be > 1")
        return errors


NEGATIVES = ("global", "micro")


@dataclass
class LossConfig:
    matmul_dtype: str = "auto"  # logits matmul dtype (auto: the training precision); softmax is always float32
    chunk_size: int | None = None  # columns per block of the fused loss (null: chosen from batch and device)
    negatives: str = "global"  # with accumulation: global (each loss over the whole global batch; features
    #                            cached, one extra forward per micro-batch) | micro (a loss per micro-batch)

    def check(self, path: str) -> list[str]:
        errors = []
        if self.negatives not in NEGATIVES:
            errors.append(
                f"{path}.negatives: {self.negatives!r} is not one of {', '.join(NEGATIVES)} (global: the loss sees "
                "the whole global batch; micro: each accumulated micro-batch is a loss of its own)"
            )
        if self.matmul_dtype not in MATMUL_DTYPES:
            errors.append(f"{path}.matmul_dtype: {self.matmul_dtype!r} is not one of {', '.join(MATMUL_DTYPES)}")
        if self.chunk_size is not None and self.chunk_size < 1:
            errors.append(f"{path}.chunk_size: {self.chunk_size} must be >= 1 (or null: chosen automatically)")
        return errors


DATA_FORMATS = ("auto", "parquet", "webdataset", "files")


@dataclass
class DataConfig:
    train: str | None = None  # parquet, WebDataset .tar shards or img2dataset output: a file, folder or
    #                           prefix (local or s3://), or a shard list: s3://b/{00000..01023}.tar::...
    val: str | None = None  # the validation data, any format train takes; null: no validation
    format: str = "auto"  # auto (detected, one line says what) | parquet | webdataset | files
    image_column: str = "image"  # parquet: encoded bytes, or an HF datasets {bytes, path} struct
    #                              (img2dataset's `jpg` is found when `image` is not there)
    caption_column: str = "caption"  # parquet: the column; WebDataset / files: the json field read
    #                                  when a sample has no txt member
    shuffle_buffer: int = 1024  # rows in each worker's local shuffle buffer (0: off)
    seed: int = 0  # file order (per epoch) and the local shuffle are seeded from this
    min_crop_scale: float = 0.5  # random resized crop area range [min_crop_scale, 1]
    decode_batch_size: int = 256  # rows per map_batches call (224 px: 38 MiB decoded, one block of its own)
    decode_cpus: float = 0.9  # CPUs each decode task asks Ray for; with read_cpus, lets N decoders and
    #                           the reads share N cores
    read_cpus: float = 0.1  # CPUs each parquet read task asks for: reads mostly wait on I/O
    read_tasks: int = 0  # parquet read tasks at once (each streams ~block_mib blocks to ~16 decoding
    #                      cores); 0: one per 16 CPUs of the cluster when the stream starts, at least 2
    block_mib: int = 32  # Ray Data block size: one read block (~1-2k encoded images) is one decode task;
    #                      larger blocks mean fewer task hand-overs, smaller ones a shorter end of epoch

    def check(self, path: str) -> list[str]:
        errors = out_of_range(path, self, ">= 0", ("shuffle_buffer", "read_tasks"))
        if self.format not in DATA_FORMATS:
            errors.append(f"{path}.format: {self.format!r} is not one of {', '.join(DATA_FORMATS)}")
        if not 0 < self.min_crop_scale <= 1:
            errors.append(f"{path}.min_crop_scale: {self.min_crop_scale} must be in (0, 1]")
        errors += out_of_range(path, self, ">= 1", ("decode_batch_size", "block_mib"))
        return errors + out_of_range(path, self, "> 0", ("decode_cpus", "read_cpus"))


OPTIMIZERS = ("adamw", "lamb")
PRECISIONS = ("auto", "bf16", "fp32")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline by default; online needs WANDB_API_KEY in the environment
    project: str = "clippy-ray"  # the W&B project the runs log to
    group: str | None = None  # the W&B group (e.g. a sweep's name); null: none

    def check(self, path: str) -> list[str]:
        if self.mode not in WANDB_MODES:
            return [f"{path}.mode: {self.mode!r} is not one of {', '.join(WANDB_MODES)}"]
        return []


@dataclass
class TrainConfig:
    run_name: str = "clippy"  # running again with the same name (and storage) resumes the run
    storage: str = "./runs"  # local folder or s3://bucket/prefix for checkpoints and results
    # an int, or [min, max]: elastic, the run goes on with fewer workers (from its last checkpoint)
    # when nodes are lost and not replaced, and grows back to max when they return
    num_workers: int | list[int] = 2
    resize_check_s: float = 60.0  # elastic: how often Ray looks for room to add workers
    use_gpu: bool = False  # a GPU per training worker (set on a GPU cluster)
    cpus_per_worker: float = 0.5  # < 1 on small CPU boxes leaves CPUs for Ray Data decoding
    # custom Ray resources each worker also asks for: pins workers to the node type that declares them
    worker_resources: dict[str, float] = field(default_factory=dict)  # e.g. {a100_node: 1}
    global_batch_size: int = 64  # pairs per optimizer step, over all workers and accumulation
    grad_accum_steps: int = 1  # micro-batches per optimizer step (elastic: at max workers; grows as workers shrink)
    steps: int = 1000  # optimizer steps
    precision: str = "auto"  # auto: bf16 where the device runs it natively (CUDA, AVX512-BF16/AMX), else fp32
    zero_stage: int = 2  # DeepSpeed ZeRO: 0 replicated, 1 optimizer state, 2 + gradients, 3 + parameters sharded
    optimizer: str = "adamw"  # adamw | lamb (a per-parameter trust ratio, for very large batches)
    lr: float = 5e-4  # peak learning rate, reached after warmup_steps
    min_lr: float = 0.0  # cosine decays to this
    warmup_steps: int = 100  # linear warmup from 0 to lr, then cosine decay to min_lr
    weight_decay: float = 0.2  # not applied to norms, biases, embeddings tokens or the temperature
    betas: tuple[float, float] = (0.9, 0.98)  # the optimizer's (beta1, beta2)
    eps: float = 1e-6  # the optimizer's epsilon
    grad_clip: float = 1.0  # 0: off
    checkpoint_every: int = 500  # steps between checkpoints (the last step always gets one)
    keep_checkpoints: int = 2  # the newest checkpoints kept (and any still waiting for its evaluation)
    val_every: int = 0  # 0: validate only at the end
    val_batches: int = 8  # per worker
    log_every: int = 10  # steps between console / W&B log lines
    max_failures: int = 0  # restarts from the last checkpoint when a worker dies
    # torch.compile the model in each worker (DeepSpeed's engine.compile): fewer, fused kernels for
    # a GPU step that is bound by launching them; the first steps pay the compilation (about a
    # minute for the ViT-B/16 + T5-base model on an H200). compile_backend "eager" traces only.
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend when compile is on: inductor, or eager (traces only)
    seed: int = 0  # the model's initialisation and the training randomness (dropout, token sub-sampling)
    # write into each checkpoint which rows each step since the previous one trained on (data/batches.npy:
    # step, rank, data position per row; 24 bytes a row): to audit a run or find the rows behind a loss spike
    record_batches: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, (list, tuple))

    @property
    def min_workers(self) -> int:
        return int(self.num_workers[0]) if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return int(self.num_workers[-1]) if self.elastic else self.num_workers

    @property
    def micro_batch_size(self) -> int:
        """Pairs per worker per forward: the global batch over max_workers x grad_accum_steps. With
        fewer workers (elastic) it stays and the accumulation grows (`grad_accum_at`)."""
        return self.global_batch_size // (self.max_workers * self.grad_accum_steps)

    def grad_accum_at(self, workers: int) -> int:
        """The accumulation that keeps global_batch_size on `workers` workers at micro_batch_size."""
        return self.global_batch_size // (self.micro_batch_size * workers)

    def _check_workers(self, path: str) -> list[str]:
        n = self.num_workers
        if self.elastic:
            ints = all(isinstance(x, int) and not isinstance(x, bool) for x in n)
            if len(n) != 2 or not ints or not 1 <= n[0] <= n[1]:
                return [f"{path}.num_workers: {list(n)} must be a number >= 1 or [min, max] with 1 <= min <= max"]
        elif isinstance(n, bool) or not isinstance(n, int) or n < 1:
            return [f"{path}.num_workers: {n!r} must be a number >= 1 or [min, max] with 1 <= min <= max"]
        return []

    def _check_batch(self, path: str) -> list[str]:
        per = self.max_workers * self.grad_accum_steps
        if self.global_batch_size % per:
            return [
                f"{path}.global_batch_size: {self.global_batch_size} is not divisible by num_workers x "
                f"grad_accum_steps = {per}; use a multiple of {per}"
            ]
        # at micro_batch_size, a step is max_workers x grad_accum_steps micro-batches: w workers
        # keep the global batch iff w divides that number
        per_step = self.max_workers * self.grad_accum_steps
        bad = [w for w in range(self.min_workers, self.max_workers) if per_step % w]
        if bad:
            low = self.max_workers
            while low > 1 and per_step % (low - 1) == 0:
                low -= 1
            every = math.lcm(*range(self.min_workers, self.max_workers + 1))
            accum = every // math.gcd(every, self.max_workers)
            return [
                f"{path}.num_workers: {list(self.num_workers)}: a step is {per_step} micro-batches (max workers x "
                f"grad_accum_steps), which {bad[-1]} workers cannot share evenly, so the global batch could not "
                f"stay the same; every size from min to max must divide {per_step}: use num_workers=[{low}, "
                f"{self.max_workers}], or grad_accum_steps={accum} (and a global_batch_size that is a multiple of "
                f"{self.max_workers * accum})"
            ]
        return []

    def check(self, path: str) -> list[str]:
        errors = self.wandb.check(f"{path}.wandb") + self._check_workers(path)
        counts = ("global_batch_size", "grad_accum_steps", "steps", "checkpoint_every")
        errors += out_of_range(path, self, ">= 1", (*counts, "keep_checkpoints", "log_every", "val_batches"))
        errors += out_of_range(path, self, "> 0", ("lr",))
        if self.lr > 0 and not 0 <= self.min_lr <= self.lr:
            errors.append(f"{path}.min_lr: {self.min_lr} must be in [0, lr={self.lr}]")
        if self.zero_stage not in (0, 1, 2, 3):
            errors.append(f"{path}.zero_stage: {self.zero_stage} is not a DeepSpeed ZeRO stage (0, 1, 2 or 3)")
        if self.precision not in PRECISIONS:
            errors.append(f"{path}.precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.precision == "bf16" and self.zero_stage == 0:  # (auto picks fp32 with ZeRO-0)
            errors.append(
                f"{path}.zero_stage: 0 with precision bf16 would reduce and accumulate gradients in bf16 "
                "(DeepSpeed keeps them in fp32 only under ZeRO); use zero_stage 1 or precision fp32"
            )
        if self.optimizer not in OPTIMIZERS:
            errors.append(f"{path}.optimizer: {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        errors += out_of_range(path, self, ">= 0", ("warmup_steps", "val_every", "max_failures"))
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            errors.append(f"{path}: weight_decay and grad_clip must be >= 0, eps > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            errors.append(f"{path}.betas: {list(self.betas)} must be two numbers in [0, 1)")
        errors += out_of_range(path, self, "> 0", ("cpus_per_worker",))
        if self.compile and self.zero_stage == 3:
            errors.append(
                f"{path}.compile: ZeRO-3 gathers each parameter in hooks that torch.compile traces past "
                "(it sees the empty partitions); use zero_stage 1 or 2 with compile, or compile: false"
            )
        if self.compile:
            from torch._dynamo import list_backends

            if self.compile_backend not in list_backends(exclude_tags=()):
                errors.append(
                    f"{path}.compile_backend: {self.compile_backend!r} is not a torch.compile backend "
                    f"({', '.join(sorted(list_backends()))})"
                )
        errors += bad_resources(f"{path}.worker_resources", self.worker_resources)
        errors += out_of_range(path, self, ">= 0", ("resize_check_s",))
        if not self._check_workers(path) and self.global_batch_size >= 1 and self.grad_accum_steps >= 1:
            errors += self._check_batch(path)
        return errors


EVAL_TASKS = ("cls", "seg", "unsup", "robust")
BACKGROUND_MODES = ("auto", "class", "threshold", "none")


@dataclass
class DuringTrainingConfig:
    """`eval.during_training`: each checkpoint evaluated as it lands, beside training (Ray Train's
    validation tasks); the rest of the eval settings come from `eval`."""

    data: str | None = None  # the evaluation data (any format `clippy-ray eval` reads); null: off
    format: str = "auto"  # as `clippy-ray eval --format`
    tasks: tuple[str, ...] = ("seg", "unsup")  # the grouping numbers; any of cls, seg, unsup, robust
    max_rows: int | None = 64  # per split: a few minutes on a CPU; null: all rows
    resolution: int | None = None  # null: eval.resolution
    workers: int = 1  # Ray actors, each holding the model once
    cpus_per_worker: float = 0.5  # leave the training workers and the decoding their CPUs
    use_gpu: bool = False  # a GPU per evaluation worker (a GPU node of its own on a cluster)
    worker_resources: dict[str, float] = field(default_factory=dict)  # e.g. {eval_gpu_node: 1}
    timeout_s: float | None = None  # an evaluation that takes longer is stopped and recorded as timed out

    def check(self, path: str) -> list[str]:
        errors = [
            f"{path}.tasks: {t!r} is not one of {', '.join(EVAL_TASKS)}" for t in self.tasks if t not in EVAL_TASKS
        ]
        if not self.tasks:
            errors.append(f"{path}.tasks: empty; name at least one of {', '.join(EVAL_TASKS)}")
        errors += out_of_range(path, self, ">= 1", ("workers",))
        errors += out_of_range(path, self, "> 0", ("cpus_per_worker",))
        if self.max_rows is not None and self.max_rows < 1:
            errors.append(f"{path}.max_rows: {self.max_rows} must be >= 1 (or null for all rows)")
        if self.resolution is not None and self.resolution < 1:
            errors.append(f"{path}.resolution: {self.resolution} must be >= 1 (or null for eval.resolution)")
        if self.timeout_s is not None and self.timeout_s <= 0:
            errors.append(f"{path}.timeout_s: {self.timeout_s} must be > 0 (or null for no limit)")
        return errors + bad_resources(f"{path}.worker_resources", self.worker_resources)


@dataclass
class EvalConfig:
    tasks: tuple[str, ...] = EVAL_TASKS  # what `clippy-ray eval` runs: any of cls, seg, unsup, robust
    resolution: int | None = None  # seg/unsup short side; None: 2 x model.image.img_size (paper: 448 on 224)
    batch_size: int = 16  # images per evaluation batch on each worker
    workers: int = 2  # Ray actors, each holding the model once
    cpus_per_worker: float = 1.0  # CPUs each evaluation worker asks Ray for
    use_gpu: bool | None = False  # a GPU per worker, asked of the autoscaler; null (older configs) = false
    worker_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per worker, as train's
    rows_per_shard: int = 32  # the unit of parallel work; results never depend on the worker count
    max_rows: int | None = None  # per split, for quick looks
    # background in zero-shot segmentation: `class` = the dataset's class 0 has prompts like any
    # class; `threshold` = background where the best class similarity < bg_threshold (GroupViT's
    # VOC protocol); `none` = no background class (ADE20K, COCO); `auto` = what the dataset declares
    background: str = "auto"
    bg_threshold: float = 0.9  # on the softmax probability of the best class (GroupViT uses 0.9 on VOC)
    pca_components: int = 8  # unsup: groups = nearest of K principal components
    # prompts: auto (the dataset's), a shipped set (clip, simple, benchmark) or a text file, one per line with {}
    templates: str = "auto"
    examples: int = 6  # overlay pictures in the report
    # the workers at the lowest CPU priority (nice 19): set for evaluation during training, so that
    # on CPUs it shares with training the scheduler runs training's threads first
    yield_cpu: bool = False
    during_training: DuringTrainingConfig = field(default_factory=DuringTrainingConfig)

    def while_training(self) -> EvalConfig:
        """The settings an evaluation during training runs with: these, with during_training's."""
        d = self.during_training
        resolution = d.resolution if d.resolution is not None else self.resolution
        return dataclasses.replace(
            self,
            tasks=d.tasks,
            max_rows=d.max_rows,
            resolution=resolution,
            workers=d.workers,
            cpus_per_worker=d.cpus_per_worker,
            use_gpu=d.use_gpu,
            worker_resources=d.worker_resources,
            yield_cpu=True,
        )

    def check(self, path: str) -> list[str]:
        errors = [
            f"{path}.tasks: {t!r} is not one of {', '.join(EVAL_TASKS)}" for t in self.tasks if t not in EVAL_TASKS
        ]
        if self.background not in BACKGROUND_MODES:
            errors.append(f"{path}.background: {self.background!r} is not one of {', '.join(BACKGROUND_MODES)}")
        errors += out_of_range(path, self, ">= 1", ("batch_size", "workers", "rows_per_shard", "pca_components"))
        if self.resolution is not None and self.resolution < 1:
            errors.append(f"{path}.resolution: {self.resolution} must be >= 1 (or null for 2 x the train size)")
        if self.max_rows is not None and self.max_rows < 1:
            errors.append(f"{path}.max_rows: {self.max_rows} must be >= 1 (or null for all rows)")
        return (
            errors
            + out_of_range(path, self, "> 0", ("cpus_per_worker",))
            + bad_resources(f"{path}.worker_resources", self.worker_resources)
            + out_of_range(path, self, ">= 0", ("examples",))
            + self.during_training.check(f"{path}.during_training")
        )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self, path: str = "") -> list[str]:
        return (
            self.model.check("model")
            + self.loss.check("loss")
            + self.data.check("data")
            + self.train.check("train")
            + self.eval.check("eval")
            + self._check_across()
        )

    def _check_across(self) -> list[str]:
        if self.model.text.cache_embeddings and self.train.zero_stage == 3:
            # ZeRO-3 gathers a module's parameters in its forward, a collective: a rank whose batch is
            # all cached would skip it while the others wait
            return [
                "model.text.cache_embeddings: not with train.zero_stage=3 (a rank that skips the encoder would "
                "leave the others waiting in its parameter gather); use zero_stage 1 or 2"
            ]
        return []


# ---------------------------------------------------------------- building from plain data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return _coerce(value, inner[0], path, errors) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(
                f"{path}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}, got {value!r}"
            )
            return tp()
        return _build(tp, value, path, errors)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            errors.append(f"{path}: expected a list, got {value!r}")
            return value
        return tuple(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {value!r}")
            return {}
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 2e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type, data: dict, path: str, errors: list[str]):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else key
        if key not in names:
            errors.append(f"{full}: unknown key (valid keys: {', '.join(names)})")
            continue
        kwargs[key] = _coerce(value, hints[key], full, errors)
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError([f"{dotted}: {key} is not a mapping"])
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["model.aggregation=avg", "loss.chunk_size=4096"]` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError([f"{item!r}: overrides are key=value, e.g. model.aggregation=avg"])
        key, raw = item.split("=", 1)
        _set_dotted(out, key.strip(), yaml.safe_load(raw) if raw != "" else None)
    return out


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def from_dict(data: dict, cls: type = Config):
    """Build and validate a config dataclass; raises ConfigError listing every bad field."""
    errors: list[str] = []
    cfg = _build(cls, data or {}, "", errors)
    if not errors:
        errors = cfg.check()
    if errors:
        raise ConfigError(errors)
    return cfg


def load(path: str | None = None, overrides: list[str] | None = None, cls: type = Config):
    """YAML file (optional) + dotted overrides -> validated config."""
    data: dict = {}
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as err:
            raise ConfigError(
                [f"{path}: cannot read the config file ({err.strerror or err}); check the path"]
            ) from None
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            problem = getattr(err, "problem", None) or "not valid YAML"
            raise ConfigError([f"{path}: not valid YAML{at}: {problem}"]) from None
        if not isinstance(data, dict):
            raise ConfigError([f"{path}: top level must be a mapping"])
    return from_dict(merge(data, parse_overrides(overrides or [])), cls)


def absolute_uri(uri: str | None) -> str | None:
    if not uri or uri == "byte":
        return uri
    if "::" in uri:  # a WebDataset shard list: each part
        return "::".join(absolute_uri(part) for part in uri.split("::"))
    return uri if "://" in uri else os.path.abspath(uri)


def absolute_paths(cfg: Config) -> Config:
    """`cfg` with its local data, weight and storage paths made absolute, in place: training workers and
    Tune trials run in working directories of their own, where a relative path means nothing."""
    cfg.data.train, cfg.data.val = absolute_uri(cfg.data.train), absolute_uri(cfg.data.val)
    cfg.model.image.pretrained = absolute_uri(cfg.model.image.pretrained)
    cfg.model.text.pretrained = absolute_uri(cfg.model.text.pretrained)
    cfg.model.text.tokenizer = absolute_uri(cfg.model.text.tokenizer)
    cfg.train.storage = absolute_uri(cfg.train.storage)  # rank 0 writes the offline W&B run there
    cfg.eval.during_training.data = absolute_uri(cfg.eval.during_training.data)
    return cfg


def to_dict(cfg) -> dict:
    """Plain data (tuples as lists), what YAML and JSON hold."""

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


def dump(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
