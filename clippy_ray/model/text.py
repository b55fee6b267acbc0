"""Text tower (transformers): a T5 encoder (or any HF encoder), masked mean pooling as in
Sentence-T5, and a learned projection."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    AutoConfig,
    AutoModel,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.masking_utils import eager_mask

from clippy_ray.config import TextConfig
from clippy_ray.errors import InputError
from clippy_ray.model.layers import DeviceKernels, eager_attention, swap_layers

T5_ENCODERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
# T5's attention on a CPU: eager, with model.layers' dropout (transformers' own extension point)
CPU_ATTENTION = "clippy_eager"
AttentionInterface.register(CPU_ATTENTION, eager_attention)
AttentionMaskInterface.register(CPU_ATTENTION, eager_mask)


def encoder_from_config(config: PretrainedConfig) -> PreTrainedModel:
    """Encoder-only model for a config: T5 family -> its EncoderModel, anything else -> AutoModel."""
    name = T5_ENCODERS.get(config.model_type)
    if name is not None:
        import transformers

        return getattr(transformers, name)(config)
    return AutoModel.from_config(config)


def hidden_size(config: PretrainedConfig) -> int:
    return getattr(config, "d_model", None) or config.hidden_size


def text_config(cfg: TextConfig, vocab_size: int) -> PretrainedConfig:
    """Config for a randomly initialized encoder; the vocabulary follows the tokenizer."""
    overrides = {"vocab_size": vocab_size, **cfg.hf_config}
    try:
        return AutoConfig.for_model(cfg.model_type, **overrides)
    except (ValueError, TypeError) as err:
        reason = str(err).split(". Should contain")[0]  # not transformers' list of every model type
        raise InputError(f"model.text.model_type={cfg.model_type!r} / hf_config: {reason}") from None


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden [N, L, D], mask [N, L] -> [N, D], padding excluded."""
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class TextTower(DeviceKernels):
    def __init__(self, encoder: PreTrainedModel, embed_dim: int, grad_checkpointing: bool = False):
        super().__init__()
        swap_layers(encoder)  # cheaper CPU dropout and RMS norm
        if grad_checkpointing:  # transformers' own: each layer recomputed in the backward, in training
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.encoder = encoder
        own = encoder.config._attn_implementation  # what the encoder runs off the CPU
        self.attention = "sdpa" if own == CPU_ATTENTION else own  # a config another tower switched
        self.proj = nn.Linear(hidden_size(encoder.config), embed_dim, bias=False)
        self._kernels_for(self.proj.weight.device)  # the device it was built on

    def _kernels_for(self, device: torch.device) -> None:
        """T5 encoders on a CPU: `CPU_ATTENTION` (transformers' eager attention with model.layers'
        dropout) in place of their SDPA attention."""
        if self.encoder.config.model_type in T5_ENCODERS:
            want = CPU_ATTENTION if device.type == "cpu" else self.attention
            if self.encoder.config._attn_implementation != want:
                self.encoder.set_attn_implementation(want)

    @property
    def vocab_size(self) -> int:
        return self.encoder.get_input_embeddings().num_embeddings

    def padding_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[N, L] token ids -> [N, L] mask: 1 for every token but the encoder's pad id."""
        pad = self.encoder.config.pad_token_id
        if pad is None:
            raise ValueError("the text encoder's config names no pad_token_id; pass attention_mask explicitly")
        return (input_ids != pad).long()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[N, L] token ids and mask (default: `padding_mask`) -> [N, E] (not normalized)."""
        if attention_mask is None:
            attention_mask = self.padding_mask(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.proj(mean_pool(hidden, attention_mask))
