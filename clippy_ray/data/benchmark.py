"""The offline grouping benchmark: procedural scenes with captions and exact masks.

Scenes hold 1-3 objects from 8 shape classes in 6 colours over one of 4 background texture
families. Every object is rendered as one boolean mask that paints the image, the semantic mask
(class per pixel, 0 = background) and the instance mask alike, so they agree pixel for pixel.
Each row is generated from its own seed (seed, split, index): shards and workers never change
the bytes. Splits: `train`, `val`, and a Waterbirds-style trio: `train-spurious` (each class on
its own background family with probability p), `test-matched` and `test-swapped`.
"""

from __future__ import annotations

import io
import math
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("background", "circle", "square", "triangle", "star", "cross", "ring", "heart", "arrow")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
    "ring": "rings",
    "heart": "hearts",
    "arrow": "arrows",
}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 130, 30),
}
BACKGROUNDS = ("stripes", "checks", "noise", "gradient")
BACKGROUND_WORDS = {"stripes": "striped", "checks": "checkered", "noise": "noisy", "gradient": "gradient"}
SPLITS = ("train", "val", "train-spurious", "test-matched", "test-swapped")
COUNT_WORDS = {2: "two", 3: "three"}
MIN_VISIBLE = 0.6  # an object keeps at least this share of its pixels, or the scene is redrawn


def spurious_background(cls: int) -> str:
    """The background family each class co-occurs with in the spurious split."""
    return BACKGROUNDS[(cls - 1) % len(BACKGROUNDS)]


@dataclass(frozen=True)
class BenchmarkSpec:
    seed: int = 0
    image_size: int = 224
    image_format: str = "png"  # png keeps colours exact; jpeg is smaller
    spurious_p: float = 0.95
    max_objects: int = 3
    # caption richness: how often a caption names the objects' colours, and whether it may name the
    # background's texture. Colours and textures tell most captions in a batch apart on their own,
    # so the fewer of them, the more a model must recognise the shapes to match its captions.
    color_p: float = 0.6
    background_words: bool = True


# ------------------------------------------------------------------------------- shapes


