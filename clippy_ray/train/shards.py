"""The optimizer side of a training checkpoint in a form that does not depend on the number of
workers (DeepSpeed ZeRO 0-3, bf16 or fp32).

Every rank writes, as safetensors, the pieces of the float32 master weights and of the optimizer
state (Adam's moments) that its ZeRO partition holds, each keyed by the parameter's name and the
piece's offset inside the flattened parameter (`state/rankNNNNN.safetensors`); rank 0 writes
`state/index.json`: which file holds which pieces, the step counters, the learning-rate schedule
and the optimizer's hyperparameters. A run resumed on any number of workers builds its engine,
then each rank fills its own partition from the saved pieces that overlap it, reading only the
files that hold them (on the same number of workers: its own) and nothing that is unpickled.

DeepSpeed's own checkpoints refuse another data-parallel size, and its universal checkpoints are
converted offline and read with torch.load(weights_only=False); this format needs neither.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

import torch
import torch.distributed as dist

from clippy_ray import storage
from clippy_ray.errors import InputError

STATE_DIR = "state"
INDEX = f"{STATE_DIR}/index.json"
FORMAT = 1

# (parameter name, offset of the piece in the flattened parameter, offset in the flat tensor, numel)
Entry = tuple[str, int, int, int]


def _optimizer_kind(engine) -> str:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if isinstance(opt, BF16_Optimizer):
        return "bf16"
    if isinstance(opt, DeepSpeedZeroOptimizer):
        return "zero12"
    if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        return "zero3"
    if isinstance(opt, torch.optim.Optimizer):
        return "none"
    raise RuntimeError(f"{type(opt).__name__}: an optimizer wrapper clippy-ray does not checkpoint")


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that steps the float32 tensors (DeepSpeed's wrappers hold it)."""
    opt = engine.optimizer
    return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer


def slots(engine, saving: bool) -> list[tuple[int, torch.Tensor, list[Entry]]]:
    """[(optimizer group, the float32 tensor the inner optimizer steps, its pieces)] on this rank,
    with no collective. The pieces exclude ZeRO's padding. Without ZeRO the parameters are their own
    masters, the same on every rank: rank 0 saves them all, every rank loads them all."""
    opt, kind = engine.optimizer, _optimizer_kind(engine)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    out = []
    if kind in ("bf16", "zero12"):
        if kind == "bf16":
            flats, groups = opt.fp32_groups_flat_partition, opt.bf16_groups
        else:
            flats, groups = opt.single_partition_of_fp32_groups, opt.bit16_groups
        for g, (flat, params) in enumerate(zip(flats, groups)):
            entries = []
            for p in params:
                m = p._hp_mapping  # None: no piece of p in this rank's partition
                if m is not None:
                    address = m.lp_fragment_address
                    entries.append((names[id(p)], address.start, m.hp_fragment_address.start, address.numel))
            out.append((g, flat, entries))
    elif kind == "zero3":
        for sub, params in enumerate(opt.fp16_groups):
            entries = []
            for p in params:
                _, offset, part = opt.grad_position[opt.get_param_id(p)]
                start = opt._get_param_partition_rank(p) * part  # ds_tensor = padded[rank * part:][:part]
                valid = max(0, min(part, p.ds_numel - start))  # the rest is padding
                if valid:
                    entries.append((names[id(p)], start, offset, valid))
            out.append((opt.sub_group_to_group_id[sub], opt.fp32_partitioned_groups_flat[sub], entries))
    elif not saving or dist.get_rank() == 0:
        for g, group in enumerate(opt.param_groups):
            out.extend((g, p, [(names[id(p)], 0, 0, p.numel())]) for p in group["params"])
    return out


