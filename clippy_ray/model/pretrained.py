"""Pretrained weights from a local path or s3:// URI, loaded strictly: any missing, unexpected or
wrongly shaped key is an error that lists them. Nothing is downloaded from a model hub."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from clippy_ray import storage
from clippy_ray.errors import UserError
from clippy_ray.model.text import T5_ENCODERS, encoder_from_config

# Keys that hold the whole model inside common checkpoint wrappers (DINO: teacher/student).
_WRAPPERS = ("state_dict", "model", "teacher", "module")
_IMAGE_PREFIXES = ("module.", "backbone.", "encoder.")
_MAX_LISTED = 12


class PretrainedError(UserError, ValueError):
    """A checkpoint that does not fit the model, with the keys that disagree."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise PretrainedError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


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
    state = _unwrap(read_state_dict(path))
    state = {k: v for k, v in state.items() if not k.startswith("head.") and k != "head"}
    for prefix in _IMAGE_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("head.")}  # prefixed heads too
    if "pos_embed" in state and "pos_embed" in vit.state_dict():
        # timm's own converter: resamples position embeddings trained at another resolution
        state = checkpoint_filter_fn(state, vit)
    load_strict(vit, state, uri)


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    for index_name, reader in (
        ("model.safetensors.index.json", load_file),
        ("pytorch_model.bin.index.json", read_state_dict),
    ):
        index = folder / index_name
        if index.exists():
            state: dict = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                state.update(reader(str(folder / shard)))
            return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return read_state_dict(folder / name)
    raise PretrainedError(f"{folder}: no model.safetensors or pytorch_model.bin in the folder")


def load_text_encoder(uri: str, overrides: dict | None = None) -> PreTrainedModel:
    """An encoder built from an HF model folder (config.json + weights), e.g. Sentence-T5.
    A full T5 checkpoint is accepted: its decoder and LM head are not part of the tower."""
    folder = storage.fetch(uri)
    if not (folder / "config.json").exists():
        raise PretrainedError(f"{uri}: expected an HF model folder with config.json")
    config = AutoConfig.from_pretrained(str(folder), **(overrides or {}))
    encoder = encoder_from_config(config)
    state = _read_hf_weights(folder)
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