def _shape(cls: str) -> list[np.ndarray]:
    """Unit-radius outline(s) of a class: the first polygon is filled, the others are holes."""
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    circle = np.stack([np.cos(t), np.sin(t)], 1)
    if cls == "circle":
        return [circle]
    if cls == "ring":
        return [circle, circle * 0.55]
    if cls == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.8]
    if cls == "triangle":
        a = np.deg2rad([90, 210, 330])
        return [np.stack([np.cos(a), -np.sin(a)], 1)]
    if cls == "star":
        a = np.deg2rad(90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return [np.stack([r * np.cos(a), -r * np.sin(a)], 1)]
    if cls == "cross":
        w = 0.33
        return [
            np.array(
                [
                    [-w, -1],
                    [w, -1],
                    [w, -w],
                    [1, -w],
                    [1, w],
                    [w, w],
                    [w, 1],
                    [-w, 1],
                    [-w, w],
                    [-1, w],
                    [-1, -w],
                    [-w, -w],
                ]
            )
        ]
    if cls == "heart":
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [np.stack([x, y + 2], 1) / 17]
    if cls == "arrow":
        return [np.array([[-1, -0.3], [0.2, -0.3], [0.2, -0.75], [1, 0], [0.2, 0.75], [0.2, 0.3], [-1, 0.3]])]
    raise ValueError(f"unknown class {cls!r}")


def object_mask(cls: str, size: int, center: tuple[float, float], radius: float, angle: float) -> np.ndarray:
    """Boolean [size, size] mask of one object."""
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for i, poly in enumerate(_shape(cls)):
        points = poly @ rot.T * radius + np.asarray(center)
        draw.polygon([tuple(p) for p in points], fill=0 if i else 255)
    return np.asarray(canvas) > 0


# ------------------------------------------------------------------------------- backgrounds


def _muted(rng: np.random.Generator) -> np.ndarray:
    return 0.5 * rng.uniform(0, 255, 3) + 0.5 * 128


def background(family: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [size, size, 3] procedural texture of one family."""
    a, b = _muted(rng), _muted(rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    if family == "stripes":
        period = rng.uniform(8, 28) * size / 224
        w = ((u / period) % 1.0 < 0.5).astype(np.float32)
    elif family == "checks":
        cell = rng.uniform(10, 32) * size / 224
        w = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)
    elif family == "noise":
        coarse = rng.uniform(0, 1, (8, 8)).astype(np.float32)
        w = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR))
        w = np.clip(w + rng.normal(0, 0.15, (size, size)), 0, 1)
    elif family == "gradient":
        w = (u - u.min()) / max(float(u.max() - u.min()), 1.0)
    else:
        raise ValueError(f"unknown background family {family!r}")
    img = a[None, None] * (1 - w[..., None]) + b[None, None] * w[..., None]
    return img.clip(0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------- scenes


@dataclass
class Scene:
    image: np.ndarray  # uint8 [S, S, 3]
    background_image: np.ndarray  # the texture before objects were drawn
    semantic: np.ndarray  # uint8 [S, S], class id, 0 = background
    instance: np.ndarray  # uint8 [S, S], 1..K per object, 0 = background
    classes: list[int]  # class id of each instance
    colors: list[str]
    background: str
    caption: str


def _row_rng(spec: BenchmarkSpec, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, zlib.crc32(split.encode()), index])


def _pick_layout(rng: np.random.Generator, split: str, spec: BenchmarkSpec) -> tuple[list[int], str]:
    n_classes = len(CLASSES) - 1
    if split in ("train", "val"):
        count = int(rng.integers(1, spec.max_objects + 1))
        return [int(c) for c in rng.integers(1, n_classes + 1, count)], str(rng.choice(BACKGROUNDS))
    cls = int(rng.integers(1, n_classes + 1))  # one object, Waterbirds style
    home = spurious_background(cls)
    others = [b for b in BACKGROUNDS if b != home]
    if split == "test-matched" or (split == "train-spurious" and rng.uniform() < spec.spurious_p):
        return [cls], home
    return [cls], str(rng.choice(others))


def _objects_phrase(classes: list[int], colors: list[str], rng: np.random.Generator, color_p: float = 0.6) -> str:
    groups: dict[tuple[int, str | None], int] = {}
    with_color = rng.uniform() < color_p
    for cls, color in zip(classes, colors):
        key = (cls, color if with_color else None)
        groups[key] = groups.get(key, 0) + 1
    parts = []
    for (cls, color), count in groups.items():
        name = CLASSES[cls] if count == 1 else PLURALS[CLASSES[cls]]
        adjective = f"{color} " if color else ""
        article = ("an " if (adjective or name)[0] in "aeiou" else "a ") if count == 1 else f"{COUNT_WORDS[count]} "
        parts.append(f"{article}{adjective}{name}")
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


CAPTION_TEMPLATES = (
    "{o}",
    "a photo of {o}",
    "an image with {o}",
    "{o} on a {b} background",
    "a picture of {o} over a {b} pattern",
    "there is {o} here",
    "{o}, {b} backdrop",
)


def caption_for(
    classes: list[int],
    colors: list[str],
    family: str,
    rng: np.random.Generator,
    color_p: float = 0.6,
    background_words: bool = True,
) -> str:
    objects = _objects_phrase(classes, colors, rng, color_p)
    templates = [t for t in CAPTION_TEMPLATES if background_words or "{b}" not in t]
    return templates[int(rng.integers(len(templates)))].format(o=objects, b=BACKGROUND_WORDS[family])


def make_scene(spec: BenchmarkSpec, split: str, index: int) -> Scene:
    """Row `index` of `split`: deterministic from (spec.seed, split, index)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    rng = _row_rng(spec, split, index)
    size = spec.image_size
    classes, family = _pick_layout(rng, split, spec)
    bg = background(family, size, rng)
    for _ in range(100):
        masks, visible_ok = [], True
        for cls in classes:
            radius = rng.uniform(0.13, 0.28) * size
            center = rng.uniform(radius * 0.8, size - radius * 0.8, 2)
            masks.append(object_mask(CLASSES[cls], size, tuple(center), radius, rng.uniform(0, 2 * np.pi)))
        instance = np.zeros((size, size), np.uint8)
        for k, m in enumerate(masks, start=1):
            instance[m] = k  # later objects occlude earlier ones
        for k, m in enumerate(masks, start=1):
            if (instance == k).sum() < MIN_VISIBLE * max(m.sum(), 1) or m.sum() < 0.002 * size * size:
                visible_ok = False
        if visible_ok:
            break
    colors = [str(c) for c in rng.choice(list(COLORS), len(classes))]
    image = bg.copy()
    semantic = np.zeros((size, size), np.uint8)
    for k, (cls, color) in enumerate(zip(classes, colors), start=1):
        where = instance == k
        image[where] = COLORS[color]
        semantic[where] = cls
    caption = caption_for(classes, colors, family, rng, spec.color_p, spec.background_words)
    return Scene(image, bg, semantic, instance, classes, colors, family, caption)


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_image(array: np.ndarray, fmt: str) -> bytes:
    if fmt == "png":
        return encode_png(array)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def make_rows(spec: BenchmarkSpec, split: str, start: int, stop: int) -> dict[str, list]:
    """Rows [start, stop) of a split as parquet-ready columns."""
    cols: dict[str, list] = {
        k: [] for k in ("key", "image", "caption", "mask", "instance_mask", "labels", "background", "split")
    }
    for index in range(start, stop):
        scene = make_scene(spec, split, index)
        cols["key"].append(f"{split}-{index:08d}")
        cols["image"].append(encode_image(scene.image, spec.image_format))
        cols["caption"].append(scene.caption)
        cols["mask"].append(encode_png(scene.semantic))
        cols["instance_mask"].append(encode_png(scene.instance))
        cols["labels"].append(sorted(set(scene.classes)))
        cols["background"].append(scene.background)
        cols["split"].append(split)
    return cols
