"""`clippy-ray segment`: one image, free-form labels -> a picture of the image, the zero-shot
label map with a legend, and the unsupervised grouping, side by side; one row per model when given
several checkpoints (max / avg / cls on the same picture). Runs in-process (no Ray)."""

from __future__ import annotations

import os
import re

import numpy as np
import torch

from clippy_ray import storage
from clippy_ray.errors import InputError
from clippy_ray.eval import visualize
from clippy_ray.eval.datasets import read_image, read_templates
from clippy_ray.eval.evaluator import (
    dense_embeddings,
    device_for,
    load_model,
    pca_groups,
    prepare,
    score_maps,
    text_classifier,
    upsample_nearest,
)


def parse_labels(text: str) -> list[list[str]]:
    """ "cat,dog,grass" -> [["cat"], ["dog"], ["grass"]]; "|" joins synonyms of one label ("sofa|couch")."""
    labels = [[s.strip() for s in item.split("|") if s.strip()] for item in text.split(",")]
    labels = [syn for syn in labels if syn]
    if len(labels) < 2:
        raise InputError(f'--labels {text!r}: give at least two comma-separated labels, e.g. "cat,dog,grass"')
    return labels


@torch.no_grad()
def zero_shot_labels(
    model, tokenizer, image: np.ndarray, labels: list[list[str]], templates: list[str], resolution: int
) -> tuple[np.ndarray, torch.Tensor]:
    """The label map a person would draw, and the dense features it came from: uint8 [H, W, 3] ->
    (int64 [H, W], each pixel the index of the label its location matches best; fp32 [h, w, E] at
    `resolution` on the short side). `clippy-ray segment` and `clippy_ray.Model.segment` share it."""
    device = next(model.parameters()).device
    batch = prepare(image, resolution, model.image.patch_size[0], crop=False)[None].to(device)
    dense = dense_embeddings(model, batch)[0]  # [h, w, E]
    classifier = text_classifier(model, tokenizer, labels, templates, device)  # [C, E]
    return score_maps(dense, classifier, image.shape[:2]).argmax(0).cpu().numpy(), dense


ROW_NAME = re.compile(r"[\w.+-]+")  # a row name: letters, digits, _ . + - (no "=", "/", ":" or spaces)


def parse_checkpoints(given: list[str]) -> list[tuple[str, str]]:
    """--checkpoint values -> (row name, URI): "max=runs/a/model" names its row; a bare URI (or a
    local path that exists, "=" or not) is named by its position when there are several, and not
    at all when it is the only one."""
    out = []
    for i, item in enumerate(given):
        name, sep, uri = item.partition("=")
        if not sep or os.path.exists(item) or "/" in name or ":" in name:
            name, uri = (f"model {i + 1}" if len(given) > 1 else ""), item
        elif not ROW_NAME.fullmatch(name) or not uri:
            raise InputError(
                f"--checkpoint {item!r}: give NAME=URI with a NAME of letters, digits, _ . + - and a URI, or a bare URI"
            )
        out.append((name, uri))
    if len({n for n, _ in out}) < len(out):
        raise InputError(f"--checkpoint: two rows share a name ({', '.join(n for n, _ in out)}); name each NAME=URI")
    return out


@torch.no_grad()
def _row(
    loaded: tuple,
    name: str,
    image: np.ndarray,
    labels: list[list[str]],
    resolution: int | None,
    components: int,
    templates: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One model's row of the picture: (picture row, label map, groups, feature resolution)."""
    model, cfg, tokenizer = loaded
    res = resolution or 2 * cfg.model.image.img_size
    pred, dense = zero_shot_labels(model, tokenizer, image, labels, read_templates(templates), res)
    groups = upsample_nearest(pca_groups(dense, components), image.shape[:2])
    names = [syn[0] for syn in labels]
    colors = visualize.palette(len(names))
    present = np.bincount(pred.ravel(), minlength=len(names)) / pred.size
    prefix = f"{name}: " if name else ""
    picture = visualize.panel(
        [
            (f"{prefix}image", image),
            (f"{prefix}zero-shot labels", visualize.overlay(image, pred, colors)),
            (
                "legend",
                visualize.legend([f"{n} {100 * p:.0f}%" for n, p in zip(names, present)], colors, image.shape[0]),
            ),
            (f"{prefix}unsupervised ({components} groups)", visualize.colorize(groups, visualize.palette(components))),
        ],
        height=image.shape[0],
    )
    return picture, pred, groups, res


def segment_image(
    checkpoint: str | list[str],
    image_uri: str,
    labels: list[list[str]],
    out: str,
    resolution: int | None = None,
    components: int = 8,
    templates: str = "clip",
    use_gpu: bool | None = None,
) -> dict:
    """Write the picture to `out` (a local path or s3://): one row per checkpoint (a URI, or a list
    of URIs or NAME=URI to compare models on one image). Returns the label map and the groups (the
    first model's), and every model's under `models`."""
    rows = parse_checkpoints([checkpoint] if isinstance(checkpoint, str) else list(checkpoint))
    loaded = [load_model(uri, device_for(use_gpu)) for _, uri in rows]  # every checkpoint checked first
    image = read_image(image_uri)
    pictures, models = [], {}
    for (name, uri), model in zip(rows, loaded):
        picture, pred, groups, res = _row(model, name, image, labels, resolution, components, templates)
        pictures.append(picture)
        models[name or uri] = {"labels": pred, "groups": groups, "resolution": res}
    picture = visualize.stack(pictures) if len(pictures) > 1 else pictures[0]
    storage.write_bytes(out, visualize.png_bytes(picture))
    first = next(iter(models.values()))
    return {**first, "picture_size": picture.shape[1::-1], "models": models}
