"""Pretrained weights from a local path or s3:// URI, loaded strictly: any missing, unexpected or
wrongly shaped key is an error that lists them. Nothing is downloaded from a model hub."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pyarrow.fs as pafs
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from clippy_ray import safeload, storage
from clippy_ray.errors import UserError
from clippy_ray.model.text import T5_ENCODERS, encoder_from_config

# Keys that hold the whole model inside common checkpoint wrappers (DINO: teacher/student).
_WRAPPERS = ("state_dict", "model", "teacher", "module")
_IMAGE_PREFIXES = ("module.", "backbone.", "encoder.")
_MAX_LISTED = 12
_FIX = "give the weights as .safetensors, or as a state dict of tensors saved with torch.save(model.state_dict())"


class PretrainedError(UserError, ValueError):
    """A checkpoint that does not fit the model, with the keys that disagree."""


def read_state_dict(path: str | Path, source: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a local .safetensors or torch.save file, read without running code from it;
    `source` (the URI it came from) names it in errors."""
    path = Path(path)
    source = source or str(path)
    if path.suffix == ".safetensors":
        return safeload.load_safetensors(path, source, _FIX)
    obj = safeload.torch_load(path, source, _FIX)
    if not isinstance(obj, dict):
        raise PretrainedError(f"{source}: expected a state dict, got {type(obj).__name__}; {_FIX}")
    return obj


def _check_weights_file(uri: str) -> None:
    """Driver side: a weights file reads as tensors only (its header or pickle records, not its data)."""
    if uri.endswith(".safetensors"):
        safeload.check_safetensors(uri, _FIX)
    else:
        safeload.check_torch_file(uri, _FIX)


def check_pretrained(field: str, uri: str) -> None:
    """Driver side, before any Ray work: the pretrained weights `field` names are there and read as
    tensors only. Image (`model.image.pretrained`): one file. Text: an HF folder with config.json
    and its weights (every shard an index lists)."""
    label = f"{field}={uri}"
    kind = storage.require(uri, field).type
    if field == "model.image.pretrained":
        if kind != pafs.FileType.File:
            raise PretrainedError(f"{label}: expected a checkpoint file (.pth or .safetensors), got a folder")
        _check_weights_file(uri)
        return
    if not storage.exists(storage.join(uri, "config.json")):
        raise PretrainedError(f"{label}: expected an HF model folder with config.json")
    try:
        hf_config = json.loads(storage.fetch(storage.join(uri, "config.json")).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PretrainedError(f"{label}: config.json is not JSON ({err})") from None
    if not isinstance(hf_config, dict) or "auto_map" in hf_config:
        raise PretrainedError(
            f"{label}: config.json names the folder's own Python code (auto_map), and clippy-ray never runs code "
            "from a model folder; use a folder of a model type transformers ships (e.g. T5, BERT)"
        )
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = storage.join(uri, index_name)
        if storage.exists(index):
            try:
                shards = sorted(set(json.loads(storage.fetch(index).read_text())["weight_map"].values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
                raise PretrainedError(f"{index}: not a shard index with a weight_map ({err!r})") from None
            for shard in shards:
                _check_weights_file(storage.join(uri, shard))
            return
    for name in ("model.safetensors", "pytorch_model.bin"):
        if storage.exists(storage.join(uri, name)):
            _check_weights_file(storage.join(uri, name))
            return
    raise PretrainedError(f"{label}: no model.safetensors or pytorch_model.bin in the folder")


def _listing(title: str, keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED]) + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else "")
    return f"\n  {title}: {shown}"


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `module`; every parameter and buffer must be covered with the right shape.
    Tied parameters (one tensor under several names) are satisfied by any one of their names."""
    own = module.state_dict()
    aliases: dict[int, list[str]] = {}
    for name, tensor in own.items():
        aliases.setdefault(tensor.data_ptr(), []).append(name)
    filled = dict(state)
    for names in aliases.values():
        present = [n for n in names if n in state]
        for n in names:
            if n not in filled and present:
                filled[n] = state[present[0]]
    missing = [k for k in own if k not in filled]
    unexpected = [k for k in filled if k not in own]
    mismatched = [
        f"{k} (checkpoint {list(filled[k].shape)} vs model {list(own[k].shape)})"
        for k in own
        if k in filled and filled[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        msg = f"{source}: checkpoint does not match the model {type(module).__name__}"
        if missing:
            msg += _listing("missing keys", missing)
        if unexpected:
            msg += _listing("unexpected keys", unexpected)
        if mismatched:
            msg += _listing("wrong shapes", mismatched)
        msg += (
            "\n  Check the architecture in the config (model.image.name / timm_kwargs, model.text) matches the "
            "checkpoint."
        )
        raise PretrainedError(msg)
    module.load_state_dict(filled, strict=True)


def _unwrap(state: dict) -> dict:
    for key in _WRAPPERS:
        if key in state and isinstance(state[key], dict):
            return _unwrap(state[key])
    return state


def load_image_backbone(vit: nn.Module, uri: str) -> None:
    """Load a timm ViT checkpoint (.pth/.pt/.bin or .safetensors; timm, DINO or supervised) into
    `vit`. The classifier / DINO projection head (`head.*`) is dropped: the tower has its own."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = storage.fetch(uri)
    if path.is_dir():
        raise PretrainedError(f"{uri}: expected a checkpoint file (.pth or .safetensors), got a folder")
    state = _unwrap(read_state_dict(path, uri))
    state = {k: v for k, v in state.items() if not k.startswith("head.") and k != "head"}
    for prefix in _IMAGE_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("head.")}  # prefixed heads too
    if "pos_embed" in state and "pos_embed" in vit.state_dict():
        # timm's own converter: resamples position embeddings trained at another resolution
        state = checkpoint_filter_fn(state, vit)
    load_strict(vit, state, uri)


