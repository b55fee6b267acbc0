"""Gathered symmetric InfoNCE (CLIP loss) over the global batch, fused and blockwise.

Each rank scores its local rows against the all-gathered columns. The gather carries gradients back
to the rank that owns each embedding, so with the usual data-parallel gradient averaging the
parameter gradients are those of the single-process loss on the concatenated batch.

The loss is one autograd Function that never holds the local x global logits: the forward streams
over blocks of columns keeping a running (max, sum) float32 logsumexp per row for both directions;
the backward recomputes each block's logits and accumulates the gradients of the local rows, of the
gathered columns and of the logit scale. Block matmuls run in `matmul_dtype` (bf16 where the
training precision is bf16), everything after them in float32. Plain torch: no Triton, no CUDA/C++.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


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


def auto_block(rows: int, cols: int, device: torch.device) -> int:
    """Columns per block when loss.chunk_size is null: 2048 on a CPU, 8192 on a GPU (matmuls large
    enough to run near peak; a block of logits is still a small part of the full matrix)."""
    return min(cols, 8192 if device.type == "cuda" else 2048)


CPU_TILE_LOGITS = 2**19  # 2 MiB of float32: the elementwise passes after a block's matmul run in cache


def _row_tile(rows: int, block: int, device: torch.device) -> int:
    """Rows per elementwise pass over a block (scale, shift, exp, sum, cast): CPU_TILE_LOGITS
    logits on a CPU; a GPU takes the block whole."""
    return rows if device.type == "cuda" else max(1, min(rows, CPU_TILE_LOGITS // block))


def _positives(block: torch.Tensor, shift: int) -> tuple[torch.Tensor, int]:
    """Local row i's positive is global column offset + i; in a tile whose first row is local row
    r0 and first column global column c0 that is entry (i - r0, i - r0 + shift), shift = offset +
    r0 - c0. -> (a view of those entries, first tile row that has one)."""
    return torch.diagonal(block, shift), max(0, -shift)


class _BlockwiseInfoNCE(torch.autograd.Function):
    """loss = (CE(local images -> all texts) + CE(local texts -> all images)) / 2 over local rows,
    computed block by block over the columns (see the module docstring). scale must be > 0."""

    @staticmethod
    def forward(ctx, image, text, all_image, all_text, scale, offset: int, block: int, dtype: torch.dtype):
        n, cols = image.shape[0], all_text.shape[0]
        tile = _row_tile(n, block, image.device)
        s = scale.detach().reshape(1).float()  # 1-d: promotes a bf16 operand to float32 in the same pass
        queries = (image.detach().to(dtype), text.detach().to(dtype))
        keys = (all_text.detach(), all_image.detach())  # cast block by block: no [N, E] copy
        run_max = torch.full((2, n), float("-inf"), device=image.device)
        run_sum = torch.zeros((2, n), device=image.device)
        pos = torch.zeros((2, n), device=image.device)
        for c0 in range(0, cols, block):
            for d in range(2):
                dots = queries[d] @ keys[d][c0 : c0 + block].to(dtype).T  # [n, b] in the matmul dtype
                diag, first = _positives(dots, offset - c0)
                pos[d, first : first + diag.numel()] = diag * s
                new_max = torch.maximum(run_max[d], dots.amax(dim=1) * s)  # s > 0: the max commutes with it
                run_sum[d].mul_(torch.exp(run_max[d] - new_max))
                run_max[d] = new_max
                for r0 in range(0, n, tile):
                    x = torch.mul(dots[r0 : r0 + tile], s).sub_(new_max[r0 : r0 + tile, None]).exp_()
                    run_sum[d, r0 : r0 + tile] += x.sum(dim=1)  # float32 [tile, b] -> [tile]
        lse = run_max + run_sum.log()  # [2, n]
        ctx.save_for_backward(image, text, all_image, all_text, scale, lse)
        ctx.offset, ctx.block, ctx.dtype = offset, block, dtype
        return (lse - pos).mean(dim=1).sum() * 0.5

    @staticmethod
    def backward(ctx, grad_loss):
        image, text, all_image, all_text, scale, lse = ctx.saved_tensors
        n, cols, dtype, block = image.shape[0], all_text.shape[0], ctx.dtype, ctx.block
        tile = _row_tile(n, block, image.device)
        s = scale.detach().reshape(1).float()
        queries = (image.detach().to(dtype), text.detach().to(dtype))
        keys = (all_text.detach(), all_image.detach())
        row_acc = torch.zeros((2, n, image.shape[1]), device=image.device)  # sum_j G_ij k_j, float32
        # sum_i G_ij q_i, float32: one matmul per block over all local rows, so nothing accumulates
        col = (torch.empty(all_text.shape, device=image.device), torch.empty(all_image.shape, device=image.device))
        for c0 in range(0, cols, block):
            for d in range(2):
                k = keys[d][c0 : c0 + block].to(dtype)
                dots = queries[d] @ k.T  # [n, b]
                g = torch.empty_like(dots)  # G = softmax - onehot, in the matmul dtype
                for r0 in range(0, n, tile):
                    x = torch.mul(dots[r0 : r0 + tile], s).sub_(lse[d, r0 : r0 + tile, None]).exp_()
                    _positives(x, ctx.offset + r0 - c0)[0].sub_(1.0)  # in float32: p - 1 keeps its digits
                    g[r0 : r0 + tile] = x
                row_acc[d] += g @ k
                col[d][c0 : c0 + block] = g.T @ queries[d]
        # d loss / d logits = G * coef; the logits' own factor s is applied once, here
        coef = grad_loss.float() * 0.5 / n
        grad_scale = None
        if ctx.needs_input_grad[4]:
            # sum_ij G_ij <q_i, k_j> = sum_i <q_i, sum_j G_ij k_j>: no extra pass over the blocks
            dots = sum((queries[d].float() * row_acc[d]).sum() for d in range(2))
            grad_scale = (coef * dots).reshape(scale.shape).to(scale.dtype)
        factor = coef * s
        return (
            row_acc[0].mul_(factor).to(image.dtype),
            row_acc[1].mul_(factor).to(text.dtype),
            col[1].mul_(factor).to(all_image.dtype),
            col[0].mul_(factor).to(all_text.dtype),
            grad_scale,
            None,
            None,
            None,
        )


class _SelfInfoNCE(torch.autograd.Function):
    """The same loss when the local rows are the whole batch (one process, or validation): the
    logits of texts -> images are the transpose of images -> texts, so each block's one matmul
    serves both directions. A column block holds every row, so the texts' logsumexp over the images
    is complete within it, while the images' runs over the blocks as in `_BlockwiseInfoNCE`.
    Backward: G = P_row + P_col - 2I per block, one recomputed matmul and two for the gradients:
    4 matmuls of N x N x E in all (the two-direction form: 8; OpenCLIP's full logits: 6)."""

    @staticmethod
    def forward(ctx, image, text, scale, block: int, dtype: torch.dtype):
        n = image.shape[0]
        tile = _row_tile(n, block, image.device)
        s = scale.detach().reshape(1).float()
        query = image.detach().to(dtype)
        keys = text.detach()
        run_max = torch.full((n,), float("-inf"), device=image.device)
        run_sum = torch.zeros(n, device=image.device)
        col_lse = torch.empty(n, device=image.device)
        pos = torch.zeros(n, device=image.device)
        for c0 in range(0, n, block):
            dots = query @ keys[c0 : c0 + block].to(dtype).T  # [n, b]: image i . text c0 + j
            diag, first = _positives(dots, -c0)
            pos[first : first + diag.numel()] = diag * s
            new_max = torch.maximum(run_max, dots.amax(dim=1) * s)  # images -> texts: rows, across blocks
            run_sum.mul_(torch.exp(run_max - new_max))
            run_max = new_max
            col_max = dots.amax(dim=0).float() * s  # texts -> images: this block's columns, over every row
            col_sum = torch.zeros(dots.shape[1], device=image.device)
            for r0 in range(0, n, tile):
                part = torch.mul(dots[r0 : r0 + tile], s)
                run_sum[r0 : r0 + tile] += torch.sub(part, new_max[r0 : r0 + tile, None]).exp_().sum(dim=1)
                col_sum += part.sub_(col_max).exp_().sum(dim=0)
            col_lse[c0 : c0 + block] = col_max + col_sum.log()
        lse = torch.stack([run_max + run_sum.log(), col_lse])  # [2, n]
        ctx.save_for_backward(image, text, scale, lse)
        ctx.block, ctx.dtype = block, dtype
        return (lse - pos).mean(dim=1).sum() * 0.5

    @staticmethod
    def backward(ctx, grad_loss):
        image, text, scale, lse = ctx.saved_tensors
        n, dtype, block = image.shape[0], ctx.dtype, ctx.block
        tile = _row_tile(n, block, image.device)
        s = scale.detach().reshape(1).float()
        query = image.detach().to(dtype)
        keys = text.detach()
        row_acc = torch.zeros(image.shape, device=image.device)  # sum_j G_ij text_j, float32
        col = torch.empty(text.shape, device=image.device)  # sum_i G_ij image_i, float32
        for c0 in range(0, n, block):
            k = keys[c0 : c0 + block].to(dtype)
            dots = query @ k.T
            g = torch.empty_like(dots)  # G = P_row + P_col - 2I, in the matmul dtype
            for r0 in range(0, n, tile):
                part = torch.mul(dots[r0 : r0 + tile], s)
                x = torch.sub(part, lse[0, r0 : r0 + tile, None]).exp_()
                x += part.sub_(lse[1, None, c0 : c0 + block]).exp_()
                _positives(x, r0 - c0)[0].sub_(2.0)  # in float32
                g[r0 : r0 + tile] = x
            row_acc += g @ k
            col[c0 : c0 + block] = g.T @ query
        coef = grad_loss.float() * 0.5 / n
        grad_scale = None
        if ctx.needs_input_grad[2]:
            grad_scale = (coef * (query.float() * row_acc).sum()).reshape(scale.shape).to(scale.dtype)
        factor = coef * s
        return row_acc.mul_(factor).to(image.dtype), col.mul_(factor).to(text.dtype), grad_scale, None, None


def blockwise_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    all_image: torch.Tensor,
    all_text: torch.Tensor,
    scale: torch.Tensor,
    offset: int,
    dtype: torch.dtype = torch.bfloat16,
    block: int | None = None,
) -> torch.Tensor:
    """Local rows image, text [n, E] against the global columns all_image, all_text [N, E], whose
    rows offset..offset+n are this rank's pairs; scale [1] or []. Columns per block: `block`, or
    `auto_block` when None."""
    block = block or auto_block(image.shape[0], all_text.shape[0], image.device)
    if image is all_image and text is all_text and offset == 0:  # one process: each matmul serves both ways
        return _SelfInfoNCE.apply(image, text, scale, block, dtype)
    return _BlockwiseInfoNCE.apply(image, text, all_image, all_text, scale, offset, block, dtype)


