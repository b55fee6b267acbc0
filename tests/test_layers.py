import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clippy_ray.model import build_model
from clippy_ray.model.layers import Dropout, PatchConv2d, T5RMSNorm, eager_attention, fast_dropout, restore_layers
from clippy_ray.model.text import CPU_ATTENTION, TextTower
from clippy_ray.tokenizer import build_tokenizer
from tests.conftest import tiny_config


def test_patch_convolution_as_a_matmul_equals_torch_convolution_in_value_and_gradients():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)
    patch = PatchConv2d.from_conv(conv)
    assert patch.weight is conv.weight and patch.bias is conv.bias
    for shape in ((2, 3, 16, 12), (1, 3, 18, 16)):  # a grid of 4x3 patches; sides not multiples of 4
        x = torch.randn(shape, requires_grad=True)
        want = conv(x)
        want_grads = torch.autograd.grad(want.square().sum(), (x, conv.weight, conv.bias))
        got = patch(x)
        got_grads = torch.autograd.grad(got.square().sum(), (x, conv.weight, conv.bias))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_swapped_layers_keep_the_state_dict_and_the_model_output():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg.model, build_tokenizer(cfg.model.text).vocab_size).eval()
    assert type(model.image.vit.patch_embed.proj) is PatchConv2d
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert any(type(m) is Dropout for m in model.text.modules())
    assert any(type(m) is T5RMSNorm for m in model.text.modules())
    keys = {k: v.shape for k, v in model.state_dict().items()}
    images = torch.randn(2, 3, cfg.model.image.img_size, cfg.model.image.img_size)
    ids = torch.randint(3, 50, (2, 8))
    with torch.no_grad():
        swapped = model(images, ids, torch.ones_like(ids))
        assert restore_layers(model) > 0
        assert type(model.image.vit.patch_embed.proj) is nn.Conv2d
        assert not any(isinstance(m, (Dropout, PatchConv2d, T5RMSNorm)) for m in model.modules())
        model.text.encoder.set_attn_implementation(model.text.attention)
        plain = model(images, ids, torch.ones_like(ids))
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    for a, b in zip(swapped, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_drops_at_its_rate_scales_what_it_keeps_and_masks_the_gradient_alike(p, dtype):
    torch.manual_seed(0)
    n = 200_001  # not a multiple of 4: the last 64-bit draw is partly used
    x = torch.ones(n, dtype=dtype, requires_grad=True)
    y = Dropout(p).train()(x)
    y.backward(torch.ones_like(y))
    dropped = round(p * 65536) / 65536
    frac = (y == 0).double().mean().item()
    assert abs(frac - dropped) < 5 * math.sqrt(dropped * (1 - dropped) / n)
    for quarter in range(4):  # each of a draw's four 16-bit fields masks at the rate
        part = y[quarter::4]
        frac = (part == 0).double().mean().item()
        assert abs(frac - dropped) < 5 * math.sqrt(dropped * (1 - dropped) / part.numel())
    kept = y[y != 0]
    assert torch.all(kept == torch.tensor(1 / (1 - dropped), dtype=dtype))
    assert torch.equal(x.grad, y.detach())  # the backward uses the forward's mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_scales_in_float32_and_rounds_once(dtype):
    """Kept values are x / (1 - p) rounded once to x's dtype (as CUDA's dropout): not x times a
    scale already rounded to bf16 (1.109375 for 1 / 0.9, which shrinks the layer's mean output)."""
    torch.manual_seed(0)
    x = torch.randn(10_000, dtype=torch.float32).to(dtype).requires_grad_()
    grad = torch.randn(10_000).to(dtype)
    y = Dropout(0.1).train()(x)
    y.backward(grad)
    scale = 65536 / (65536 - round(0.1 * 65536))
    kept = y != 0
    assert torch.equal(y[kept], (x[kept].detach().float() * scale).to(dtype))
    assert torch.equal(x.grad[kept], (grad[kept].float() * scale).to(dtype))
    assert torch.all(x.grad[~kept] == 0)


def test_cpu_dropout_follows_the_seed_and_is_the_identity_in_eval_or_at_zero():
    x = torch.randn(64, 32)
    drop = Dropout(0.3).train()
    torch.manual_seed(1)
    a = drop(x)
    torch.manual_seed(1)
    assert torch.equal(drop(x), a)
    torch.manual_seed(2)
    assert not torch.equal(drop(x), a)
    assert drop.eval()(x) is x
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))


