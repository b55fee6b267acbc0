"""DeepSpeed configuration and engine from a TrainConfig (the only DeepSpeed-aware training file
besides the loop and the checkpoint code)."""

from __future__ import annotations

import torch

from clippy_ray.config import TrainConfig
from clippy_ray.train.optim import build_optimizer, lr_lambda


def deepspeed_config(cfg: TrainConfig) -> dict:
    return {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW / our LAMB as client optimizers
        "steps_per_print": 2**31 - 1,  # progress is ours (rank 0), not DeepSpeed's
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, cfg: TrainConfig):
    """deepspeed.initialize on the existing process group (Ray Train made it)."""
    import deepspeed

    from clippy_ray._compat import skip_deepspeed_shm_op

    skip_deepspeed_shm_op()
    optimizer = build_optimizer(model, cfg)
    # A factory, so the schedule drives the optimizer DeepSpeed wraps (and is saved with it).
    schedule = lr_lambda(cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(cfg),
        dist_init_required=False,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    return engine
