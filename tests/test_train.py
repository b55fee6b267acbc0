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
from clippy_ray.data.plan import TrainedRows
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


def optimizer_state(checkpoint_uri: str, rank: int = 0) -> tuple[dict, dict]:
    """(rank `rank`'s saved pieces, the index) of a checkpoint's optimizer state."""
    from safetensors.torch import load

    index = json.loads(storage.read_bytes(f"{checkpoint_uri}/state/index.json"))
    return load(storage.read_bytes(f"{checkpoint_uri}/state/rank{rank:05d}.safetensors")), index


def trained_set(state: dict) -> set[int]:
    """The data positions a train_state.json records as trained on."""
    rows = TrainedRows.from_dict(state["rows"])
    return set(range(rows.low)) | {rows.low + int(i) for i in np.flatnonzero(rows.bits)}


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
    # the handoff's logit scale is the optimizer's float32 master, not the module's bf16 copy (on the
    # bf16 grid: 2^-7 apart near ln(1 / 0.07) = 2.66, up to ~1.6% off in the scale)
    from safetensors.torch import load_file

    handoff = load_file(str(storage.fetch(f"{ckpt12}/model/model.safetensors")))
    scale = handoff["logit_scale"]
    assert scale.dtype == torch.float32 and not torch.equal(scale, scale.bfloat16().float()), scale
    assert handoff["image.proj.weight"].dtype == torch.bfloat16  # (the rest is the module's bf16 weights)

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
    # exactly the rows trained: 12 steps of 16 pairs, then 2 more, none of them twice (the benchmark
    # has no bad rows), over an epoch boundary (160 rows an epoch)
    assert len(trained_set(state12)) == state12["rows_consumed"] == 12 * 16 and state12["epoch"] in (0, 1)
    assert trained_set(state12) < trained_set(state14) and len(trained_set(state14)) == 14 * 16
    assert max(trained_set(state12)) >= 160
    # the optimizer state was restored, not restarted: Adam's step count is 14, not 2, and the second
    # moment keeps at least beta2**2 of its step-12 value everywhere (a fresh one would not)
    (before, index12), (after, index14) = optimizer_state(ckpt12), optimizer_state(f"{uri}/resume/step_00000014")
    assert index12["group_steps"] == {"0": 12.0, "1": 12.0} and index14["group_steps"] == {"0": 14.0, "1": 14.0}
    beta2 = config.TrainConfig().betas[1]
    moments = [k for k in before if k.startswith("exp_avg_sq/")]
    assert moments and all(torch.all(after[k] >= before[k] * beta2**2 * (1 - 1e-5)) for k in moments)
    assert not all(torch.equal(after[k], before[k]) for k in moments)


# ZeRO-0 with a frozen text encoder whose caption embeddings are cached; ZeRO-3 with accumulation
# (the loop's feature cache, loss.negatives=global) and the first ViT block and T5 layer frozen
@pytest.mark.parametrize(
    "stage, precision, accum, frozen",
    [
        (0, "fp32", 1, ["model.text.frozen_layers=-1", "model.text.cache_embeddings=true"]),
        (3, "bf16", 2, ["model.image.frozen_blocks=1", "model.text.frozen_layers=1"]),
    ],
)
def test_zero_stage_0_and_3_paths_train_steps(ray_local, bench, tmp_path, monkeypatch, stage, precision, accum, frozen):
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
            f"train.grad_accum_steps={accum}",
            "model.image.pretrained=vit.safetensors",
            *frozen,
        )
    )
    assert result.metrics["step"] == 2 and np.isfinite(result.metrics["loss"])
    trained = load_file(str(Path(result.checkpoint.path) / "model" / "model.safetensors"))

    # two small steps from the pretrained tower, not from a random one
    def moved(block: int) -> float:
        name = f"image.vit.blocks.{block}.attn.qkv.weight"
        return (
            (trained[name].float() - source.blocks[block].attn.qkv.weight.to(trained[name].dtype).float()).abs().max()
        )

    assert 0 < moved(1) < 0.02  # Adam moves a weight by about lr (2e-3) a step; another random init: ~0.1
    if "model.image.frozen_blocks=1" in frozen:
        assert moved(0) == 0  # frozen: exactly the pretrained weights (in the checkpoint's dtype)


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


