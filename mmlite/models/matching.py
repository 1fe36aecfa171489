"""Image-text matching: image encoder, text encoder, a fusion strategy and a match classifier (chapters 3, 4.3).

The seed article's worked case: a CNN extracts image features; word embeddings and an RNN extract text
features; cross-attention lets each attend to the other; the attention outputs are added to the original
features and passed through a feed-forward network; the two fused representations are concatenated and
classified as match / no match. `fusion` swaps the middle step for any strategy of mmlite.fusion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmlite.encoders import CNNEncoder, GRUTextEncoder, TransformerTextEncoder, ViTEncoder
from mmlite.fusion import FUSIONS, make_fusion

IMAGE_ENCODERS = ("cnn", "vit")
TEXT_ENCODERS = ("gru", "transformer")


@dataclass
class MatchingConfig:
    vocab_size: int  # tokenizer size (len(tokenizer))
    pad_id: int = 0  # id of [PAD]
    image_size: int = 32  # side of the square input images
    d_model: int = 64  # width of both encoders' tokens
    image_encoder: str = "cnn"  # "cnn" (a grid of region tokens) or "vit" (patch tokens)
    cnn_width: int = 32  # channels of the CNN's first stage
    cnn_depth: int = 3  # stride-2 stages: 32x32 -> 4x4 region grid
    patch_size: int = 8  # ViT patch side
    text_encoder: str = "gru"  # "gru" (word embeddings + GRU) or "transformer"
    text_depth: int = 2  # transformer text encoder blocks (ignored by the GRU)
    fusion: str = "cross_attention"  # one of mmlite.fusion.FUSIONS
    n_heads: int = 4  # attention heads (cross-attention fusion, transformers)
    fusion_layers: int = 1  # co-attention layers of the cross-attention fusion
    hidden: int = 64  # classifier hidden width
    n_classes: int = 2  # match / no match

    def __post_init__(self) -> None:
        for name, value, allowed in (("image_encoder", self.image_encoder, IMAGE_ENCODERS),
                                     ("text_encoder", self.text_encoder, TEXT_ENCODERS),
                                     ("fusion", self.fusion, tuple(FUSIONS))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.fusion == "hierarchical" and self.image_encoder != "cnn":
            raise ValueError("fusion='hierarchical' needs image_encoder='cnn' (it fuses the CNN's stages)")
        for name in ("vocab_size", "image_size", "d_model", "hidden", "n_classes", "n_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class MatchingModel(nn.Module):
    """forward(images (B,3,H,W), ids (B,T), mask (B,T)) -> logits (B, n_classes); class 1 = "the text matches"."""

    def __init__(self, cfg: MatchingConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        if cfg.image_encoder == "cnn":
            self.image_encoder = CNNEncoder(width=cfg.cnn_width, d_model=d, depth=cfg.cnn_depth)
        else:
            self.image_encoder = ViTEncoder(cfg.image_size, cfg.patch_size, d_model=d, depth=2, n_heads=cfg.n_heads)
        if cfg.text_encoder == "gru":
            self.text_encoder = GRUTextEncoder(cfg.vocab_size, d_word=d, d_model=d, pad_id=cfg.pad_id)
        else:
            self.text_encoder = TransformerTextEncoder(cfg.vocab_size, d_model=d, depth=cfg.text_depth,
                                                       n_heads=cfg.n_heads, pad_id=cfg.pad_id, pool="none")
        if cfg.fusion == "hierarchical":
            # two levels: the CNN's middle stage with the word embeddings, its output with the text encoder's
            mid = self.image_encoder.level_channels[-2] if cfg.cnn_depth > 1 else self.image_encoder.level_channels[0]
            self.fusion = make_fusion("hierarchical", dims_image=[mid, d], dims_text=[d, d], d_out=2 * d)
        elif cfg.fusion == "cross_attention":
            self.fusion = make_fusion("cross_attention", d_image=d, d_text=d, d_model=d, n_heads=cfg.n_heads,
                                      layers=cfg.fusion_layers)
        else:
            self.fusion = make_fusion(cfg.fusion, d_image=d, d_text=d, d_out=2 * d)
        self.classifier = nn.Sequential(nn.Linear(self.fusion.d_out, cfg.hidden), nn.GELU(),
                                        nn.Linear(cfg.hidden, cfg.n_classes))

    def image_tokens(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> region or patch tokens (B, N, d_model)."""
        return self.image_encoder(images).tokens

    def forward(self, images: Tensor, ids: Tensor, mask: Tensor, return_weights: bool = False
                ) -> Tensor | tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Logits (B, n_classes); with return_weights (cross-attention fusion only) also its attention maps."""
        if return_weights and self.cfg.fusion != "cross_attention":
            raise ValueError(f"return_weights needs fusion='cross_attention', this model uses {self.cfg.fusion!r}")
        if self.cfg.fusion == "hierarchical":
            image, levels = self.image_encoder(images, return_levels=True)
            mid = levels[-2] if len(levels) > 1 else levels[0]  # (B, h*w, C_mid)
            words = self.text_encoder.embed(ids)  # (B, T, d_model)
            text = self.text_encoder(ids, mask).tokens  # (B, T, d_model)
            fused = self.fusion([mid, image.tokens], [words, text], text_mask=mask)
            return self.classifier(fused)
        image = self.image_tokens(images)  # (B, N, d_model)
        text = self.text_encoder(ids, mask).tokens  # (B, T, d_model)
        if return_weights:
            fused, weights = self.fusion(image, text, text_mask=mask, return_weights=True)
            return self.classifier(fused), weights
        return self.classifier(self.fusion(image, text, text_mask=mask))

    def match_probability(self, images: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """P(match) per pair, (B,)."""
        return torch.softmax(self.forward(images, ids, mask), dim=-1)[:, 1]
