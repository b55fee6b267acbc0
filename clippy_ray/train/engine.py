"""DeepSpeed configuration and engine from a TrainConfig (the only DeepSpeed-aware training file
besides the loop and the checkpoint code).

Mixed precision: under bf16 the module computes in bf16 while the optimizer keeps float32 master
weights and state (every ZeRO stage); gradients are accumulated over micro-batches and reduced
across ranks in float32; the logit scale the loss sees is its float32 master (`Fp32LogitScale`).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from clippy_ray.config import TrainConfig
from clippy_ray.train.optim import Lamb, build_optimizer, lr_lambda


def deepspeed_config(cfg: TrainConfig) -> dict:
    bf16 = cfg.precision == "bf16"  # never with zero_stage 0 (TrainConfig.check, agree_precision)
    conf = {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW / our LAMB as client optimizers
        "steps_per_print": 2**31 - 1,  # progress is ours (rank 0), not DeepSpeed's
        "wall_clock_breakdown": False,
    }
    if bf16:
        # float32 gradients: accumulated over micro-batches (ZeRO-1 then runs DeepSpeed's
        # BF16_Optimizer) and reduced across ranks in float32, not bf16
        conf["data_types"] = {"grad_accum_dtype": "fp32"}
        conf["communication_data_type"] = "fp32"
    return conf


def build_engine(model: torch.nn.Module, cfg: TrainConfig, order=None, grouped_gradients: bool = True):
    """deepspeed.initialize on the existing process group (Ray Train made it), the model compiled
    if cfg.compile. `order`: of the parameters in the optimizer's groups (optim.param_groups; a
    resumed run keeps its checkpoint's). `grouped_gradients=False` leaves DeepSpeed's
    BF16_Optimizer as shipped (bench/host_ops.py compares the two)."""
    import deepspeed

    from clippy_ray._compat import skip_deepspeed_shm_op

    skip_deepspeed_shm_op()
    optimizer = build_optimizer(model, cfg, order)
    # A factory, so the schedule drives the optimizer DeepSpeed wraps (and is saved with it).
    schedule = lr_lambda(cfg)
    logit_scale = model.logit_scale.detach().float().clone()  # before DeepSpeed rounds it to bf16
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(cfg),
        dist_init_required=False,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    if isinstance(optimizer, Lamb) and engine.zero_optimization_stage() > 0:
        optimizer.partitioned(lambda: lamb_pieces(engine), count=len(list(model.parameters())))
    _set_fp32(engine.module.logit_scale, logit_scale)
    if grouped_gradients:
        GroupedGradients.install(engine.optimizer)
    engine.module.register_forward_hook(Fp32LogitScale(engine, model.max_logit_scale))
    if cfg.compile:  # in place (state-dict keys unchanged); compiles at the first forward
        engine.compile(backend=cfg.compile_backend)
    return engine


class GroupedGradients:
    """DeepSpeed's BF16_Optimizer (bf16 under ZeRO-1: the paper config) with its per-parameter
    gradient work done one operator per group instead of one Python loop iteration per parameter.

    As shipped, it loops over the parameters in Python: per parameter, at each micro-batch it casts
    the bf16 gradient to float32 and adds it to the float32 gradient, and at the step it takes a
    norm and scales the gradient when clipping: ~2,250 of the ~7,200 operators of a step at the
    paper's depths (bench/host_ops.py), and a GPU's step is bound by the host. Here the bf16
    gradients are added in one `_foreach_add_`, and the norm and the clipping read DeepSpeed's flat
    float32 gradient buffers, whose slices are the per-parameter gradients (and whose padding is
    zeros). The same arithmetic except the order in which the norm sums (tests/test_precision.py).
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        # each parameter's float32 gradient (a 1-D slice of the flat buffer) shaped as the parameter
        self.shaped = [
            [hp.view(lp.shape) for lp, hp in zip(group, hps)]
            for group, hps in zip(optimizer.bf16_groups, optimizer.fp32_groups_gradients)
        ]

    @classmethod
    def install(cls, optimizer) -> GroupedGradients | None:
        """On a BF16_Optimizer that accumulates in float32, without model or expert parallelism
        (whose norms need DeepSpeed's per-parameter selection), expert folding corrections (applied
        per parameter as it accumulates) or immediate_grad_update; None (DeepSpeed's own path)
        otherwise."""
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

        if not isinstance(optimizer, BF16_Optimizer) or optimizer.grad_acc_dtype is not torch.float32:
            return None
        if optimizer.has_moe_layers or optimizer.mpu is not None or optimizer.immediate_grad_update:
            return None
        if getattr(optimizer, "autoep_folding_tp_group", None) is not None:
            return None
        grouped = cls(optimizer)
        optimizer.update_hp_grads = grouped.update_hp_grads
        optimizer.get_grads_for_norm = grouped.get_grads_for_norm
        return grouped

    @torch.no_grad()
    def update_hp_grads(self, clear_lp_grads: bool = False) -> None:
        opt = self.optimizer
        hp, lp = [], []
        for i, group in enumerate(opt.bf16_groups):
            for j, param in enumerate(group):
                if param.grad is not None:
                    hp.append(self.shaped[i][j])
                    lp.append(param.grad)
                    param._hp_grad = opt.fp32_groups_gradients[i][j]  # as DeepSpeed links it
        if hp:
            torch._foreach_add_(hp, lp)
            if clear_lp_grads:
                torch._foreach_zero_(lp)

    @torch.no_grad()
    def get_grads_for_norm(self, for_clipping: bool = False):
        flats = list(self.optimizer.fp32_groups_gradients_flat)
        return flats if for_clipping else (flats, {})


