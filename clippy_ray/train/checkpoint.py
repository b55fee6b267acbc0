"""The DeepSpeed side of a training checkpoint: the shards that resume uses live in
`<checkpoint>/ds/`; the handoff model beside them (`<checkpoint>/model/`) is written with
`clippy_ray.model.handoff`."""

from __future__ import annotations

import contextlib

import torch

DEEPSPEED_TAG = "ds"


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (None elsewhere). Collective under ZeRO-3: every rank
    must call it."""
    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    module = engine.module
    gathered = (
        deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
        if engine.zero_optimization_stage() == 3
        else contextlib.nullcontext()
    )
    with gathered:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
