"""The evaluation tasks on one shard of samples: plain torch, no Ray.

- cls: zero-shot classification against prompt-averaged class embeddings (CLIP's protocol).
- seg: per-location similarity of the dense projected features to each class embedding,
  bilinearly upsampled to the mask, argmax (top-down, no aggregation at test time).
- unsup: PCA of the dense map, each location to the nearest of K components, groups matched to
  the annotated segments (Hungarian), Jaccard per segment.
- robust: zero-shot accuracy on matched vs swapped backgrounds.

Each returns sums that the runner adds up across shards (see eval/metrics.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clippy_ray.config import EvalConfig
from clippy_ray.data.transforms import normalize
from clippy_ray.eval import metrics
from clippy_ray.eval.datasets import EvalDataError, EvalSet, Sample


# ------------------------------------------------------------------------------- inputs

def prepare(image: np.ndarray, short_side: int, patch: int, crop: bool) -> torch.Tensor:
    """uint8 [H, W, 3] -> uint8 [3, h, w]. crop: resize the short side and center-crop a square
    (classification). Otherwise keep the whole image at about the same aspect, each side rounded to
    a multiple of the patch size (segmentation; scores are upsampled back to [H, W])."""
    img = Image.fromarray(image)
    w, h = img.size
    if crop:
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
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
def text_classifier(model, tokenizer, names: list[list[str]], templates: list[str], device: torch.device,
                    batch_size: int = 256) -> torch.Tensor:
    """One L2-normalized fp32 embedding per class [C, E]: the mean over synonyms x templates of
    the normalized text embeddings, normalized again (CLIP's zero-shot classifier)."""
    prompts = [t.format(n) for syn in names for n in syn for t in templates]
    owners = [c for c, syn in enumerate(names) for _ in syn for _ in templates]
    embs = []
    for i in range(0, len(prompts), batch_size):
        tok = tokenizer(prompts[i:i + batch_size])
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
    comps = vh[:min(k, vh.shape[0])]  # [K, E]
    proj = x @ comps.T  # [HW, K]
    flip = proj.max(0).values < -proj.min(0).values
    proj = torch.where(flip[None], -proj, proj)
    return proj.argmax(1).reshape(h, w)


def upsample_nearest(labels: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    return F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long().cpu().numpy()


# ------------------------------------------------------------------------------- the evaluator

def background_mode(cfg: EvalConfig, data: EvalSet) -> str:
    """The segmentation background mode: eval.background, or the dataset's own when auto."""
    mode = data.default_background if cfg.background == "auto" else cfg.background
    if mode in ("class", "threshold") and not data.has_background:
        raise EvalDataError(f"eval.background={mode!r} but {data.fmt} data has no background class; "
                            f"use eval.background=none (or auto)")
    return mode


class Evaluator:
    """Holds one model and the class embeddings of one dataset; evaluates shards of it."""

    def __init__(self, model, tokenizer, data: EvalSet, cfg: EvalConfig, device: torch.device,
                 train_size: int, patch: int, templates: list[str]):
        self.model, self.tokenizer, self.data, self.cfg, self.device = model, tokenizer, data, cfg, device
        self.train_size, self.patch = train_size, patch
        self.resolution = cfg.resolution or 2 * train_size
        self.background = background_mode(cfg, data)
        names = data.class_names
        first_fg = 1 if data.has_background else 0
        self.fg_ids = list(range(first_fg, len(names)))  # classification never predicts background
        self.fg = text_classifier(model, tokenizer, [names[i] for i in self.fg_ids], templates, device)
        self.all = (text_classifier(model, tokenizer, names[:first_fg], templates, device) if first_fg else
                    self.fg[:0])
        self.all = torch.cat([self.all, self.fg])  # row = class id
        self.context = (text_classifier(model, tokenizer, data.context_names, templates, device)
                        if data.context_names else self.fg[:0])
        self.scale = float(model.scale().float()) if hasattr(model, "scale") else 100.0

    # -- per task sums
    def run(self, task: str, samples: list[Sample]) -> dict:
        if task == "cls":
            return self._classify(samples)
        if task in ("robust-matched", "robust-swapped"):
            out = self._classify(samples)
            return {"correct": out["correct"], "labels": out["labels"]}
        if task == "seg":
            return self._segment(samples)
        if task == "unsup":
            return self._group(samples)
        raise ValueError(f"unknown task {task!r}")

    def _classify(self, samples: list[Sample]) -> dict:
        tensors = [prepare(s.image, self.train_size, self.patch, crop=True) for s in samples]
        logits = []
        for _, batch in _same_shape_batches(tensors, self.cfg.batch_size):
            logits.append(image_embeddings(self.model, batch.to(self.device)) @ self.fg.T)
        logits = torch.cat(logits).cpu().numpy() if logits else np.zeros((0, len(self.fg_ids)))
        fg = np.asarray(self.fg_ids)
        labels = [[self.fg_ids.index(l) for l in s.labels if l in self.fg_ids] for s in samples]
        hits = metrics.topk_hits(logits, labels, (1, 5))
        top1 = fg[logits.argmax(1)] if len(logits) else np.zeros(0, int)
        first = [s.labels[0] if s.labels else -1 for s in samples]
        return {"hits1": hits[1], "hits5": hits[5], "rows": len(samples),
                "correct": [int(p == l) for p, l in zip(top1.tolist(), first)], "labels": first}

    def _dense(self, samples: list[Sample]):
        tensors = [prepare(s.image, self.resolution, self.patch, crop=False) for s in samples]
        for start, batch in _same_shape_batches(tensors, self.cfg.batch_size):
            dense = dense_embeddings(self.model, batch.to(self.device))
            for j in range(dense.shape[0]):
                yield samples[start + j], dense[j]

    def predict(self, sample: Sample, dense: torch.Tensor) -> np.ndarray:
        """[H, W] class ids at the mask's (or image's) size."""
        size = sample.mask.shape if sample.mask is not None else sample.image.shape[:2]
        classifier = self.fg if self.background == "threshold" else self.all
        scores = score_maps(dense, classifier, tuple(size))
        return label_map(scores, self.background, self.cfg.bg_threshold, self.scale).cpu().numpy()

    def _segment(self, samples: list[Sample]) -> dict:
        conf = np.zeros((len(self.data.class_names),) * 2, np.int64)
        for sample, dense in self._dense(samples):
            if sample.mask is None:
                raise EvalDataError(f"row {sample.key}: no mask; the seg task needs a mask for every row")
            conf += metrics.confusion(self.predict(sample, dense), sample.mask, len(self.data.class_names))
        return {"confusion": conf}

    def groups(self, sample: Sample, dense: torch.Tensor) -> np.ndarray:
        size = sample.mask.shape if sample.mask is not None else sample.image.shape[:2]
        return upsample_nearest(pca_groups(dense, self.cfg.pca_components), tuple(size))

    def _group(self, samples: list[Sample]) -> dict:
        ious = []
        for sample, dense in self._dense(samples):
            segments = sample.instances if sample.instances is not None else sample.mask
            if segments is None:
                raise EvalDataError(f"row {sample.key}: no instance or class mask for the unsup task")
            ious += metrics.matched_jaccard(self.groups(sample, dense), segments)
        return {"ious": ious}

    def context_map(self, sample: Sample, dense: torch.Tensor) -> np.ndarray:
        """Per-location argmax over the classes and the context names (the paper's Figure 4a):
        ids 0..F-1 = foreground classes, F.. = contexts."""
        scores = score_maps(dense, torch.cat([self.fg, self.context]), tuple(sample.image.shape[:2]))
        return scores.argmax(0).cpu().numpy()

    # -- pictures
    def pictures(self, task: str, samples: list[Sample]) -> list[dict]:
        out = []
        for sample, dense in self._dense(samples):
            item = {"key": sample.key, "image": sample.image, "truth": sample.mask}
            if task == "robust":
                item["pred"] = self.context_map(sample, dense)
            else:
                item["pred"] = self.predict(sample, dense)
                item["groups"] = self.groups(sample, dense)
            out.append(item)
        return out


def device_for(use_gpu: bool | None) -> torch.device:
    if use_gpu is None:
        use_gpu = torch.cuda.is_available()
    return torch.device("cuda" if use_gpu else "cpu")


def accuracy(hits: int, rows: int) -> float:
    return 100.0 * hits / rows if rows else math.nan
