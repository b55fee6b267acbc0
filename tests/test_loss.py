import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clippy_ray import loss as loss_module
from clippy_ray.loss import ContrastiveLoss, auto_block, blockwise_loss, reference_loss


def naive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The textbook symmetric InfoNCE on one process: the full N x N logits."""
    logits = scale * image @ text.T
    labels = torch.arange(image.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def embeddings(n=8, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1))


def test_two_pair_loss_equals_the_hand_computation():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    e = math.exp
    # logits = image @ text.T = [[1, .6], [0, .8]]; rows: image->text, columns: text->image
    i2t = (-1 + math.log(e(1) + e(0.6)) - 0.8 + math.log(e(0) + e(0.8))) / 2
    t2i = (-1 + math.log(e(1) + e(0)) - 0.8 + math.log(e(0.6) + e(0.8))) / 2
    loss = ContrastiveLoss(torch.float32)(image, text, torch.tensor([1.0]))
    assert loss.item() == pytest.approx(0.5 * (i2t + t2i), abs=1e-6)


def test_single_process_loss_and_gradients_equal_the_naive_loss():
    image, text = embeddings()
    scale = torch.tensor([14.0])
    leaves = [t.clone().requires_grad_() for t in (image, text, scale)]
    ours = ContrastiveLoss(torch.float32)(*leaves)
    ours.backward()
    ref_leaves = [t.clone().requires_grad_() for t in (image, text, scale)]
    ref = naive_loss(*ref_leaves)
    ref.backward()
    torch.testing.assert_close(ours, ref)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_chunked_columns_equal_unchunked_loss_and_gradients(chunk):
    image, text = embeddings(n=8)
    scale = torch.tensor([20.0])
    results = []
    for chunk_size in (None, chunk):
        leaves = [t.clone().requires_grad_() for t in (image, text, scale)]
        loss = ContrastiveLoss(torch.float32, chunk_size=chunk_size)(*leaves)
        loss.backward()
        results.append((loss, [t.grad for t in leaves]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def _loss_and_grads(fn, *tensors):
    leaves = [t.clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def _rank_slice(n_global=48, n_local=12, rank=2, d=16, seed=3):
    """One simulated rank: its rows of the global batch, the global columns, the scale."""
    all_image, all_text = embeddings(n_global, d, seed)
    rows = slice(rank * n_local, (rank + 1) * n_local)
    return all_image[rows], all_text[rows], all_image, all_text, torch.tensor([17.0]), rank * n_local


# (block, row tile in logits): one block, blocks that split this rank's positives, several row tiles
LAYOUTS = [(None, None), (7, None), (5, 16), (48, 96)]


@pytest.mark.parametrize("block, tile", LAYOUTS)
def test_fused_loss_and_all_gradients_equal_the_reference_in_float32(monkeypatch, block, tile):
    if tile:
        monkeypatch.setattr(loss_module, "CPU_TILE_LOGITS", tile)
    *tensors, offset = _rank_slice()
    fused = _loss_and_grads(lambda *t: blockwise_loss(*t, offset, torch.float32, block), *tensors)
    ref = _loss_and_grads(lambda *t: reference_loss(*t, offset, torch.float32), *tensors)
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=0)
    names = ("local image", "local text", "global image", "global text", "logit scale")
    for name, a, b in zip(names, fused[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n} grad: {m}")


@pytest.mark.parametrize("block, tile", LAYOUTS)
def test_fused_bf16_loss_is_as_close_to_float32_as_the_bf16_reference(monkeypatch, block, tile):
    """The documented bf16 tolerance: loss within 2e-3 relative of float32, each gradient within 2e-2
    (relative, in norm), the same as the plain-autograd bf16 loss."""
    if tile:
        monkeypatch.setattr(loss_module, "CPU_TILE_LOGITS", tile)
    *tensors, offset = _rank_slice()
    exact = _loss_and_grads(lambda *t: reference_loss(*t, offset, torch.float32), *tensors)
    fused = lambda *t: blockwise_loss(*t, offset, torch.bfloat16, block)
    reference = lambda *t: reference_loss(*t, offset, torch.bfloat16)
    for fn in (fused, reference):
        loss, grads = _loss_and_grads(fn, *tensors)
        assert loss.item() == pytest.approx(exact[0].item(), rel=2e-3)
        for a, b in zip(grads, exact[1]):
            assert ((a - b).norm() / b.norm()).item() < 2e-2


def _whole_batch(n=40, d=16, seed=4):
    image, text = embeddings(n, d, seed)
    return image, text, torch.tensor([17.0])


@pytest.mark.parametrize("block, tile", LAYOUTS)
def test_one_process_loss_shares_each_matmul_and_equals_the_reference_in_float32(monkeypatch, block, tile):
    """Local rows = the whole batch (one process, validation): one matmul per block serves both
    directions (loss._SelfInfoNCE); the same loss and gradients as the full logits."""
    if tile:
        monkeypatch.setattr(loss_module, "CPU_TILE_LOGITS", tile)
    calls = []
    monkeypatch.setattr(
        loss_module._SelfInfoNCE, "apply", lambda *a, _f=loss_module._SelfInfoNCE.apply: calls.append(1) or _f(*a)
    )
    fused = _loss_and_grads(lambda i, t, s: blockwise_loss(i, t, i, t, s, 0, torch.float32, block), *_whole_batch())
    ref = _loss_and_grads(naive_loss, *_whole_batch())
    assert calls, "the one-process path was not taken"
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=0)
    for name, a, b in zip(("image", "text", "logit scale"), fused[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n} grad: {m}")


@pytest.mark.parametrize("block, tile", LAYOUTS)
def test_one_process_bf16_loss_is_as_close_to_float32_as_the_bf16_reference(monkeypatch, block, tile):
    if tile:
        monkeypatch.setattr(loss_module, "CPU_TILE_LOGITS", tile)
    exact = _loss_and_grads(naive_loss, *_whole_batch())
    loss, grads = _loss_and_grads(
        lambda i, t, s: blockwise_loss(i, t, i, t, s, 0, torch.bfloat16, block), *_whole_batch()
    )
    assert loss.item() == pytest.approx(exact[0].item(), rel=2e-3)
    for a, b in zip(grads, exact[1]):
        assert ((a - b).norm() / b.norm()).item() < 2e-2


def test_automatic_block_size_bounds_the_block_and_covers_small_batches():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert auto_block(32, 64, cpu) == 64  # the demo's batch: one block
    assert auto_block(4096, 32768, cpu) == 2048 and auto_block(4096, 32768, gpu) == 8192


def test_bf16_matmul_stays_close_to_the_float32_loss():
    image, text = embeddings(n=64, d=32)
    scale = torch.tensor([1 / 0.07])
    bf16 = ContrastiveLoss(torch.bfloat16)(image, text, scale)
    assert bf16.dtype == torch.float32  # softmax and the loss are float32
    assert bf16.item() == pytest.approx(naive_loss(image, text, scale).item(), rel=2e-2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank: int, world: int, port: int, chunk_size, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same shared weights and full batch on every rank
        encoder = torch.nn.Linear(5, 6)  # a shared "model" so parameter gradients are compared too
        logit_scale = torch.nn.Parameter(torch.tensor([math.log(10.0)]))
        raw_image, raw_text = torch.randn(8, 5), torch.randn(8, 5)
        rows = slice(rank * 4, rank * 4 + 4)  # this rank's local batch
        image = F.normalize(encoder(raw_image[rows]), dim=-1)
        text = F.normalize(encoder(raw_text[rows]), dim=-1)
        loss = ContrastiveLoss(torch.float32, chunk_size=chunk_size)(image, text, logit_scale.exp())
        loss.backward()
        grads = [encoder.weight.grad, encoder.bias.grad, logit_scale.grad, loss.detach().reshape(1)]
        for g in grads:  # data-parallel averaging, as DeepSpeed / DDP do
            dist.all_reduce(g)
            g /= world
        torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.integration  # two spawned gloo processes
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_two_gloo_ranks_match_the_single_process_loss_on_the_concatenated_batch(tmp_path, chunk_size):
    mp.spawn(_two_rank_worker, args=(2, _free_port(), chunk_size, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    encoder = torch.nn.Linear(5, 6)
    logit_scale = torch.nn.Parameter(torch.tensor([math.log(10.0)]))
    raw_image, raw_text = torch.randn(8, 5), torch.randn(8, 5)
    ref = naive_loss(F.normalize(encoder(raw_image), dim=-1), F.normalize(encoder(raw_text), dim=-1), logit_scale.exp())
    ref.backward()
    expected = [encoder.weight.grad, encoder.bias.grad, logit_scale.grad, ref.detach().reshape(1)]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, a, b in zip(("weight grad", "bias grad", "logit_scale grad", "loss"), got, expected):
            torch.testing.assert_close(a, b, msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}")
