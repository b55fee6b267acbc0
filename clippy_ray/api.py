"""Use a trained CLIPpy from Python: `load` a checkpoint or handoff folder (local or s3://) into a
model with plain-tensor methods, its tokenizer and its image preprocessing. No Ray, no DeepSpeed.

    model, tokenizer, preprocess = clippy_ray.load("s3://bucket/runs/demo/step_00000300")
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from clippy_ray.data.transforms import normalize
from clippy_ray.errors import InputError
from clippy_ray.eval.datasets import read_templates
from clippy_ray.eval.evaluator import device_for, load_model, prepare
from clippy_ray.eval.segment import zero_shot_labels
from clippy_ray.model.clippy import CLIPpy
from clippy_ray.tokenizer import Tokenizer


class Preprocess:
    """PIL image -> ImageNet-normalized fp32 [3, size, size]: the short side resized to the model's
    training size and a center square crop, as zero-shot classification in evaluation does."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = np.asarray(image.convert("RGB"))  # uint8 [H, W, 3]
        return normalize(prepare(pixels, self.size, patch=1, crop=True)[None])[0]  # patch: unused by a crop

    def __repr__(self) -> str:
        return f"Preprocess(size={self.size})"


class Model(CLIPpy):
    """A trained CLIPpy in eval mode, as `load` returns it. Inputs are moved to the model's device
    and dtype; outputs are fp32. Gradients are on unless the caller disables them (torch.no_grad)."""

    tokenizer: Tokenizer  # the tokenizer the model was trained with (`segment` prompts through it)
    image_size: int  # the training image size; `segment` works at twice that by default

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        param = next(self.parameters())
        return images.to(device=param.device, dtype=param.dtype)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized images [N, 3, H, W] (H, W multiples of the patch size) -> L2-normalized [N, E]."""
        return super().encode_image(self._pixels(images)).float()

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized images [N, 3, H, W] -> L2-normalized per-location embeddings [N, H/p, W/p, E]."""
        return super().dense_features(self._pixels(images)).float()

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [N, L] (the tokenizer's `input_ids`; mask: every non-pad token unless given) ->
        L2-normalized [N, E]."""
        device = next(self.parameters()).device
        mask = None if attention_mask is None else torch.as_tensor(attention_mask, device=device)
        return super().encode_text(torch.as_tensor(input_ids, device=device), mask).float()

    def segment(
        self,
        image: Image.Image | np.ndarray,
        labels: Sequence[str | Sequence[str]],
        *,
        templates: str = "clip",
        resolution: int | None = None,
    ) -> np.ndarray:
        """The label map a person would draw: int64 [H, W] at the image's own size, each pixel the
        index in `labels` of the label its location matches best; the computation of `clippy-ray
        segment`. A label may be a list of synonyms (their prompts are averaged). templates: a
        shipped prompt set (clip, simple, benchmark) or a text file; resolution: the short side the
        image is seen at (default twice the training size)."""
        pixels = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else image
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise InputError(f"segment: image must be PIL or uint8 [H, W, 3], not {pixels.dtype} {pixels.shape}")
        names = [[label] if isinstance(label, str) else list(label) for label in labels]
        if isinstance(labels, str) or not names or not all(names):
            raise InputError(f"segment: labels must be non-empty names or lists of synonyms, not {labels!r}")
        res = resolution or 2 * self.image_size
        return zero_shot_labels(self, self.tokenizer, pixels, names, read_templates(templates), res)[0]


def load(uri: str | os.PathLike, device: str | torch.device | None = None) -> tuple[Model, Tokenizer, Preprocess]:
    """A trained model from a training checkpoint (`<run>/step_XXXXXXXX`) or its handoff folder
    (`.../model`), local or s3://: (model in eval mode on `device`, its tokenizer, its image
    preprocessing). device: default CUDA when available, else CPU; a bf16 model runs in fp32 on CPUs
    without native bf16. Of a checkpoint only the handoff is downloaded, not the optimizer state."""
    device = torch.device(device) if device is not None else device_for(None)
    clippy, cfg, tokenizer = load_model(str(uri), device)
    # The handoff builds a CLIPpy; Model only adds methods (no parameters or buffers), so the
    # loaded instance takes the class instead of being rebuilt (torch.nn.utils.parametrize does
    # the same).
    clippy.__class__ = Model
    clippy.tokenizer = tokenizer
    clippy.image_size = cfg.model.image.img_size
    return clippy.eval(), tokenizer, Preprocess(cfg.model.image.img_size)