def _read_hf_weights(folder: Path, uri: str) -> dict[str, torch.Tensor]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            state: dict = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                state.update(read_state_dict(folder / shard, storage.join(uri, shard)))
            return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return read_state_dict(folder / name, storage.join(uri, name))
    raise PretrainedError(f"{uri}: no model.safetensors or pytorch_model.bin in the folder")


def _hf_config(folder: Path, uri: str, overrides: dict | None) -> PretrainedConfig:
    try:  # never the folder's own Python code (auto_map): transformers refuses it here
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=False, **(overrides or {}))
    except (OSError, ValueError) as err:
        raise PretrainedError(f"{uri}: not a usable HF model config ({str(err).strip().splitlines()[0]})") from None


def text_encoder_config(uri: str, overrides: dict | None = None) -> PretrainedConfig:
    """The architecture of the HF model folder at `uri`, from its config.json alone (no weights are
    read or downloaded): what a model is built with when its weights come from elsewhere."""
    config_uri = storage.join(uri, "config.json")
    if not storage.exists(config_uri):
        raise PretrainedError(f"{uri}: expected an HF model folder with config.json")
    raw = storage.read_bytes(config_uri)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_bytes(raw)
        return _hf_config(Path(tmp), uri, overrides)


def load_text_encoder(uri: str, overrides: dict | None = None) -> PreTrainedModel:
    """An encoder built from an HF model folder (config.json + weights), e.g. Sentence-T5.
    A full T5 checkpoint is accepted: its decoder and LM head are not part of the tower."""
    folder = storage.fetch(uri)
    if not (folder / "config.json").exists():
        raise PretrainedError(f"{uri}: expected an HF model folder with config.json")
    config = _hf_config(folder, uri, overrides)
    encoder = encoder_from_config(config)
    state = _read_hf_weights(folder, uri)
    prefix = f"{encoder.base_model_prefix}."
    state = {k.removeprefix(prefix): v for k, v in state.items()}
    if config.model_type in T5_ENCODERS:
        state = {k: v for k, v in state.items() if not k.startswith(("decoder.", "lm_head."))}
    load_strict(encoder, state, uri)
    return encoder


def save_image_backbone(vit: nn.Module, path: str | Path) -> None:
    """The ViT's weights as a timm-style safetensors file (what load_image_backbone reads)."""
    save_file({k: v.detach().contiguous() for k, v in vit.state_dict().items()}, str(path))


def save_text_encoder(encoder: PreTrainedModel, folder: str | Path) -> None:
    """config.json + model.safetensors (tied tensors stored once), what load_text_encoder reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoder.config.to_json_file(str(folder / "config.json"))
    seen: set[int] = set()
    state = {}
    for name, tensor in encoder.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().contiguous()
    save_file(state, str(folder / "model.safetensors"))