def _file(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def save(engine, folder: str) -> None:
    """Write this rank's pieces under `folder/state/` (a local folder that becomes the checkpoint);
    rank 0 also writes the index. Collective: every rank calls it."""
    from safetensors.torch import save_file

    rank = dist.get_rank()
    state = inner_optimizer(engine).state
    tensors: dict[str, torch.Tensor] = {}
    pieces: list[tuple[str, int, int]] = []
    steps: dict[int, float] = {}
    keys: set[str] = set()
    for g, flat, entries in slots(engine, saving=True):
        data = flat.detach().view(-1)
        saved = state.get(flat, {})
        per_element = {
            k: v.view(-1) for k, v in saved.items() if torch.is_tensor(v) and v.dim() and v.numel() == data.numel()
        }
        keys |= set(per_element)
        if "step" in saved:
            steps[g] = float(saved["step"])
        for name, start, offset, numel in entries:
            pieces.append((name, start, numel))
            tensors[f"fp32/{name}@{start}"] = data[offset : offset + numel].float().clone()
            for k, v in per_element.items():
                tensors[f"{k}/{name}@{start}"] = v[offset : offset + numel].float().clone()
    os.makedirs(os.path.join(folder, STATE_DIR), exist_ok=True)
    if tensors:
        save_file(tensors, os.path.join(folder, STATE_DIR, _file(rank)))
    mine = {"file": _file(rank) if tensors else None, "pieces": pieces, "steps": steps, "keys": sorted(keys)}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if rank != 0:
        return
    inner = inner_optimizer(engine)
    group_steps: dict[int, float] = {}
    for part in every:
        for g, s in part["steps"].items():
            group_steps[int(g)] = max(group_steps.get(int(g), 0.0), s)
    index = {
        "format": FORMAT,
        "world_size": dist.get_world_size(),
        "zero_stage": engine.zero_optimization_stage(),
        "optimizer": type(inner).__name__,
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "skipped_steps": engine.skipped_steps,
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "param_groups": [{k: v for k, v in group.items() if k != "params"} for group in inner.param_groups],
        "group_steps": group_steps,
        "state_keys": sorted(set().union(*(part["keys"] for part in every))),
        "numel": {n: int(getattr(p, "ds_numel", p.numel())) for n, p in engine.module.named_parameters()},
        "files": {part["file"]: part["pieces"] for part in every if part["file"]},
    }
    with open(os.path.join(folder, INDEX), "w") as f:
        json.dump(index, f)


def check_model(uri: str, index: dict, sizes: dict[str, int]) -> None:
    """The checkpoint's optimizer state belongs to a model with exactly these parameters and sizes
    ({name: numel}); a one-line error saying what differs and what to do otherwise (every rank
    decides the same, before any collective)."""
    saved = index["numel"]
    missing, extra = sorted(set(sizes) - set(saved)), sorted(set(saved) - set(sizes))
    resized = sorted(n for n in set(sizes) & set(saved) if sizes[n] != saved[n])
    if missing or extra or resized:
        what = "; ".join(
            part
            for part in (
                f"not in the checkpoint: {missing[:3]}" if missing else "",
                f"not in this model: {extra[:3]}" if extra else "",
                f"other sizes: {[(n, saved[n], sizes[n]) for n in resized[:3]]} (saved, here)" if resized else "",
            )
            if part
        )
        raise InputError(
            f"{uri}: its optimizer state is for another model ({what}); resume with the model config it was "
            f"trained with (its config.yaml), or start a new run from its weights: --from {uri} --from-mode weights "
            "train.run_name=NEW_NAME"
        )


def read_index(uri: str) -> dict:
    """The index of the checkpoint at `uri` (a one-line error naming it when it cannot be read)."""
    try:
        index = json.loads(storage.read_bytes(storage.join(uri, INDEX)))
    except ValueError as err:
        raise InputError(f"{uri}/{INDEX}: not valid JSON ({err}); the checkpoint is damaged") from None
    if index.get("format") != FORMAT:
        raise InputError(f"{uri}/{INDEX}: format {index.get('format')!r}; this clippy-ray reads format {FORMAT}")
    bad = [f for f in index.get("files", {}) if not re.fullmatch(r"rank\d{5}\.safetensors", f)]
    if bad:
        raise InputError(f"{uri}/{INDEX}: names {bad[0]!r}, not a rank's file; the checkpoint is damaged")
    return index


class _Pieces:
    """The saved pieces of one checkpoint, read file by file as a rank first needs one."""

    def __init__(self, uri: str, index: dict):
        self.uri = uri
        self.where: dict[str, list[tuple[int, int, str]]] = defaultdict(list)  # name -> (start, numel, file)
        for file, pieces in index["files"].items():
            for name, start, numel in pieces:
                self.where[name].append((start, numel, file))
        self.files: dict[str, dict[str, torch.Tensor]] = {}
        self.bytes_read = 0

    def _tensors(self, file: str) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load

        if file not in self.files:
            uri = storage.join(self.uri, STATE_DIR, file)
            data = storage.read_bytes(uri)
            self.bytes_read += len(data)
            try:
                self.files[file] = load(data)
            except SafetensorError as err:
                raise InputError(f"{uri}: not a readable safetensors file ({err}); the checkpoint is damaged") from None
        return self.files[file]

    def fill(self, out: torch.Tensor, kind: str, name: str, start: int, numel: int) -> None:
        """out[:numel] = the saved elements [start, start + numel) of `kind` (fp32, exp_avg, ...) of
        parameter `name`."""
        covered = 0
        for first, count, file in self.where.get(name, []):
            lo, hi = max(first, start), min(first + count, start + numel)
            if lo < hi:
                saved = self._tensors(file).get(f"{kind}/{name}@{first}")
                if saved is None or saved.numel() != count:
                    raise InputError(
                        f"{storage.join(self.uri, STATE_DIR, file)}: no {count} values of {kind}/{name}@{first} "
                        "as its index says; the checkpoint is damaged"
                    )
                out[lo - start : hi - start] = saved[lo - first : hi - first]
                covered += hi - lo
        if covered != numel:
            raise InputError(
                f"{self.uri}: {kind} of {name} [{start}, {start + numel}) is not all in the checkpoint "
                f"({covered} of {numel} values); it belongs to another model or is incomplete"
            )


@torch.no_grad()
def load(engine, uri: str, index: dict | None = None) -> int:
    """Fill this rank's masters and optimizer state from the checkpoint at `uri` (any number of
    workers wrote it), restore the optimizer's steps and hyperparameters, the schedule and the
    engine's counters, and make the module's weights the new masters. Returns the bytes this rank
    read. Collective: every rank calls it, after deepspeed.initialize."""
    index = index or read_index(uri)
    check_model(uri, index, {n: int(getattr(p, "ds_numel", p.numel())) for n, p in engine.module.named_parameters()})
    opt, kind = engine.optimizer, _optimizer_kind(engine)
    inner = inner_optimizer(engine)
    if len(index["param_groups"]) != len(inner.param_groups):
        raise InputError(f"{uri}: {len(index['param_groups'])} optimizer groups saved, {len(inner.param_groups)} here")
    if kind == "zero3":
        opt._partition_all_parameters()  # as engine.load_checkpoint does before it loads
    saved = _Pieces(uri, index)
    steps = {int(g): s for g, s in index["group_steps"].items()}
    states: dict[int, dict] = {}  # id(flat tensor) -> its optimizer state
    for g, flat, entries in slots(engine, saving=False):
        data = flat.data.view(-1)
        master = data.clone() if kind == "none" else torch.zeros_like(data)  # ZeRO padding: zeros
        moments = {k: torch.zeros_like(data, dtype=torch.float32) for k in index["state_keys"]}
        for name, start, offset, numel in entries:
            saved.fill(master[offset : offset + numel], "fp32", name, start, numel)
            for k, buffer in moments.items():
                saved.fill(buffer[offset : offset + numel], k, name, start, numel)
        data.copy_(master)
        if g in steps:  # saved after a step; before one the state is created lazily
            states[id(flat)] = {k: b.view_as(flat) for k, b in moments.items()}
            states[id(flat)]["step"] = torch.tensor(steps[g], dtype=torch.float32)
    # the state and hyperparameters through torch's own load_state_dict, which puts each in the
    # dtype and on the device the optimizer keeps it (fused AdamW: a float32 step on the device)
    if kind == "zero3":
        opt._set_fp32_optimizer_param_groups()  # between steps ZeRO-3 leaves the groups empty
    state, groups, i = {}, [], 0
    for group, hyper in zip(inner.param_groups, index["param_groups"]):
        ids = []
        for p in group["params"]:
            if id(p) in states:
                state[i] = states[id(p)]
            ids.append(i)
            i += 1
        hyper = {k: tuple(v) if isinstance(v, list) else v for k, v in hyper.items()}
        groups.append({**{k: v for k, v in group.items() if k != "params"}, **hyper, "params": ids})
    inner.load_state_dict({"state": state, "param_groups": groups})
    if kind == "zero3":
        opt._clear_fp32_optimizer_param_groups()
    if engine.lr_scheduler is not None and index["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(index["lr_scheduler"])
    engine.global_steps = index["global_steps"]
    engine.global_samples = index["global_samples"]
    engine.skipped_steps = index["skipped_steps"]
    # the module's (bf16 or working) weights from the new masters
    if kind in ("bf16", "zero12"):
        opt.update_lp_params()  # partition -> low-precision partition, all-gathered (collective)
        opt._hp_optimizer_states_linked = False  # relink the per-parameter views to the new state
        opt._lazy_init_hp_params_optimizer_state()
    elif kind == "zero3":
        for sub in range(len(opt.fp16_groups)):
            opt._reassign_or_swap_out_partitioned_parameters(sub)  # masters -> the ds_tensor partitions
        opt.checkpoint_event_epilogue()  # re-gathers the persistent parameters (collective)
    return saved.bytes_read
