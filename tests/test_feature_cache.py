"""Feature caching over micro-batches (loss.negatives=global): the loss and every parameter
gradient of an accumulated step equal those of the loss over the whole global batch at once, with
token sub-sampling and dropout on, in one process, on two gloo ranks, and through DeepSpeed under
ZeRO 1-3 (with activation checkpointing)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from clippy_ray.loss import ContrastiveLoss, reference_loss
from clippy_ray.model import build_model
from clippy_ray.tokenizer import build_tokenizer
from clippy_ray.train import feature_cache
from clippy_ray.train.feature_cache import cached_step
from tests.conftest import tiny_config

MICRO, ACCUM, WORLD = 4, 4, 2  # 4 micro-batches of 4 pairs per rank: 16 per rank, 32 on 2 ranks
RANDOM = (  # token sub-sampling and dropout in both towers
    "model.token_keep_ratio=0.5",
    "model.image.timm_kwargs={patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2, proj_drop_rate: 0.1}",
    "model.text.hf_config={num_layers: 2, d_model: 32, d_kv: 8, num_heads: 4, d_ff: 64, dropout_rate: 0.1}",
)
PLAIN = ("model.text.hf_config={num_layers: 2, d_model: 32, d_kv: 8, num_heads: 4, d_ff: 64, dropout_rate: 0.0}",)


def _model(*overrides):
    cfg = tiny_config(*overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, build_tokenizer(cfg.model.text).vocab_size)
    model.train()
    return model


def _pairs(n: int, seed: int = 1):
    """n pairs: noise images and numbered captions of different lengths."""
    tok = build_tokenizer(tiny_config().model.text)
    g = torch.Generator().manual_seed(seed)
    enc = tok([f"shape {i} " + "and more " * (i % 3) for i in range(n)])
    return (
        torch.randn(n, 3, 32, 32, generator=g),
        torch.from_numpy(enc["input_ids"]),
        torch.from_numpy(enc["attention_mask"]),
    )


def _micro_batches(pairs, rows: slice):
    images, ids, mask = (t[rows] for t in pairs)
    return [(images[k : k + MICRO], ids[k : k + MICRO], mask[k : k + MICRO]) for k in range(0, len(images), MICRO)]


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _cached(model, batches):
    """The cached step's loss and gradients on `batches` (one rank's micro-batches)."""
    model.zero_grad()
    loss, _ = cached_step(
        lambda b: model(*b), lambda t: t.backward(), batches, ContrastiveLoss(torch.float32), torch.device("cpu")
    )
    return loss, _grads(model)


def _big_batch(model, per_rank: list[list], seeds: list[int]):
    """The loss over every rank's pairs at once, with graphs kept through every forward: rank r's
    micro-batches run in order from seed seeds[r], as that rank draws them."""
    model.zero_grad()
    images, texts = [], []
    for batches, seed in zip(per_rank, seeds):
        torch.manual_seed(seed)
        for b in batches:
            img, txt, scale = model(*b)
            images.append(img)
            texts.append(txt)
    img, txt = torch.cat(images), torch.cat(texts)
    loss = reference_loss(img, txt, img, txt, scale, 0, torch.float32)
    loss.backward()
    return loss.detach(), _grads(model)


def _assert_same(got, expected, what: str):
    (loss, grads), (ref_loss, ref_grads) = got, expected
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=f"{what}: loss")
    assert grads.keys() == ref_grads.keys() and "logit_scale" in grads and len(grads) > 20
    for name in grads:
        torch.testing.assert_close(
            grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{what}: {n}: {m}"
        )


def test_cached_micro_batches_give_the_big_batch_loss_and_gradients_with_sub_sampling_and_dropout():
    model = _model(*RANDOM)
    batches = _micro_batches(_pairs(MICRO * ACCUM), slice(None))
    expected = _big_batch(model, [batches], [7])
    torch.manual_seed(7)
    _assert_same(_cached(model, batches), expected, "cached")


def test_without_the_kept_random_state_the_gradients_are_wrong(monkeypatch):
    """The check above can fail: re-running the forwards on fresh random draws changes the gradients."""
    model = _model(*RANDOM)
    batches = _micro_batches(_pairs(MICRO * ACCUM), slice(None))
    expected = _big_batch(model, [batches], [7])
    monkeypatch.setattr(feature_cache.RandomState, "restore", lambda self: None)
    torch.manual_seed(7)
    with pytest.raises(AssertionError):
        _assert_same(_cached(model, batches), expected, "cached without the random state")


def test_cached_micro_batches_equal_one_forward_of_the_whole_batch_without_randomness():
    model = _model(*PLAIN)
    pairs = _pairs(MICRO * ACCUM)
    model.zero_grad()
    img, txt, scale = model(*pairs)  # one 16-pair step, no accumulation
    loss = reference_loss(img, txt, img, txt, scale, 0, torch.float32)
    loss.backward()
    _assert_same(_cached(model, _micro_batches(pairs, slice(None))), (loss.detach(), _grads(model)), "one forward")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine_run(cfg_overrides, rank, pairs, steps):
    """The full weights after `steps` steps of the training loop's own forward / backward through
    DeepSpeed (fp32), each step on the same global batch, cached when accumulating."""
    from clippy_ray.train.checkpoint import full_state_dict
    from clippy_ray.train.engine import build_engine, cached_engine_step

    cfg = tiny_config(
        *PLAIN, f"train.num_workers={WORLD}", f"train.global_batch_size={MICRO * ACCUM * WORLD}",
        "train.precision=fp32", "train.warmup_steps=0", "train.lr=1e-3", *cfg_overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg.model, build_tokenizer(cfg.model.text).vocab_size)
    engine = build_engine(model, cfg.train)
    local = slice(rank * MICRO * ACCUM, (rank + 1) * MICRO * ACCUM)
    size = cfg.train.micro_batch_size
    images, ids, mask = (t[local] for t in pairs)
    batches = [(images[k : k + size], ids[k : k + size], mask[k : k + size]) for k in range(0, len(images), size)]
    loss_fn, losses = ContrastiveLoss(torch.float32), []
    for _ in range(steps):
        if len(batches) > 1:
            loss, _ = cached_engine_step(engine, lambda b: engine(*b), batches, loss_fn, torch.device("cpu"))
        else:
            img, txt, scale = engine(*batches[0])
            loss = loss_fn(img, txt, scale)
            engine.backward(loss)
            engine.step()
        losses.append(loss.item())
    return full_state_dict(engine), losses, engine.global_steps


def _worker(rank: int, port: int, out: str):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = str(WORLD)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        record = {}
        # the plain model on 2 ranks, sub-sampling and dropout on: each rank's gradients, averaged
        model, pairs = _model(*RANDOM), _pairs(MICRO * ACCUM * WORLD)
        torch.manual_seed(100 + rank)
        loss, grads = _cached(model, _micro_batches(pairs, slice(rank * MICRO * ACCUM, (rank + 1) * MICRO * ACCUM)))
        for g in [loss, *grads.values()]:  # data-parallel averaging, as DeepSpeed / DDP do
            dist.all_reduce(g)
            g /= WORLD
        record["plain"] = (loss, grads)
        # DeepSpeed: 4 cached micro-batches against 1 without accumulation, the same global batch
        pairs = _pairs(MICRO * ACCUM * WORLD, seed=2)
        for stage in (1, 2, 3):
            extra = ["model.image.grad_checkpointing=true", "model.text.grad_checkpointing=true"] if stage == 3 else []
            for accum in (1, ACCUM):
                record[f"zero{stage}_accum{accum}"] = _engine_run(
                    [f"train.zero_stage={stage}", f"train.grad_accum_steps={accum}", *extra], rank, pairs, steps=2
                )
        if rank == 0:
            torch.save(record, os.path.join(out, "record.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("feature_cache")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return torch.load(out / "record.pt", weights_only=True)


@pytest.mark.integration  # two spawned gloo processes
def test_two_ranks_cached_give_the_loss_and_gradients_over_all_32_pairs(record):
    model = _model(*RANDOM)
    pairs = _pairs(MICRO * ACCUM * WORLD)
    per_rank = [_micro_batches(pairs, slice(r * MICRO * ACCUM, (r + 1) * MICRO * ACCUM)) for r in range(WORLD)]
    loss, grads = _big_batch(model, per_rank, [100 + r for r in range(WORLD)])
    got_loss, got_grads = record["plain"]
    # each rank's loss is over its own rows; their mean is the loss over the 32 pairs
    _assert_same((got_loss, got_grads), (loss, grads), "two ranks")


@pytest.mark.integration
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_steps_with_cached_accumulation_equal_steps_on_the_whole_batch(record, stage):
    """Two optimizer steps under ZeRO-`stage` (ZeRO-3 with activation checkpointing in both towers):
    4 accumulated micro-batches of 4 pairs per rank, cached, against one micro-batch of 16."""
    big, big_losses, big_steps = record[f"zero{stage}_accum1"]
    cached, cached_losses, cached_steps = record[f"zero{stage}_accum{ACCUM}"]
    assert big_steps == cached_steps == 2
    torch.testing.assert_close(torch.tensor(cached_losses), torch.tensor(big_losses), rtol=1e-5, atol=1e-6)
    assert big.keys() == cached.keys()
    for name in big:
        torch.testing.assert_close(cached[name], big[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
