"""One config tree (dataclasses). YAML files and `key=value` overrides only fill it.

Every bad field is reported on its own line, naming the field, the value and what is valid:

    config error: model.aggregation: 'maxx' is not one of max, avg, cls
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """Invalid configuration; the message has one line per bad field."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("config error: " + "\n  ".join(errors) if len(errors) == 1
                         else "config errors:\n  " + "\n  ".join(errors))


AGGREGATIONS = ("max", "avg", "cls")
MATMUL_DTYPES = ("bfloat16", "float32")


@dataclass
class ImageConfig:
    name: str = "vit_base_patch16_224"  # any timm ViT
    pretrained: str | None = None  # None: random init; else a timm .pth/.safetensors file URI
    img_size: int = 224  # training resolution; any multiple of the patch size works at eval
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {depth: 2, embed_dim: 64}

    def check(self, path: str) -> list[str]:
        errors = []
        if self.img_size <= 0:
            errors.append(f"{path}.img_size: {self.img_size} must be a positive number of pixels")
        for bad in ("num_classes", "dynamic_img_size", "img_size", "pretrained"):
            if bad in self.timm_kwargs:
                errors.append(f"{path}.timm_kwargs.{bad}: set by clippy-ray; remove it"
                              + (f" (use {path}.{bad})" if bad in ("img_size", "pretrained") else ""))
        return errors


@dataclass
class TextConfig:
    model_type: str = "t5"  # architecture for random init (t5 -> T5EncoderModel, else AutoModel)
    pretrained: str | None = None  # None: random init; else an HF model folder URI (Sentence-T5)
    hf_config: dict[str, Any] = field(default_factory=dict)  # overrides, e.g. {num_layers: 2}
    tokenizer: str = "byte"  # "byte" (ByT5, needs no file) or a tokenizer folder URI
    max_length: int = 64

    def check(self, path: str) -> list[str]:
        errors = []
        if self.max_length <= 0:
            errors.append(f"{path}.max_length: {self.max_length} must be >= 1")
        return errors


@dataclass
class ModelConfig:
    image: ImageConfig = field(default_factory=ImageConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 512
    aggregation: str = "max"  # max (CLIPpy) | avg | cls
    token_keep_ratio: float | None = None  # train-time token sub-sampling, fraction of patches
    token_keep_count: int | None = None  # ... or a fixed number of patches (not both)
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0  # CLIP clamps exp(logit_scale) at 100

    def check(self, path: str) -> list[str]:
        errors = self.image.check(f"{path}.image") + self.text.check(f"{path}.text")
        if self.embed_dim <= 0:
            errors.append(f"{path}.embed_dim: {self.embed_dim} must be >= 1")
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


@dataclass
class LossConfig:
    matmul_dtype: str = "bfloat16"  # logits matmul dtype; softmax is always float32
    chunk_size: int | None = None  # columns per chunk (bounds peak memory at large global batch)

    def check(self, path: str) -> list[str]:
        errors = []
        if self.matmul_dtype not in MATMUL_DTYPES:
            errors.append(f"{path}.matmul_dtype: {self.matmul_dtype!r} is not one of {', '.join(MATMUL_DTYPES)}")
        if self.chunk_size is not None and self.chunk_size < 1:
            errors.append(f"{path}.chunk_size: {self.chunk_size} must be >= 1 (or null for no chunking)")
        return errors


@dataclass
class DataConfig:
    train: str | None = None  # parquet file or folder URI (local or s3://)
    val: str | None = None
    image_column: str = "image"  # encoded bytes, or an HF datasets {bytes, path} struct
    caption_column: str = "caption"
    shuffle_buffer: int = 1024  # rows in each worker's local shuffle buffer (0: off)
    seed: int = 0  # file order and local shuffle are seeded per epoch from this
    min_crop_scale: float = 0.5  # random resized crop area range [min_crop_scale, 1]
    decode_batch_size: int = 64  # rows per map_batches call
    decode_cpus: float = 1.0  # CPUs each decode task asks Ray for
    block_mib: int = 16  # Ray Data block size: small blocks of encoded images spread decoding over CPUs

    def check(self, path: str) -> list[str]:
        errors = []
        if self.shuffle_buffer < 0:
            errors.append(f"{path}.shuffle_buffer: {self.shuffle_buffer} must be >= 0")
        if not 0 < self.min_crop_scale <= 1:
            errors.append(f"{path}.min_crop_scale: {self.min_crop_scale} must be in (0, 1]")
        if self.decode_batch_size < 1:
            errors.append(f"{path}.decode_batch_size: {self.decode_batch_size} must be >= 1")
        if self.block_mib < 1:
            errors.append(f"{path}.block_mib: {self.block_mib} must be >= 1")
        if self.decode_cpus <= 0:
            errors.append(f"{path}.decode_cpus: {self.decode_cpus} must be > 0")
        return errors


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def check(self, path: str = "") -> list[str]:
        return self.model.check("model") + self.loss.check("loss") + self.data.check("data")


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
            errors.append(f"{path}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}, got {value!r}")
            return tp()
        return _build(tp, value, path, errors)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {value!r}")
            return {}
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
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
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError([f"{path}: top level must be a mapping"])
    return from_dict(merge(data, parse_overrides(overrides or [])), cls)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
