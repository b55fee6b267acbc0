"""The Python API (`clippy_ray.load`) and the "Use a trained model from Python" snippets of docs/api.md,
run as written against a tiny handoff placed where their path points."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
SECTION = "## Use a trained model from Python"
CHECKPOINT = "runs/demo/checkpoints/demo/step_00000300"  # the path the snippets load


def readme_snippets() -> list[str]:
    """The ```python blocks of docs/api.md's API section, in order."""
    text = API_DOC.read_text()
    assert SECTION in text, f"docs/api.md lost its {SECTION!r} section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def run_snippets(snippets: list[str], checkpoint: str = CHECKPOINT) -> dict:
    """Exec the snippets one after another in one namespace (the reader's session), the checkpoint
    path replaced by `checkpoint`; returns the namespace."""
    namespace: dict = {}
    for i, code in enumerate(snippets, start=1):
        exec(compile(code.replace(CHECKPOINT, checkpoint), f"docs/api.md {SECTION!r} block {i}", "exec"), namespace)
    return namespace


@pytest.fixture
def reader_dir(tmp_path, tiny_handoff, monkeypatch):
    """A working folder as the README's reader has it: a checkpoint at the README's path (the tiny
    handoff as `model/`, a stand-in optimizer shard in `ds/`) and a benchmark scene as scene.png."""
    from clippy_ray.data.benchmark import BenchmarkSpec, make_scene

    checkpoint = tmp_path / CHECKPOINT
    shutil.copytree(tiny_handoff, checkpoint / "model")
    (checkpoint / "ds").mkdir()
    (checkpoint / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"optimizer state")
    scene = make_scene(BenchmarkSpec(seed=0, image_size=64), "val", 3)
    Image.fromarray(scene.image).save(tmp_path / "scene.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_snippets_run_and_give_the_models_embeddings_and_the_segment_commands_label_map(reader_dir, capsys):
    from clippy_ray.api import Model
    from clippy_ray.eval.segment import segment_image

    snippets = readme_snippets()
    assert len(snippets) == 3  # classification, segmentation, plain timm + transformers
    ns = run_snippets(snippets)
    model, tokenizer = ns["model"], ns["tokenizer"]
    assert isinstance(model, Model) and not model.training
    embed_dim = model.image.proj.out_features

    # classification: normalized embeddings, one probability per label
    assert ns["image"].shape == (1, embed_dim) and ns["text"].shape == (6, embed_dim)
    assert ns["image"].dtype == ns["text"].dtype == torch.float32
    torch.testing.assert_close(ns["image"].norm(dim=-1).cpu(), torch.ones(1))
    torch.testing.assert_close(ns["text"].norm(dim=-1).cpu(), torch.ones(6))
    assert ns["probs"].shape == (6,) and float(ns["probs"].sum()) == pytest.approx(1.0, abs=1e-5)

    # segmentation: the scene's own size, and exactly what `clippy-ray segment` computes
    label_map = ns["label_map"]
    assert label_map.shape == (64, 64) and label_map.dtype == np.int64
    assert label_map.min() >= 0 and label_map.max() < len(ns["labels"])
    labels = [[name] for name in ns["labels"]]
    command = segment_image(CHECKPOINT, "scene.png", labels, str(reader_dir / "picture.png"))
    np.testing.assert_array_equal(label_map, command["labels"])

    # plain timm + transformers towers (on the CPU) reproduce the model's embeddings
    torch.testing.assert_close(ns["image_plain"], ns["image"].cpu())
    with torch.no_grad():
        text = model.encode_text(torch.from_numpy(tokenizer(["a red shape"])["input_ids"]))
    torch.testing.assert_close(ns["text_plain"], text.cpu())
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split()[0] in ns["labels"]


def test_encode_text_without_a_mask_equals_the_tokenizers_mask(tiny_handoff):
    import clippy_ray

    model, tokenizer, preprocess = clippy_ray.load(tiny_handoff, device="cpu")
    tokens = tokenizer(["a red circle", "a much longer caption about two blue squares"])
    ids, mask = torch.from_numpy(tokens["input_ids"]), torch.from_numpy(tokens["attention_mask"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids), model.encode_text(ids, mask))
        # the tokenizer's own numpy arrays go in as they are
        torch.testing.assert_close(
            model.encode_text(tokens["input_ids"], tokens["attention_mask"]), model.encode_text(ids)
        )
        dense = model.dense_features(preprocess(Image.new("RGB", (50, 40), "red"))[None])
    assert dense.shape == (1, 4, 4, model.image.proj.out_features)  # 32 px, patch 8
    torch.testing.assert_close(dense.norm(dim=-1), torch.ones(1, 4, 4))


def test_a_bf16_model_takes_fp32_inputs_and_gives_fp32_embeddings(tmp_path, monkeypatch):
    import clippy_ray
    from clippy_ray import precision
    from clippy_ray.model import build_model
    from clippy_ray.model.handoff import export_handoff
    from clippy_ray.tokenizer import build_tokenizer
    from tests.conftest import tiny_config

    cfg = tiny_config()
    tok = build_tokenizer(cfg.model.text)
    trained = build_model(cfg.model, tok.vocab_size).to(torch.bfloat16)
    export_handoff(trained, trained.state_dict(), cfg, tok, tmp_path / "model")
    monkeypatch.setattr(precision, "choose", lambda *_: precision.Choice("bf16", "as on a bf16 device"))
    model, tokenizer, preprocess = clippy_ray.load(tmp_path / "model", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        image = model.encode_image(preprocess(Image.new("RGB", (32, 32), "blue"))[None])
        text = model.encode_text(torch.from_numpy(tokenizer(["a blue square"])["input_ids"]))
    assert image.dtype == text.dtype == torch.float32 and image.shape == text.shape == (1, 16)


def test_preprocess_center_crops_to_the_training_size_and_normalizes():
    from clippy_ray.api import Preprocess
    from clippy_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    image = Image.new("RGB", (120, 30), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 30, 30))  # the left quarter, outside the center crop
    out = Preprocess(32)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    white = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out, white.view(3, 1, 1).expand(3, 32, 32))


def test_segment_names_a_bad_image_or_empty_labels(tiny_handoff):
    import clippy_ray

    model, _, _ = clippy_ray.load(tiny_handoff, device="cpu")
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        model.segment(np.zeros((8, 8), np.uint8), ["a", "b"])
    with pytest.raises(ValueError, match="labels must be non-empty"):
        model.segment(np.zeros((8, 8, 3), np.uint8), [])
    with pytest.raises(ValueError, match="labels must be non-empty"):
        model.segment(np.zeros((8, 8, 3), np.uint8), "cat,grass")  # a list, not the command's syntax


def test_readme_snippets_run_against_a_checkpoint_on_s3_and_fetch_only_its_handoff(
    reader_dir, bucket, monkeypatch, capsys
):
    from clippy_ray import storage

    cache = reader_dir / "cache"
    monkeypatch.setenv("CLIPPY_RAY_CACHE", str(cache))
    uri = f"s3://{bucket}/runs/demo/step_00000300"
    storage.upload(reader_dir / CHECKPOINT, uri)
    assert storage.exists(f"{uri}/ds/zero_pp_rank_0_mp_rank_00_optim_states.pt")

    ns = run_snippets(readme_snippets()[:2], uri)  # the third reads a local folder
    assert ns["label_map"].shape == (64, 64) and ns["probs"].shape == (6,)
    fetched = [p.relative_to(cache) for p in cache.rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in fetched)
    assert not [p for p in fetched if "ds" in p.parts], fetched
    assert capsys.readouterr().out.count("\n") == 2  # one line per snippet


def test_segment_with_several_checkpoints_draws_one_row_per_model(tiny_handoff, tmp_path, capsys):
    from clippy_ray import cli
    from clippy_ray.data.benchmark import BenchmarkSpec, make_scene
    from clippy_ray.eval.segment import segment_image
    from clippy_ray.model import build_model
    from clippy_ray.model.handoff import export_handoff
    from clippy_ray.tokenizer import build_tokenizer
    from tests.conftest import tiny_config

    cfg = tiny_config("model.aggregation=avg")  # a second, different model
    tok = build_tokenizer(cfg.model.text)
    torch.manual_seed(1)
    model = build_model(cfg.model, tok.vocab_size)
    export_handoff(model, model.state_dict(), cfg, tok, tmp_path / "avg")
    Image.fromarray(make_scene(BenchmarkSpec(image_size=48), "val", 3).image).save(tmp_path / "scene.png")
    labels = [["circle"], ["square"], ["background"]]

    alone = {
        name: segment_image(uri, str(tmp_path / "scene.png"), labels, str(tmp_path / f"{name}.png"))
        for name, uri in (("max", tiny_handoff), ("avg", str(tmp_path / "avg")))
    }
    args = ["segment", "--image", str(tmp_path / "scene.png"), "--labels", "circle,square,background"]
    args += ["--checkpoint", f"max={tiny_handoff}", "--checkpoint", f"avg={tmp_path / 'avg'}"]
    assert cli.main([*args, "--out", str(tmp_path / "both.png")]) == 0
    assert "2 models" in capsys.readouterr().out

    both = np.asarray(Image.open(tmp_path / "both.png"))
    rows = [np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("max", "avg")]
    assert both.shape[0] == rows[0].shape[0] + 4 + rows[1].shape[0]  # stacked, 4 px apart
    # each row shows its own model: the same label maps as the model alone
    info = segment_image(
        [f"max={tiny_handoff}", f"avg={tmp_path / 'avg'}"], str(tmp_path / "scene.png"), labels, str(tmp_path / "x.png")
    )
    for name in ("max", "avg"):
        np.testing.assert_array_equal(info["models"][name]["labels"], alone[name]["labels"])
        np.testing.assert_array_equal(info["models"][name]["groups"], alone[name]["groups"])
    assert not np.array_equal(info["models"]["max"]["groups"], info["models"]["avg"]["groups"])


def test_checkpoint_row_names_are_parsed_without_eating_uris(tmp_path, monkeypatch):
    from clippy_ray.errors import InputError
    from clippy_ray.eval.segment import parse_checkpoints

    monkeypatch.chdir(tmp_path)
    (tmp_path / "lr=0.001").mkdir()  # a local folder whose name holds "="
    assert parse_checkpoints(["runs/a"]) == [("", "runs/a")]
    assert parse_checkpoints(["max=s3://b/x=y", "s3://b/x=y", "lr=0.001", "seed-1.5=runs/b"]) == [
        ("max", "s3://b/x=y"),
        ("model 2", "s3://b/x=y"),
        ("model 3", "lr=0.001"),
        ("seed-1.5", "runs/b"),
    ]
    for bad in ("=runs/a", "two words=runs/a", "max="):
        with pytest.raises(InputError, match="give NAME=URI"):
            parse_checkpoints([bad])
    with pytest.raises(InputError, match="two rows share a name"):
        parse_checkpoints(["a=runs/x", "a=runs/y"])
