"""Training: real local Ray, real moto S3 server, real DeepSpeed on gloo."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import torch.multiprocessing as mp

from clippy_ray import config, storage
from clippy_ray.data.benchmark import BenchmarkSpec
from clippy_ray.data.commands import make_benchmark
from tests.conftest import TINY

pytestmark = pytest.mark.integration  # DeepSpeed engines, Ray Train runs, gloo process groups


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- handoff export, no Ray


def _export_worker(rank: int, port: int, stage: int, out: str):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        from clippy_ray.data.transforms import normalize
        from clippy_ray.model import build_model
        from clippy_ray.model.handoff import export_handoff
        from clippy_ray.tokenizer import build_tokenizer
        from clippy_ray.train.checkpoint import full_state_dict
        from clippy_ray.train.engine import build_engine

        cfg = config.load(
            None,
            TINY
            + [
                f"train.zero_stage={stage}",
                "train.num_workers=1",
                "train.global_batch_size=4",
                "train.precision=bf16",
                "train.steps=3",
                "train.warmup_steps=0",
            ],
        )
        torch.manual_seed(0)
        tok = build_tokenizer(cfg.model.text)
        model = build_model(cfg.model, tok.vocab_size)
        engine = build_engine(model, cfg.train)
        ids = torch.from_numpy(tok(["a red star", "two rings", "a cross", "a heart"])["input_ids"])
        mask = (ids != 0).long()
        images = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
        img, txt, scale = engine(normalize(images, torch.bfloat16), ids, mask)
        engine.backward(-(img * txt).sum())  # one real step so the weights are not the initial ones
        engine.step()
        engine.eval()
        with torch.no_grad():
            img, txt, _ = engine(normalize(images, torch.bfloat16), ids, mask)
        export_handoff(engine.module, full_state_dict(engine), cfg, tok, os.path.join(out, "model"))
        torch.save(
            {"img": img.float(), "txt": txt.float(), "images": images, "ids": ids, "mask": mask},
            os.path.join(out, "engine.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("stage", [2, 3])
def test_handoff_export_loads_without_deepspeed_and_gives_the_engines_embeddings(tmp_path, stage):
    mp.spawn(_export_worker, args=(_free_port(), stage, str(tmp_path)), nprocs=1, join=True)
    from clippy_ray.data.transforms import normalize
    from clippy_ray.model.handoff import load_handoff

    ref = torch.load(tmp_path / "engine.pt")
    model, cfg, tok = load_handoff(str(tmp_path / "model"))
    assert "deepspeed" not in type(model).__module__ and next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        img, txt, _ = model(normalize(ref["images"], torch.bfloat16), ref["ids"], ref["mask"])
    # ZeRO-0/1/2 run the module's own layers: bit-identical. ZeRO-3 runs its own linear function
    # over gathered partitions (another kernel path): equal to within one bf16 step (2^-8).
    tol = 0.0 if stage < 3 else 2.0**-8
    torch.testing.assert_close(img.float(), ref["img"], rtol=0, atol=tol)
    torch.testing.assert_close(txt.float(), ref["txt"], rtol=0, atol=tol)


def test_bad_train_config_is_one_error_line_before_any_worker_starts():
    bad = ["train.zero_stage=5", "train.lr=-0.1", "train.global_batch_size=30", "train.num_workers=4"]

    def train(*overrides: str) -> subprocess.CompletedProcess:
        bin_ = Path(sys.executable).parent / "clippy-ray"
        return subprocess.run([str(bin_), "train", *overrides], capture_output=True, text=True, timeout=120)

    out = train(*bad, "model.nope=1")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "ray" not in out.stdout.lower()
    assert "model.nope: unknown key" in out.stderr  # unknown keys stop the build before validation
    out = train(*bad)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert any("train.zero_stage: 5 is not a DeepSpeed ZeRO stage (0, 1, 2 or 3)" in line for line in lines)
    assert any("train.lr: -0.1 must be > 0" in line for line in lines)
    assert any(
        "train.global_batch_size: 30 is not divisible by num_workers x grad_accum_steps = 4" in line for line in lines
    )


# ---------------------------------------------------------------- Ray Train + DeepSpeed runs


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    import ray

    if not ray.is_initialized():
        pytest.skip("needs the session's Ray")
    make_benchmark(
        str(out),
        rows=160,
        eval_rows=32,
        spec=BenchmarkSpec(seed=0, image_size=32),
        rows_per_shard=40,
        splits=("train", "val"),
    )
    return out


def train_cfg(bench: Path, storage_uri: str, name: str, *overrides: str) -> config.Config:
    return config.load(
        None,
        TINY
        + [
            f"data.train={bench / 'train'}",
            "data.shuffle_buffer=0",
            "data.decode_batch_size=16",
            f"train.storage={storage_uri}",
            f"train.run_name={name}",
            "train.num_workers=2",
            "train.cpus_per_worker=0.5",
            "train.global_batch_size=16",
            "train.lr=2e-3",
            "train.warmup_steps=2",
            "train.weight_decay=0.0",
            "train.wandb.mode=disabled",
            "train.val_batches=1",
            *overrides,
        ],
    )


def optimizer_state(checkpoint_uri: str, rank: int = 0) -> dict:
    folder = storage.fetch(storage.join(checkpoint_uri, "ds"))
    path = next(folder.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
    return torch.load(path, weights_only=False, map_location="cpu")["optimizer_state_dict"]["base_optimizer_state"]


def test_zero2_bf16_run_checkpoints_to_s3_and_a_second_invocation_resumes_its_state(ray_local, bench, bucket):
    from clippy_ray.train.trainer import fit

    uri = f"s3://{bucket}/runs"
    first = fit(
        train_cfg(
            bench,
            uri,
            "resume",
            "train.steps=12",
            "train.checkpoint_every=6",
            "train.log_every=6",
            "train.keep_checkpoints=3",
            "train.zero_stage=2",
            "train.precision=bf16",
            "train.wandb.mode=offline",
        )
    )
    assert first.metrics["step"] == 12
    # the W&B files travel with the run to its storage (a scaled-down node takes its disk with it)
    wandb_runs = storage.info(f"{uri}/resume/wandb")
    assert wandb_runs.type.name == "Directory"
    losses = first.metrics_dataframe.sort_values("step")["loss"].tolist()
    assert len(losses) == 2 and losses[1] < losses[0], losses  # mean loss of steps 7-12 < steps 1-6
    ckpt12 = f"{uri}/resume/step_00000012"
    assert storage.exists(f"{ckpt12}/model/model.safetensors") and storage.exists(f"{uri}/resume/config.yaml")

    second = fit(
        train_cfg(
            bench,
            uri,
            "resume",
            "train.steps=14",
            "train.checkpoint_every=6",
            "train.log_every=6",
            "train.keep_checkpoints=3",
            "train.zero_stage=2",
            "train.precision=bf16",
        )
    )
    assert second.metrics["step"] == 14
    state14 = json.loads(storage.fetch(f"{uri}/resume/step_00000014/train_state.json").read_text())
    state12 = json.loads(storage.fetch(f"{ckpt12}/train_state.json").read_text())
    # the data position continues: 12 steps of 16 pairs handed out at least 192 rows (the rows a
    # worker had pulled but not yet batched count too: at most one block each, here one 40-row
    # file); the second invocation's stream started exactly there, and 2 more steps moved it by
    # 32 rows give or take a block per worker
    assert 192 <= state12["data_position"] <= 192 + 2 * 40 and state12["epoch"] == 1  # 160 rows an epoch
    # (the first row it handed out; with decode tasks finishing out of order the first block to
    # arrive can be a later one: at most one per task in flight, 2 here; 2 blocks late seen once)
    assert state12["data_position"] <= second.metrics["data_start"] <= state12["data_position"] + 2 * 40
    assert 0 <= state14["data_position"] - state12["data_position"] <= 32 + 2 * 40
    # the optimizer state was restored, not restarted: Adam's step count is 14, not 2, and the second
    # moment keeps at least beta2**2 of its step-12 value everywhere (a fresh one would not)
    before, after = optimizer_state(ckpt12)["state"][0], optimizer_state(f"{uri}/resume/step_00000014")["state"][0]
    assert int(before["step"]) == 12 and int(after["step"]) == 14
    beta2 = config.TrainConfig().betas[1]
    assert torch.all(after["exp_avg_sq"] >= before["exp_avg_sq"] * beta2**2 * (1 - 1e-5))
    assert not torch.equal(after["exp_avg_sq"], before["exp_avg_sq"])


@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (3, "bf16")])
def test_zero_stage_0_and_3_paths_train_steps(ray_local, bench, tmp_path, monkeypatch, stage, precision):
    from safetensors.torch import load_file

    from clippy_ray.model.clippy import build_model
    from clippy_ray.model.pretrained import save_image_backbone
    from clippy_ray.train.trainer import fit

    # pretrained weights at a path relative to the launch folder, as `clippy-ray weights --out
    # runs/weights` and the README write them: the workers run elsewhere and must still find them
    torch.manual_seed(5)
    source = build_model(train_cfg(bench, str(tmp_path), "init").model, vocab_size=384).image.vit
    save_image_backbone(source, tmp_path / "vit.safetensors")
    monkeypatch.chdir(tmp_path)
    result = fit(
        train_cfg(
            bench,
            str(tmp_path),
            f"zero{stage}",
            "train.steps=2",
            "train.checkpoint_every=2",
            "train.log_every=1",
            f"train.zero_stage={stage}",
            f"train.precision={precision}",
            "model.image.pretrained=vit.safetensors",
        )
    )
    assert result.metrics["step"] == 2 and np.isfinite(result.metrics["loss"])
    trained = load_file(str(Path(result.checkpoint.path) / "model" / "model.safetensors"))
    # two small steps from the pretrained tower, not from a random one
    delta = (trained["image.vit.blocks.0.attn.qkv.weight"].float() - source.blocks[0].attn.qkv.weight).abs().max()
    assert delta < 0.02  # Adam moves a weight by about lr (2e-3) a step; another random init: ~0.1


def _train_workers() -> list[psutil.Process]:
    """The Ray Train workers of this test session's Ray (descendants of this process, so another
    Ray on the same machine is never touched)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if any("RayTrainWorker" in part for part in proc.cmdline()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_a_killed_worker_restarts_from_the_last_checkpoint_and_the_run_completes(ray_local, bench, tmp_path):
    from clippy_ray.train.trainer import fit

    cfg = train_cfg(
        bench,
        str(tmp_path),
        "kill",
        "train.steps=10",
        "train.checkpoint_every=3",
        "train.log_every=1",
        "train.max_failures=1",
        "train.zero_stage=2",
    )
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(r=fit(cfg)), daemon=True)
    thread.start()
    deadline = time.time() + 300
    while not (tmp_path / "kill" / "step_00000003").exists():
        assert time.time() < deadline and thread.is_alive(), "no first checkpoint"
        time.sleep(0.5)
    victims = _train_workers()
    assert len(victims) == 2
    victims[0].send_signal(signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive()
    assert result["r"].metrics["step"] == 10
    states = sorted(p.name for p in (tmp_path / "kill").glob("step_*"))
    assert states[-1] == "step_00000010"


def test_from_starts_a_new_run_with_the_weights_or_the_full_state_of_a_checkpoint(ray_local, bench, tmp_path):
    from safetensors.torch import load_file

    from clippy_ray.train.trainer import fit

    common = (
        "train.checkpoint_every=2",
        "train.log_every=1",
        "train.zero_stage=2",
        "train.lr=1e-5",
        "train.warmup_steps=0",
    )
    source = fit(train_cfg(bench, str(tmp_path), "source", "train.steps=2", "train.wandb.mode=offline", *common))
    assert list((tmp_path / "source" / "wandb").glob("offline-run-*"))  # W&B offline, rank 0 only
    ckpt = source.checkpoint.path
    weights = fit(
        train_cfg(bench, str(tmp_path), "weights", "train.steps=1", *common), init_from=ckpt, init_mode="weights"
    )
    full = fit(train_cfg(bench, str(tmp_path), "full", "train.steps=3", *common), init_from=ckpt, init_mode="full")

    assert weights.metrics["step"] == 1 and full.metrics["step"] == 3  # full state continues at step 2
    adam_step = {
        name: int(optimizer_state(res.checkpoint.path)["state"][0]["step"])
        for name, res in (("weights", weights), ("full", full))
    }
    assert adam_step == {"weights": 1, "full": 3}
    # weights mode starts from the checkpoint's weights (one tiny step away), not a fresh init
    a = load_file(f"{ckpt}/model/model.safetensors")
    b = load_file(f"{weights.checkpoint.path}/model/model.safetensors")
    from clippy_ray.model import build_model
    from clippy_ray.tokenizer import build_tokenizer

    cfg = train_cfg(bench, str(tmp_path), "fresh")
    torch.manual_seed(1)
    c = build_model(cfg.model, build_tokenizer(cfg.model.text).vocab_size).state_dict()
    key = "image.vit.blocks.0.attn.qkv.weight"
    assert (b[key].float() - a[key].float()).norm() < 0.1 * (c[key].float() - a[key].float()).norm()
