import math

import pytest
import torch
import torch.nn.functional as F

from clippy_ray.model import build_model
from clippy_ray.model.image import keep_random_tokens
from clippy_ray.tokenizer import build_tokenizer
from tests.conftest import tiny_config


def make(*overrides):
    cfg = tiny_config(*overrides)
    tok = build_tokenizer(cfg.model.text)
    return build_model(cfg.model, tok.vocab_size), tok


def batch(tok, n=4, size=32):
    torch.manual_seed(0)
    enc = tok(["a red circle on stripes", "two stars", "a blue heart", "a ring and a cross"][:n])
    return torch.randn(n, 3, size, size), torch.from_numpy(enc["input_ids"]), torch.from_numpy(enc["attention_mask"])


@pytest.mark.parametrize("aggregation", ["max", "avg", "cls"])
def test_forward_backward_every_aggregation_with_token_subsampling(aggregation):
    model, tok = make(f"model.aggregation={aggregation}", "model.token_keep_ratio=0.5")
    model.train()
    images, ids, mask = batch(tok)
    img, txt, scale = model(images, ids, mask)
    assert img.shape == txt.shape == (4, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(4))
    loss = -(img * txt).sum(-1).mean() * scale.squeeze()
    loss.backward()
    for name in ("image.proj.weight", "image.vit.patch_embed.proj.weight", "text.proj.weight", "logit_scale"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_vit_attention_follows_the_parameters_device_when_the_model_moves():
    """Explicit softmax(q k^T) v on a CPU, the fused kernel elsewhere; switched when the model moves
    (not in forward, where a compiled graph would see the switch and compile again)."""
    model, _ = make()
    attn = [m for m in model.image.vit.modules() if hasattr(m, "fused_attn")]
    assert attn and not any(m.fused_attn for m in attn)
    model.to("meta")  # any device that is not a CPU, through a parent module's .to()
    assert all(m.fused_attn for m in attn)
    model.to_empty(device="cpu")
    assert not any(m.fused_attn for m in attn)


def test_model_built_at_224_runs_at_448_with_a_twice_larger_feature_map():
    model, _ = make("model.image.img_size=224", "model.image.timm_kwargs={depth: 1, embed_dim: 32, num_heads: 2}")
    model.eval()
    with torch.no_grad():
        small = model.dense_features(torch.randn(1, 3, 224, 224))
        large = model.dense_features(torch.randn(1, 3, 448, 448))
        emb = model.encode_image(torch.randn(2, 3, 448, 448))
    assert small.shape == (1, 14, 14, 16)
    assert large.shape == (1, 28, 28, 16)
    assert emb.shape == (2, 16)


def test_resolution_not_a_multiple_of_the_patch_is_a_clear_error():
    model, _ = make()
    with pytest.raises(ValueError, match="not a multiple of the patch size 8x8"):
        model.encode_image(torch.randn(1, 3, 36, 36))


def test_max_pool_embedding_is_the_max_over_the_dense_map():
    model, tok = make("model.aggregation=max", "model.token_keep_ratio=0.5")
    model.eval()  # sub-sampling is off at eval
    images, _, _ = batch(tok)
    with torch.no_grad():
        dense = model.image.forward_dense(images)  # [N, H, W, E] before normalization
        emb = model.encode_image(images)
    torch.testing.assert_close(emb, F.normalize(dense.amax(dim=(1, 2)), dim=-1))
    # and the dense map that segmentation uses is that map, normalized per location
    torch.testing.assert_close(model.dense_features(images), F.normalize(dense, dim=-1))


def test_avg_pool_embedding_is_the_mean_over_the_dense_map():
    model, tok = make("model.aggregation=avg")
    model.eval()
    images, _, _ = batch(tok)
    with torch.no_grad():
        dense = model.image.forward_dense(images)
        torch.testing.assert_close(model.encode_image(images), F.normalize(dense.mean(dim=(1, 2)), dim=-1))


def test_cls_mode_still_gives_dense_features_through_the_same_projection():
    model, tok = make("model.aggregation=cls")
    model.eval()
    images, _, _ = batch(tok)
    with torch.no_grad():
        dense = model.dense_features(images)
        cls_emb = model.encode_image(images)
    assert dense.shape == (4, 4, 4, 16)
    # the class embedding is not one of the patch embeddings
    assert not torch.allclose(cls_emb, F.normalize(model.image.forward_dense(images).amax(dim=(1, 2)), dim=-1))


def test_token_subsampling_keeps_a_different_random_subset_per_image():
    torch.manual_seed(0)
    tokens = torch.arange(2 * 16, dtype=torch.float32).reshape(1, 32, 1).repeat(8, 1, 3)  # rows identical
    kept = keep_random_tokens(tokens, 8)
    assert kept.shape == (8, 8, 3)
    sets = {tuple(sorted(row[:, 0].tolist())) for row in kept}
    assert len(sets) > 1  # different subsets across the batch
    for row in kept:  # a subset of the original tokens, without repeats
        values = row[:, 0].tolist()
        assert len(set(values)) == 8 and set(values) <= set(range(32))


def test_subsampling_count_and_ratio_are_applied_in_training_only():
    seen = []
    for override, expected in (("model.token_keep_count=3", 3), ("model.token_keep_ratio=0.25", 4)):
        model, tok = make(override)
        model.image.vit.blocks.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
        images, _, _ = batch(tok)
        model.train()
        model.encode_image(images)
        model.eval()
        model.encode_image(images)
        assert seen[-2:] == [1 + expected, 1 + 16], override  # class token + kept patches; all at eval


def test_cls_aggregation_without_a_class_token_is_a_config_error():
    with pytest.raises(ValueError, match="has no class token"):
        make(
            "model.aggregation=cls",
            "model.image.timm_kwargs={patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2, class_token: false, "
            "global_pool: avg}",
        )


def test_logit_scale_is_a_1d_parameter_whose_gradient_the_bound_does_not_cut():
    model, _ = make("model.init_temperature=0.07")
    assert model.logit_scale.shape == (1,)
    torch.testing.assert_close(model.scale(), torch.tensor([1 / 0.07]))
    # training clamps the value at max_logit_scale after each step (tests/test_precision.py); the
    # forward does not, so a scale at the bound still gets the gradient that brings it back
    with torch.no_grad():
        model.logit_scale.fill_(math.log(model.max_logit_scale))
    model.scale().sum().backward()
    assert model.logit_scale.grad.item() == pytest.approx(100.0, rel=1e-5)


def test_pretrained_text_encoder_smaller_than_the_tokenizer_is_rejected(tmp_path):
    from transformers import T5Config

    from clippy_ray.model.pretrained import save_text_encoder
    from clippy_ray.model.text import encoder_from_config

    small = T5Config(vocab_size=100, num_layers=2, d_model=32, d_kv=8, num_heads=4, d_ff=64)
    save_text_encoder(encoder_from_config(small), tmp_path / "t5")
    with pytest.raises(ValueError, match="tokenizer has 384 tokens but the text encoder embeds only 100"):
        make(f"model.text.pretrained={tmp_path / 't5'}")


def test_a_bf16_model_gives_unit_norm_float32_embeddings():
    """Normalized in float32: a bf16 model's embeddings have norm 1 to float32 precision (normalizing
    in bf16 and casting after gives norms 0.996-1.004)."""
    model, tok = make()
    model = model.to(torch.bfloat16).eval()
    images, ids, mask = batch(tok)
    with torch.no_grad():
        img, txt = model.encode_image(images.bfloat16()), model.encode_text(ids, mask)
        dense = model.dense_features(images.bfloat16())
    for emb in (img, txt, dense):
        assert emb.dtype == torch.float32
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(emb.shape[:-1]), atol=1e-6, rtol=0)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """model.image.grad_checkpointing / model.text.grad_checkpointing recompute each block in the
    backward with the forward's random state: with dropout and token sub-sampling on, the loss and
    every parameter gradient equal the model's without it."""
    vit = "model.image.timm_kwargs={patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2, proj_drop_rate: 0.1}"
    common = ("model.token_keep_ratio=0.5", vit, "model.text.hf_config={num_layers: 2, d_model: 32, d_kv: 8, "
              "num_heads: 4, d_ff: 64, dropout_rate: 0.1}")  # fmt: skip
    torch.manual_seed(0)
    plain, tok = make(*common)
    torch.manual_seed(0)
    ckpt, _ = make(*common, "model.image.grad_checkpointing=true", "model.text.grad_checkpointing=true")
    ckpt.load_state_dict(plain.state_dict())
    images, ids, mask = batch(tok)
    grads, losses = [], []
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(1)
        img, txt, scale = model(images, ids, mask)
        loss = F.cross_entropy(scale * img @ txt.T, torch.arange(4)) + F.cross_entropy(
            scale * txt @ img.T, torch.arange(4)
        )
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert ckpt.text.encoder.is_gradient_checkpointing and ckpt.image.grad_checkpointing
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def _trained(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.grad is not None}


