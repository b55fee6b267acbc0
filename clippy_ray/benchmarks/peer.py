"""clippy-ray beside OpenCLIP (open-clip-torch, pinned in the `bench` extra), in one run:

- loss: the fused loss against OpenCLIP's own `ClipLoss(local_loss=True, gather_with_grad=True)`
  on the same features, bf16 and fp32, one process and one simulated rank of several (the gathered
  columns handed to both, as the all-gather would): time and peak memory of forward + backward, and
  each loss's distance from the exact (float64) value.
- step: one training step of the same model shape (a timm ViT and an HF T5 encoder; OpenCLIP's
  `CustomTextCLIP` with `timm_model_name` / `hf_model_name`, trained by `open_clip_train`'s own
  `train_one_epoch`) against clippy-ray's (DeepSpeed engine, the training loop's step): images/s and
  peak memory on the same batch, without and with activation checkpointing, and with feature caching
  (OpenCLIP's `accum_freq`, clippy-ray's `loss.negatives: global`) against the same global batch
  without it.
- fits: the largest contrastive batch (negatives per loss) one step of each fits in a memory budget:
  plain, with activation checkpointing, with feature caching (half the micro-batch the plain step
  fits, accumulated).

Interleaved repetitions after a warm-up; medians with the spread. Goals: the fused loss <= 1.0x
OpenCLIP's time at <= 0.35x its memory; negatives with caching >= 8x without; a cached step <= 1.4x
the same global batch without caching; clippy-ray's step >= 1.0x OpenCLIP's images/s at <= 0.8x its
memory. Runs unchanged on a GPU (bf16 there: OpenCLIP under autocast, clippy-ray under DeepSpeed).

    python bench/peer.py [--sections loss step fits] [--reps 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from clippy_ray import config
from clippy_ray._compat import patch_torchvision_ops
from clippy_ray.benchmarks import common
from clippy_ray.benchmarks.common import PeakMemory, spread, synchronize
from clippy_ray.benchmarks.loss_memory import measure, rank_inputs
from clippy_ray.loss import ContrastiveLoss, blockwise_loss
from clippy_ray.precision import TORCH_DTYPES

VIT = "clippy_peer_vit"  # the ViT both stacks build by name from timm's registry


def _open_clip():
    patch_torchvision_ops()  # open_clip imports torchvision (a CUDA wheel on a CPU torch; see _compat)
    try:
        import open_clip
        import open_clip.loss
        import open_clip_train.train  # noqa: F401 (the step's train_one_epoch)
    except ImportError as e:
        raise SystemExit(f"bench/peer.py needs open-clip-torch: pip install -e '.[bench]' ({e})") from None
    return open_clip


# ---------------------------------------------------------------- the loss, same features


def openclip_loss(world: int, all_image: torch.Tensor, all_text: torch.Tensor):
    """OpenCLIP's ClipLoss(local_loss=True, gather_with_grad=True) as rank 0 of `world`: its own
    code, with its all-gather (open_clip.loss.gather_features) handing over the gathered columns."""
    oc = _open_clip()
    loss = oc.loss.ClipLoss(local_loss=True, gather_with_grad=True, rank=0, world_size=world)

    def forward(image, text, columns_image, columns_text, scale):
        if world == 1:
            return loss(image, text, scale.reshape(()))
        real = oc.loss.gather_features
        oc.loss.gather_features = lambda *a, **k: (columns_image, columns_text)
        try:
            return loss(image, text, scale.reshape(()))
        finally:
            oc.loss.gather_features = real

    return forward


def exact_loss(image, text, all_image, all_text, scale) -> float:
    """The loss in float64 over the full logits (what both approximate)."""
    i, t, ai, at = (x.double() for x in (image, text, all_image, all_text))
    labels = torch.arange(len(i))
    s = float(scale)
    return 0.5 * (F.cross_entropy(s * i @ at.T, labels) + F.cross_entropy(s * t @ ai.T, labels)).item()


def loss_section(args, device) -> dict:
    out = {}
    for ranks in args.ranks:
        for name in args.dtypes:
            dtype = TORCH_DTYPES[name]
            image, text, all_image, all_text = rank_inputs(args.batch, ranks, args.dim, device)
            if ranks == 1:
                all_image, all_text = image, text
            inputs = [x.to(dtype) for x in (image, text)]  # features as a bf16 / fp32 model hands them over
            inputs += inputs if ranks == 1 else [x.to(dtype) for x in (all_image, all_text)]
            scale = torch.tensor([1 / 0.07], device=device)
            candidates = {
                "openclip": openclip_loss(ranks, inputs[2], inputs[3]),
                "clippy_ray": lambda i, t, ai, at, s, d=dtype: blockwise_loss(i, t, ai, at, s, 0, d),
            }
            exact = exact_loss(*inputs, scale)
            for fn in candidates.values():
                measure(fn, inputs, scale)  # warm-up
            runs = {k: [] for k in candidates}
            for _ in range(args.reps):
                for k, fn in candidates.items():
                    runs[k].append(measure(fn, inputs, scale))
            case = {
                k: {m: spread([r[m] for r in rs]) for m in ("seconds", "peak_bytes", "loss")} for k, rs in runs.items()
            }
            for k in candidates:
                case[k]["error_vs_exact"] = abs(case[k]["loss"]["median"] - exact)
            case["exact"] = exact
            case["ratio"] = {
                m: spread([a[m] / b[m] for a, b in zip(runs["clippy_ray"], runs["openclip"])])
                for m in ("seconds", "peak_bytes")
                if runs["openclip"][0][m]
            }
            out[f"{name}_ranks{ranks}"] = case
            local = args.batch // ranks
            print(
                f"loss, {name} features, {'one process' if ranks == 1 else f'one rank of {ranks}'} "
                f"({local} x {args.batch} x {args.dim}): time {common.describe(case['ratio']['seconds']['values'])}x "
                f"OpenCLIP's (goal <= 1.0), peak memory "
                f"{common.describe(case['ratio']['peak_bytes']['values'], '{:.3f}')}x (goal <= 0.35); "
                f"OpenCLIP {case['openclip']['seconds']['median']:.2f} s, "
                f"{case['openclip']['peak_bytes']['median'] / 2**20:.0f} MiB, loss off by "
                f"{case['openclip']['error_vs_exact']:.1e}; "
                f"clippy-ray {case['clippy_ray']['seconds']['median']:.2f} s, "
                f"{case['clippy_ray']['peak_bytes']['median'] / 2**20:.0f} MiB, off by "
                f"{case['clippy_ray']['error_vs_exact']:.1e}"
            )
    return out


# ---------------------------------------------------------------- the same model, two training stacks


def register_vit(args) -> None:
    """The bench's ViT in timm's registry, so that OpenCLIP's TimmModel (which passes no image
    size to timm) and clippy-ray's ImageTower build the same network by name."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if VIT in timm.list_models(VIT):
        return

    @register_model
    def clippy_peer_vit(pretrained=False, **kwargs):  # noqa: ARG001 (timm's signature)
        shape = dict(
            img_size=args.image_size, patch_size=args.patch, embed_dim=args.width, depth=args.depth,
            num_heads=max(1, args.width // 64),
        )  # fmt: skip
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's loading options
            kwargs.pop(key, None)
        model = VisionTransformer(**{**shape, **kwargs})
        model.pretrained_cfg = model.default_cfg = {}  # no weights to download; OpenCLIP reads it
        return model


def text_config(args) -> dict:
    return {
        "num_layers": args.text_depth, "d_model": args.text_width, "d_kv": 64,
        "num_heads": max(1, args.text_width // 64), "d_ff": 4 * args.text_width, "dropout_rate": 0.0,
    }  # fmt: skip


def clippy_config(args, micro: int, accum: int, checkpointing: bool, precision: str) -> config.Config:
    return config.load(
        None,
        [
            f"model.image.name={VIT}",
            f"model.image.img_size={args.image_size}",
            f"model.text.hf_config={text_config(args)}".replace("'", ""),
            f"model.text.max_length={args.text_length}",
            f"model.embed_dim={args.embed}",
            "model.aggregation=avg",
            f"model.image.grad_checkpointing={str(checkpointing).lower()}",
            f"model.text.grad_checkpointing={str(checkpointing).lower()}",
            "train.num_workers=1",
            f"train.global_batch_size={micro * accum}",
            f"train.grad_accum_steps={accum}",
            f"train.precision={precision}",
            "train.zero_stage=1",
            "train.warmup_steps=0",
        ],
    )


def make_batches(args, n: int, size: int, device) -> list[tuple]:
    """n pairs in micro-batches of `size`: noise images, captions of the configured length."""
    from clippy_ray.tokenizer import build_tokenizer

    tok = build_tokenizer(clippy_config(args, 1, 1, False, "fp32").model.text)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, args.image_size, args.image_size, generator=g)
    enc = tok([f"photo number {i} of a shape on a textured background" for i in range(n)])
    ids, mask = torch.from_numpy(enc["input_ids"]), torch.from_numpy(enc["attention_mask"])
    return [tuple(x[k : k + size].to(device) for x in (images, ids, mask)) for k in range(0, n, size)]


class ClippyStack:
    """clippy-ray's step: the DeepSpeed engine and the training loop's forward, loss and backward
    (the feature cache when accumulating)."""

    name = "clippy_ray"

    def __init__(self, args, micro: int, accum: int, checkpointing: bool, device):
        from clippy_ray.model import build_model
        from clippy_ray.tokenizer import build_tokenizer
        from clippy_ray.train.engine import build_engine

        cfg = clippy_config(args, micro, accum, checkpointing, args.precision)
        torch.manual_seed(0)
        model = build_model(cfg.model, build_tokenizer(cfg.model.text).vocab_size)
        self.engine = build_engine(model, cfg.train)
        self.dtype = TORCH_DTYPES[args.precision]
        self.loss = ContrastiveLoss(self.dtype)
        self.device = device

    def step(self, batches: list[tuple]) -> None:
        from clippy_ray.train.engine import cached_engine_step

        def forward(b):
            return self.engine(b[0].to(self.dtype), b[1], b[2])

        if len(batches) > 1:
            cached_engine_step(self.engine, forward, batches, self.loss, self.device)
        else:
            loss = self.loss(*forward(batches[0]))
            self.engine.backward(loss)
            self.engine.step()

    def parameters(self):
        return self.engine.module.parameters()

    def close(self) -> None:
        self.engine.destroy()


class OpenClipStack:
    """OpenCLIP's step: CustomTextCLIP (timm + HF towers), ClipLoss, AdamW, and open_clip_train's
    own train_one_epoch over the step's micro-batches (accum_freq: its feature cache)."""

    name = "openclip"

    def __init__(self, args, micro: int, accum: int, checkpointing: bool, device):
        oc = _open_clip()
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP
        from transformers import MT5Config

        folder = os.path.join(args.work, "t5")
        if not os.path.exists(folder):  # HFTextEncoder reads its architecture from a folder or the Hub
            # OpenCLIP knows T5 encoders as mt5; with T5's relu feed-forward it is T5's network
            MT5Config(
                vocab_size=384, pad_token_id=0, eos_token_id=1, feed_forward_proj="relu", **text_config(args)
            ).save_pretrained(folder)
        vision = CLIPVisionCfg(timm_model_name=VIT, timm_model_pretrained=False, timm_pool="avg", timm_proj="linear",
                               image_size=args.image_size)  # fmt: skip
        text = CLIPTextCfg(hf_model_name=folder, hf_model_pretrained=False, hf_proj_type="linear",
                           hf_pooler_type="mean_pooler", context_length=args.text_length, vocab_size=384)  # fmt: skip
        torch.manual_seed(0)
        self.model = CustomTextCLIP(args.embed, vision, text, output_dict=True).to(device)
        if checkpointing:
            self.model.set_grad_checkpointing(True)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.1)
        self.loss = oc.loss.ClipLoss(local_loss=True, gather_with_grad=True)
        self.args = SimpleNamespace(
            device=str(device), precision="amp_bf16" if args.precision == "bf16" else "fp32", accum_freq=accum,
            distill=False, skip_scheduler=True, grad_clip_norm=1.0, horovod=False, log_every_n_steps=2**31,
            world_size=1, batch_size=micro, rank=0, local_rank=0, wandb=False,
        )  # fmt: skip

    def step(self, batches: list[tuple]) -> None:
        from open_clip_train.train import train_one_epoch

        pairs = [(images, ids) for images, ids, _ in batches]  # OpenCLIP's text tower masks pad ids itself
        data = {"train": SimpleNamespace(set_epoch=lambda epoch: None, dataloader=_Loader(pairs))}
        train_one_epoch(self.model, data, self.loss, 0, self.optimizer, None, None, None, self.args)

    def parameters(self):
        return self.model.parameters()

    def close(self) -> None:
        pass