@pytest.mark.parametrize(
    ("x_dtype", "w_dtype", "shape"),
    [
        (torch.float32, torch.float32, (4, 7, 64)),
        (torch.bfloat16, torch.bfloat16, (4, 7, 64)),
        (torch.bfloat16, torch.float32, (4, 7, 64)),
        (torch.float32, torch.bfloat16, (4, 7, 64)),
        (torch.float32, torch.float32, (64,)),
        (torch.bfloat16, torch.bfloat16, (9, 64)),
    ],
)
def test_t5_rms_norm_on_a_cpu_equals_t5_layer_norm_in_value_dtype_and_gradients(x_dtype, w_dtype, shape):
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    torch.manual_seed(0)
    ref = T5LayerNorm(64)
    ref.weight.data = (torch.rand(64) + 0.5).to(w_dtype)
    norm = T5RMSNorm(64)
    norm.weight = ref.weight
    x = (torch.randn(shape) * 3).to(x_dtype).requires_grad_()
    grad = torch.randn(shape)
    out = []
    for module in (ref, norm):
        y = module(x)
        out.append((y, *torch.autograd.grad(y, (x, ref.weight), grad.to(y.dtype))))
    # float64 reference gradients: ours are computed in float32 throughout, T5's round through bf16
    x64, w64 = x.detach().double().requires_grad_(), ref.weight.detach().double().requires_grad_()
    y64 = w64 * x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-6)
    want_x, want_w = torch.autograd.grad(y64, (x64, w64), grad.double())
    (ref_y, ref_gx, ref_gw), (y, gx, gw) = out
    assert y.dtype == ref_y.dtype and gx.dtype == x.dtype and gw.dtype == w_dtype
    tol = {"rtol": 1e-5, "atol": 1e-5} if x_dtype == torch.float32 else {"rtol": 2**-7, "atol": 2**-7}
    torch.testing.assert_close(y, ref_y, **tol)
    assert (gx.double() - want_x).abs().max() <= (ref_gx.double() - want_x).abs().max() * 1.01 + 1e-6
    w_tol = 1e-5 if w_dtype == torch.float32 and x_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(gw.double(), want_w, rtol=w_tol, atol=w_tol * want_w.abs().max().item())


def t5_tower(dropout_rate: float) -> TextTower:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(num_layers=2, d_model=32, d_kv=8, num_heads=4, d_ff=64, vocab_size=100, dropout_rate=dropout_rate)
    return TextTower(T5EncoderModel(config), 16)


