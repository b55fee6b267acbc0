"""Drop-in replacements for layers the towers use, same parameters and math, cheaper to train
(bench/layers.py measures each against the layer it replaces):

- `PatchConv2d`: a ViT's patch embedding (a convolution whose stride is its kernel) as one matmul
  over the non-overlapping patches, on every device. On a CPU the bf16 convolution's weight
  gradient is several times slower than the same FLOPs as a matmul.
- `Dropout`: on a CPU, the keep mask drawn as 16-bit integers, four per 64-bit draw of torch's
  generator, instead of torch's bernoulli_ (the largest single operator of a T5 step there), and
  mask and scale applied in one pass. Elsewhere, and in eval mode, it is nn.Dropout.
- `T5RMSNorm`: T5's RMS norm; on a CPU its forward and backward as one autograd function of a few
  whole-tensor passes instead of autograd over T5's float32 chain of casts.

`swap_layers(module)` puts them in place of every matching layer; state dicts are unchanged.
`restore_layers(module)` undoes it (the benchmark's baseline). `eager_attention` is T5's attention
with that dropout (text.py switches T5 to it on a CPU), and `DeviceKernels` lets a tower pick its
kernels for its device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.t5.modeling_t5 import T5LayerNorm

_LEVELS = 1 << 16  # the keep mask's resolution: the drop rate is rounded to a multiple of 1/65536


class PatchConv2d(nn.Conv2d):
    """nn.Conv2d with stride == kernel, no padding, dilation or groups, computed as patchify + matmul."""

    @classmethod
    def applies_to(cls, conv: nn.Module) -> bool:
        return (
            type(conv) is nn.Conv2d
            and conv.stride == conv.kernel_size
            and conv.padding == (0, 0)
            and conv.dilation == (1, 1)
            and conv.groups == 1
        )

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> PatchConv2d:
        """The same layer, sharing `conv`'s parameters (so loading and optimizing them is unchanged)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, device="meta")
        new.weight, new.bias = conv.weight, conv.bias
        new.train(conv.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        if x.dim() != 4 or x.shape[-2] % kh or x.shape[-1] % kw:  # unbatched, or a remainder the convolution drops
            return super().forward(x)
        n, c, h, w = x.shape
        patches = x.reshape(n, c, h // kh, kh, w // kw, kw).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(n, h // kh, w // kw, c * kh * kw)  # [N, H', W', C*kh*kw]
        out = F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)  # [N, H', W', D]
        return out.permute(0, 3, 1, 2)  # NCHW as a convolution returns, a view: NHWC consumers copy nothing


def uniform_int16(n: int) -> torch.Tensor:
    """n integers uniform over the 65536 int16 values, from torch's default CPU generator: four per
    64-bit draw. torch's full 64-bit range kernel (`random_(-2**63, None)`) takes the generator's
    64 bits as they are; a narrower range pays a 64-bit modulo per element, 3-5x slower. Under
    torch.compile, which cannot trace `random_`, two per `randint` int32 draw."""
    if torch.compiler.is_compiling():
        draws = torch.randint(-(1 << 31), 1 << 31, ((n + 1) // 2,), dtype=torch.int32)
    else:
        draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)
    return draws.view(torch.int16)[:n]


class _CPUDropout(torch.autograd.Function):
    """Inverted dropout on the CPU: 0 with probability p rounded to a multiple of 1/65536, else
    x / (1 - that rounded p), computed in float32 (float64 for float64 x) and rounded once to x's
    dtype (as CUDA's native_dropout does; torch's CPU path multiplies by the scale already rounded
    to x's dtype). The mask is made in x's dtype in one pass (1 kept, 0 dropped) and saved for the
    backward, which applies it and the scale in one pass as the forward does (and is itself
    differentiable, for double backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        dropped = round(p * _LEVELS)
        keep = torch.empty(x.shape, dtype=x.dtype)
        torch.ge(uniform_int16(x.numel()).view(x.shape), dropped - _LEVELS // 2, out=keep)
        ctx.scale = _LEVELS / (_LEVELS - dropped)
        ctx.save_for_backward(keep)
        return torch.addcmul(torch.zeros((), dtype=x.dtype), x, keep, value=ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.addcmul(torch.zeros((), dtype=grad.dtype), grad, keep, value=ctx.scale), None


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout, through `_CPUDropout` for floating-point tensors on the CPU in training at 0 < p < 1."""
    dropped = round(p * _LEVELS)
    if not training or x.device.type != "cpu" or not x.is_floating_point() or not 0 < dropped < _LEVELS:
        return F.dropout(x, p, training)
    return _CPUDropout.apply(x, p)


class Dropout(nn.Dropout):
    """nn.Dropout, through `_CPUDropout` on the CPU in training; the same layer everywhere else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return super().forward(x)
        return fast_dropout(x, self.p, self.training)


class _RMSNorm(torch.autograd.Function):
    """T5LayerNorm's math: weight * cast(x * rsqrt(mean(x^2) + eps)), the cast to the weight's
    dtype when that is half or bf16, the statistics in float32; the input's gradient computed in
    float32 and returned in the input's dtype (the weight's in the output's dtype, as autograd
    computes it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(torch.float32)  # one cast, reused: mixed-dtype operators would each cast again
        rstd = torch.linalg.vector_norm(x32, dim=-1, keepdim=True)  # [..., 1]
        rstd = rstd.square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        normed = x32.mul_(rstd) if x32 is not x else x * rstd  # float32
        if weight.dtype in (torch.float16, torch.bfloat16):
            normed = normed.to(weight.dtype)
        ctx.save_for_backward(x, normed, weight, rstd)
        return weight * normed

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, normed, weight, rstd = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed).reshape(-1, normed.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            x32 = x.to(torch.float32)
            g = grad.to(torch.float32)
            g = g.mul_(weight) if g is not grad else g * weight  # d loss / d normalized x, float32
            # d/dx of x * rstd(x): rstd * g - x * rstd^3 * mean(g * x)
            coef = torch.linalg.vecdot(g, x32).unsqueeze_(-1).mul_(rstd.pow(3)).div_(-x.shape[-1])
            grad_x = torch.addcmul(g.mul_(rstd), x32, coef).to(x.dtype)
        return grad_x, grad_weight, None


class T5RMSNorm(T5LayerNorm):
    """T5LayerNorm (same weight), through `_RMSNorm` on a CPU (float64 aside: T5 narrows its statistics)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.device.type != "cpu" or hidden_states.dtype == torch.float64:
            return super().forward(hidden_states)
        return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention for T5 (an AttentionInterface function; `attention_mask` is
    its eager float mask), with `fast_dropout`. q, k, v [N, H, L, Dh] -> ([N, L, H, Dh], weights).
    In bf16 its numerics are eager's: bf16 matmuls, the softmax computed in float32 and stored in
    bf16 (as flash attention stores P); torch's SDPA, which it replaces on a CPU, runs a float32
    math path there with a float bias and dropout, about twice as slow (bench/layers.py)."""
    weights = torch.matmul(query, key.transpose(2, 3))  # [N, H, L, L]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if scaling != 1.0:  # T5 folds the scale into its weights
        weights = weights * scaling
    if position_bias is not None:
        weights = weights + position_bias
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = fast_dropout(F.softmax(weights, dim=-1), dropout, module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class DeviceKernels(nn.Module):
    """A tower whose kernels follow its parameters' device: `_kernels_for(device)` runs after every
    .to() / .cuda() / .bfloat16() of the tower or a module holding it (set there, not in forward,
    so a compiled forward never sees the switch and compiles once)."""

    def _kernels_for(self, device: torch.device) -> None:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._kernels_for(next(self.parameters()).device)
        return out


def swap_layers(module: nn.Module) -> int:
    """Replace, inside `module`, every nn.Dropout by `Dropout`, every T5LayerNorm by `T5RMSNorm`
    and the nn.Conv2d of every patch embedding (a module with a `patch_size`, as timm's PatchEmbed)
    by `PatchConv2d`. Returns how many layers it replaced."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                new = Dropout(child.p, child.inplace)
                new.train(child.training)
            elif PatchConv2d.applies_to(child) and hasattr(parent, "patch_size"):  # a ViT's patch embedding
                new = PatchConv2d.from_conv(child)
            elif type(child) is T5LayerNorm:
                new = T5RMSNorm(child.weight.shape[0], child.variance_epsilon)
                new.weight = child.weight
                new.train(child.training)
            else:
                continue
            setattr(parent, name, new)
            swapped += 1
    return swapped


def restore_layers(module: nn.Module) -> int:
    """Undo `swap_layers`: torch's nn.Dropout and nn.Conv2d and T5LayerNorm again, sharing the same
    parameters."""
    restored = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is Dropout:
                new = nn.Dropout(child.p, child.inplace)
            elif type(child) is PatchConv2d:
                new = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, device="meta")
                new.weight, new.bias = child.weight, child.bias
            elif type(child) is T5RMSNorm:
                new = T5LayerNorm(child.weight.shape[0], child.variance_epsilon)
                new.weight = child.weight
            else:
                continue
            new.train(child.training)
            setattr(parent, name, new)
            restored += 1
    return restored
