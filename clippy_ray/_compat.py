"""CPU-only workarounds, applied only when the problem is present; no-ops on a CUDA install.

Nothing else belongs here: every function names the upstream issue it works around.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

_torchvision_done = False


def patch_torchvision_ops() -> bool:
    """Let `import torchvision` succeed on a CPU torch paired with a CUDA torchvision wheel.

    pytorch/vision#9085: torchvision 0.28.0 ships only a CUDA build of its C extension. On CPU
    torch the extension fails to load and `import torchvision` dies with "operator
    torchvision::nms does not exist" while registering fake kernels. timm and transformers import
    torchvision, so we declare the two schemas it looks up before the first import. The C++ ops
    (nms, roi_align, ...) stay unavailable; CLIPpy uses none of them. Returns True if it patched.
    """
    global _torchvision_done
    if _torchvision_done:
        return False
    _torchvision_done = True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    import torch

    if hasattr(torch.ops.torchvision, "nms"):  # extension already loaded: nothing to do
        return False
    ext = os.path.join(os.path.dirname(spec.origin), "_C.so")
    try:
        torch.ops.load_library(ext)
        return False  # a matching build (CUDA torch + CUDA torchvision): leave it alone
    except (OSError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    # Keep the library object alive for the life of the process.
    globals()["_torchvision_lib"] = lib
    return True


def skip_deepspeed_shm_op() -> bool:
    """Skip DeepSpeed's shared-memory comm op on the CPU accelerator.

    deepspeed/comm/torch.py builds a C++ shm all-reduce op with ninja at every CPU process-group
    start (~30 s on a fresh machine; see microsoft/DeepSpeed#5539 for its CPU-only build). gloo
    does the same work; returning None from the builder is DeepSpeed's own "op unavailable" path.
    No-op unless DeepSpeed's accelerator is the CPU. Returns True if it patched.
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return False
    module = importlib.import_module("deepspeed.comm.torch")  # `import a.b.c as m` gives torch
    module.build_shm_op = lambda: None
    return True
