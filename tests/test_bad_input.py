"""Bad input and untrusted files: every mistake is one line (`clippy-ray: ...`, exit 2, no
traceback), found on the driver before any Ray work, and no file anyone hands us runs code.

CASES is the table: one row per mistake (config, data, storage, checkpoints, images, eval data,
sweep configs), each run through the real CLI in-process. Rows marked PAYLOAD plant a pickle
whose unpickling would create a marker file; the marker must never appear. The last tests run the
loaders that do read such files (DeepSpeed's shards on resume, the handoff on `--from weights`)
with real DeepSpeed and Ray."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
import yaml
from PIL import Image

from clippy_ray import cli, config
from tests.conftest import TINY, tiny_config
from tests.test_train import _free_port, optimizer_state, train_cfg

BUCKET = "bad-input"  # made once per module on the session's S3 server
MISSING_BUCKET = "no-such-bucket-here"


class Payload:
    """Unpickling this runs a shell command that creates `marker` (what a crafted checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _parquet(path: Path, columns: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_handoff):
    """Every file the table needs, good and bad, under one folder; MARKER is what a payload creates."""
    root = tmp_path_factory.mktemp("bad")
    marker = root / "PAYLOAD_RAN"
    payload = {"weights": torch.zeros(2), "extra": Payload(marker)}
    _parquet(root / "train" / "part-0.parquet", {"image": [_png()] * 16, "caption": ["a red square"] * 16})
    _parquet(root / "wrongcols" / "part-0.parquet", {"img": [_png()], "text": ["a red square"]})
    (root / "notparquet").mkdir()
    (root / "notparquet" / "fake.parquet").write_text("just text")
    (root / "textonly").mkdir()
    (root / "textonly" / "notes.txt").write_text("notes")
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("not an image")
    (root / "broken.yaml").write_text("model:\n  aggregation: [max\n")
    torch.save(payload, root / "payload.pth")  # torch.save's zip format
    torch.save(payload, root / "legacy.pth", _use_new_zipfile_serialization=False)  # torch < 1.6's format
    (root / "bare.pth").write_bytes(pickle.dumps(payload))  # a bare pickle (protocol 4)
    (root / "garbage.safetensors").write_bytes(b"\xff" * 64)
    (root / "t5-payload").mkdir()
    (root / "t5-payload" / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 32}))
    torch.save(payload, root / "t5-payload" / "pytorch_model.bin")
    # Training checkpoints: the handoff in model/ and DeepSpeed-like shards in ds/, one of them planted
    for name, planted in (("ckpt-model-payload", "mp_rank_00_model_states.pt"), ("ckpt-optim-payload", "optim")):
        ds = root / name / "ds"
        shutil.copytree(tiny_handoff, root / name / "model")
        ds.mkdir(parents=True)
        model_states = payload if planted == "mp_rank_00_model_states.pt" else {"module": {"w": torch.zeros(2)}}
        torch.save(model_states, ds / "mp_rank_00_model_states.pt")
        optim = payload if planted == "optim" else {"optimizer_state_dict": {"state": {}}}
        torch.save(optim, ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    # Handoffs whose model.safetensors is a pickle payload (inside a checkpoint, and bare)
    for folder in (root / "ckpt-bad-handoff" / "model", root / "handoff-payload"):
        shutil.copytree(tiny_handoff, folder)
        torch.save(payload, folder / "model.safetensors")
    # Handoffs whose other files would run code: the encoder config naming its own Python module
    # (which creates the marker on import), and a config.yaml with a Python tag
    remote = root / "handoff-remote-code"
    shutil.copytree(tiny_handoff, remote)
    auto_map = {"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}
    (remote / "text_encoder" / "config.json").write_text(json.dumps(auto_map))
    (remote / "text_encoder" / "configuration_evil.py").write_text(f"import os\nos.system('touch {marker}')\n")
    shutil.copytree(tiny_handoff, root / "handoff-yaml-tag")
    (root / "handoff-yaml-tag" / "config.yaml").write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    (root / "t5-remote").mkdir()
    (root / "t5-remote" / "config.json").write_text(json.dumps(auto_map))
    # Sweeps: a base training config, then sweep files
    base = config.to_dict(tiny_config(f"data.train={root / 'train'}", f"train.storage={root / 'runs'}"))
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {"base": str(root / "base.yaml"), "storage": str(root / "sweeps"), "scheduler": {"name": "fifo"}}
    sweeps = {
        "sweep-lrr": {"axes": {"train.lrr": [0.1]}},
        "sweep-image-payload": {"axes": {"image_init": ["ssl"]}, "image_inits": {"ssl": str(root / "payload.pth")}},
        "sweep-text-missing": {"axes": {"text_init": ["sentence"]}, "text_inits": {"sentence": str(root / "nope")}},
        "sweep-eval-missing": {"axes": {"aggregation": ["max"]}, "eval_data": f"s3://{MISSING_BUCKET}/eval"},
    }
    for name, extra in sweeps.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump({**sweep, **extra}))
    return {"tmp": root, "handoff": tiny_handoff, "marker": marker}


@pytest.fixture(scope="module")
def s3_world(s3_server):
    """A bucket holding one file that is not parquet; S3 rows read it. The S3 server's request log
    (werkzeug, on stderr) is quieted so stderr holds what the command printed."""
    import logging

    import boto3

    server_log = logging.getLogger("werkzeug")
    level = server_log.level
    server_log.setLevel(logging.WARNING)
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="train/part-0.parquet", Body=b"PAR1")
    yield BUCKET
    server_log.setLevel(level)


