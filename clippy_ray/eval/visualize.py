"""Pictures of segmentations (Pillow only): coloured label maps over the image, legends, and
side-by-side panels."""

from __future__ import annotations

import colorsys
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clippy_ray.eval.metrics import IGNORE

TITLE_H = 16


def palette(n: int, background_first: bool = False) -> np.ndarray:
    """n distinct colours [n, 3] uint8 (golden-ratio hues); id 0 dark grey when it is background."""
    colors = []
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.75, 0.95 if i % 2 else 0.75)
        colors.append((int(r * 255), int(g * 255), int(b * 255)))
    out = np.array(colors, np.uint8).reshape(n, 3)
    if background_first and n:
        out[0] = (40, 40, 40)
    return out


def colorize(labels: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """[H, W] ids -> [H, W, 3]; the ignore label white, ids beyond the palette wrap around."""
    out = colors[np.where(labels == IGNORE, 0, labels) % len(colors)]
    out[labels == IGNORE] = 255
    return out


def overlay(image: np.ndarray, labels: np.ndarray, colors: np.ndarray, alpha: float = 0.8) -> np.ndarray:
    """The label colours over the image (`alpha` = weight of the colours), resized to the image."""
    if labels.shape != image.shape[:2]:
        labels = np.asarray(Image.fromarray(labels.astype(np.int32)).resize(image.shape[1::-1], Image.NEAREST))
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * colorize(labels, colors).astype(np.float32)
    return mixed.clip(0, 255).astype(np.uint8)


def legend(names: list[str], colors: np.ndarray, height: int, width: int = 140) -> np.ndarray:
    """A column of colour swatches with names, `height` pixels tall."""
    img = Image.new("RGB", (width, max(height, 14 * len(names) + 4)), (255, 255, 255))
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    for i, name in enumerate(names):
        y = 4 + 14 * i
        draw.rectangle([4, y, 14, y + 10], fill=tuple(int(c) for c in colors[i]))
        draw.text((18, y - 1), name[:22], fill=(0, 0, 0), font=font)
    return np.asarray(img)


def _titled(title: str, image: np.ndarray, height: int) -> Image.Image:
    img = Image.fromarray(image)
    if img.height != height:
        img = img.resize((max(1, round(img.width * height / img.height)), height), Image.NEAREST)
    canvas = Image.new("RGB", (img.width, height + TITLE_H), (255, 255, 255))
    canvas.paste(img, (0, TITLE_H))
    ImageDraw.Draw(canvas).text((2, 2), title, fill=(0, 0, 0), font=ImageFont.load_default())
    return canvas


def panel(items: list[tuple[str, np.ndarray]], height: int | None = None, gap: int = 4) -> np.ndarray:
    """Titled pictures side by side at one height."""
    height = height or max(a.shape[0] for _, a in items)
    tiles = [_titled(t, a, height) for t, a in items]
    canvas = Image.new(
        "RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), max(t.height for t in tiles)), (255, 255, 255)
    )
    x = 0
    for t in tiles:
        canvas.paste(t, (x, 0))
        x += t.width + gap
    return np.asarray(canvas)


def stack(rows: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """Rows on top of one another, left-aligned."""
    width = max(r.shape[1] for r in rows)
    canvas = Image.new("RGB", (width, sum(r.shape[0] for r in rows) + gap * (len(rows) - 1)), (255, 255, 255))
    y = 0
    for r in rows:
        canvas.paste(Image.fromarray(r), (0, y))
        y += r.shape[0] + gap
    return np.asarray(canvas)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
