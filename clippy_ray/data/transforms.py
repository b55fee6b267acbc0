"""Decode and augment images (Pillow + numpy), and normalize on the device. No Ray here.

Images travel as uint8 [N, 3, S, S] (4x less than float32 through the object store) and are
normalized with the ImageNet statistics where the model runs (`normalize`).
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RATIO = (3 / 4, 4 / 3)


def open_rgb(data: bytes, min_side: int | None = None) -> Image.Image:
    """Decode to RGB. With `min_side`, JPEGs are decoded at a reduced size (DCT scaling via `draft`)
    when the target is much smaller than the source, but never below `min_side` on the short side."""
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG" and min_side:
        w, h = img.size
        scale = min_side / min(w, h)
        img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
    return img.convert("RGB")


def random_resized_crop_box(w: int, h: int, rng: np.random.Generator, min_scale: float) -> tuple[float, ...]:
    """(left, top, right, bottom) of a crop covering [min_scale, 1] of the area at aspect ratio
    in [3/4, 4/3], as torchvision's RandomResizedCrop; a center crop if no draw fits."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        ratio = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        cw, ch = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if cw <= w and ch <= h:
            x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            return x0, y0, x0 + cw, y0 + ch
    return center_square_box(w, h)


def center_square_box(w: int, h: int) -> tuple[float, ...]:
    side = min(w, h)
    x0, y0 = (w - side) / 2, (h - side) / 2
    return x0, y0, x0 + side, y0 + side


def load_image(data: bytes, size: int, train: bool, rng: np.random.Generator, min_scale: float = 0.5) -> np.ndarray:
    """Encoded bytes -> uint8 [3, size, size]. Train: random resized crop + horizontal flip.
    Eval: resize the short side to `size` and center crop."""
    min_side = math.ceil(size / math.sqrt(min_scale)) if train else size
    img = open_rgb(data, min_side)
    w, h = img.size
    box = random_resized_crop_box(w, h, rng, min_scale) if train else center_square_box(w, h)
    out = np.asarray(img.resize((size, size), Image.BILINEAR, box=box))
    if train and rng.uniform() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> ImageNet-normalized `dtype` (run on the device that trains)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    return ((images.float() / 255.0 - mean) / std).to(dtype)
