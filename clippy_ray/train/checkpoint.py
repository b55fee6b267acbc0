"""The handoff checkpoint: plain safetensors weights + the resolved config + the tokenizer, which
`eval` and `segment` load without DeepSpeed. Lives in `<checkpoint>/model/` beside the DeepSpeed
shards (`<checkpoint>/ds/`) that resume uses."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from clippy_ray import config, storage
from clippy_ray.model import CLIPpy, build_model
from clippy_ray.model.pretrained import load_strict
from clippy_ray.tokenizer import Tokenizer, build_tokenizer

HANDOFF_DIR = "model"
DEEPSPEED_TAG = "ds"


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (None elsewhere). Collective under ZeRO-3: every rank
    must call it."""
    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None


def export_handoff(model: CLIPpy, state: dict[str, torch.Tensor], cfg: config.Config, tokenizer: Tokenizer,
                   folder: str | Path) -> None:
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
    save_file(unique, str(folder / "model.safetensors"))
    (folder / "config.yaml").write_text(config.dump(cfg))
    model.text.encoder.config.save_pretrained(str(folder / "text_encoder"))
    tokenizer.save(folder / "tokenizer")


def load_handoff(uri: str) -> tuple[CLIPpy, config.Config, Tokenizer]:
    """A model ready for inference from a handoff folder, or a checkpoint holding one (local or
    s3://). Weights keep the dtype they were trained in (bf16 or fp32)."""
    folder = storage.fetch(uri)
    if (folder / HANDOFF_DIR / "model.safetensors").exists():
        folder = folder / HANDOFF_DIR
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"{uri}: no model.safetensors (expected a handoff folder or a checkpoint with {HANDOFF_DIR}/)")
    from transformers import AutoConfig

    cfg = config.from_dict(yaml.safe_load((folder / "config.yaml").read_text()))
    cfg.model.text.tokenizer = str(folder / "tokenizer")
    tokenizer = build_tokenizer(cfg.model.text)
    encoder_config = AutoConfig.from_pretrained(str(folder / "text_encoder"))
    model = build_model(cfg.model, tokenizer.vocab_size, encoder_config=encoder_config)  # no pretrained loads
    state = load_file(str(folder / "model.safetensors"))
    dtype = next(iter(state.values())).dtype
    model.to(dtype)
    load_strict(model, state, uri)
    return model.eval(), cfg, tokenizer
