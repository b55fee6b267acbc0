import pytest
import torch

from clippy_ray import storage
from clippy_ray.model import build_model
from clippy_ray.model.pretrained import PretrainedError, save_image_backbone, save_text_encoder
from clippy_ray.tokenizer import build_tokenizer
from tests.conftest import tiny_config


def fresh(*overrides):
    cfg = tiny_config(*overrides)
    return build_model(cfg.model, build_tokenizer(cfg.model.text).vocab_size)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_image_and_text_towers_round_trip_through_a_local_path_and_s3(tmp_path, bucket):
    torch.manual_seed(1)
    source = fresh()
    save_image_backbone(source.image.vit, tmp_path / "vit.safetensors")
    save_text_encoder(source.text.encoder, tmp_path / "t5")
    storage.upload(tmp_path / "vit.safetensors", f"s3://{bucket}/weights/vit.safetensors")
    storage.upload(tmp_path / "t5", f"s3://{bucket}/weights/t5")

    for image_uri, text_uri in (
        (tmp_path / "vit.safetensors", tmp_path / "t5"),
        (f"s3://{bucket}/weights/vit.safetensors", f"s3://{bucket}/weights/t5"),
    ):
        torch.manual_seed(2)  # a different random init, overwritten by the load
        loaded = fresh(f"model.image.pretrained={image_uri}", f"model.text.pretrained={text_uri}")
        assert_same_weights(loaded.image.vit, source.image.vit)
        assert_same_weights(loaded.text.encoder, source.text.encoder)
        assert not torch.equal(loaded.image.proj.weight, source.image.proj.weight)  # projections are new


def test_dino_style_pth_with_teacher_wrapper_backbone_prefix_and_head_loads(tmp_path, bucket):
    torch.manual_seed(3)
    source = fresh()
    state = {f"backbone.{k}": v for k, v in source.image.vit.state_dict().items()}
    state["head.mlp.0.weight"] = torch.randn(8, 32)  # DINO's projection head is not part of the tower
    torch.save({"teacher": state, "epoch": 100}, tmp_path / "dino.pth")
    storage.upload(tmp_path / "dino.pth", f"s3://{bucket}/dino.pth")
    loaded = fresh(f"model.image.pretrained=s3://{bucket}/dino.pth")
    assert_same_weights(loaded.image.vit, source.image.vit)


def test_image_checkpoint_trained_at_another_resolution_gets_resampled_position_embeddings(tmp_path):
    source = fresh("model.image.img_size=64")  # 8x8 grid
    save_image_backbone(source.image.vit, tmp_path / "vit64.safetensors")
    loaded = fresh("model.image.img_size=32", f"model.image.pretrained={tmp_path / 'vit64.safetensors'}")
    assert loaded.image.vit.pos_embed.shape == (1, 1 + 16, 32)
    assert torch.equal(loaded.image.vit.blocks[0].attn.qkv.weight, source.image.vit.blocks[0].attn.qkv.weight)


def test_wrong_shape_image_checkpoint_is_a_clear_error_listing_the_keys(tmp_path):
    wide = fresh("model.image.timm_kwargs={patch_size: 8, depth: 2, embed_dim: 48, num_heads: 2}")
    save_image_backbone(wide.image.vit, tmp_path / "wide.safetensors")
    with pytest.raises(PretrainedError) as err:
        fresh(f"model.image.pretrained={tmp_path / 'wide.safetensors'}")
    message = str(err.value)
    assert "wrong shapes" in message and "blocks.0.attn.qkv.weight (checkpoint [144, 48] vs model [96, 32])" in message
    assert "wide.safetensors" in message


def test_checkpoint_missing_layers_is_a_clear_error_not_a_partial_load(tmp_path):
    deep = fresh()
    state = {k: v for k, v in deep.image.vit.state_dict().items() if not k.startswith("blocks.1.")}
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(PretrainedError, match=r"missing keys: blocks\.1\.attn\.proj\.bias"):
        fresh(f"model.image.pretrained={tmp_path / 'partial.pth'}")


def test_full_t5_checkpoint_loads_its_encoder_and_ignores_the_decoder(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=384, num_layers=2, d_model=32, d_kv=8, num_heads=4, d_ff=64)
    full = T5ForConditionalGeneration(cfg)
    save_text_encoder(full, tmp_path / "t5-full")  # has decoder.* and shared weights
    loaded = fresh(f"model.text.pretrained={tmp_path / 't5-full'}")
    assert torch.equal(
        loaded.text.encoder.encoder.block[1].layer[0].SelfAttention.q.weight,
        full.encoder.block[1].layer[0].SelfAttention.q.weight,
    )
    assert torch.equal(loaded.text.encoder.shared.weight, full.shared.weight)


def test_missing_s3_object_names_the_uri(s3_server, bucket):
    with pytest.raises(storage.StorageError, match=f"s3://{bucket}/nope.pth: no such object"):
        fresh(f"model.image.pretrained=s3://{bucket}/nope.pth")
