"""Patch embedding and the vision transformer encoder (derived in chapter 4.3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmlite.blocks import TransformerStack
from mmlite.encoders._checks import check_images
from mmlite.encoders.output import EncoderOutput, all_real
from mmlite.pooling import masked_mean

POOLS = ("cls", "mean")


class PatchEmbedding(nn.Module):
    """Cut the image into non-overlapping P x P patches and map each linearly to d_model.

    Written as a Conv2d with kernel_size = stride = P, which is exactly "unfold into P*P*C vectors, then
    one nn.Linear" (chapter 4.3 checks the two agree). (B, C, H, W) -> (B, (H/P)(W/P), d_model), patches
    in row-major order. Any H, W divisible by P is accepted here; the ViT fixes the size.
    """

    def __init__(self, image_size: int = 32, patch_size: int = 8, in_channels: int = 3, d_model: int = 64) -> None:
        super().__init__()
        if patch_size < 1 or image_size % patch_size != 0:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.d_model = d_model
        self.grid_size = image_size // patch_size  # patches per side
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, d_model, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, d_model)."""
        check_images(images, self.in_channels)
        for side, name in ((images.shape[2], "height"), (images.shape[3], "width")):
            if side % self.patch_size != 0:
                raise ValueError(f"images {name} is {side}, not divisible by patch_size {self.patch_size}")
        x = self.proj(images)  # (B, d_model, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, d_model)


class ViTEncoder(nn.Module):
    """[CLS] + patch embeddings + learned positions -> TransformerStack (pre-norm blocks, final LayerNorm).

    Images in [0, 1] are mapped to [-1, 1] first, (x - 0.5) / 0.5, like CNNEncoder.
    forward returns EncoderOutput: tokens are the N patch outputs (B, N, d_model), row-major over the grid;
    pooled (B, d_model) is the class token's output (pool="cls") or the mean of the patch tokens (pool="mean").
    """

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 8,
        d_model: int = 64,
        depth: int = 4,
        n_heads: int = 4,
        pool: str = "cls",
        in_channels: int = 3,
        ff_hidden: int | None = None,
        dropout: float = 0.0,
        impl: str = "scratch",
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.image_size = image_size
        self.d_model = d_model
        self.pool = pool
        self.patch_embed = PatchEmbedding(image_size, patch_size, in_channels, d_model)
        self.grid_size = self.patch_embed.grid_size  # patches per side (for attention overlays)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))  # (1, 1, D)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.patch_embed.num_patches, d_model) * 0.02)  # (1, 1+N, D)
        self.drop = nn.Dropout(dropout)
        self.stack = TransformerStack(d_model, depth, n_heads, ff_hidden=ff_hidden, dropout=dropout, impl=impl)

    def forward(self, images: Tensor) -> EncoderOutput:
        """(B, C, image_size, image_size) in [0, 1] -> EncoderOutput(patch tokens (B, N, d_model), mask, pooled)."""
        check_images(images, self.patch_embed.in_channels)
        if tuple(images.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"images spatial size is {tuple(images.shape[2:])} but the ViT was built for "
                f"image_size={self.image_size} (its positional embedding has one entry per patch)"
            )
        x = self.patch_embed((images - 0.5) / 0.5)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = self.stack(self.drop(torch.cat([cls, x], dim=1) + self.pos_embed))  # (B, 1+N, D)
        patches = x[:, 1:]  # (B, N, D)
        pooled = x[:, 0] if self.pool == "cls" else masked_mean(patches)  # (B, D)
        return EncoderOutput(patches, all_real(patches), pooled)
