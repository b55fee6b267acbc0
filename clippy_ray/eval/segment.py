"""`clippy-ray segment`: one image, free-form labels -> a picture of the image, the zero-shot
label map with a legend, and the unsupervised grouping, side by side. Runs in-process (no Ray)."""

from __future__ import annotations

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


@torch.no_grad()
def segment_image(
    checkpoint: str,
    image_uri: str,
    labels: list[list[str]],
    out: str,
    resolution: int | None = None,
    components: int = 8,
    templates: str = "clip",
    use_gpu: bool | None = None,
) -> dict:
    """Write the picture to `out` (a local path or s3://); returns the label map and the groups."""
    model, cfg, tokenizer = load_model(checkpoint, device_for(use_gpu))
    image = read_image(image_uri)
    res = resolution or 2 * cfg.model.image.img_size
    pred, dense = zero_shot_labels(model, tokenizer, image, labels, read_templates(templates), res)
    groups = upsample_nearest(pca_groups(dense, components), image.shape[:2])
    names = [syn[0] for syn in labels]
    colors = visualize.palette(len(names))
    present = np.bincount(pred.ravel(), minlength=len(names)) / pred.size
    picture = visualize.panel(
        [
            ("image", image),
            ("zero-shot labels", visualize.overlay(image, pred, colors)),
            (
                "legend",
                visualize.legend([f"{n} {100 * p:.0f}%" for n, p in zip(names, present)], colors, image.shape[0]),
            ),
            (f"unsupervised ({components} groups)", visualize.colorize(groups, visualize.palette(components))),
        ],
        height=image.shape[0],
    )
    storage.write_bytes(out, visualize.png_bytes(picture))
    return {"labels": pred, "groups": groups, "picture_size": picture.shape[1::-1], "resolution": res}
