"""clippy-ray: distributed training of CLIPpy (perceptual grouping in contrastive vision-language models).

Use a trained model from Python:

    import clippy_ray
    model, tokenizer, preprocess = clippy_ray.load("runs/demo/checkpoints/demo/step_00000300")

`load`, `Model`, `Preprocess` and `Tokenizer` are the public names; they load their modules on
first use, so `import clippy_ray` stays cheap for the command line and Ray workers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from clippy_ray._lazy import lazy_attributes

__version__ = "0.1.0"

_HOMES = {"load": "api", "Model": "api", "Preprocess": "api", "Tokenizer": "tokenizer"}

if TYPE_CHECKING:
    from clippy_ray.api import Model, Preprocess, load
    from clippy_ray.tokenizer import Tokenizer

__getattr__ = lazy_attributes(__name__, _HOMES)


def __dir__() -> list[str]:  # tab completion in notebooks offers the public names
    return sorted([*__all__, "__version__"])


__all__ = ["Model", "Preprocess", "Tokenizer", "load"]