@pytest.fixture
def s3_denied(s3_world, monkeypatch):
    """The S3 server refuses every request from now on (unknown credentials), as a bucket the keys
    may not read does."""
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)


S3 = pytest.mark.integration  # rows that talk to the session's S3 server
DATA = "data.train={tmp}/train"
STORE = "train.storage={tmp}/runs"
REFUSED = "refused to load: the file holds pickled code (posix.system), and clippy-ray never runs code from a file"
PRETRAINED_FIX = (
    "give the weights as .safetensors, or as a state dict of tensors saved with torch.save(model.state_dict())"
)
SHARD_FIX = (
    "resume only from checkpoints this run wrote; to start from someone else's checkpoint use --from-mode weights, "
    "which reads model/model.safetensors only"
)
HANDOFF_FIX = "give a handoff clippy-ray wrote (model.safetensors beside config.yaml), e.g. <run>/step_XXXXXXXX/model"
NOT_PARQUET = "Parquet magic bytes not found in footer. Either the file is corrupted or this is not a parquet file."
EVAL = ["eval", "--checkpoint", "{handoff}", "--data"]
SEGMENT = ["segment", "--checkpoint", "{handoff}", "--labels", "cat,dog", "--out", "{tmp}/pic.png", "--image"]
PAYLOAD = "payload"  # the row plants a pickle payload

