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
from safetensors.torch import save_file

from clippy_ray import config, safeload, storage
from clippy_ray.errors import InputError
from clippy_ray.model.clippy import CLIPpy, build_model
from clippy_ray.model.pretrained import load_strict
from clippy_ray.tokenizer import Tokenizer, build_tokenizer

HANDOFF_DIR = "model"  # the handoff folder's name inside a training checkpoint
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
_FIX = "give a handoff clippy-ray wrote (model.safetensors beside config.yaml), e.g. <run>/step_XXXXXXXX/model"


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


def find_handoff(uri: str, field: str = "--checkpoint") -> str:
    """The URI of the handoff folder at `uri` (the folder itself, or a training checkpoint holding
    one in model/), its safetensors header checked; reads no weights. Anything else is a one-line
    error naming `field=uri` and what to give instead."""
    storage.require(uri, field)
    for folder in (storage.join(uri, HANDOFF_DIR), uri):
        weights = storage.join(folder, WEIGHTS)
        if storage.exists(weights):
            safeload.check_safetensors(weights, _FIX)
            if not storage.exists(storage.join(folder, CONFIG)):
                raise InputError(f"{field}={uri}: no {CONFIG} beside {weights}; {_FIX}")
            return folder
    raise InputError(
        f"{field}={uri}: no {WEIGHTS} there or in {HANDOFF_DIR}/; give a training checkpoint "
        f"(<run>/step_XXXXXXXX) or its {HANDOFF_DIR}/ folder"
    )


def load_weights(model: CLIPpy, uri: str, field: str = "--from") -> None:
    """Copy the weights of the handoff at `uri` (or a checkpoint holding one) into `model`, which
    must have the same architecture (strict). Reads model.safetensors only: nothing in it runs."""
    weights = storage.join(find_handoff(uri, field), WEIGHTS)
    load_strict(model, safeload.load_safetensors(storage.fetch(weights), weights, _FIX), weights)


def _read_yaml(path: Path, uri: str) -> dict:
    """A YAML mapping read with yaml.safe_load (no Python tags, so nothing in it runs)."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        reason = str(err).strip().splitlines()[0]
        raise InputError(f"{uri}: not a YAML config clippy-ray wrote ({reason}); {_FIX}") from None
    if not isinstance(data, dict):
        raise InputError(f"{uri}: not a YAML mapping; {_FIX}")
    return data


def read_config(uri: str) -> dict:
    """The resolved config (as plain YAML data) saved with a handoff folder or a checkpoint holding
    one (local or s3://); {} when there is none. Reads only that file."""
    for name in (f"{HANDOFF_DIR}/{CONFIG}", CONFIG):
        path = storage.join(uri, name)
        if storage.exists(path):
            return _read_yaml(storage.fetch(path), path)
    return {}


def load_handoff(uri: str) -> tuple[CLIPpy, config.Config, Tokenizer]:
    """A model ready for inference from a handoff folder, or a checkpoint holding one (local or
    s3://). Weights keep the dtype they were trained in (bf16 or fp32). Of a checkpoint only its
    handoff is downloaded, not the DeepSpeed shards beside it. Nothing in the folder runs: a
    missing, corrupt or foreign file is a one-line InputError naming it."""
    from transformers import AutoConfig

    handoff = find_handoff(uri)  # checked before anything is downloaded
    folder = storage.fetch(handoff)
    cfg = config.from_dict(_read_yaml(folder / CONFIG, storage.join(handoff, CONFIG)))
    cfg.model.text.tokenizer = str(folder / "tokenizer")
    tokenizer = build_tokenizer(cfg.model.text)
    try:  # a config.json only: transformers refuses a folder's own code (auto_map) when not trusted
        encoder_config = AutoConfig.from_pretrained(str(folder / "text_encoder"), trust_remote_code=False)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0]
        raise InputError(f"{storage.join(handoff, 'text_encoder')}: not an encoder config ({reason}); {_FIX}") from None
    # The saved weights replace everything, so nothing the config names as pretrained is loaded.
    model = build_model(cfg.model, tokenizer.vocab_size, load_pretrained=False, encoder_config=encoder_config)
    state = safeload.load_safetensors(folder / WEIGHTS, storage.join(handoff, WEIGHTS), _FIX)
    dtype = next(iter(state.values())).dtype
    model.to(dtype)
    load_strict(model, state, uri)
    return model.eval(), cfg, tokenizer
