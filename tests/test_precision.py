"""Mixed precision under DeepSpeed, on 2 gloo ranks with the tiny model: float32 gradients and
master weights, a float32 logit scale the bound cannot trap, LAMB's per-parameter trust ratio under
every ZeRO stage, and bf16 training that follows fp32. One spawned pair of processes runs every
engine (DeepSpeed's start-up dominates); the tests read what it recorded."""

from __future__ import annotations

import contextlib
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from clippy_ray import config
from tests.conftest import TINY

pytestmark = pytest.mark.integration  # DeepSpeed engines on gloo process groups

WORLD, PAIRS = 2, 16  # ranks; pairs in the fixed global batch
PARITY_STEPS = 30
LAMB_STEPS = 3
COMPILED_STEPS = 4
GROUPED_STEPS = 3
BF16_STEP = 2.0**-6  # bf16's spacing in [2, 4), where ln(1 / 0.07) = 2.66 lies
PARITY_TOLERANCE = 0.075  # |bf16 - fp32| of the mean loss over the ranks at every step, nats


def _config(*overrides: str) -> config.Config:
    return config.load(
        None,
        TINY
        + [
            f"train.num_workers={WORLD}",
            f"train.global_batch_size={PAIRS}",
            "train.warmup_steps=0",
            "train.lr=1e-3",
            # T5's dropout would draw different masks in one process and in two
            "model.text.hf_config={num_layers: 2, d_model: 32, d_kv: 8, num_heads: 4, d_ff: 64, dropout_rate: 0.0}",
            *overrides,
        ],
    )


def _batch(cfg: config.Config, rows: slice):
    """The fixed global batch (noise images, numbered captions), rows `rows` of it."""
    from clippy_ray.data.transforms import normalize
    from clippy_ray.tokenizer import build_tokenizer

    tok = build_tokenizer(cfg.model.text)
    g = torch.Generator().manual_seed(1)
    size = cfg.model.image.img_size
    images = torch.randint(0, 255, (PAIRS, 3, size, size), dtype=torch.uint8, generator=g)
    enc = tok([f"shape number {i} in colour {i % 3}" for i in range(PAIRS)])
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    return (
        normalize(images[rows], dtype),
        torch.from_numpy(enc["input_ids"])[rows],
        torch.from_numpy(enc["attention_mask"])[rows],
    )


def _model(cfg: config.Config):
    from clippy_ray.model import build_model
    from clippy_ray.tokenizer import build_tokenizer

    torch.manual_seed(0)
    return build_model(cfg.model, build_tokenizer(cfg.model.text).vocab_size)


def _inspect(engine) -> dict:
    """Where DeepSpeed keeps gradients and masters (dtype names)."""
    opt, stage = engine.optimizer, engine.zero_optimization_stage()
    model_dtype, accum_dtype = engine.get_data_types()
    if stage == 1:  # BF16_Optimizer: its own accumulation buffers
        buffers, masters = opt.fp32_groups_gradients_flat, opt.fp32_groups_flat_partition
    elif stage == 2:
        buffers = [torch.empty(0, dtype=opt.gradient_accumulation_dtype)] if opt.use_separate_grad_accum else []
        masters = opt.single_partition_of_fp32_groups
    else:
        buffers, masters = [opt.grad_partitions_flat_buffer], opt.fp32_partitioned_groups_flat
    return {
        "optimizer": type(opt).__name__,
        "module": str(model_dtype),
        "accumulate": str(accum_dtype),
        "reduce": str(engine.communication_data_type),
        "buffers": sorted({str(b.dtype) for b in buffers}),
        "masters": sorted({str(m.dtype) for m in masters}),
    }


def _coverage(engine, model) -> bool:
    """Every parameter's pieces in the flat partitions add up, over ranks, to the parameter."""
    import torch.distributed as dist

    from clippy_ray.train.engine import lamb_pieces

    sizes = [getattr(p, "ds_numel", p.numel()) for p in model.parameters()]  # ZeRO-3 empties p itself
    counts = torch.zeros(len(sizes), dtype=torch.int64)
    for pieces in lamb_pieces(engine).values():
        for index, _, numel in pieces:
            counts[index] += numel
    dist.all_reduce(counts)
    # exactly: ZeRO-3's padding (uninitialised memory) is no piece of any parameter
    return all(size == int(c) for size, c in zip(sizes, counts))


