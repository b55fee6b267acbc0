"""The saved-model format ("handoff"): plain safetensors weights + the resolved config + the text
encoder's config + the tokenizer, in one folder. Training writes it (`<checkpoint>/model/`, beside
the DeepSpeed shards that resume uses); eval and segment read it. No Ray, no DeepSpeed.

    <folder>/model.safetensors   full weights, tied tensors stored once, in the trained dtype
    <folder>/config.yaml         the run's resolved config
    <folder>/text_encoder/       the text encoder's HF config (its architecture)
    <folder>/tokenizer/          the tokenizer
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from clippy_ray import config, storage
from clippy_ray.errors import InputError
from clippy_ray.model.clippy import CLIPpy, build_model
from clippy_ray.model.pretrained import load_strict
from clippy_ray.tokenizer import Tokenizer, build_tokenizer

HANDOFF_DIR = "model"  # the handoff folder's name inside a training checkpoint
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"


def export_handoff(
    model: CLIPpy, state: dict[str, torch.Tensor], cfg: config.Config, tokenizer: Tokenizer, folder: str | Path
) -> None:
    """Write `state` (the full weights) with what rebuilds the model: the resolved config, the text
    encoder's own config (it can come from a pretrained folder) and the tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    unique = {}
    for name, tensor in state.items():  # tied tensors stored once (safetensors refuses aliases)
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        unique[name] = tensor.contiguous()
    save_file(unique, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(config.dump(cfg))
    model.text.encoder.config.save_pretrained(str(folder / "text_encoder"))
    tokenizer.save(folder / "tokenizer")


def read_config(uri: str) -> dict:
    """The resolved config (as plain YAML data) saved with a handoff folder or a checkpoint holding
    one (local or s3://); {} when there is none. Reads only that file."""
    for name in (f"{HANDOFF_DIR}/{CONFIG}", CONFIG):
        path = storage.join(uri, name)
        if storage.exists(path):
            return yaml.safe_load(storage.fetch(path).read_text()) or {}
    return {}


def load_handoff(uri: str) -> tuple[CLIPpy, config.Config, Tokenizer]:
    """A model ready for inference from a handoff folder, or a checkpoint holding one (local or
    s3://). Weights keep the dtype they were trained in (bf16 or fp32). Of a checkpoint only its
    handoff is downloaded, not the DeepSpeed shards beside it."""
    nested = storage.join(uri, HANDOFF_DIR)
    folder = storage.fetch(nested if storage.exists(storage.join(nested, WEIGHTS)) else uri)
    if not (folder / WEIGHTS).exists():
        raise InputError(f"{uri}: no {WEIGHTS} (expected a handoff folder or a checkpoint with {HANDOFF_DIR}/)")
    from transformers import AutoConfig

    cfg = config.from_dict(yaml.safe_load((folder / CONFIG).read_text()))
    cfg.model.text.tokenizer = str(folder / "tokenizer")
    tokenizer = build_tokenizer(cfg.model.text)
    encoder_config = AutoConfig.from_pretrained(str(folder / "text_encoder"))
    # The saved weights replace everything, so nothing the config names as pretrained is loaded.
    model = build_model(cfg.model, tokenizer.vocab_size, load_pretrained=False, encoder_config=encoder_config)
    state = load_file(str(folder / WEIGHTS))
    dtype = next(iter(state.values())).dtype
    model.to(dtype)
    load_strict(model, state, uri)
    return model.eval(), cfg, tokenizer
