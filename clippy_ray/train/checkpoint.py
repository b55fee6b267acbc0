"""The tensors of a training checkpoint: the optimizer side that resume reads lives in
`<checkpoint>/state/` (safetensors pieces of every rank's partition, `clippy_ray.train.shards`,
readable on any number of workers); the handoff model beside it (`<checkpoint>/model/`) is
written with `clippy_ray.model.handoff`.

Checkpoints of older versions hold DeepSpeed's own shards in `<checkpoint>/ds/` instead: pickles,
which resume on the number of workers that wrote them. They are read without running code:
`torch.load(weights_only=True)` with exactly the DeepSpeed classes its own checkpoints hold
(`DEEPSPEED_GLOBALS`), through DeepSpeed's checkpoint engine (`load_shards`), and checked on the
driver before a run starts (`check_init`).
"""

from __future__ import annotations

import contextlib
import importlib
import os

import torch

from clippy_ray import safeload, storage
from clippy_ray.errors import InputError
from clippy_ray.model.handoff import find_handoff
from clippy_ray.train.shards import INDEX

DEEPSPEED_TAG = "ds"
# The non-tensor objects in the shards ZeRO 0-3 write in fp32 and bf16 (AdamW and LAMB), found
# with torch.serialization.get_unsafe_globals_in_checkpoint: the optimizer shards' loss scaler,
# ZeRO stage and parameter fragment addresses. Nothing else is ever built from a shard.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
_FIX = (
    "resume only from checkpoints this run wrote; to start from someone else's checkpoint use "
    "--from-mode weights, which reads model/model.safetensors only"
)


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (None elsewhere). Collective under ZeRO-3: every rank
    must call it."""
    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    module = engine.module
    gathered = (
        deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
        if engine.zero_optimization_stage() == 3
        else contextlib.nullcontext()
    )
    with gathered:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None


def _deepspeed_classes() -> list[type]:
    out = []
    for name in DEEPSPEED_GLOBALS:
        module, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), attr))
    return out


def load_shards(engine, folder: str, source: str) -> dict | None:
    """Restore weights, optimizer and schedule from the shards in `folder/ds/` (local); returns the
    client state saved with them (None when there are none). `source` (the checkpoint's URI) names
    a shard that holds pickled code or is unreadable, in a one-line error; nothing in it runs."""
    allowed = _deepspeed_classes()
    reader = engine.checkpoint_engine

    def safe_load(path: str, map_location=None):
        name = os.path.relpath(path, folder)
        return safeload.torch_load(path, storage.join(source, name), _FIX, allowed, map_location)

    # Every shard DeepSpeed reads here goes through its checkpoint engine's `load` (model states,
    # ZeRO optimizer partitions). Optimizer states are always loaded: DeepSpeed's module-only ZeRO-3
    # path and universal checkpoints call torch.load(weights_only=False) themselves.
    reader.load = safe_load  # shadows TorchCheckpointEngine.load for this engine only
    try:
        _, client = engine.load_checkpoint(
            folder, tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    finally:
        del reader.load
    return client


def legacy_shards(uri: str) -> list[str]:
    """The DeepSpeed shard files (`ds/*.pt`) of a checkpoint written in the older format."""
    shards = storage.join(uri, DEEPSPEED_TAG)
    return [f for f in storage.list_files(shards) if f.endswith(".pt")] if storage.exists(shards) else []


def download_legacy(uri: str, folder: str) -> int:
    """Copy an older checkpoint's DeepSpeed shards (`ds/`, every rank's) into `folder/ds/`; returns
    the bytes copied."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(storage.join(uri, DEEPSPEED_TAG))
    target = os.path.join(folder, DEEPSPEED_TAG)
    try:
        pafs.copy_files(path, target, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except OSError as err:
        raise storage.describe(storage.join(uri, DEEPSPEED_TAG), err) from None
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(target) for f in files)


def check_init(uri: str, mode: str) -> None:
    """Driver side, before any Ray work: `--from URI` can seed a run in `mode`. weights: a handoff
    with a safetensors file (no optimizer state is read); full: the optimizer state's index, or
    (older checkpoints) DeepSpeed shards that name nothing beyond DEEPSPEED_GLOBALS (their pickle
    records are read, not their tensors)."""
    storage.require(uri, "--from")
    if mode == "weights":
        find_handoff(uri, "--from")
        return
    if storage.exists(storage.join(uri, INDEX)):
        return  # safetensors and JSON only: nothing in it can run code
    files = legacy_shards(uri)
    if not any(f.endswith("model_states.pt") for f in files):
        raise InputError(
            f"--from={uri}: no optimizer state ({INDEX}, or DeepSpeed shards in {DEEPSPEED_TAG}/); --from-mode full "
            "needs a training checkpoint (<run>/step_XXXXXXXX); for a handoff folder use --from-mode weights"
        )
    for f in files:
        safeload.check_torch_file(f, _FIX, DEEPSPEED_GLOBALS)
