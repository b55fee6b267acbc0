"""Memory and time of the chunked contrastive loss against the unchunked one, same run.

Memory is what autograd keeps for backward (bytes of saved tensors), the part chunking bounds.
    python bench/loss_chunking.py [--batch 8192] [--dim 512] [--chunk 1024]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from clippy_ray.loss import ContrastiveLoss


def measure(
    loss_fn: ContrastiveLoss, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, local: int, repeats: int
):
    """-> (loss, peak bytes saved for backward (each storage once), best fwd+bwd seconds)."""
    storages: set[int] = set()
    saved = [0, 0]  # current, peak

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in storages:
            storages.add(storage.data_ptr())
            saved[0] += storage.nbytes()
            saved[1] = max(saved[1], saved[0])
        return t

    times = []
    for _ in range(repeats):
        a, b = image.clone().requires_grad_(), text.clone().requires_grad_()
        storages.clear()
        saved[0] = 0
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            # One process stands in for a rank: its rows are the first `local` rows, its columns
            # the whole global batch (what the gather hands every rank).
            loss = loss_fn.local_loss(a[:local], b[:local], a, b, scale)
        loss.backward()
        times.append(time.perf_counter() - start)
    return loss.item(), saved[1], min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8192, help="global batch (columns)")
    parser.add_argument("--local", type=int, default=1024, help="rows on this rank")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    image = F.normalize(torch.randn(args.batch, args.dim), dim=-1)
    text = F.normalize(torch.randn(args.batch, args.dim), dim=-1)
    scale = torch.tensor([1 / 0.07])
    base = ContrastiveLoss(torch.bfloat16, chunk_size=None)
    chunked = ContrastiveLoss(torch.bfloat16, chunk_size=args.chunk)
    base_loss, base_mem, base_time = measure(base, image, text, scale, args.local, args.repeats)
    loss, mem, t = measure(chunked, image, text, scale, args.local, args.repeats)
    print(f"local {args.local} x global {args.batch} x dim {args.dim}, bf16 matmul, chunk {args.chunk}")
    print(
        f"unchunked: saved-for-backward {base_mem / 2**20:8.1f} MiB, fwd+bwd {base_time * 1e3:7.1f} ms, "
        f"loss {base_loss:.5f}"
    )
    print(f"chunked:   saved-for-backward {mem / 2**20:8.1f} MiB, fwd+bwd {t * 1e3:7.1f} ms, loss {loss:.5f}")
    print(f"ratio chunked/unchunked: memory {mem / base_mem:.3f}x, time {t / base_time:.2f}x")
    print("reproduce: python bench/loss_chunking.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()))


if __name__ == "__main__":
    main()
