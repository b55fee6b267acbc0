"""ViT image tower (timm): any resolution that is a multiple of the patch size, token
sub-sampling at train time, and max / avg / cls aggregation over a projected dense map."""

from __future__ import annotations

import timm
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from clippy_ray.config import ImageConfig
from clippy_ray.errors import InputError
from clippy_ray.model.layers import DeviceKernels, swap_layers


def aggregate(patches: torch.Tensor, cls: torch.Tensor | None, mode: str) -> torch.Tensor:
    """patches [N, K, E] (projected), cls [N, E] (projected) -> [N, E]."""
    if mode == "max":  # CLIPpy: the gradient lands on one location per channel
        return patches.amax(dim=1)
    if mode == "avg":
        return patches.mean(dim=1)
    if mode == "cls":
        if cls is None:
            raise ValueError("aggregation 'cls' needs a ViT with a class token")
        return cls
    raise ValueError(f"unknown aggregation {mode!r}; expected max, avg or cls")


def keep_random_tokens(tokens: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep `keep` random tokens of each row, a different subset per image. [N, L, D] -> [N, keep, D]."""
    n, length, dim = tokens.shape
    if keep >= length:
        return tokens
    idx = torch.rand(n, length, device=tokens.device).argsort(dim=1)[:, :keep]
    return tokens.gather(1, idx.unsqueeze(-1).expand(n, keep, dim))


def _create_vit(cfg: ImageConfig, img_size: int) -> nn.Module:
    """The timm ViT the config names, its position embeddings on the grid of `img_size` (any input
    size runs: dynamic_img_size resamples them to the input's grid)."""
    try:
        return timm.create_model(
            cfg.name, pretrained=False, num_classes=0, dynamic_img_size=True, img_size=img_size, **cfg.timm_kwargs
        )
    except (RuntimeError, TypeError) as err:
        raise InputError(f"model.image.name={cfg.name!r} with timm_kwargs={cfg.timm_kwargs}: {err}") from None


def freeze_vit(vit: nn.Module, blocks: int) -> int:
    """Stop training the embeddings and the first `blocks` blocks of a timm ViT (-1: all of it, its
    final norm too) -> the number of blocks frozen. Nothing before the first trained block then
    needs a gradient, so autograd records none of it: those blocks cost a forward only."""
    if blocks == 0:
        return 0
    depth = len(vit.blocks)
    if blocks > depth:
        raise InputError(f"model.image.frozen_blocks={blocks}: the ViT has {depth} blocks (use -1 for all of it)")
    blocks = depth if blocks == -1 else blocks
    for name, param in vit.named_parameters():
        top = name.split(".")[0]
        if top == "blocks":
            param.requires_grad_(int(name.split(".")[1]) >= blocks)
        elif top in ("norm", "fc_norm", "head", "head_drop"):
            param.requires_grad_(blocks < depth)
        else:  # patch_embed, pos_embed, cls_token, reg_token, norm_pre
            param.requires_grad_(False)
    return blocks


class ImageTower(DeviceKernels):
    def __init__(
        self,
        cfg: ImageConfig,
        embed_dim: int,
        aggregation: str = "max",
        keep_ratio: float | None = None,
        keep_count: int | None = None,
    ):
        super().__init__()
        self.vit = _create_vit(cfg, cfg.img_size)
        if cfg.pos_embed_grid:  # built again with the position embeddings of that grid
            self.vit = _create_vit(cfg, cfg.pos_embed_grid * self.vit.patch_embed.patch_size[0])
        self.grad_checkpointing = cfg.grad_checkpointing
        if not all(hasattr(self.vit, a) for a in ("patch_embed", "_pos_embed", "blocks", "norm")):
            raise InputError(f"model.image.name={cfg.name!r} is not a timm VisionTransformer")
        if aggregation == "cls" and getattr(self.vit, "cls_token", None) is None:
            raise InputError(f"model.aggregation='cls' but {cfg.name!r} has no class token")
        swap_layers(self.vit)  # patch embedding as a matmul, cheaper CPU dropout
        self.patch_size = tuple(self.vit.patch_embed.patch_size)
        self.num_prefix = self.vit.num_prefix_tokens
        self.has_cls = getattr(self.vit, "cls_token", None) is not None
        self.aggregation = aggregation
        self.keep_ratio = keep_ratio
        self.keep_count = keep_count
        self.proj = nn.Linear(self.vit.embed_dim, embed_dim, bias=False)
        self.frozen_blocks = freeze_vit(self.vit, cfg.frozen_blocks)
        self._kernels_for(self.proj.weight.device)  # the device it was built on

    def grid(self, images: torch.Tensor) -> tuple[int, int]:
        h, w = images.shape[-2:]
        ph, pw = self.patch_size
        if h % ph or w % pw:
            raise InputError(
                f"image size {h}x{w} is not a multiple of the patch size {ph}x{pw}; "
                f"resize to e.g. {h // ph * ph}x{w // pw * pw}"
            )
        return h // ph, w // pw

    def _num_keep(self, length: int) -> int:
        if self.keep_count is not None:
            return min(self.keep_count, length)
        if self.keep_ratio is not None:
            return max(1, min(length, round(length * self.keep_ratio)))
        return length

    def _encode(self, images: torch.Tensor, subsample: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """-> projected class token [N, E] (or None) and projected patch tokens [N, K, E]."""
        vit = self.vit
        x = vit.patch_embed(images)  # [N, H, W, D] (dynamic_img_size keeps the grid)
        x = vit._pos_embed(x)  # [N, P + H*W, D]: position embeddings interpolated, added before any drop
        prefix, patches = x[:, : self.num_prefix], x[:, self.num_prefix :]
        if subsample:
            patches = keep_random_tokens(patches, self._num_keep(patches.shape[1]))
        x = torch.cat([prefix, patches], dim=1)
        x = vit.norm_pre(x)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            for block in vit.blocks:  # each block's activations recomputed in the backward (same RNG)
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = vit.blocks(x)
        x = vit.norm(x)
        cls = self.proj(x[:, 0]) if self.has_cls else None
        return cls, self.proj(x[:, self.num_prefix :])

    def _kernels_for(self, device: torch.device) -> None:
        """timm's fused attention runs the flash-attention kernel; on a CPU its explicit
        softmax(q k^T) v, batched matmuls that use AMX / AVX-512, is several times faster forward
        and backward (bench/throughput.py). Same math either way."""
        fused = device.type != "cpu"
        for module in self.vit.modules():
            if getattr(module, "fused_attn", fused) != fused:
                module.fused_attn = fused

    def forward_dense(self, images: torch.Tensor) -> torch.Tensor:
        """Per-location projected features, no sub-sampling: [N, 3, H*p, W*p] -> [N, H, W, E]."""
        h, w = self.grid(images)
        _, patches = self._encode(images, subsample=False)
        return patches.reshape(images.shape[0], h, w, -1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Aggregated image embedding [N, E] (not normalized). Sub-samples tokens in train mode."""
        self.grid(images)
        cls, patches = self._encode(images, subsample=self.training)
        return aggregate(patches, cls, self.aggregation)