def test_t5_cpu_attention_equals_the_encoders_sdpa_attention_with_padding():
    tower = t5_tower(0.1).eval()
    assert tower.encoder.config._attn_implementation == CPU_ATTENTION and tower.attention == "sdpa"
    ids = torch.randint(1, 100, (3, 10))
    ids[1:, 6:] = 0  # padding
    out = {}
    for impl in (CPU_ATTENTION, "sdpa"):
        tower.encoder.set_attn_implementation(impl)
        tower.zero_grad()
        emb = tower(ids)
        emb.square().sum().backward()
        out[impl] = (emb, [p.grad.clone() for p in tower.parameters()])
    torch.testing.assert_close(out[CPU_ATTENTION][0], out["sdpa"][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(out[CPU_ATTENTION][1], out["sdpa"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_t5_encoder_on_a_cpu_runs_the_cpu_attention_and_drops_its_weights_with_the_cpu_mask(monkeypatch):
    from transformers import AttentionInterface

    calls = []

    def counted(module, *args, **kwargs):
        calls.append(kwargs["dropout"])
        return eager_attention(module, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, CPU_ATTENTION, counted)
    tower = t5_tower(0.5)
    for m in tower.modules():  # only the attention weights' dropout (a rate, not a module) stays on
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    ids = torch.randint(1, 100, (2, 10))
    with torch.no_grad():
        plain = tower.eval()(ids)
        assert calls == [0.0, 0.0]  # one call per layer, no dropout in eval
        torch.manual_seed(3)
        dropped = tower.train()(ids)
        assert calls[2:] == [0.5, 0.5]
        torch.manual_seed(3)  # the mask comes from torch's generator: the same seed, the same output
        assert torch.equal(tower(ids), dropped)
    assert not torch.allclose(plain, dropped)


def test_t5_cpu_attention_in_bf16_stays_within_bf16_rounding_of_float32():
    """bf16 matmuls and a bf16-stored softmax (eager's numerics): against the float32 encoder, an
    error of the order of bf16's rounding, as SDPA's float32 math path has."""
    tower = t5_tower(0.1).eval()
    ids = torch.randint(1, 100, (3, 10))
    ids[1:, 6:] = 0
    with torch.no_grad():
        want = tower(ids)
        tower.bfloat16()
        errors = {}
        for impl in (CPU_ATTENTION, "sdpa"):
            tower.encoder.set_attn_implementation(impl)
            errors[impl] = (tower(ids).float() - want).abs().max().item()
    scale = want.abs().max().item()
    assert errors[CPU_ATTENTION] < 0.02 * scale
    assert errors[CPU_ATTENTION] < 4 * errors["sdpa"] + 2**-8 * scale


def test_cpu_dropout_compiles_into_one_graph():
    compiled = torch.compile(lambda x: fast_dropout(x, 0.25), backend="aot_eager", fullgraph=True)
    x = torch.ones(1000, requires_grad=True)
    y = compiled(x)
    assert 0.15 < (y == 0).float().mean().item() < 0.35
    assert torch.all(y[y != 0] == 1 / 0.75)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, y.detach())


def test_cpu_dropout_on_strided_inputs_double_backward_and_integers():
    x = torch.randn(48, 64)
    drop = Dropout(0.3).train()
    torch.manual_seed(4)
    strided = drop(x.t())
    torch.manual_seed(4)
    assert torch.equal(strided, drop(x.t().contiguous()))  # the same mask, whatever the layout
    w = torch.randn(64, 48, requires_grad=True)
    (g,) = torch.autograd.grad((drop(w) ** 2).sum(), w, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), w)  # g = 2 m^2 w for the mask m: d/dw sum(g) = 2 m^2
    m_sq = g.detach() / (2 * w.detach())
    torch.testing.assert_close(gg, 2 * m_sq)
    scale = 65536 / (65536 - round(0.3 * 65536))
    assert torch.all((m_sq == 0) | torch.isclose(m_sq, torch.tensor(scale**2)))
    assert (m_sq == 0).any() and (m_sq != 0).any()
    with pytest.raises(RuntimeError):  # as F.dropout: integers cannot be dropped out
        drop(torch.ones(10, dtype=torch.int64))


def test_text_attention_follows_the_parameters_device_when_the_model_moves():
    tower = t5_tower(0.1)
    tower.to("meta")
    assert tower.encoder.config._attn_implementation == "sdpa"
    tower.to_empty(device="cpu")
    assert tower.encoder.config._attn_implementation == CPU_ATTENTION


def test_patch_embedding_of_a_model_built_at_224_runs_at_448():
    model = build_model(
        tiny_config(
            "model.image.img_size=224", "model.image.timm_kwargs={depth: 1, embed_dim: 32, num_heads: 2}"
        ).model,
        300,
    )
    pe = model.image.vit.patch_embed
    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        torch.testing.assert_close(pe(x), F.conv2d(x, pe.proj.weight, pe.proj.bias, stride=16).permute(0, 2, 3, 1))
