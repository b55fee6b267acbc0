"""Evaluation metrics in plain numpy: confusion-matrix mIoU, Hungarian-matched Jaccard, top-k
accuracy and the Waterbirds-style domain gap. No torch, no Ray.

Everything reduces through sums (confusion counts, per-instance IoU lists, hit counts) so shards
evaluated in parallel combine exactly: IoU is computed once from the summed counts, never
averaged per shard.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from clippy_ray.errors import InputError

IGNORE = 255


def confusion(pred: np.ndarray, truth: np.ndarray, num_classes: int, ignore: int = IGNORE) -> np.ndarray:
    """[C, C] int64 counts, rows = truth, columns = prediction, over pixels whose truth is not
    `ignore`. Truth values >= num_classes (other than `ignore`) are an error, not dropped."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    valid = truth != ignore
    t = truth[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    if t.size and (t.max() >= num_classes or t.min() < 0):
        raise InputError(f"truth label {int(t.max())} outside 0..{num_classes - 1} (and not the ignore label {ignore})")
    if p.size and (p.max() >= num_classes or p.min() < 0):
        raise ValueError(f"predicted label {int(p.max())} outside 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU of each class from summed confusion counts; NaN for a class absent from both truth and
    prediction (it neither helps nor hurts the mean)."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(conf: np.ndarray) -> float:
    """Mean over the classes present in truth or prediction."""
    iou = iou_per_class(conf)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def largest_object_map(truth: np.ndarray, has_background: bool, ignore: int = IGNORE) -> np.ndarray:
    """Every pixel the class that covers most of the truth's pixels (background aside where there
    is one): the prediction of a model that names the main object and segments nothing. A truth
    with no object gives background (0)."""
    valid = truth[truth != ignore].astype(np.int64)
    counts = np.bincount(valid, minlength=1)
    if has_background:
        counts[0] = 0
    label = int(counts.argmax()) if counts.any() else 0
    return np.full(truth.shape, label, dtype=np.int64)


def matched_jaccard(
    groups: np.ndarray, segments: np.ndarray, ignore: int = IGNORE, include_background: bool = True
) -> list[float]:
    """IoU of each ground-truth segment with the group Hungarian-matched to it (one group per
    segment at most, matching chosen to maximize the total IoU); an unmatched segment scores 0.
    Label-agnostic: `segments` is an instance map (0 = background, `ignore` = not scored),
    `groups` any integer map of the same shape. Returns one IoU per segment, in id order."""
    if groups.shape != segments.shape:
        raise ValueError(f"groups {groups.shape} and segments {segments.shape} differ in shape")
    valid = segments != ignore
    seg_ids = [int(s) for s in np.unique(segments[valid]) if include_background or s != 0]
    if not seg_ids:
        return []
    group_ids = np.unique(groups[valid])
    seg_masks = np.stack([(segments == s) & valid for s in seg_ids]).reshape(len(seg_ids), -1)
    grp_masks = np.stack([(groups == g) & valid for g in group_ids]).reshape(len(group_ids), -1)
    inter = seg_masks.astype(np.int64) @ grp_masks.T.astype(np.int64)  # [S, G]
    union = seg_masks.sum(1)[:, None] + grp_masks.sum(1)[None, :] - inter
    iou = inter / np.maximum(union, 1)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    scores = np.zeros(len(seg_ids))
    scores[rows] = iou[rows, cols]
    return scores.tolist()


def topk_hits(logits: np.ndarray, labels: list[list[int]], ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """How many rows have one of their labels among the top k predictions, for each k. A row may
    hold several labels (a scene with two objects): naming any of them is a hit."""
    order = np.argsort(-logits, axis=1, kind="stable")
    hits = {}
    for k in ks:
        top = order[:, :k]
        hits[k] = int(sum(bool(set(top[i].tolist()) & set(row)) for i, row in enumerate(labels)))
    return hits


def domain_gap(
    correct_matched: np.ndarray,
    labels_matched: np.ndarray,
    correct_swapped: np.ndarray,
    labels_swapped: np.ndarray,
    class_names: list[str],
) -> dict:
    """Accuracy on matched vs swapped backgrounds per class group and overall, and the gap
    Delta = matched - swapped in accuracy points (the paper's Waterbirds number). A class with
    no rows in one of the two splits has no gap (None)."""
    out = {"per_class": {}}
    for c, name in enumerate(class_names):
        m, s = labels_matched == c, labels_swapped == c
        if not m.any() or not s.any():
            continue
        acc_m, acc_s = 100 * float(correct_matched[m].mean()), 100 * float(correct_swapped[s].mean())
        out["per_class"][name] = {
            "matched": acc_m,
            "swapped": acc_s,
            "gap": acc_m - acc_s,
            "rows_matched": int(m.sum()),
            "rows_swapped": int(s.sum()),
        }
    acc_m = 100 * float(np.mean(correct_matched)) if len(correct_matched) else float("nan")
    acc_s = 100 * float(np.mean(correct_swapped)) if len(correct_swapped) else float("nan")
    gaps = [v["gap"] for v in out["per_class"].values()]
    out.update(matched=acc_m, swapped=acc_s, gap=acc_m - acc_s, worst_class_gap=max(gaps) if gaps else None)
    return out