# (id, argv, the exact stderr line; "..." at the end: its start, [PAYLOAD] [S3 | "denied"])
CASES = [
    # config
    ("config-bad-value", ["config", "model.aggregation=maxx"],
     "config error: model.aggregation: 'maxx' is not one of max, avg, cls"),
    ("config-file-missing", ["config", "--config", "{tmp}/nope.yaml"],
     "config error: {tmp}/nope.yaml: cannot read the config file (No such file or directory); check the path"),
    ("config-not-yaml", ["config", "--config", "{tmp}/broken.yaml"],
     "config error: {tmp}/broken.yaml: not valid YAML at line 3, column 1: expected ',' or ']', but got "
     "'<stream end>'"),
    ("config-not-key-value", ["config", "model.aggregation"],
     "config error: 'model.aggregation': overrides are key=value, e.g. model.aggregation=avg"),
    # data
    ("data-inspect-missing", ["data", "inspect", "{tmp}/nope"], "{tmp}/nope: no such file or folder; check the path"),
    ("data-inspect-not-parquet", ["data", "inspect", "{tmp}/notparquet"],
     f"{{tmp}}/notparquet: {{tmp}}/notparquet/fake.parquet is not a parquet file ({NOT_PARQUET}); "
     "convert it with `clippy-ray data convert` or remove it"),
    ("data-convert-index-missing", ["data", "convert", "--index", "{tmp}/nope.tsv", "--out", "{tmp}/converted"],
     "--index={tmp}/nope.tsv: no such file or folder; check the path"),
    ("data-benchmark-color-p", ["data", "make-benchmark", "--out", "{tmp}/b", "--rows", "8", "--color-p", "60"],
     "--color-p 60.0: a share of captions, from 0 (never name colours) to 1 (always)"),
    ("data-benchmark-out-no-bucket", ["data", "make-benchmark", "--out", f"s3://{MISSING_BUCKET}/b", "--rows", "8"],
     f"--out=s3://{MISSING_BUCKET}/b: bucket s3://{MISSING_BUCKET} not found; create it or fix the URI", S3),
    ("data-missing", ["train", "data.train={tmp}/nope", STORE],
     "data.train={tmp}/nope: no such file or folder; check the path"),
    ("data-no-parquet-files", ["train", "data.train={tmp}/textonly", STORE],
     "data.train={tmp}/textonly: no parquet, .tar shards or image files there (found 1 other files, e.g. notes.txt); "
     "point data.train at parquet, WebDataset .tar shards or img2dataset output (`clippy-ray data convert` turns a "
     "TSV of image paths into parquet)"),
    ("data-not-parquet", ["train", "data.train={tmp}/notparquet", STORE],
     f"data.train={{tmp}}/notparquet: {{tmp}}/notparquet/fake.parquet is not a parquet file ({NOT_PARQUET}); "
     "convert it with `clippy-ray data convert` or remove it"),
    ("data-wrong-columns", ["train", "data.train={tmp}/wrongcols", STORE],
     "{tmp}/wrongcols: no image column 'image' (set data.image_column); columns found: img (binary), text (string)"),
    ("data-val-missing", ["train", DATA, "data.val={tmp}/nope", STORE],
     "data.val={tmp}/nope: no such file or folder; check the path"),
    ("data-s3-no-bucket", ["train", f"data.train=s3://{MISSING_BUCKET}/train", STORE],
     f"data.train=s3://{MISSING_BUCKET}/train: no such bucket '{MISSING_BUCKET}'; check the bucket name and "
     "AWS_ENDPOINT_URL", S3),
    ("data-s3-empty-prefix", ["train", f"data.train=s3://{BUCKET}/empty", STORE],
     f"data.train=s3://{BUCKET}/empty: no such object or prefix (bucket '{BUCKET}' exists); check the path", S3),
    ("data-s3-not-parquet", ["train", f"data.train=s3://{BUCKET}/train", STORE],
     f"data.train=s3://{BUCKET}/train: s3://{BUCKET}/train/part-0.parquet is not a parquet file (Parquet file "
     "size is 4 bytes, smaller than the minimum file footer (8 bytes)); convert it with `clippy-ray data convert` "
     "or remove it", S3),
    ("data-s3-access-denied", ["train", f"data.train=s3://{BUCKET}/train", STORE],
     f"s3://{BUCKET}/train: access denied (AWS Error ACCESS_DENIED during HeadObject); check that "
     "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY may use it", "denied"),
    # storage
    ("storage-s3-no-bucket", ["train", DATA, f"train.storage=s3://{MISSING_BUCKET}/runs"],
     f"train.storage=s3://{MISSING_BUCKET}/runs: bucket s3://{MISSING_BUCKET} not found; create it or fix the URI", S3),
    ("storage-bad-scheme", ["train", DATA, "train.storage=gs://bucket/runs"],
     "gs://bucket/runs: unsupported scheme; use a local path or s3://bucket/prefix"),
    # checkpoints and pretrained weights
    ("from-missing", ["train", DATA, STORE, "--from", "{tmp}/nope"],
     "--from={tmp}/nope: no such file or folder; check the path"),
    ("from-not-a-checkpoint", ["train", DATA, STORE, "--from", "{tmp}/empty"],
     "--from={tmp}/empty: no model.safetensors there or in model/; give a training checkpoint "
     "(<run>/step_XXXXXXXX) or its model/ folder"),
    ("from-full-without-shards", ["train", DATA, STORE, "--from", "{handoff}", "--from-mode", "full"],
     "--from={handoff}: no optimizer state (state/index.json, or DeepSpeed shards in ds/); --from-mode full needs a "
     "training checkpoint (<run>/step_XXXXXXXX); for a handoff folder use --from-mode weights"),
    ("from-full-payload-in-model-states",
     ["train", DATA, STORE, "--from", "{tmp}/ckpt-model-payload", "--from-mode", "full"],
     f"{{tmp}}/ckpt-model-payload/ds/mp_rank_00_model_states.pt: {REFUSED}; {SHARD_FIX}", PAYLOAD),
    ("from-full-payload-in-optimizer-shard",
     ["train", DATA, STORE, "--from", "{tmp}/ckpt-optim-payload", "--from-mode", "full"],
     f"{{tmp}}/ckpt-optim-payload/ds/zero_pp_rank_0_mp_rank_00_optim_states.pt: {REFUSED}; {SHARD_FIX}", PAYLOAD),
    ("from-weights-payload-as-safetensors", ["train", DATA, STORE, "--from", "{tmp}/ckpt-bad-handoff"],
     f"{{tmp}}/ckpt-bad-handoff/model/model.safetensors: not a safetensors file (no valid header); {HANDOFF_FIX}",
     PAYLOAD),
    ("pretrained-image-payload", ["train", DATA, STORE, "model.image.pretrained={tmp}/payload.pth"],
     f"{{tmp}}/payload.pth: {REFUSED}; {PRETRAINED_FIX}", PAYLOAD),
    ("pretrained-image-legacy-pickle", ["train", DATA, STORE, "model.image.pretrained={tmp}/legacy.pth"],
     f"{{tmp}}/legacy.pth: {REFUSED}; {PRETRAINED_FIX}", PAYLOAD),
    ("pretrained-image-bare-pickle", ["train", DATA, STORE, "model.image.pretrained={tmp}/bare.pth"],
     "{tmp}/bare.pth: refused to load: the file holds pickled code (posix.system, torch.storage._load_from_bytes), "
     f"and clippy-ray never runs code from a file; {PRETRAINED_FIX}", PAYLOAD),
    ("pretrained-image-corrupt-safetensors",
     ["train", DATA, STORE, "model.image.pretrained={tmp}/garbage.safetensors"],
     f"{{tmp}}/garbage.safetensors: not a safetensors file (no valid header); {PRETRAINED_FIX}"),
    ("pretrained-image-missing", ["train", DATA, STORE, "model.image.pretrained={tmp}/dino.pth"],
     "model.image.pretrained={tmp}/dino.pth: no such file or folder; upload the weights there or fix the URI"),
    ("pretrained-text-remote-code", ["train", DATA, STORE, "model.text.pretrained={tmp}/t5-remote"],
     "model.text.pretrained={tmp}/t5-remote: config.json names the folder's own Python code (auto_map), and "
     "clippy-ray never runs code from a model folder; use a folder of a model type transformers ships (e.g. T5, "
     "BERT)", PAYLOAD),
    ("pretrained-text-payload", ["train", DATA, STORE, "model.text.pretrained={tmp}/t5-payload"],
     f"{{tmp}}/t5-payload/pytorch_model.bin: {REFUSED}; {PRETRAINED_FIX}", PAYLOAD),
    ("model-loads-payload-pth", ["model", *TINY, "model.image.pretrained={tmp}/payload.pth"],
     f"{{tmp}}/payload.pth: {REFUSED}; {PRETRAINED_FIX}", PAYLOAD),
    ("model-loads-corrupt-safetensors", ["model", *TINY, "model.image.pretrained={tmp}/garbage.safetensors"],
     f"{{tmp}}/garbage.safetensors: not a readable safetensors file (Error while deserializing header: header too "
     f"large); {PRETRAINED_FIX}"),
    # eval: checkpoint and data
    ("eval-checkpoint-missing", ["eval", "--checkpoint", "{tmp}/nope", "--data", "{tmp}/train"],
     "--checkpoint={tmp}/nope: no such file or folder; check the path"),
    ("eval-checkpoint-payload", ["eval", "--checkpoint", "{tmp}/handoff-payload", "--data", "{tmp}/train"],
     f"{{tmp}}/handoff-payload/model.safetensors: not a safetensors file (no valid header); {HANDOFF_FIX}", PAYLOAD),
    ("eval-checkpoint-yaml-tag", ["eval", "--checkpoint", "{tmp}/handoff-yaml-tag", "--data", "{tmp}/train"],
     "{tmp}/handoff-yaml-tag/config.yaml: not a YAML config clippy-ray wrote (could not determine a constructor "
     f"for the tag 'tag:yaml.org,2002:python/object/apply:os.system'); {HANDOFF_FIX}", PAYLOAD),
    ("eval-out-no-bucket", [*EVAL, "{tmp}/train", "--out", f"s3://{MISSING_BUCKET}/eval"],
     f"--out=s3://{MISSING_BUCKET}/eval: bucket s3://{MISSING_BUCKET} not found; create it or fix the URI", S3),
    ("eval-data-missing", [*EVAL, "{tmp}/nope"], "--data={tmp}/nope: no such file or folder; check the path"),
    ("eval-data-s3-no-bucket", [*EVAL, f"s3://{MISSING_BUCKET}/voc"],
     f"--data=s3://{MISSING_BUCKET}/voc: no such bucket '{MISSING_BUCKET}'; check the bucket name and "
     "AWS_ENDPOINT_URL", S3),
    ("eval-data-s3-empty-prefix", [*EVAL, f"s3://{BUCKET}/empty"],
     f"--data=s3://{BUCKET}/empty: no such object or prefix (bucket '{BUCKET}' exists); check the path", S3),
    ("eval-data-not-parquet", [*EVAL, "{tmp}/notparquet", "--classes", "voc21"],
     f"--data={{tmp}}/notparquet: {{tmp}}/notparquet/fake.parquet is not a parquet file ({NOT_PARQUET})"),
    ("eval-parquet-without-classes", [*EVAL, "{tmp}/train"],
     "{tmp}/train: plain parquet needs --classes FILE (one class name per line, line 0 = background if the masks "
     "use 0 for it)"),
    ("eval-unknown-class-file", [*EVAL, "{tmp}/train", "--classes", "voc22"],
     "no shipped classes file 'voc22'; shipped: ade150, coco133, voc21, waterbirds, waterbirds_places (or give a "
     "path to a .txt file)"),
    ("eval-named-task-unsupported", [*EVAL, "{tmp}/train", "--classes", "voc21", "--tasks", "robust"],
     "cannot run robust: parquet data has no matched/swapped background splits (benchmark test-matched/"
     "test-swapped, or Waterbirds metadata.csv) (choose --tasks from the ones the data supports)"),
    # images
    ("segment-not-an-image", [*SEGMENT, "{tmp}/notes.txt"],
     "{tmp}/notes.txt: not an image (no format PIL knows); give a JPEG or PNG file"),
    ("segment-image-missing", [*SEGMENT, "{tmp}/nope.jpg"], "{tmp}/nope.jpg: no such file or folder; check the path"),
    ("segment-checkpoint-payload",
     ["segment", "--checkpoint", "{tmp}/handoff-payload", "--labels", "a,b", "--out", "{tmp}/p.png", "--image",
      "{tmp}/notes.txt"],
     f"{{tmp}}/handoff-payload/model.safetensors: not a safetensors file (no valid header); {HANDOFF_FIX}", PAYLOAD),
    ("segment-checkpoint-remote-code",
     ["segment", "--checkpoint", "{tmp}/handoff-remote-code", "--labels", "a,b", "--out", "{tmp}/p.png", "--image",
      "{tmp}/notes.txt"],
     "{tmp}/handoff-remote-code/text_encoder: not an encoder config (The repository {tmp}/handoff-remote-code/"
     "text_encoder contains custom code which must be executed to correctly load the model. You can inspect the "
     f"repository content at {{tmp}}/handoff-remote-code/text_encoder .); {HANDOFF_FIX}", PAYLOAD),
    ("segment-one-label", [*SEGMENT[:4], "cat", *SEGMENT[5:], "{tmp}/notes.txt"],
     "--labels 'cat': give at least two comma-separated labels, e.g. \"cat,dog,grass\""),
    # sweeps
    ("tune-file-missing", ["tune", "--config", "{tmp}/nope.yaml"],
     "config error: {tmp}/nope.yaml: cannot read the config file (No such file or directory); check the path"),
    ("tune-unknown-key", ["tune", "--config", "{tmp}/sweep-lrr.yaml"],
     "config error: axes.train.lrr: unknown key (valid keys: ..."),
    ("tune-image-init-payload", ["tune", "--config", "{tmp}/sweep-image-payload.yaml"],
     f"{{tmp}}/payload.pth: {REFUSED}; {PRETRAINED_FIX}", PAYLOAD),
    ("tune-text-init-missing", ["tune", "--config", "{tmp}/sweep-text-missing.yaml"],
     "model.text.pretrained={tmp}/nope: no such file or folder; upload the weights there or fix the URI"),
    ("tune-eval-data-no-bucket", ["tune", "--config", "{tmp}/sweep-eval-missing.yaml"],
     f"eval_data=s3://{MISSING_BUCKET}/eval: no such bucket '{MISSING_BUCKET}'; upload the evaluation data or fix "
     "the URI", S3),
]  # fmt: skip