def _get_fp32(param: torch.nn.Parameter) -> torch.Tensor:
    """The float32 master of a parameter (a collective under ZeRO: every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(param)
    if master is None:  # no ZeRO: the (float32) parameter is its own master
        master = param.detach()
    return master.float().reshape(-1).clone()


def master_logit_scale(engine) -> torch.Tensor:
    """The float32 master of the model's logit_scale (what the optimizer steps; the module's copy is
    bf16-rounded under bf16); a collective under ZeRO."""
    return _get_fp32(engine.module.logit_scale)


def _set_fp32(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Write a parameter's float32 master (each rank writes its own part)."""
    import torch.distributed as dist
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

    value = value.to(param.device).float().reshape(-1)
    if hasattr(param, "ds_id"):  # ZeRO-3: this rank's slice of the padded flat parameter
        part = param.ds_tensor.numel()
        padded = torch.zeros(part * dist.get_world_size(), device=value.device)
        padded[: value.numel()] = value
        safe_set_local_fp32_param(param, padded[dist.get_rank() * part :][:part])
    elif hasattr(param, "_hp_mapping"):  # ZeRO-1/2: the fragment in this rank's flat partition
        safe_set_full_fp32_param(param, value)
    else:  # no ZeRO: the (float32) parameter is its own master
        param.data.copy_(value.reshape(param.shape))


class Fp32LogitScale:
    """Forward hook on the model: its third output, exp(logit_scale), gets the value of the float32
    master of logit_scale and the gradient of the model's own scale.

    Under bf16 the module's logit_scale is a bf16 copy of the master (near ln(1 / 0.07) = 2.66 its
    steps are 2^-6, 1.6% of the temperature); without this the loss would see the temperature move
    in those steps while the master moves finely. Once per optimizer step (at the first forward
    after it: a collective under ZeRO, which every data-parallel rank runs) the master is read and
    clamped at ln(max_logit_scale) by value, as CLIP does after its step, so the bound never cuts
    the gradient that can move it back.
    """

    def __init__(self, engine, max_logit_scale: float):
        self.engine = engine
        self.bound = math.log(max_logit_scale)
        self.seen_step: int | None = None
        self.master = torch.zeros(1)

    def refresh(self) -> None:
        """Read the master and write it back clamped, on the device: reading its value to decide
        whether to clamp would make the host wait for the GPU once per step."""
        param = self.engine.module.logit_scale
        master = _get_fp32(param).clamp_(max=self.bound)
        _set_fp32(param, master)  # the same value unless it was above the bound
        self.master = master
        self.seen_step = self.engine.global_steps

    # outside any torch.compile graph: a graph that read engine.global_steps would be guarded on it
    # and recompiled at every step, and refresh() may run a collective
    @torch.compiler.disable
    def __call__(self, module, inputs, output):
        image, text, scale = output
        if self.seen_step != self.engine.global_steps:
            self.refresh()
        value = self.master.to(scale.device).exp()
        # value in the forward; d/d(scale) = value / scale, so the logit gets d loss/d s * exp(master)
        return image, text, value * (scale / scale.detach())


def lamb_pieces(engine) -> dict[int, list[tuple[int, int, int]]]:
    """Where each parameter lies in the flat float32 partitions the optimizer steps under ZeRO:
    {data_ptr of a flat partition: [(parameter index, start, numel), ...]} on this rank."""
    optimizer, stage = engine.optimizer, engine.zero_optimization_stage()
    pieces: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    # the flat partitions of ZeRO-1/2, or of BF16_Optimizer (ZeRO-1 under bf16)
    flats = getattr(optimizer, "single_partition_of_fp32_groups", None)
    flats = flats or getattr(optimizer, "fp32_groups_flat_partition", None)
    for index, param in enumerate(engine.module.parameters()):
        if not param.requires_grad:
            continue
        if stage == 3:
            group, start, part = optimizer.grad_position[optimizer.get_param_id(param)]
            # the partition's tail past the parameter's end is padding, uninitialised memory that
            # must not enter the norms (DeepSpeed allocates ds_tensor with torch.empty)
            numel = max(0, min(part, param.ds_numel - optimizer._get_param_partition_rank(param) * part))
            if numel:
                pieces[optimizer.fp32_partitioned_groups_flat[group].data_ptr()].append((index, start, numel))
            continue
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            if not hasattr(param, "_hp_mapping"):
                raise RuntimeError(
                    f"train.optimizer=lamb: {type(optimizer).__name__} (ZeRO-{stage}) gives no map from "
                    "parameters to its flat partitions, so LAMB's per-parameter trust ratio is unavailable"
                )
            continue  # none of this parameter lies in this rank's partition
        flat = flats[mapping.param_group_index]
        address = mapping.hp_fragment_address
        pieces[flat.data_ptr()].append((index, address.start, address.numel))
    return pieces


def cached_engine_step(engine, forward, batches, loss_fn, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step of `engine` over this rank's micro-batches with the feature cache
    (`feature_cache.cached_step`): the micro-batches' surrogates sum to the step's loss, so
    DeepSpeed's backward runs without its 1/accumulation scaling; its step() steps the optimizer at
    the accumulation boundary only. -> (this rank's loss, the scale), detached."""
    from clippy_ray.train.feature_cache import cached_step

    def backward(surrogate: torch.Tensor) -> None:
        engine.backward(surrogate, scale_wrt_gas=False)
        engine.step()

    return cached_step(forward, backward, batches, loss_fn, device)