class _HostReads(TorchDispatchMode):
    """Counts the operators that copy a tensor's value to the host (.item(), bool(), ...)."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


def _worker(rank: int, port: int, out: str):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = str(WORLD)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)  # two ranks share the machine's cores
    try:
        from clippy_ray.benchmarks.common import OperatorCounts
        from clippy_ray.loss import ContrastiveLoss
        from clippy_ray.train.checkpoint import full_state_dict
        from clippy_ray.train.engine import Fp32LogitScale, _get_fp32, _set_fp32, build_engine

        rows = slice(rank * PAIRS // WORLD, (rank + 1) * PAIRS // WORLD)
        record: dict = {}

        def step(engine, inputs, extra=None, matmul=torch.float32) -> tuple[float, float]:
            img, txt, scale = engine(*inputs)
            loss = ContrastiveLoss(matmul)(img, txt, scale)
            engine.backward(loss + (extra(scale) if extra else 0))
            engine.step()
            return loss.item(), scale.item()

        # bf16 + LAMB under ZeRO-1/2/3: the engine, LAMB's map, the logit scale's master and bound
        for stage in (1, 2, 3):
            cfg = _config(f"train.zero_stage={stage}", "train.precision=bf16", "train.optimizer=lamb")
            model = _model(cfg)
            engine, inputs = build_engine(model, cfg.train), _batch(cfg, rows)
            got = {"inspect": _inspect(engine), "coverage": _coverage(engine, model), "master": [], "seen": []}
            # bf16 parameters as DeepSpeed left them (views into its flat buffers under ZeRO-1/2; empty
            # under ZeRO-3) whose size is a multiple of 8 but whose data is off a 16-byte boundary
            got["misaligned"] = [
                n for n, p in engine.module.named_parameters() if p.numel() and p.numel() % 8 == 0 and p.data_ptr() % 16
            ]
            got["master"].append(_get_fp32(engine.module.logit_scale).item())
            for _ in range(6):
                got["seen"].append(step(engine, inputs)[1])
                got["master"].append(_get_fp32(engine.module.logit_scale).item())
            # the once-per-step refresh (read, clamp, write back) reads no value to the host: on a
            # GPU each such read makes the host wait for every kernel queued before it
            (hook,) = [h for h in engine.module._forward_hooks.values() if isinstance(h, Fp32LogitScale)]
            with _HostReads() as reads:
                hook.refresh()
            got["host_reads"] = reads.count
            hook.seen_step = None  # the next forward refreshes again, as the first after a step does
            # above the bound: the next forward (the first after a step) sees it clamped, and a loss
            # that lowers the scale moves it back below
            _set_fp32(engine.module.logit_scale, torch.tensor([math.log(100.0) + 0.3]))
            got["at_bound"] = step(engine, inputs, extra=lambda s: 10 * s.sum())[1]
            got["after_bound"] = _get_fp32(engine.module.logit_scale).item()
            record[f"bf16_zero{stage}"] = got

        # fp32 LAMB under ZeRO-1/2/3: the weights after a few steps
        for stage in (1, 2, 3):
            cfg = _config(f"train.zero_stage={stage}", "train.precision=fp32", "train.optimizer=lamb")
            model = _model(cfg)
            engine, inputs = build_engine(model, cfg.train), _batch(cfg, rows)
            for _ in range(LAMB_STEPS):
                step(engine, inputs)
            record[f"lamb_zero{stage}"] = full_state_dict(engine)

        # bf16 vs fp32, AdamW, ZeRO-2 (the demo's setting), the loss's matmuls in the training precision
        for precision, matmul in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            cfg = _config("train.zero_stage=2", f"train.precision={precision}")
            engine, inputs = build_engine(_model(cfg), cfg.train), _batch(cfg, rows)
            losses = [step(engine, inputs, matmul=matmul)[0] for _ in range(PARITY_STEPS)]
            t = torch.tensor(losses)
            dist.all_reduce(t)
            record[f"parity_{precision}"] = (t / WORLD).tolist()

        # train.compile (backend eager: dynamo's graphs, run op by op) against the same bf16 run
        # uncompiled, under ZeRO-1 (the paper config: DeepSpeed's BF16_Optimizer) and ZeRO-2
        from torch._dynamo import reset
        from torch._dynamo.utils import counters

        for stage in (1, 2):
            for compiled in (False, True):
                reset()
                counters.clear()
                cfg = _config(
                    f"train.zero_stage={stage}", "train.precision=bf16", f"train.compile={compiled}",
                    "train.compile_backend=eager",
                )  # fmt: skip
                engine, inputs = build_engine(_model(cfg), cfg.train), _batch(cfg, rows)
                graphs, losses, norms = [], [], []
                for _ in range(COMPILED_STEPS):
                    losses.append(step(engine, inputs, matmul=torch.bfloat16)[0])
                    norms.append(float(engine.get_global_grad_norm()))
                    graphs.append(counters["stats"]["unique_graphs"])
                t = torch.tensor(losses)
                dist.all_reduce(t)
                record[f"compile_zero{stage}_{compiled}"] = {
                    "losses": (t / WORLD).tolist(),
                    "norms": norms,
                    "graphs": graphs,
                    "keys": list(engine.module.state_dict()),
                }
        # GroupedGradients against DeepSpeed's BF16_Optimizer as shipped (ZeRO-1, bf16), 2 micro-batches
        # per step: the same float32 gradients and weights, one norm operator per group
        for clip in (0.0, 1e-3):  # off (the weights must be bit-equal), and clipping at every step
            for grouped in (False, True):
                cfg = _config(
                    "train.zero_stage=1", "train.precision=bf16", "train.grad_accum_steps=2", f"train.grad_clip={clip}"
                )  # fmt: skip
                engine = build_engine(_model(cfg), cfg.train, grouped_gradients=grouped)
                inputs = _batch(cfg, rows)
                halves = [tuple(x[half::2] for x in inputs) for half in (0, 1)]
                norms, ops, stepped = [], OperatorCounts(), []
                inner = engine.optimizer.optimizer  # the AdamW on the flat float32 partitions

                def inner_step(*args, _step=inner.step, _inner=inner, _stepped=stepped, **kwargs):
                    # the gradient AdamW gets, clipped or not: its norm over this rank's partition
                    grads = [p.grad.reshape(-1) for g in _inner.param_groups for p in g["params"]]
                    _stepped.append(torch.cat(grads).double().square().sum().sqrt().item())  # not a counted norm
                    return _step(*args, **kwargs)

                inner.step = inner_step
                for n in range(GROUPED_STEPS):
                    for half in halves:
                        img, txt, scale = engine(*half)
                        with ops if n == GROUPED_STEPS - 1 else contextlib.nullcontext():
                            engine.backward(ContrastiveLoss(torch.bfloat16)(img, txt, scale))
                            engine.step()
                    norms.append(float(engine.get_global_grad_norm()))
                record[f"grouped_{clip}_{grouped}"] = {
                    "norms": norms,
                    "stepped": stepped,
                    "weights": full_state_dict(engine),
                    "masters": [m.clone() for m in engine.optimizer.fp32_groups_flat_partition],
                    "ops": dict(ops.counts),
                    "groups": len(engine.optimizer.bf16_groups),
                    "params": sum(len(g) for g in engine.optimizer.bf16_groups),
                }
        if rank == 0:
            torch.save(record, os.path.join(out, "record.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("precision")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(out)), nprocs=WORLD, join=True)
    return torch.load(out / "record.pt", weights_only=False)


@pytest.mark.parametrize("stage, wrapper", [(1, "BF16_Optimizer"), (2, "DeepSpeedZeroOptimizer"), (3, "Stage3")])
def test_bf16_engines_keep_float32_masters_and_reduce_and_accumulate_gradients_in_float32(record, stage, wrapper):
    got = record[f"bf16_zero{stage}"]["inspect"]
    assert wrapper in got["optimizer"]
    assert got["module"] == "torch.bfloat16"
    assert got["accumulate"] == got["reduce"] == "torch.float32"
    assert got["buffers"] == got["masters"] == ["torch.float32"]


@pytest.mark.parametrize("stage", [1, 2])  # ZeRO-3 gathers each parameter into a buffer of its own
def test_deepspeed_flat_buffers_keep_every_parameter_16_byte_aligned(record, stage):
    # cuBLAS runs a matmul whose weight or bias is off 16 bytes on slow align-1 kernels (optim.aligned_order)
    assert record[f"bf16_zero{stage}"]["misaligned"] == []


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_loss_sees_the_float32_logit_scale_which_moves_by_less_than_a_bf16_step(record, stage):
    got = record[f"bf16_zero{stage}"]
    master = torch.tensor(got["master"], dtype=torch.float64)
    assert master[0] == pytest.approx(math.log(1 / 0.07), abs=1e-6)  # not the bf16-rounded 2.656
    moves = (master[1:] - master[:-1]).abs()
    assert (moves > 0).all() and (moves < BF16_STEP / 2).all(), moves
    assert not torch.equal(master.float(), master.float().bfloat16().float())  # values bf16 cannot hold
    # each forward's scale is exp(the master the previous step left), not exp(a bf16 value)
    torch.testing.assert_close(torch.tensor(got["seen"]), master[:-1].exp().float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_temperature_bound_clamps_the_value_and_training_can_still_move_it_back(record, stage):
    assert record[f"bf16_zero{stage}"]["host_reads"] == 0  # the clamp stays on the device
    got = record[f"bf16_zero{stage}"]
    assert got["at_bound"] == pytest.approx(100.0, rel=1e-6)  # clamped by value after the step
    assert got["after_bound"] < math.log(100.0)  # the gradient at the bound was not cut


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_lamb_piece_map_covers_every_parameter_once_over_the_ranks(record, stage):
    assert record[f"bf16_zero{stage}"]["coverage"]


@pytest.fixture(scope="module")
def lamb_reference() -> dict[str, torch.Tensor]:
    """Plain LAMB in one process on the whole batch: the weights after LAMB_STEPS steps."""
    from clippy_ray.loss import ContrastiveLoss
    from clippy_ray.train.optim import build_optimizer, lr_lambda

    cfg = _config("train.precision=fp32", "train.optimizer=lamb")
    model = _model(cfg)
    opt = build_optimizer(model, cfg.train)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train))
    inputs = _batch(cfg, slice(None))
    for _ in range(LAMB_STEPS):
        loss = ContrastiveLoss(torch.float32)(*model(*inputs))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        schedule.step()
    return model.state_dict()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_lamb_under_zero_equals_single_process_lamb_with_per_parameter_trust_ratios(record, lamb_reference, stage):
    # with one trust ratio per flat partition (what DeepSpeed does to a client LAMB) the updates
    # differ from these by 1-15x their own size
    got = record[f"lamb_zero{stage}"]
    for name, want in lamb_reference.items():
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_bf16_training_follows_fp32_within_the_stated_tolerance(record):
    bf16, fp32 = torch.tensor(record["parity_bf16"]), torch.tensor(record["parity_fp32"])
    assert fp32[-5:].mean() < fp32[:5].mean() / 4  # it learns, so the comparison means something
    gap = (bf16 - fp32).abs()
    assert gap.max() < PARITY_TOLERANCE, (bf16.tolist(), fp32.tolist())


def test_a_resumed_run_reads_the_precision_its_checkpoint_was_trained_in(tmp_path):
    import json

    from clippy_ray.train.state import read_train_state as saved_train_state
    from clippy_ray.train.state import saved_precision

    (tmp_path / "fp32").mkdir()
    (tmp_path / "fp32" / "train_state.json").write_text(json.dumps({"step": 6, "precision": "fp32"}))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "train_state.json").write_text(json.dumps({"step": 6}))
    assert saved_precision(saved_train_state(str(tmp_path / "fp32"))) == "fp32"
    # written before it was recorded, or unreadable: auto decides
    assert saved_precision(saved_train_state(str(tmp_path / "old"))) is None
    assert saved_train_state(str(tmp_path / "missing")) is None
    assert saved_precision(None) is None


@pytest.mark.parametrize("stage", [1, 2])
def test_a_compiled_model_trains_as_the_eager_one_without_recompiling_and_saves_the_same_keys(record, stage):
    """train.compile: the first step's loss and gradient norm equal the uncompiled run's (same
    weights, batch and precision), and the next steps' losses follow it; the graphs compiled at the
    first step serve every later one (a graph that read the optimizer's step count would be
    compiled anew at each); the state dict keeps its keys, so checkpoints and handoffs load into an
    uncompiled model."""
    compiled, eager = record[f"compile_zero{stage}_True"], record[f"compile_zero{stage}_False"]
    assert eager["graphs"] == [0] * COMPILED_STEPS  # the reference is not compiled
    assert compiled["losses"][0] == pytest.approx(eager["losses"][0], rel=1e-6)
    assert compiled["norms"][0] == pytest.approx(eager["norms"][0], rel=1e-5)
    # later steps: the traced backward sums T5's relative-position-bias gradient in another order;
    # one bf16 rounding of that parameter apart after the first step (measured), which Adam's first
    # steps amplify to a few thousandths of a nat (0.003-0.005 measured over 4 steps)
    assert compiled["losses"] == pytest.approx(eager["losses"], abs=0.02)
    assert compiled["graphs"][0] >= 1 and len(set(compiled["graphs"])) == 1, compiled["graphs"]
    assert compiled["keys"] == eager["keys"]


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_grouped_gradients_give_deepspeeds_bf16_optimizer_step_with_one_operator_per_group(record, clip):
    """GroupedGradients (installed by build_engine on BF16_Optimizer) against DeepSpeed's own
    per-parameter loops, over steps of 2 micro-batches on 2 ranks: the same gradient norms (summed in
    another order) and, unclipped, bit-equal gradients, weights and float32 masters (the same
    accumulation); clipping at every step, the same clipped gradient. The backwards and step of the last
    step take one norm (and one clipping product) per group instead of per parameter, and ~10 fewer
    operators per parameter."""
    stock, grouped = record[f"grouped_{clip}_False"], record[f"grouped_{clip}_True"]
    assert len(stock["stepped"]) == GROUPED_STEPS  # once per step, not per micro-batch
    if clip:
        # from the same weights: the same norm, and AdamW gets the same clipped gradient
        assert grouped["norms"][0] == pytest.approx(stock["norms"][0], rel=1e-5)
        assert grouped["stepped"][0] == pytest.approx(stock["stepped"][0], rel=1e-5)
        assert all(n > 10 * clip for n in stock["norms"])  # every step clipped,
        assert max(stock["stepped"]) <= clip  # to the bound over the whole model
        # later steps start from weights whose bf16 copies differ by a rounding here and there
        # (the clip coefficients differ in the 7th digit), so they agree to bf16's precision
        assert grouped["norms"] == pytest.approx(stock["norms"], rel=1e-2)
        assert grouped["stepped"] == pytest.approx(stock["stepped"], rel=1e-2)
    else:
        assert grouped["norms"] == pytest.approx(stock["norms"], rel=1e-5)  # summed in another order
        assert grouped["stepped"] == stock["stepped"]
        for name, want in stock["weights"].items():
            assert torch.equal(grouped["weights"][name], want), name
        assert all(torch.equal(g, s) for g, s in zip(grouped["masters"], stock["masters"]))
    # DeepSpeed: per parameter, at each micro-batch a cast and an add, at the step a norm and a clip
    params, groups, ops, base = stock["params"], stock["groups"], grouped["ops"], stock["ops"]
    assert base["linalg_vector_norm"] == params and ops["linalg_vector_norm"] == groups
    assert ops["mul_"] == base["mul_"] - (params - groups if clip else 0)
    assert ops["_to_copy"] == base["_to_copy"] - 2 * params and ops["add_"] == base["add_"] - 2 * params
    assert sum(ops.values()) < sum(base.values()) - 9 * params


def test_mfu_of_the_quietest_quarter_takes_the_repetitions_with_the_highest_peaks():
    from clippy_ray.benchmarks.throughput import mfu_at_highest_peaks

    peaks = [600.0, 1200.0, 700.0, 1000.0, 650.0, 900.0, 800.0, 1100.0]
    achieved = [300.0, 360.0, 330.0, 350.0, 310.0, 340.0, 320.0, 352.0]
    quiet = mfu_at_highest_peaks(achieved, peaks)
    assert quiet["values"] == [360.0 / 1200.0, 352.0 / 1100.0]  # the top two of eight, by peak
    assert quiet["lowest_peak_flops"] == 1100.0
    assert mfu_at_highest_peaks([10.0, 20.0], [100.0, 50.0])["values"] == [0.1]  # at least one