class _Loader:
    def __init__(self, pairs):
        self.pairs = pairs
        self.num_batches = len(pairs)
        self.num_samples = sum(len(p[0]) for p in pairs)

    def __iter__(self):
        return iter(self.pairs)


STACKS = {"openclip": OpenClipStack, "clippy_ray": ClippyStack}


def _timed_step(stack, batches, device) -> dict:
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        stack.step(batches)
        synchronize(device)
        seconds = time.perf_counter() - start
    pairs = sum(len(b[0]) for b in batches)
    return {"seconds": seconds, "images_per_s": pairs / seconds, "peak_bytes": memory.peak}


def step_section(args, device) -> dict:
    """Each stack on the same global batch: plain, with checkpointing, and cached (accumulated
    micro-batches) against the same global batch in one micro-batch."""
    cases = {
        "plain": (args.step_batch, 1, False),
        "checkpointing": (args.step_batch, 1, True),
        "cached": (args.step_batch // args.accum, args.accum, False),
    }
    out = {}
    for case, (micro, accum, ckpt) in cases.items():
        stacks = {name: cls(args, micro, accum, ckpt, device) for name, cls in STACKS.items()}
        if case == "plain":  # the same shape: the same parameters, give or take a bias or a norm
            sizes = {name: sum(p.numel() for p in stack.parameters()) for name, stack in stacks.items()}
            out["parameters"] = sizes
            print("step, parameters: " + ", ".join(f"{n} {v / 1e6:.2f} M" for n, v in sizes.items()))
        batches = make_batches(args, micro * accum, micro, device)
        for stack in stacks.values():
            _timed_step(stack, batches, device)  # warm-up (and the optimizer's state)
        runs = {name: [] for name in stacks}
        for _ in range(args.reps):
            for name, stack in stacks.items():
                runs[name].append(_timed_step(stack, batches, device))
        for stack in stacks.values():
            stack.close()
        result = {n: {m: spread([r[m] for r in rs]) for m in ("images_per_s", "peak_bytes")} for n, rs in runs.items()}
        result["ratio"] = {
            m: spread([a[m] / b[m] for a, b in zip(runs["clippy_ray"], runs["openclip"])])
            for m in ("images_per_s", "peak_bytes")
        }
        out[case] = result
        print(
            f"step, {case} ({micro} x {accum} pairs): clippy-ray / OpenCLIP images/s "
            f"{common.describe(result['ratio']['images_per_s']['values'])}x (goal >= 1.0), peak memory "
            f"{common.describe(result['ratio']['peak_bytes']['values'])}x (goal <= 0.8); images/s "
            f"{result['clippy_ray']['images_per_s']['median']:.1f} vs "
            f"{result['openclip']['images_per_s']['median']:.1f}"
        )
    for name in STACKS:
        cost = [
            p["images_per_s"] / c["images_per_s"]
            for p, c in zip(_values(out, "plain", name), _values(out, "cached", name))
        ]
        out.setdefault("cache_cost", {})[name] = spread(cost)
        print(
            f"step, {name}: the cached step ({args.step_batch // args.accum} x {args.accum}) takes "
            f"{common.describe(cost)}x the time of the same {args.step_batch} pairs in one micro-batch"
            + (" (goal <= 1.4)" if name == "clippy_ray" else "")
        )
    return out


def _values(out, case, name) -> list[dict]:
    return [{"images_per_s": v} for v in out[case][name]["images_per_s"]["values"]]


def _peak_of_step(cls, args, micro, accum, ckpt, device) -> int:
    stack = cls(args, micro, accum, ckpt, device)
    try:
        warm = make_batches(args, 2 * accum, 2, device)  # the optimizer's state, outside the measurement
        _timed_step(stack, warm, device)
        return _timed_step(stack, make_batches(args, micro * accum, micro, device), device)["peak_bytes"]
    finally:
        stack.close()


def fits_section(args, device) -> dict:
    """The largest power-of-two contrastive batch whose step stays within --budget-mib: plain and
    with checkpointing (the micro-batch is the batch), then cached (half the plain step's
    micro-batch, accumulated up to --fits-cap)."""
    budget = args.budget_mib * 2**20
    out = {}
    for name, cls in STACKS.items():
        found = {}
        for variant, ckpt in (("plain", False), ("checkpointing", True)):
            size, best = args.fits_start, 0
            while size <= args.fits_cap and _peak_of_step(cls, args, size, 1, ckpt, device) <= budget:
                best, size = size, size * 2
            found[variant] = best
        # half the micro-batch the plain step fits: headroom for the step's embeddings and the loss
        micro, accum, best = found["plain"] // 2, 2, found["plain"]
        while (
            micro and micro * accum <= args.fits_cap and _peak_of_step(cls, args, micro, accum, False, device) <= budget
        ):
            best, accum = micro * accum, accum * 2
        found["cached"] = best
        found["capped"] = best * 2 > args.fits_cap
        out[name] = found
        print(
            f"fits in {args.budget_mib} MiB, {name}: {found['plain']} pairs plain, {found['checkpointing']} with "
            f"activation checkpointing, {found['cached']}{' (the cap)' if found['capped'] else ''} with feature "
            "caching "
            + (f"({found['cached'] / found['plain']:.0f}x plain" if found["plain"] else "(nothing fits plain")
            + (", goal >= 8x)" if name == "clippy_ray" else ")")
        )
    return out


def _process_group() -> None:
    """DeepSpeed wants a process group: one gloo rank."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=["loss", "step", "fits"], choices=("loss", "step", "fits"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # the loss
    parser.add_argument("--batch", type=int, default=16384, help="loss: the global batch (gathered columns)")
    parser.add_argument("--dim", type=int, default=768, help="loss: embedding width")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 8], help="loss: 1 process, one rank of R")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=("bf16", "fp32"),
        help="loss: feature dtypes (default: fp32 on a CPU, both on a GPU)",
    )
    # the model both stacks train
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--width", type=int, default=192, help="ViT width (heads: width / 64)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--text-width", type=int, default=192)
    parser.add_argument("--text-depth", type=int, default=4)
    parser.add_argument("--text-length", type=int, default=48, help="tokens per caption (byte tokenizer)")
    parser.add_argument("--embed", type=int, default=256)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: bf16 on a GPU")
    # the step
    parser.add_argument("--step-batch", type=int, default=128, help="step: the global batch")
    parser.add_argument("--accum", type=int, default=4, help="step: micro-batches of the cached step")
    # what fits
    parser.add_argument("--budget-mib", type=int, default=256, help="fits: the memory budget")
    parser.add_argument("--fits-start", type=int, default=8)
    parser.add_argument("--fits-cap", type=int, default=4096)
    common.add_json_argument(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    # bf16 matmuls are emulated on CPUs without AVX512-BF16 / AMX (~30x slower): fp32 there
    args.dtypes = args.dtypes or (["bf16", "fp32"] if device.type == "cuda" else ["fp32"])
    _open_clip()
    results = {}
    with tempfile.TemporaryDirectory(prefix="clippy-ray-peer-") as work:
        args.work = work
        if "loss" in args.sections:
            results["loss"] = loss_section(args, device)
        if {"step", "fits"} & set(args.sections):
            from clippy_ray._compat import skip_deepspeed_shm_op

            skip_deepspeed_shm_op()
            register_vit(args)
            _process_group()
        if "step" in args.sections:
            results["step"] = step_section(args, device)
        if "fits" in args.sections:
            results["fits"] = fits_section(args, device)
        del args.work
    shown = {k: v for k, v in vars(args).items() if v is not None and k != "json"}
    print("reproduce: python bench/peer.py " + " ".join(f"--{k.replace('_', '-')} {_arg(v)}" for k, v in shown.items()))
    common.write_json(args.json, "peer", args, results)


def _arg(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)
