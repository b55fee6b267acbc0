"""What model.layers saves: one worker's training step with the towers' layers as the model builds
them (the patch embedding as a matmul; on a CPU the dropout mask drawn as 16-bit integers, T5's
eager attention and its RMS norm as one autograd function) against the same step with torch's
nn.Conv2d and nn.Dropout, T5LayerNorm and the encoder's SDPA attention, interleaved over
repetitions, on the same model, batch and device; and each layer alone, forward and backward, at
the step's shapes.

    python bench/layers.py --config configs/vitb16_t5base.yaml --batch 128 --steps 2 \\
        'model.image.timm_kwargs={depth: 2}' \\
        'model.text.hf_config={num_layers: 2, num_heads: 12, d_model: 768, d_kv: 64, d_ff: 3072, vocab_size: 32128}'
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from clippy_ray import precision
from clippy_ray.benchmarks import common, throughput
from clippy_ray.benchmarks.common import synchronize
from clippy_ray.benchmarks.throughput import Setup
from clippy_ray.model import build_model
from clippy_ray.model.layers import Dropout, PatchConv2d, T5LayerNorm, T5RMSNorm, eager_attention
from clippy_ray.model.text import T5_ENCODERS
from clippy_ray.tokenizer import build_tokenizer


class _Attention(nn.Module):
    """A T5 attention function on fixed masks and position bias; input q, k, v stacked [3, N, H, L, Dh]."""

    def __init__(self, fn, mask: torch.Tensor, bias: torch.Tensor, p: float):
        super().__init__()
        self.fn, self.mask, self.bias, self.dropout, self.is_causal = fn, mask, bias, p, False

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv.unbind(0)
        return self.fn(self, q, k, v, self.mask, scaling=1.0, dropout=self.dropout, position_bias=self.bias)[0]


def _attention_pair(setup: Setup, heads: int, head_dim: int, p: float):
    """T5's SDPA attention (transformers') and model.layers.eager_attention, a quarter of each row padded."""
    n, length = setup.batch, setup.cfg.model.text.max_length
    dtype = precision.TORCH_DTYPES[setup.precision.precision]
    attend = torch.ones(n, 1, length, length, dtype=torch.bool, device=setup.device)
    attend[..., length - length // 4 :] = False
    additive = torch.zeros(attend.shape, dtype=dtype, device=setup.device).masked_fill(~attend, torch.finfo(dtype).min)
    bias = torch.randn(1, heads, length, length, dtype=dtype, device=setup.device)
    pair = (_Attention(sdpa_attention_forward, attend, bias, p), _Attention(eager_attention, additive, bias, p))
    return (*pair, (3, n, heads, length, head_dim), True)


def _pairs(setup: Setup) -> dict[str, tuple[nn.Module, nn.Module, torch.Size, bool]]:
    """name -> (torch layer, replacement, input shape, whether the input needs a gradient)."""
    cfg, device = setup.cfg, setup.device
    model = build_model(cfg.model, build_tokenizer(cfg.model.text).vocab_size)
    conv = model.image.vit.patch_embed.proj
    torch_conv = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride)
    size = cfg.model.image.img_size
    pairs = {"patch embedding": (torch_conv, PatchConv2d.from_conv(torch_conv), (setup.batch, 3, size, size), False)}
    text = model.text.encoder.config
    p = getattr(text, "dropout_rate", None) or getattr(text, "hidden_dropout_prob", 0.0)
    if p:
        length = cfg.model.text.max_length
        for name, width in (("dropout, model width", text.d_model), ("dropout, feed-forward", text.d_ff)):
            pairs[name] = (nn.Dropout(p), Dropout(p), (setup.batch, length, width), True)
    if text.model_type in T5_ENCODERS:
        pairs["T5 attention"] = _attention_pair(setup, text.num_heads, text.d_kv, p)
    if text.model_type == "t5":
        norm = T5LayerNorm(text.d_model, text.layer_norm_epsilon)
        swapped = T5RMSNorm(text.d_model, text.layer_norm_epsilon)
        swapped.weight = norm.weight
        pairs["T5 RMS norm"] = (norm, swapped, (setup.batch, cfg.model.text.max_length, text.d_model), True)
    dtype = precision.TORCH_DTYPES[setup.precision.precision]
    return {
        name: (a.to(device, dtype).train(), b.to(device, dtype).train(), torch.Size(shape), grad)
        for name, (a, b, shape, grad) in pairs.items()
    }


def _timed(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, calls: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        layer(x).backward(grad)
    synchronize(device)
    return (time.perf_counter() - start) / calls


def layer_seconds(setup: Setup, reps: int, calls: int = 3) -> dict[str, dict]:
    """Seconds per forward + backward of each layer pair, interleaved over `reps` repetitions of
    `calls` calls; the replacement's time over torch's per repetition."""
    dtype = precision.TORCH_DTYPES[setup.precision.precision]
    out = {}
    for name, (torch_layer, swapped, shape, needs_grad) in _pairs(setup).items():
        x = torch.randn(shape, device=setup.device, dtype=dtype, requires_grad=needs_grad)
        grad = torch.randn_like(torch_layer(x))
        layers = {"torch": torch_layer, "swapped": swapped}

        for layer in layers.values():
            _timed(layer, x, grad, calls, setup.device)  # warm-up
        seconds: dict[str, list[float]] = {k: [] for k in layers}
        for rep in range(reps):
            for k in list(layers) if rep % 2 == 0 else list(reversed(layers)):
                seconds[k].append(_timed(layers[k], x, grad, calls, setup.device))
        ratios = [s / t for s, t in zip(seconds["swapped"], seconds["torch"])]
        out[name] = {"shape": list(shape), "seconds": seconds, "ratios": ratios}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    throughput.add_step_arguments(parser)
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per repetition")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=6, help="repetitions; the order alternates")
    common.add_json_argument(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    setup = throughput.prepare(args.config, args.overrides, args.batch, device, args.compile)
    layers = layer_seconds(setup, args.reps)
    steps = {"torch": throughput.build_step(setup, swapped_layers=False), "swapped": throughput.build_step(setup)}
    for step in steps.values():
        step.train_steps(args.warmup)
    seconds = throughput.interleaved_seconds(steps, args.reps, args.steps)
    ratios = [s / t for s, t in zip(seconds["swapped"], seconds["torch"])]
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": setup.precision.precision,
        "batch_per_worker": args.batch,
        "layers": {
            name: {
                "shape": v["shape"],
                "seconds": {k: common.spread(s) for k, s in v["seconds"].items()},
                "swapped_over_torch": common.spread(v["ratios"]),
            }
            for name, v in layers.items()
        },
        "seconds_per_step": {name: common.spread(v) for name, v in seconds.items()},
        "swapped_over_torch": common.spread(ratios),
    }
    print(
        f"{' '.join([args.config, *args.overrides])}: 1 worker on {out['device']}, {out['precision']}, "
        f"batch {args.batch}; {args.reps} interleaved reps, median (min-max)"
    )
    for name, v in layers.items():
        times = {k: common.describe([s * 1e3 for s in t], "{:.1f}") for k, t in v["seconds"].items()}
        print(
            f"  {name:26s} {str(v['shape']):18s} torch {times['torch']} ms, swapped {times['swapped']} ms, "
            f"ratio {common.describe(v['ratios'], '{:.3f}')}"
        )
    for name in steps:
        print(f"  training step, {name:8s} {common.describe([s * 1e3 for s in seconds[name]], '{:.0f}')} ms")
    print(f"  swapped / torch step time: {common.describe(ratios, '{:.3f}')}")
    common.write_json(args.json, "layers", args, out)