def reference_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    all_image: torch.Tensor,
    all_text: torch.Tensor,
    scale: torch.Tensor,
    offset: int,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The same loss in plain autograd, as OpenCLIP's ClipLoss(local_loss=True) computes it: the full
    [n, N] logits in both directions. The baseline of the tests and of bench/loss_memory.py."""
    s = scale.reshape(()).float()
    labels = torch.arange(image.shape[0], device=image.device) + offset
    per_image = (image.to(dtype) @ all_text.to(dtype).T).float() * s
    per_text = (text.to(dtype) @ all_image.to(dtype).T).float() * s
    return 0.5 * (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels))


class ContrastiveLoss(nn.Module):
    """loss = (CE(img -> all texts) + CE(text -> all images)) / 2, averaged over this rank's rows.

    Returns this rank's loss; the mean over ranks equals the loss on the global batch.
    chunk_size: columns per block (None: chosen from the batch and the device, `auto_block`).
    """

    def __init__(self, matmul_dtype: torch.dtype = torch.bfloat16, chunk_size: int | None = None):
        super().__init__()
        self.matmul_dtype = matmul_dtype
        self.chunk_size = chunk_size

    def forward(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """image, text: L2-normalized [n, E] (local rows); scale: [1] or [] (exp of logit scale, > 0)."""
        if image.shape != text.shape:
            raise ValueError(f"image {tuple(image.shape)} and text {tuple(text.shape)} embeddings must match")
        rank, _ = world()
        all_image, all_text = gather_with_grad(image), gather_with_grad(text)
        offset = rank * image.shape[0]  # this rank's pairs in the gathered columns
        return blockwise_loss(image, text, all_image, all_text, scale, offset, self.matmul_dtype, self.chunk_size)
