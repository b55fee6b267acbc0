"""Training step time of Ray Train + DeepSpeed against a bare single-process PyTorch loop: the
same tiny model (configs/demo.yaml), the same fixed batch, the same optimizer, fp32, one worker
with all the cores. Prints the ratio (goal <= 1.1x).

    python bench/step_overhead.py [--steps 30] [--batch 32] [--stages 0 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from clippy_ray import config
from clippy_ray.benchmarks import common
from clippy_ray.data.transforms import normalize
from clippy_ray.loss import ContrastiveLoss
from clippy_ray.model import build_model
from clippy_ray.ray_init import init_ray
from clippy_ray.tokenizer import build_tokenizer
from clippy_ray.train.optim import build_optimizer, lr_lambda

WARMUP = 5


def make_setup(cfg: config.Config, batch: int):
    torch.manual_seed(0)
    tok = build_tokenizer(cfg.model.text)
    model = build_model(cfg.model, tok.vocab_size)
    enc = tok([f"a red star number {i}" for i in range(batch)])
    size = cfg.model.image.img_size
    inputs = (
        normalize(torch.randint(0, 255, (batch, 3, size, size), dtype=torch.uint8)),
        torch.from_numpy(enc["input_ids"]),
        torch.from_numpy(enc["attention_mask"]),
    )
    return model, inputs, ContrastiveLoss(torch.float32)


def bare_steps(cfg: config.Config, batch: int, steps: int) -> list[float]:
    model, inputs, loss_fn = make_setup(cfg, batch)
    opt = build_optimizer(model, cfg.train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train))
    times = []
    for _ in range(WARMUP + steps):
        start = time.perf_counter()
        loss = loss_fn(*model(*inputs))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        times.append(time.perf_counter() - start)
    return times[WARMUP:]


def _ray_loop(loop_config: dict) -> None:
    from clippy_ray.train.engine import build_engine

    torch.set_num_threads(loop_config["threads"])
    cfg = config.from_dict(loop_config["config"])
    model, inputs, loss_fn = make_setup(cfg, loop_config["batch"])
    engine = build_engine(model, cfg.train)
    times = []
    for _ in range(WARMUP + loop_config["steps"]):
        start = time.perf_counter()
        loss = loss_fn(*engine(*inputs))
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - start)
    with open(loop_config["out"], "w") as f:
        json.dump(times[WARMUP:], f)


def ray_steps(cfg: config.Config, batch: int, steps: int, threads: int) -> list[float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        TorchTrainer(
            _ray_loop,
            train_loop_config={
                "config": config.to_dict(cfg),
                "batch": batch,
                "steps": steps,
                "threads": threads,
                "out": out,
            },
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
            run_config=RunConfig(storage_path=tmp, name="bench"),
        ).fit()
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 2])
    common.add_json_argument(parser)
    args = parser.parse_args(argv)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    base = config.load(
        args.config,
        [
            "train.num_workers=1",
            f"train.global_batch_size={args.batch}",
            "train.precision=fp32",
            "train.grad_accum_steps=1",
        ],
    )
    init_ray()
    bare = statistics.median(bare_steps(base, args.batch, args.steps))
    print(f"model {args.config}, batch {args.batch}, fp32, {threads} threads, median of {args.steps} steps")
    print(f"bare PyTorch loop:                 {bare * 1e3:7.1f} ms/step")
    results = {"bare_ms": bare * 1e3, "zero_stages": {}}
    for stage in args.stages:
        cfg = config.from_dict(
            {**config.to_dict(base), "train": {**config.to_dict(base)["train"], "zero_stage": stage}}
        )
        t = statistics.median(ray_steps(cfg, args.batch, args.steps, threads))
        results["zero_stages"][stage] = {"ms": t * 1e3, "ratio": t / bare}
        print(
            f"Ray Train + DeepSpeed ZeRO-{stage}:       {t * 1e3:7.1f} ms/step   ratio {t / bare:.2f}x (goal <= 1.10)"
        )
    print(
        "reproduce: python bench/step_overhead.py --steps {} --batch {} --stages {}".format(
            args.steps, args.batch, " ".join(map(str, args.stages))
        )
    )
    common.write_json(args.json, "step_overhead", args, results)