def _step(model, tok):
    model.train()
    images, ids, mask = batch(tok)
    img, txt, scale = model(images, ids, mask)
    loss = F.cross_entropy(scale * img @ txt.T, torch.arange(4))
    loss.backward()
    return loss


def test_frozen_blocks_train_only_the_later_blocks_with_the_same_gradients():
    no_dropout = "model.text.hf_config={num_layers: 2, d_model: 32, d_kv: 8, num_heads: 4, d_ff: 64, dropout_rate: 0.0}"
    torch.manual_seed(0)
    plain, tok = make(no_dropout)
    torch.manual_seed(0)
    frozen, _ = make(no_dropout, "model.image.frozen_blocks=1", "model.text.frozen_layers=1")
    frozen.load_state_dict(plain.state_dict())
    for model in (plain, frozen):
        _step(model, tok)
    trained = _trained(frozen)
    assert not {n for n in trained if n.startswith(("image.vit.patch_embed", "image.vit.blocks.0.", "image.vit.cls"))}
    assert "image.vit.pos_embed" not in trained and "image.vit.blocks.1.attn.qkv.weight" in trained
    assert "text.encoder.shared.weight" not in trained and not {n for n in trained if ".block.0." in n}
    assert {"text.encoder.encoder.block.1.layer.0.SelfAttention.q.weight", "image.proj.weight"} <= trained
    # freezing changes which parameters train, not the gradients of those that do
    grads = dict(plain.named_parameters())
    for name, param in frozen.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(param.grad, grads[name].grad, msg=name)
    # the optimizer holds the trained parameters only
    from clippy_ray.train.optim import param_groups

    held = {id(p) for g in param_groups(frozen, 0.1) for p in g["params"]}
    assert held == {id(p) for p in frozen.parameters() if p.requires_grad} and len(held) < len(
        list(frozen.parameters())
    )


