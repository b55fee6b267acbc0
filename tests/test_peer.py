"""clippy-ray's loss against the real peer: OpenCLIP's own ClipLoss(local_loss=True,
gather_with_grad=True) (open-clip-torch, pinned in the dev extra) on the same embeddings, in one
process and on two gloo ranks with OpenCLIP's own all-gather; and bench/peer.py end to end on a
tiny shape."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from clippy_ray._compat import patch_torchvision_ops
from clippy_ray.loss import ContrastiveLoss

WORLD, LOCAL, DIM = 2, 12, 32


def _features(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(WORLD * LOCAL, DIM, generator=g), dim=-1)
    text = F.normalize(torch.randn(WORLD * LOCAL, DIM, generator=g), dim=-1)
    return image, text, torch.tensor([1 / 0.07])


def _openclip(rank: int = 0, world: int = 1):
    patch_torchvision_ops()
    from open_clip.loss import ClipLoss

    return ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)


def _loss_and_grads(fn, image, text, scale):
    leaves = [t.clone().requires_grad_() for t in (image, text, scale)]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach(), *(t.grad for t in leaves)]


def test_the_loss_and_its_gradients_equal_openclips_in_one_process():
    image, text, scale = _features()
    ours = _loss_and_grads(ContrastiveLoss(torch.float32), image, text, scale)
    theirs = _loss_and_grads(lambda i, t, s: _openclip()(i, t, s.reshape(())), image, text, scale)
    for name, a, b in zip(("loss", "image grad", "text grad", "scale grad"), ours, theirs):
        torch.testing.assert_close(a, b.reshape(a.shape), rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(rank: int, port: int, out: str):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        image, text, scale = _features()
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        got = {
            "ours": _loss_and_grads(ContrastiveLoss(torch.float32), image[rows], text[rows], scale),
            "openclip": _loss_and_grads(
                lambda i, t, s: _openclip(rank, WORLD)(i, t, s.reshape(())), image[rows], text[rows], scale
            ),
        }
        torch.save(got, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.integration  # two spawned gloo processes
def test_on_two_ranks_each_ranks_loss_and_gradients_equal_openclips_with_its_own_all_gather(tmp_path):
    mp.spawn(_two_ranks, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, a, b in zip(("loss", "image grad", "text grad", "scale grad"), got["ours"], got["openclip"]):
            torch.testing.assert_close(
                a, b.reshape(a.shape), rtol=1e-5, atol=1e-7, msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}"
            )


@pytest.mark.integration  # DeepSpeed engines and OpenCLIP models, a few steps each
def test_the_peer_bench_runs_every_section_and_writes_its_figures(tmp_path):
    out = tmp_path / "peer.json"
    tiny = "--image-size 16 --patch 8 --width 64 --depth 1 --text-width 64 --text-depth 1 --text-length 16 --embed 32"
    cmd = [sys.executable, "bench/peer.py", "--reps", "1", "--batch", "256", "--dim", "32", "--dtypes", "fp32",
           *tiny.split(), "--step-batch", "16", "--accum", "2", "--budget-mib", "64", "--fits-start", "8",
           "--fits-cap", "64", "--json", str(out)]  # fmt: skip
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    for case in ("fp32_ranks1", "fp32_ranks8"):
        loss = results["loss"][case]
        # both compute the same loss: each within float32 rounding of the float64 value
        assert loss["clippy_ray"]["error_vs_exact"] < 1e-4 and loss["openclip"]["error_vs_exact"] < 1e-4
        assert loss["ratio"]["seconds"]["median"] > 0
    for case in ("plain", "checkpointing", "cached"):
        assert results["step"][case]["ratio"]["images_per_s"]["median"] > 0
    fits = results["fits"]["clippy_ray"]
    assert fits["plain"] >= 8 and fits["cached"] >= fits["plain"]
    assert "step, cached" in run.stdout and "fits in 64 MiB" in run.stdout