def _row(case: tuple) -> pytest.param:
    name, argv, line, *flags = case
    marks = [pytest.mark.integration] if S3 in flags or "denied" in flags else []
    return pytest.param(argv, line, flags, id=name, marks=marks)


@pytest.mark.parametrize("argv, line, flags", [_row(c) for c in CASES])
def test_a_mistake_is_one_line_naming_the_input_and_the_fix(world, request, capsys, argv, line, flags):
    if S3 in flags:
        request.getfixturevalue("s3_world")
    if "denied" in flags:
        request.getfixturevalue("s3_denied")

    def fill(text: str) -> str:
        return text.replace("{tmp}", str(world["tmp"])).replace("{handoff}", world["handoff"])

    ray_was_running = ray.is_initialized()
    code = cli.main([fill(a) for a in argv])
    err = capsys.readouterr().err
    assert ray.is_initialized() == ray_was_running, "the mistake was found only after Ray started"
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    expected = f"clippy-ray: {fill(line)}"
    assert len(lines) == 1, lines
    assert lines[0].startswith(expected[:-3]) if expected.endswith("...") else lines[0] == expected
    assert not world["marker"].exists(), "a planted payload ran"


def test_the_planted_payload_is_real_it_runs_under_an_unsafe_load(world):
    """What every PAYLOAD row guards against: torch.load(weights_only=False) on it runs its code."""
    marker = world["marker"]
    torch.load(world["tmp"] / "payload.pth", weights_only=False)
    try:
        assert marker.exists()
    finally:
        marker.unlink()


