"""Text tower (transformers): a T5 encoder (or any HF encoder), masked mean pooling as in
Sentence-T5, and a learned projection."""

from __future__ import annotations

from collections import OrderedDict

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


CACHE_ENTRIES = 65_536  # captions per worker whose pooled encoder output text.cache_embeddings keeps


def freeze_encoder(encoder: PreTrainedModel, layers: int) -> bool:
    """Stop training the token embedding and the first `layers` layers of an HF encoder (-1: all of
    it) -> whether the whole encoder is frozen. T5's stacks keep their layers in `block`, BERT-like
    encoders in `encoder.layer`."""
    if layers == 0:
        return False
    stack = getattr(encoder, "encoder", encoder)
    blocks = getattr(stack, "block", None) or getattr(stack, "layer", None)
    if blocks is None:
        raise InputError(f"model.text.frozen_layers: {type(encoder).__name__} has no list of layers to freeze")
    if layers > len(blocks):
        raise InputError(f"model.text.frozen_layers={layers}: the encoder has {len(blocks)} layers (use -1 for all)")
    if layers == -1:
        encoder.requires_grad_(False)
        return True
    encoder.get_input_embeddings().requires_grad_(False)
    if hasattr(encoder, "embeddings"):  # BERT-like: position and type embeddings and their norm too
        encoder.embeddings.requires_grad_(False)
    for block in list(blocks)[:layers]:
        block.requires_grad_(False)
    return False


class TextTower(DeviceKernels):
    def __init__(
        self,
        encoder: PreTrainedModel,
        embed_dim: int,
        grad_checkpointing: bool = False,
        frozen_layers: int = 0,
        cache_embeddings: bool = False,
    ):
        super().__init__()
        swap_layers(encoder)  # cheaper CPU dropout and RMS norm
        if grad_checkpointing:  # transformers' own: each layer recomputed in the backward, in training
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.encoder = encoder
        own = encoder.config._attn_implementation  # what the encoder runs off the CPU
        self.attention = "sdpa" if own == CPU_ATTENTION else own  # a config another tower switched
        self.proj = nn.Linear(hidden_size(encoder.config), embed_dim, bias=False)
        self.frozen = freeze_encoder(encoder, frozen_layers)  # the whole encoder: it runs without dropout
        self.cache: OrderedDict[bytes, torch.Tensor] | None = OrderedDict() if cache_embeddings else None
        if cache_embeddings and not self.frozen:
            raise InputError("model.text.cache_embeddings needs model.text.frozen_layers=-1")
        self._kernels_for(self.proj.weight.device)  # the device it was built on

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:  # a fixed feature extractor: no dropout, so a caption always embeds the same
            self.encoder.eval()
        return self

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
        if self.cache is not None:
            return self.proj(self._cached_pool(input_ids, attention_mask))
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.proj(mean_pool(hidden, attention_mask))

    def _cached_pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's pooled output per row, from the cache where the caption (its
        unmasked tokens) was seen; the others encoded in one batch and kept (least recently used
        dropped past CACHE_ENTRIES)."""
        ids, mask = input_ids.cpu(), attention_mask.cpu().bool()
        keys = [ids[i][mask[i]].numpy().tobytes() for i in range(len(ids))]
        missing = [i for i, k in enumerate(keys) if k not in self.cache]
        if missing:
            rows = torch.tensor(missing, device=input_ids.device)
            with torch.no_grad():
                hidden = self.encoder(input_ids=input_ids[rows], attention_mask=attention_mask[rows]).last_hidden_state
                pooled = mean_pool(hidden, attention_mask[rows])
            for i, row in zip(missing, pooled):
                self.cache[keys[i]] = row.clone()  # not a view that keeps the whole batch alive
        for k in keys:
            self.cache.move_to_end(k)
        while len(self.cache) > CACHE_ENTRIES:
            self.cache.popitem(last=False)
        return torch.stack([self.cache[k] for k in keys])
