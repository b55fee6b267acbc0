"""CLIPpy: image and text towers projected to one space, and a learnable temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from clippy_ray.config import ModelConfig
from clippy_ray.errors import InputError
from clippy_ray.model.image import ImageTower
from clippy_ray.model.pretrained import load_image_backbone, load_text_encoder
from clippy_ray.model.text import TextTower, encoder_from_config, text_config


class CLIPpy(nn.Module):
    def __init__(
        self, image: ImageTower, text: TextTower, init_temperature: float = 0.07, max_logit_scale: float = 100.0
    ):
        super().__init__()
        self.image = image
        self.text = text
        # Shape [1], not []: DeepSpeed cannot flatten 0-dim parameters across ranks.
        self.logit_scale = nn.Parameter(torch.full([1], math.log(1.0 / init_temperature)))
        self.max_logit_scale = max_logit_scale

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), float32 [1]. Training keeps it <= max_logit_scale by clamping the value
        after each optimizer step, as CLIP does; a clamp here would zero the gradient at the bound."""
        return self.logit_scale.float().exp()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> L2-normalized float32 [N, E] (normalized in float32 whatever the model's dtype)."""
        return F.normalize(self.image(images).float(), dim=-1)

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> L2-normalized float32 per-location embeddings [N, H/p, W/p, E] (segmentation)."""
        return F.normalize(self.image.forward_dense(images).float(), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[N, L] token ids (mask: every non-pad token unless given) -> L2-normalized float32 [N, E]."""
        return F.normalize(self.text(input_ids, attention_mask).float(), dim=-1)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """-> (image embeddings [N, E], text embeddings [N, E], logit scale [1])."""
        return self.encode_image(images), self.encode_text(input_ids, attention_mask), self.scale()


def build_model(
    cfg: ModelConfig, vocab_size: int, *, load_pretrained: bool = True, encoder_config: PretrainedConfig | None = None
) -> CLIPpy:
    """The model a config describes. `vocab_size` is the tokenizer's; the text encoder must embed
    at least that many tokens.

    load_pretrained: load the weights the config names (model.image.pretrained, model.text.pretrained).
    False builds every tower randomly initialized, for weights restored right after (a saved model).
    encoder_config: the text encoder's architecture when it is not the config's own (a saved model's,
    which may have come from a pretrained folder); only with load_pretrained=False."""
    if encoder_config is not None and load_pretrained:
        raise ValueError(
            "build_model: encoder_config describes an encoder whose weights come from elsewhere; "
            "pass load_pretrained=False with it"
        )
    if not load_pretrained and cfg.text.pretrained and encoder_config is None:
        raise ValueError(
            f"build_model: model.text.pretrained={cfg.text.pretrained!r} defines the encoder's "
            "architecture; without loading it, pass that architecture as encoder_config"
        )
    image = ImageTower(cfg.image, cfg.embed_dim, cfg.aggregation, cfg.token_keep_ratio, cfg.token_keep_count)
    if load_pretrained and cfg.image.pretrained:
        load_image_backbone(image.vit, cfg.image.pretrained)
    if encoder_config is not None:
        encoder = encoder_from_config(encoder_config)
    elif load_pretrained and cfg.text.pretrained:
        encoder = load_text_encoder(cfg.text.pretrained, cfg.text.hf_config)
    else:
        encoder = encoder_from_config(text_config(cfg.text, vocab_size))
    text = TextTower(
        encoder, cfg.embed_dim, cfg.text.grad_checkpointing, cfg.text.frozen_layers, cfg.text.cache_embeddings
    )
    if text.vocab_size < vocab_size:
        raise InputError(
            f"model.text: the tokenizer has {vocab_size} tokens but the text encoder embeds only "
            f"{text.vocab_size}; use the tokenizer the encoder was trained with (model.text.tokenizer)"
        )
    return CLIPpy(image, text, cfg.init_temperature, cfg.max_logit_scale)