def test_a_bug_inside_a_command_keeps_its_traceback(world, monkeypatch):
    from clippy_ray import safeload

    def broken(*args, **kwargs):
        raise KeyError("an internal bug")

    monkeypatch.setattr(safeload, "check_safetensors", broken)
    with pytest.raises(KeyError, match="an internal bug"):  # not turned into a one-line user error
        cli.main(["eval", "--checkpoint", world["handoff"], "--data", str(world["tmp"] / "train")])


def test_the_loaders_themselves_refuse_payloads_without_the_driver_checks(world):
    """The loaders workers use (pretrained weights, the handoff) refuse on their own, for library users."""
    from clippy_ray.model.handoff import load_handoff
    from clippy_ray.model.pretrained import read_state_dict
    from clippy_ray.safeload import UnsafeFileError

    tmp = world["tmp"]
    for path in (tmp / "payload.pth", tmp / "legacy.pth", tmp / "bare.pth", tmp / "t5-payload" / "pytorch_model.bin"):
        with pytest.raises(UnsafeFileError, match=r"holds pickled code \(posix\.system"):
            read_state_dict(path)
    with pytest.raises(UnsafeFileError, match="not a safetensors file"):
        load_handoff(str(tmp / "handoff-payload"))
    assert not world["marker"].exists()