def many_files(folder: Path, files: int, rows: int, row_group: int) -> Path:
    """`files` parquet files of `rows` small PNG images each (row groups of `row_group`), captions
    naming the file and row: data shaped like a real run's, read by several tasks out of order."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for f in range(files):
        images = []
        for _ in range(rows):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
            images.append(buf.getvalue())
        table = pa.table({"image": images, "caption": [f"file {f} row {r}" for r in range(rows)]})
        pq.write_table(table, folder / f"part-{f:03d}.parquet", row_group_size=row_group)
    return folder


def batches_trained(run: Path) -> np.ndarray:
    """(step, rank, position) of every row the run's checkpoints record as trained (record_batches)."""
    return np.concatenate([np.load(p / "data" / "batches.npy", allow_pickle=False) for p in sorted(run.glob("step_*"))])


def fit_killing_a_worker(cfg, first_checkpoint: Path, after_s: float):
    """`fit(cfg)` with one of its 2 training workers SIGKILLed at a random moment up to `after_s`
    after `first_checkpoint` is written; returns the finished run's result."""
    from clippy_ray.train.trainer import fit

    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(r=fit(cfg)), daemon=True)
    thread.start()
    deadline = time.time() + 300
    while not (first_checkpoint / "train_state.json").exists():
        assert time.time() < deadline and thread.is_alive(), "no first checkpoint"
        time.sleep(0.2)
    time.sleep(np.random.default_rng().uniform(0, after_s))  # a random step after it
    victims = _train_workers()
    assert len(victims) == 2
    victims[0].send_signal(signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive()
    return result["r"]


def test_a_worker_killed_mid_epoch_resumes_and_every_row_is_trained_exactly_once(ray_local, bench, tmp_path):
    """8 files of 1,500 rows read by 4 tasks at once, 2 workers with shuffle buffers; a worker killed
    at a random step after the first checkpoint; the run restarts and finishes. Every data position
    the run trained on (recorded per step in the checkpoints) was trained once, and the checkpoint's
    record of them is exact."""

    data = many_files(tmp_path / "data", files=8, rows=1500, row_group=300)
    steps, pairs, every = 40, 64, 10
    cfg = train_cfg(
        bench,
        str(tmp_path),
        "kill",
        f"data.train={data}",
        "data.read_tasks=4",
        "data.block_mib=1",
        "data.decode_batch_size=64",
        "data.shuffle_buffer=128",
        f"train.global_batch_size={pairs}",
        f"train.steps={steps}",
        f"train.checkpoint_every={every}",
        "train.keep_checkpoints=100",
        "train.log_every=5",
        "train.max_failures=1",
        "train.zero_stage=2",
        "train.record_batches=true",
        "data.val=null",
    )
    result = fit_killing_a_worker(cfg, tmp_path / "kill" / f"step_{every:08d}", after_s=3)
    assert result.metrics["step"] == steps
    run = tmp_path / "kill"
    trained = batches_trained(run)
    positions = trained[:, 2]
    # every step trained its global batch, and no row twice (8 x 1,500 rows: one epoch, no bad rows)
    assert sorted(set(trained[:, 0].tolist())) == list(range(1, steps + 1))
    assert len(positions) == steps * pairs and len(np.unique(positions)) == len(positions)
    # the checkpoints' record is exactly those rows, and it is no prefix of the data positions: the
    # readers and buffers hand rows out of order (a watermark alone would skip or repeat rows)
    final = json.loads((run / f"step_{steps:08d}" / "train_state.json").read_text())
    assert trained_set(final) == set(positions.tolist())
    first = json.loads((run / f"step_{every:08d}" / "train_state.json").read_text())
    assert first["rows_consumed"] > first["data_position"]


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
        name: int(optimizer_state(res.checkpoint.path)[1]["group_steps"]["0"])
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
