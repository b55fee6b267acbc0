"""Gathered symmetric InfoNCE (CLIP loss) over the global batch.

Each rank scores its local rows against the all-gathered columns (never the full N x N on one
rank). The gather carries gradients back to the rank that owns each embedding, so with the usual
data-parallel gradient averaging the parameter gradients are those of the single-process loss
on the concatenated batch. Logit matmuls run in `matmul_dtype` (bf16 by default); scaling and
log-softmax run in float32. `chunk_size` splits the columns and recomputes each chunk in backward,
so peak memory is [local, chunk] instead of [local, global]. Plain torch: no Triton, no CUDA code.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the gradient of its own rows summed
    over all ranks (every rank's loss uses every row). Synchronous collectives on any backend."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        # all_gather_single replaces all_gather_into_tensor in newer torch; same collective
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, x.contiguous())
        ctx.rows = x.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = grad.new_empty((ctx.rows, *grad.shape[1:]))
            (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, grad)
            return out
        summed = grad.clone()  # gloo has no reduce-scatter: all-reduce, keep this rank's rows
        dist.all_reduce(summed)
        start = dist.get_rank() * ctx.rows
        return summed[start : start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 with gradients. Every rank must pass the same shape (drop the last
    partial batch)."""
    _, size = world()
    if size == 1:
        return x
    return _GatherWithGrad.apply(x)


def _lse(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row-wise logsumexp of scale * q k^T: q [n, E], k [c, E] -> [n] float32."""
    logits = (q.to(dtype) @ k.to(dtype).T).float() * scale.float()
    return torch.logsumexp(logits, dim=1)


def row_logsumexp(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, chunk_size: int | None = None
) -> torch.Tensor:
    if chunk_size is None or chunk_size >= k.shape[0]:
        return _lse(q, k, scale, dtype)
    parts = [
        checkpoint(_lse, q, k[start : start + chunk_size], scale, dtype, use_reentrant=False)
        for start in range(0, k.shape[0], chunk_size)
    ]
    return torch.logsumexp(torch.stack(parts, dim=1), dim=1)


def positive_logits(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """scale * <a_i, b_i> with the same matmul rounding as the full logits: [n, E] x2 -> [n]."""
    dots = (a.to(dtype).unsqueeze(1) @ b.to(dtype).unsqueeze(2)).reshape(-1)
    return dots.float() * scale.float()


class ContrastiveLoss(nn.Module):
    """loss = (CE(img -> all texts) + CE(text -> all images)) / 2, averaged over this rank's rows.

    Returns this rank's loss; the mean over ranks equals the loss on the global batch.
    """

    def __init__(self, matmul_dtype: torch.dtype = torch.bfloat16, chunk_size: int | None = None):
        super().__init__()
        self.matmul_dtype = matmul_dtype
        self.chunk_size = chunk_size

    def forward(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """image, text: L2-normalized [n, E] (local rows); scale: [1] or [] (exp of logit scale)."""
        if image.shape != text.shape:
            raise ValueError(f"image {tuple(image.shape)} and text {tuple(text.shape)} embeddings must match")
        return self.local_loss(image, text, gather_with_grad(image), gather_with_grad(text), scale)

    def local_loss(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        all_image: torch.Tensor,
        all_text: torch.Tensor,
        scale: torch.Tensor,
    ) -> torch.Tensor:
        """Local rows [n, E] against the global columns [N, E] (which contain the local rows)."""
        scale = scale.reshape(())
        dt = self.matmul_dtype
        pos = positive_logits(image, text, scale, dt)  # the target column is this row's own pair
        i2t = row_logsumexp(image, all_text, scale, dt, self.chunk_size) - pos
        t2i = row_logsumexp(text, all_image, scale, dt, self.chunk_size) - pos
        return 0.5 * (i2t.mean() + t2i.mean())
