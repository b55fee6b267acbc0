"""Session fixtures: one real S3-compatible server (moto) on 127.0.0.1, tiny model configs."""

from __future__ import annotations

import os

import pytest

from clippy_ray import config

# Ray Train's controller polls its workers every 2 s by default, so each run's end (and a
# checkpoint's registration) waits up to 2 s for the next poll; the suite runs ~20 training runs.
# Every Ray the tests start (in this process, the CLI subprocesses, the simulated clusters' nodes)
# inherits this environment. A poll that takes longer is a missed health check, which Ray Train
# tolerates for minutes.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

TINY = [
    "model.image.img_size=32",
    "model.image.timm_kwargs={patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}",
    "model.text.hf_config={num_layers: 2, d_model: 32, d_kv: 8, num_heads: 4, d_ff: 64}",
    "model.text.max_length=16",
    "model.embed_dim=16",
]


# Tests that need one of these are integration tests (`make test`); the rest are unit tests
# (`make test-fast`: pure Python, torch, timm, transformers; the whole set in under a minute).
INTEGRATION_FIXTURES = {"ray_local", "s3_server", "bucket"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.integration)


def tiny_config(*overrides: str) -> config.Config:
    """A 2-layer ViT and a 2-layer T5 with the byte tokenizer."""
    return config.load(None, TINY + list(overrides))


@pytest.fixture(scope="session")
def tiny_handoff(tmp_path_factory) -> str:
    """A handoff folder of a randomly initialized tiny model (no training); treat it as read-only."""
    import torch

    from clippy_ray.model import build_model
    from clippy_ray.model.handoff import export_handoff
    from clippy_ray.tokenizer import build_tokenizer

    cfg = tiny_config("eval.templates=simple")
    tok = build_tokenizer(cfg.model.text)
    torch.manual_seed(0)
    model = build_model(cfg.model, tok.vocab_size)
    folder = tmp_path_factory.mktemp("handoff") / "model"
    export_handoff(model, model.state_dict(), cfg, tok, folder)
    return str(folder)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real moto S3 server; the environment points boto3 and pyarrow at it (fake credentials)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_REGION": "us-east-1",
        "CLIPPY_RAY_CACHE": str(tmp_path_factory.mktemp("cache")),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket per test; returns its name."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-")[:50].strip("-")
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the session (2 CPUs, like the CI box). Started after the S3 server so its
    workers inherit the endpoint from the environment."""
    import ray
    from ray.data import DataContext

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}},
    )
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def bench(ray_local, tmp_path_factory):
    """The tiny benchmark the training tests read (160 train rows at 32 px in 40-row files, 32 val
    rows with masks); made once, with the session's Ray. Treat it as read-only."""
    from clippy_ray.data.benchmark import BenchmarkSpec
    from clippy_ray.data.commands import make_benchmark

    out = tmp_path_factory.mktemp("bench")
    make_benchmark(
        str(out), rows=160, eval_rows=32, spec=BenchmarkSpec(seed=0, image_size=32), rows_per_shard=40,
        splits=("train", "val"),
    )  # fmt: skip
    return out
