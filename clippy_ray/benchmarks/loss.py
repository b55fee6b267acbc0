"""Peak memory and time of the fused blockwise loss against OpenCLIP's local loss (the full
[local, global] logits in plain autograd) for one simulated rank of a large global batch."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from clippy_ray.benchmarks.common import PeakMemory, spread, synchronize
from clippy_ray.loss import blockwise_loss, reference_loss


def rank_inputs(batch: int, ranks: int, dim: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """One rank's view: its local image/text rows [batch/ranks, dim] and the gathered columns
    [batch, dim] (separate leaves, as the all-gather hands them over), unit norm, float32."""
    g = torch.Generator().manual_seed(seed)
    local = batch // ranks
    all_image = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(device)
    all_text = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(device)
    return [all_image[:local].clone(), all_text[:local].clone(), all_image, all_text]


def losses(dtype: torch.dtype, block: int | None) -> dict[str, Callable]:
    """name -> fn(image, text, all_image, all_text, scale) for this rank (rank 0: offset 0)."""
    return {
        "reference": lambda *t: reference_loss(*t, 0, dtype),
        "fused": lambda *t: blockwise_loss(*t, 0, dtype, block),
    }


def measure(fn: Callable, inputs: list[torch.Tensor], scale: torch.Tensor) -> dict:
    """One forward + backward: {seconds, peak_bytes (above the inputs), loss}."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    device = inputs[0].device
    with PeakMemory(device) as memory:
        synchronize(device)
        start = time.perf_counter()
        loss = fn(*leaves, scale)
        loss.backward()
        synchronize(device)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_bytes": memory.peak, "loss": loss.item()}


def run(batch: int, ranks: int, dim: int, block: int | None, dtype: torch.dtype, reps: int, device: torch.device):
    """Warm-up, then `reps` interleaved (reference, fused) pairs -> per-candidate spreads and the
    per-rep ratios fused / reference."""
    inputs = rank_inputs(batch, ranks, dim, device)
    scale = torch.tensor([1 / 0.07], device=device)
    candidates = losses(dtype, block)
    for fn in candidates.values():  # kernel selection (oneDNN builds a kernel per shape), page faults
        measure(fn, inputs, scale)
    runs: dict[str, list[dict]] = {name: [] for name in candidates}
    for _ in range(reps):
        for name, fn in candidates.items():
            runs[name].append(measure(fn, inputs, scale))
    out = {}
    for name, rs in runs.items():
        out[name] = {key: spread([r[key] for r in rs]) for key in ("seconds", "peak_bytes", "loss")}
    ratios = {}
    for key in ("seconds", "peak_bytes"):
        if runs["fused"][0][key] is not None:
            ratios[key] = spread([f[key] / r[key] for f, r in zip(runs["fused"], runs["reference"])])
    out["fused_over_reference"] = ratios
    return out