def test_a_wholly_frozen_tower_trains_its_projection_only_and_the_text_encoder_runs_without_dropout():
    model, tok = make("model.image.frozen_blocks=-1", "model.text.frozen_layers=-1")
    model.train()
    assert not model.text.encoder.training and model.image.training  # dropout off in the frozen encoder
    _step(model, tok)
    assert {n for n in _trained(model)} == {"image.proj.weight", "text.proj.weight", "logit_scale"}


def test_cached_caption_embeddings_equal_the_encoders_and_skip_it_for_a_seen_caption():
    common = ("model.text.frozen_layers=-1",)
    torch.manual_seed(0)
    cached, tok = make(*common, "model.text.cache_embeddings=true")
    torch.manual_seed(0)
    plain, _ = make(*common)
    plain.load_state_dict(cached.state_dict())
    cached.train(), plain.train()
    calls = []
    cached.text.encoder.register_forward_hook(lambda module, args, output: calls.append(1))
    _, ids, mask = batch(tok)
    first = cached.encode_text(ids, mask)
    torch.testing.assert_close(first, plain.encode_text(ids, mask))
    again = cached.encode_text(ids.flip(0), mask.flip(0))  # the same captions, another order
    torch.testing.assert_close(again, first.flip(0))
    assert len(calls) == 1  # the second batch was all cached
    again.sum().backward()  # the projection still trains
    assert cached.text.proj.weight.grad is not None


def test_freezing_settings_are_checked():
    from clippy_ray import config
    from clippy_ray.errors import InputError

    with pytest.raises(InputError, match="model.image.frozen_blocks=3: the ViT has 2 blocks"):
        make("model.image.frozen_blocks=3")
    with pytest.raises(config.ConfigError, match="cache_embeddings: needs model.text.frozen_layers=-1"):
        tiny_config("model.text.cache_embeddings=true")
    with pytest.raises(config.ConfigError, match="not with train.zero_stage=3"):
        tiny_config("model.text.frozen_layers=-1", "model.text.cache_embeddings=true", "train.zero_stage=3")


def test_pos_embed_grid_keeps_a_finer_position_grid_resampled_to_each_input():
    model, tok = make("model.image.pos_embed_grid=8")  # img_size 32, patch 8: 4x4 by default
    default, _ = make()
    assert default.image.vit.pos_embed.shape[1] == 1 + 16 and model.image.vit.pos_embed.shape[1] == 1 + 64
    images, ids, mask = batch(tok)
    img, _, _ = model(images, ids, mask)
    assert img.shape == (4, 16)
    with torch.no_grad():
        assert model.dense_features(torch.randn(1, 3, 64, 64)).shape == (1, 8, 8, 16)  # the kept grid, as is


def test_a_bert_like_encoders_embeddings_and_first_layers_freeze():
    bert = ("model.text.model_type=bert", "model.text.hf_config={hidden_size: 32, num_hidden_layers: 2, "
            "num_attention_heads: 2, intermediate_size: 64}", "model.text.frozen_layers=1")  # fmt: skip
    model, _ = make(*bert)
    trains = {n: p.requires_grad for n, p in model.text.named_parameters()}
    assert not any(v for n, v in trains.items() if n.startswith(("encoder.embeddings.", "encoder.encoder.layer.0.")))
    assert all(v for n, v in trains.items() if n.startswith("encoder.encoder.layer.1."))
    assert trains["proj.weight"]