# ------------------------------------------------------------------------------- real DeepSpeed shards


def _shards_worker(rank: int, port: int, out: str, marker: str):
    """Save real DeepSpeed checkpoints (ZeRO 0 fp32, 2 bf16, 3 bf16), load each back through the
    safe loader into a fresh engine, then plant a payload in each shard and load again."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    results = {}
    try:
        from clippy_ray.data.transforms import normalize
        from clippy_ray.model import build_model
        from clippy_ray.safeload import UnsafeFileError
        from clippy_ray.tokenizer import build_tokenizer
        from clippy_ray.train.checkpoint import load_shards
        from clippy_ray.train.engine import build_engine

        def engine(cfg, tok):
            torch.manual_seed(0)
            return build_engine(build_model(cfg.model, tok.vocab_size), cfg.train)

        for stage, precision in ((0, "fp32"), (2, "bf16"), (3, "bf16")):
            overrides = [f"train.zero_stage={stage}", "train.num_workers=1", "train.global_batch_size=4"]
            cfg = config.load(None, TINY + overrides + [f"train.precision={precision}", "train.warmup_steps=0"])
            tok = build_tokenizer(cfg.model.text)

            trained = engine(cfg, tok)
            ids = torch.from_numpy(tok(["a red star", "two rings", "a cross", "a heart"])["input_ids"])
            images = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            img, txt, _ = trained(normalize(images, dtype), ids, (ids != 0).long())
            trained.backward(-(img * txt).float().sum())
            trained.step()
            folder = os.path.join(out, f"zero{stage}")
            trained.save_checkpoint(folder, tag="ds", client_state={"train_state": {"step": 1}})
            fresh = engine(cfg, tok)
            client = load_shards(fresh, folder, f"s3://runs/zero{stage}")
            got = {"client": client["train_state"], "steps": fresh.global_steps, "refused": {}}
            for shard in sorted(os.listdir(os.path.join(folder, "ds"))):
                path = os.path.join(folder, "ds", shard)
                saved = Path(path).read_bytes()
                torch.save({"x": Payload(Path(marker))}, path)
                try:
                    load_shards(engine(cfg, tok), folder, f"s3://runs/zero{stage}")
                except UnsafeFileError as err:
                    got["refused"][shard] = str(err)
                Path(path).write_bytes(saved)
            results[f"zero{stage}"] = got
    finally:
        dist.destroy_process_group()
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f)


@pytest.mark.integration  # real DeepSpeed engines on a gloo process group
def test_real_deepspeed_shards_load_back_safely_and_a_payload_in_any_shard_is_refused(tmp_path):
    import torch.multiprocessing as mp

    marker = tmp_path / "PAYLOAD_RAN"
    mp.spawn(_shards_worker, args=(_free_port(), str(tmp_path), str(marker)), nprocs=1, join=True)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"zero0", "zero2", "zero3"}
    for name, got in results.items():
        assert got["client"] == {"step": 1} and got["steps"] == 1, name  # the state came back
        shards = sorted(os.listdir(tmp_path / name / "ds"))
        assert any("optim_states" in s for s in shards) or name == "zero0"
        assert sorted(got["refused"]) == shards, name  # every shard, model states and optimizer alike
        for shard, message in got["refused"].items():
            assert message.startswith(f"s3://runs/{name}/ds/{shard}: refused to load: the file holds pickled code")
            assert "\n" not in message
    assert not marker.exists()


# ------------------------------------------------------------------------------- Ray Train runs


def _plant(shards: Path, marker: Path) -> None:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"x": Payload(marker)}, shards / name)


@pytest.fixture(scope="module")
def seeded_run(ray_local, world, tmp_path_factory):
    """`train --from` (weights mode) a checkpoint someone handed us: its handoff is good, every
    DeepSpeed shard beside it is a planted payload. A 1-step run, one worker, no validation."""
    root = tmp_path_factory.mktemp("runs")
    given = root / "given"
    shutil.copytree(world["handoff"], given / "model")
    (given / "ds").mkdir()
    _plant(given / "ds", root / "PAYLOAD_RAN")
    small = ("train.num_workers=1", "train.global_batch_size=8", "data.val=null", "train.checkpoint_every=1")
    cfg = train_cfg(world["tmp"], str(root), "seeded", "train.steps=1", *small)
    (root / "seeded.yaml").write_text(yaml.safe_dump(config.to_dict(cfg)))
    code = cli.main(["train", "--config", str(root / "seeded.yaml"), "--from", str(given)])
    return {"code": code, "root": root, "marker": root / "PAYLOAD_RAN"}


def test_from_weights_reads_only_the_handoff_so_a_payload_in_the_shards_never_loads(seeded_run):
    root = seeded_run["root"]
    assert seeded_run["code"] == 0 and not seeded_run["marker"].exists()
    assert optimizer_state(str(root / "seeded" / "step_00000001"))[1]["group_steps"]["0"] == 1  # a new run


def test_resuming_from_a_planted_shard_in_the_runs_own_storage_is_one_line(seeded_run, capsys):
    # the optimizer state is safetensors: a pickle in its place is refused as damaged, never unpickled
    root, marker = seeded_run["root"], seeded_run["marker"]
    shard = root / "seeded" / "step_00000001" / "state" / "rank00000.safetensors"
    saved = shard.read_bytes()
    torch.save({"x": Payload(marker)}, shard)
    try:
        code = cli.main(["train", "--config", str(root / "seeded.yaml"), "train.steps=2"])
    finally:
        shard.write_bytes(saved)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0] == (
        f"clippy-ray: {shard}: not a readable safetensors file (Error while deserializing: header too large); "
        "the checkpoint is damaged"
    )
    assert not marker.exists()
