"""Optimizers and the learning-rate schedule (plain torch; DeepSpeed wraps them at the edge)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from clippy_ray.config import TrainConfig
from clippy_ray.errors import UserError

# Parameters that never get weight decay besides 1-d ones (norms, biases): the temperature and
# the learned tokens / position embeddings, as CLIP and OpenCLIP do.
_NO_DECAY_NAMES = ("logit_scale", "pos_embed", "cls_token", "reg_token")


def param_groups(model: nn.Module, weight_decay: float, order: Callable[[list], list] | None = None) -> list[dict]:
    """Decayed and undecayed parameters, each group in `order` (default: aligned_order)."""
    order = order or aligned_order
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or any(n in name for n in _NO_DECAY_NAMES):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": order(decay), "weight_decay": weight_decay},
        {"params": order(no_decay), "weight_decay": 0.0},
    ]


def aligned_order(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """`params` with those whose size is not a multiple of 8 moved to the end (order otherwise kept).
    DeepSpeed ZeRO-1/2 packs each group's bf16 parameters back to back in one flat buffer; one of
    odd size (logit_scale, [1]) shifts every later one off 16-byte alignment, and cuBLAS then runs
    their matmuls on slow align-1 kernels. Measured on an H200 (bench/profile_step.py, the
    ViT-B/16 + T5-base config): with logit_scale first among the no-decay parameters, every ViT
    linear bias was misaligned and those layers' forward matmuls took 34% of the kernel time."""
    odd = [getattr(p, "ds_numel", p.numel()) % 8 != 0 for p in params]  # ZeRO-3 empties p; ds_numel: its size
    return [p for p, o in zip(params, odd) if not o] + [p for p, o in zip(params, odd) if o]


def layout(model: nn.Module, order: Callable[[list], list] | None = None) -> str:
    """Which parameters each optimizer group holds, in order, as a digest. DeepSpeed saves the
    optimizer state (under ZeRO as flat per-group buffers with the float32 masters; without, per
    parameter index), which loads into the right parameters only in the order it was saved in."""
    names = {id(p): name for name, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in param_groups(model, 0.0, order)]
    return hashlib.sha256(json.dumps(groups).encode()).hexdigest()[:16]


def resume_order(model: nn.Module, train_state: dict | None, source: str) -> Callable[[list], list]:
    """The order to build the optimizer's groups in when resuming the checkpoint at `source` (its
    train_state.json: `train_state`): the one its optimizer state was saved in, so that state loads
    into the right parameters. A checkpoint that records none was saved before aligned_order, in the
    model's own order, and keeps it (correct, with that order's misaligned buffers); a record that
    matches neither belongs to other parameters and is refused."""
    if train_state is None:
        raise UserError(
            f"{source}: its train_state.json cannot be read; it records the order of the parameters in "
            "the optimizer state, without which that state cannot be resumed (check the checkpoint is "
            "complete and readable)"
        )
    saved = train_state.get("param_layout")
    if saved is None:
        return list
    for order in (aligned_order, list):
        if saved == layout(model, order):
            return order
    raise UserError(
        f"{source}: its optimizer state was saved for other parameters than this config's model, so it "
        f"cannot be resumed as is; start from its weights in a new run instead: clippy-ray train --from "
        f"{source} --from-mode weights train.run_name=NEW_NAME (optimizer state and schedule start fresh)"
    )


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2019): Adam moments with a per-parameter trust ratio ||w|| / ||update||,
    the large-batch optimizer the CLIPpy paper cites. Plain torch, any device.

    Under ZeRO the tensors it steps are flat float32 partitions, each holding pieces of many
    parameters (a parameter may straddle ranks). `partitioned` tells it where the pieces lie; each
    parameter's norms are then summed over its pieces and over ranks (one all-reduce per flat
    tensor), so the trust ratio is LAMB's, not one per partition."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._pieces: Callable[[], dict[int, list[tuple[int, int, int]]]] | None = None
        self._count = 0

    def partitioned(self, pieces: Callable[[], dict[int, list[tuple[int, int, int]]]], count: int) -> None:
        """pieces() -> {data_ptr of a flat tensor: [(parameter index < count, start, numel), ...]}
        on this rank; every rank steps the same flat tensors in the same order (a collective each)."""
        self._pieces, self._count = pieces, count

    def _update(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """Adam's bias-corrected step direction plus decoupled weight decay, float32."""
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        state["step"] += 1
        step = state["step"].item()
        grad = p.grad.float()
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat = state["exp_avg"] / (1 - beta1**step)
        v_hat = state["exp_avg_sq"] / (1 - beta2**step)
        update = m_hat / (v_hat.sqrt() + group["eps"])
        if group["weight_decay"]:
            update.add_(p.float(), alpha=group["weight_decay"])
        return update

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        pieces = self._pieces() if self._pieces is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if pieces is None:
                    if p.grad is not None:
                        update = self._update(p, group)
                        p.add_((update * _trust(p.float().norm(), update.norm()) * -group["lr"]).to(p.dtype))
                    continue
                if p.data_ptr() not in pieces:
                    raise RuntimeError("LAMB: a flat partition with no parameter map; call partitioned() again")
                update = self._update(p, group) if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
                self._step_pieces(p, update, pieces[p.data_ptr()], group["lr"])
        return loss

    def _step_pieces(self, flat: torch.Tensor, update: torch.Tensor, pieces: list, lr: float) -> None:
        squares = torch.zeros(2, self._count, device=flat.device)  # ||w||^2, ||update||^2 per parameter
        for index, start, numel in pieces:
            squares[0, index] += flat[start : start + numel].float().square().sum()
            squares[1, index] += update[start : start + numel].square().sum()
        dist.all_reduce(squares)
        trust = _trust(squares[0].sqrt(), squares[1].sqrt())
        for index, start, numel in pieces:
            flat[start : start + numel].add_((update[start : start + numel] * (trust[index] * -lr)).to(flat.dtype))


def _trust(w_norm: torch.Tensor, u_norm: torch.Tensor) -> torch.Tensor:
    """||w|| / ||update||, or 1 where either is zero (fresh biases, no gradient)."""
    return torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, order: Callable[[list], list] | None = None
) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, order)
    if cfg.optimizer == "lamb":
        return Lamb(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    # torch's fused AdamW kernel, on GPU and CPU (one pass over the state: ~5x faster on a CPU)
    fused = torch.cuda.is_available() or not cfg.use_gpu
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def lr_lambda(cfg: TrainConfig):
    """Multiplier of cfg.lr at optimizer step s: linear warmup, then cosine to min_lr."""
    floor = cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
