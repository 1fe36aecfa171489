"""A small convolutional image encoder that returns a grid of region tokens (derived in chapter 3)."""

from __future__ import annotations

from torch import Tensor, nn

from mmlite.encoders._checks import check_images
from mmlite.encoders.output import EncoderOutput, all_real
from mmlite.pooling import masked_mean

NORMS = ("batch", "group", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    """The normalisation layer after each convolution."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


def _conv_norm_act(c_in: int, c_out: int, stride: int, norm: str) -> nn.Sequential:
    """3x3 convolution (bias only without a norm) + norm + ReLU."""
    conv = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=(norm == "none"))
    return nn.Sequential(conv, _norm(norm, c_out), nn.ReLU(inplace=True))


def _to_tokens(feature_map: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h*w, C), row-major over the grid (token k is at row k // w, column k % w)."""
    return feature_map.flatten(2).transpose(1, 2)  # (B, h*w, C)


class CNNEncoder(nn.Module):
    """Stages of [3x3 stride-2 conv, 3x3 conv], each halving the resolution, then a 1x1 projection to d_model.

    Images come in as floats in [0, 1] and are mapped to [-1, 1] inside (x - 0.5) / 0.5, so the data
    pipeline never needs per-dataset statistics. With depth stages, an S x S image gives an
    (S / 2**depth)^2 grid of tokens: 32x32 -> 4x4 and 64x64 -> 8x8 with depth=3.
    Channels per stage: width, 2*width, 2*width, ... (capped at 2*width to stay cheap on a CPU).
    """

    def __init__(
        self,
        in_channels: int = 3,
        width: int = 32,
        d_model: int = 64,
        depth: int = 3,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if min(in_channels, width, d_model, depth) < 1:
            raise ValueError(
                f"in_channels, width, d_model and depth must be positive, got "
                f"{in_channels}, {width}, {d_model}, {depth}"
            )
        self.in_channels = in_channels
        self.d_model = d_model
        self.depth = depth
        self.level_channels = [width * min(2**i, 2) for i in range(depth)]  # channels of each stage's map
        stages = []
        c_in = in_channels
        for c_out in self.level_channels:
            stages.append(nn.Sequential(_conv_norm_act(c_in, c_out, 2, norm), _conv_norm_act(c_out, c_out, 1, norm)))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.proj = nn.Conv2d(c_in, d_model, kernel_size=1)  # last map -> d_model region tokens

    def grid_size(self, image_size: int) -> int:
        """Side of the token grid for a square image: image_size / 2**depth."""
        stride = 2**self.depth
        if image_size < stride or image_size % stride != 0:
            raise ValueError(
                f"image_size {image_size} must be a positive multiple of 2**depth = {stride} "
                f"(depth={self.depth})"
            )
        return image_size // stride

    def level_grid_sizes(self, image_size: int) -> list[int]:
        """Grid side of every stage's map, finest first."""
        self.grid_size(image_size)
        return [image_size // 2 ** (i + 1) for i in range(self.depth)]

    def forward(self, images: Tensor, return_levels: bool = False
                ) -> EncoderOutput | tuple[EncoderOutput, list[Tensor]]:
        """images: (B, C, H, W) in [0, 1] -> EncoderOutput(tokens (B, h*w, d_model), mask all True, pooled).

        pooled is the mean of the region tokens, (B, d_model).

        With return_levels=True also returns every stage's map as tokens, finest first and before
        the projection: [(B, H/2 * W/2, level_channels[0]), (B, H/4 * W/4, level_channels[1]), ...]
        (a hierarchical fusion projects them to its own width).
        """
        check_images(images, self.in_channels)
        for side, name in ((images.shape[2], "height"), (images.shape[3], "width")):
            if side % 2**self.depth != 0:
                raise ValueError(
                    f"images {name} is {side} but must be a multiple of 2**depth = {2**self.depth}"
                )
        x = (images - 0.5) / 0.5  # [0, 1] -> [-1, 1]
        levels = []
        for stage in self.stages:
            x = stage(x)  # (B, C_i, H / 2**(i+1), W / 2**(i+1))
            if return_levels:
                levels.append(_to_tokens(x))  # (B, h_i*w_i, C_i)
        tokens = _to_tokens(self.proj(x))  # (B, h*w, d_model)
        out = EncoderOutput(tokens, all_real(tokens), masked_mean(tokens))
        return (out, levels) if return_levels else out
