"""What every evaluation task shares, plain torch, no Ray: one model, the class embeddings of one
dataset, and dense features of its images. The tasks (eval/tasks/) and `segment` build on it.

- class embeddings: prompt-averaged text embeddings per class (CLIP's zero-shot classifier).
- dense features: the projected per-location embeddings of a whole image, compared with the class
  embeddings location by location (top-down, no aggregation at test time) or grouped by PCA.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clippy_ray.config import EvalConfig
from clippy_ray.data.transforms import center_square_box, normalize
from clippy_ray.eval.datasets import EvalDataError, EvalSet, Sample, fill, read_templates

# ------------------------------------------------------------------------------- inputs


def prepare(image: np.ndarray, short_side: int, patch: int, crop: bool) -> torch.Tensor:
    """uint8 [H, W, 3] -> uint8 [3, h, w]. crop: resize the short side and center-crop a square
    (classification). Otherwise keep the whole image at about the same aspect, each side rounded to
    a multiple of the patch size (segmentation; scores are upsampled back to [H, W])."""
    img = Image.fromarray(image)
    w, h = img.size
    if crop:
        box = center_square_box(w, h)
        size = (short_side, short_side)
    else:
        box = None
        scale = short_side / min(w, h)
        size = (max(patch, round(w * scale / patch) * patch), max(patch, round(h * scale / patch) * patch))
    out = np.asarray(img.resize(size, Image.BILINEAR, box=box))
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


def _same_shape_batches(tensors: list[torch.Tensor], batch_size: int) -> list[tuple[int, torch.Tensor]]:
    """Consecutive runs of equal-shape images, at most batch_size each: (first index, [N, 3, h, w])."""
    out, start = [], 0
    while start < len(tensors):
        stop = start + 1
        while stop < len(tensors) and stop - start < batch_size and tensors[stop].shape == tensors[start].shape:
            stop += 1
        out.append((start, torch.stack(tensors[start:stop])))
        start = stop
    return out


# ------------------------------------------------------------------------------- embeddings


@torch.no_grad()
def text_classifier(
    model, tokenizer, names: list[list[str]], templates: list[str], device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """One L2-normalized fp32 embedding per class [C, E]: the mean over synonyms x templates of
    the normalized text embeddings, normalized again (CLIP's zero-shot classifier)."""
    prompts = [fill(t, n) for syn in names for n in syn for t in templates]
    owners = [c for c, syn in enumerate(names) for _ in syn for _ in templates]
    embs = []
    for i in range(0, len(prompts), batch_size):
        tok = tokenizer(prompts[i : i + batch_size])
        ids = torch.as_tensor(tok["input_ids"], device=device)
        mask = torch.as_tensor(tok["attention_mask"], device=device)
        embs.append(model.encode_text(ids, mask).float())
    emb = torch.cat(embs)
    owner = torch.as_tensor(owners, device=device)
    out = torch.zeros(len(names), emb.shape[1], device=device).index_add_(0, owner, emb)
    return F.normalize(out, dim=-1)


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


@torch.no_grad()
def image_embeddings(model, images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, h, w] -> fp32 [N, E]."""
    return model.encode_image(normalize(images, _dtype(model))).float()


@torch.no_grad()
def dense_embeddings(model, images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, h, w] -> fp32 [N, h/p, w/p, E]."""
    return model.dense_features(normalize(images, _dtype(model))).float()


# ------------------------------------------------------------------------------- predictions


def score_maps(dense: torch.Tensor, classifier: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Cosine similarity of each location to each class, bilinearly upsampled:
    dense [h, w, E], classifier [C, E] -> [C, H, W]."""
    scores = torch.einsum("hwe,ce->chw", dense, classifier)
    return F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]


def label_map(scores: torch.Tensor, mode: str, threshold: float, scale: float) -> torch.Tensor:
    """[C, H, W] scores -> [H, W] class ids. `class`/`none`: argmax over all classes (id = row).
    `threshold`: scores are foreground classes 1..C; background (0) where the softmax probability
    of the best class, at the model's logit scale, is below `threshold`."""
    if mode in ("class", "none"):
        return scores.argmax(0)
    if mode == "threshold":
        prob, best = torch.softmax(scores * scale, dim=0).max(0)
        return torch.where(prob < threshold, torch.zeros_like(best), best + 1)
    raise ValueError(f"unknown background mode {mode!r}")


def pca_groups(dense: torch.Tensor, k: int) -> torch.Tensor:
    """Bottom-up grouping with no text: the top-k principal directions of one image's dense map
    [h, w, E]; each location joins the direction its centred feature projects onto most (the
    nearest unit component). Signs are fixed so the larger-magnitude end of each component is
    positive, which makes the result independent of the SVD's sign choice. -> [h, w] int64."""
    h, w, e = dense.shape
    x = dense.reshape(h * w, e).double()
    x = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    comps = vh[: min(k, vh.shape[0])]  # [K, E]
    proj = x @ comps.T  # [HW, K]
    flip = proj.max(0).values < -proj.min(0).values
    proj = torch.where(flip[None], -proj, proj)
    return proj.argmax(1).reshape(h, w)


def upsample_nearest(labels: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """[h, w] ids -> [H, W] numpy ids (nearest neighbour, so ids stay ids)."""
    return F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long().cpu().numpy()


# ------------------------------------------------------------------------------- settings


def background_mode(cfg: EvalConfig, data: EvalSet) -> str:
    """The segmentation background mode: eval.background, or the dataset's own when auto."""
    mode = data.default_background if cfg.background == "auto" else cfg.background
    if mode in ("class", "threshold") and not data.has_background:
        raise EvalDataError(
            f"eval.background={mode!r} but {data.fmt} data has no background class; use eval.background=none (or auto)"
        )
    return mode


def resolve_templates(cfg: EvalConfig, data: EvalSet) -> list[str]:
    """eval.templates, or the template set that suits the data when auto."""
    return read_templates(data.templates if cfg.templates == "auto" else cfg.templates)


def check_settings(cfg: EvalConfig, data: EvalSet) -> dict:
    """Check on the driver, before any worker loads a model, the settings every Evaluator will use
    (templates, background mode); -> the ones a report names."""
    resolve_templates(cfg, data)
    return {"background": background_mode(cfg, data), "pca_components": cfg.pca_components}


def foreground_ids(data: EvalSet) -> list[int]:
    """The class ids an image can be classified as: all but background (id 0 where there is one)."""
    return list(range(1 if data.has_background else 0, len(data.class_names)))


def device_for(use_gpu: bool | None) -> torch.device:
    if use_gpu is None:
        use_gpu = torch.cuda.is_available()
    return torch.device("cuda" if use_gpu else "cpu")


# ------------------------------------------------------------------------------- the evaluator


class Evaluator:
    """Holds one model and the class embeddings of one dataset; the tasks evaluate shards with it."""

    def __init__(
        self,
        model,
        tokenizer,
        data: EvalSet,
        cfg: EvalConfig,
        device: torch.device,
        train_size: int,
        patch: int,
        templates: list[str],
    ):
        self.model, self.tokenizer, self.data, self.cfg, self.device = model, tokenizer, data, cfg, device
        self.train_size, self.patch = train_size, patch
        self.resolution = cfg.resolution or 2 * train_size
        self.background = background_mode(cfg, data)
        names = data.class_names
        self.fg_ids = foreground_ids(data)  # classification never predicts background
        first_fg = len(names) - len(self.fg_ids)  # background classes come first
        self.fg = text_classifier(model, tokenizer, [names[i] for i in self.fg_ids], templates, device)  # [F, E]
        self.all = text_classifier(model, tokenizer, names[:first_fg], templates, device) if first_fg else self.fg[:0]
        self.all = torch.cat([self.all, self.fg])  # [C, E], row = class id
        self.context = (
            text_classifier(model, tokenizer, data.context_names, templates, device)
            if data.context_names
            else self.fg[:0]
        )
        self.scale = float(model.scale().float()) if hasattr(model, "scale") else 100.0

    def fg_logits(self, samples: list[Sample]) -> np.ndarray:
        """Each center-cropped image against the foreground classes: [N, F], column j = class fg_ids[j]."""
        tensors = [prepare(s.image, self.train_size, self.patch, crop=True) for s in samples]
        logits = [
            image_embeddings(self.model, batch.to(self.device)) @ self.fg.T
            for _, batch in _same_shape_batches(tensors, self.cfg.batch_size)
        ]
        return torch.cat(logits).cpu().numpy() if logits else np.zeros((0, len(self.fg_ids)))

    def dense(self, samples: list[Sample]) -> Iterator[tuple[Sample, torch.Tensor]]:
        """Yields (sample, its dense features [h, w, E]) at the evaluation resolution, in order."""
        tensors = [prepare(s.image, self.resolution, self.patch, crop=False) for s in samples]
        for start, batch in _same_shape_batches(tensors, self.cfg.batch_size):
            dense = dense_embeddings(self.model, batch.to(self.device))
            for j in range(dense.shape[0]):
                yield samples[start + j], dense[j]

    def predict(self, sample: Sample, dense: torch.Tensor, background: str | None = None) -> np.ndarray:
        """[H, W] class ids at the mask's (or image's) size, under the background mode (`background`,
        else the evaluation's)."""
        background = background or self.background
        classifier = self.fg if background == "threshold" else self.all
        scores = score_maps(dense, classifier, _label_size(sample))
        return label_map(scores, background, self.cfg.bg_threshold, self.scale).cpu().numpy()

    def groups(self, sample: Sample, dense: torch.Tensor) -> np.ndarray:
        """[H, W] unsupervised group ids (PCA of the dense map) at the mask's (or image's) size."""
        return upsample_nearest(pca_groups(dense, self.cfg.pca_components), _label_size(sample))


def _label_size(sample: Sample) -> tuple[int, int]:
    return tuple(sample.mask.shape if sample.mask is not None else sample.image.shape[:2])


def load_model(checkpoint: str, device: torch.device):
    """(model, config, tokenizer) of a handoff checkpoint on `device`. A bf16 model stays bf16 only
    where the device runs bf16 natively; elsewhere (CPUs without AVX512-BF16 / AMX) it is cast to
    fp32, since emulated bf16 runs ~30x slower there."""
    from clippy_ray import precision
    from clippy_ray.model.handoff import load_handoff

    model, model_cfg, tokenizer = load_handoff(checkpoint)
    if next(model.parameters()).dtype == torch.bfloat16 and precision.choose("auto", device).precision == "fp32":
        model.float()
    return model.to(device), model_cfg, tokenizer


def build_evaluator(checkpoint: str, data: EvalSet, cfg: EvalConfig, device: torch.device | None = None) -> Evaluator:
    """Load a handoff checkpoint onto `device` and embed the dataset's class names."""
    device = device or device_for(bool(cfg.use_gpu))
    model, model_cfg, tokenizer = load_model(checkpoint, device)
    with torch.no_grad():
        return Evaluator(
            model,
            tokenizer,
            data,
            cfg,
            device,
            model_cfg.model.image.img_size,
            model.image.patch_size[0],
            resolve_templates(cfg, data),
        )
