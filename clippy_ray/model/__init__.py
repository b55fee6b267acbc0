"""CLIPpy model: plain torch + timm + transformers. Imports neither ray nor deepspeed."""

from clippy_ray._compat import patch_torchvision_ops

patch_torchvision_ops()  # before timm / transformers import torchvision

from clippy_ray.model.clippy import CLIPpy, build_model  # noqa: E402
from clippy_ray.model.image import ImageTower  # noqa: E402
from clippy_ray.model.text import TextTower  # noqa: E402

__all__ = ["CLIPpy", "ImageTower", "TextTower", "build_model"]
