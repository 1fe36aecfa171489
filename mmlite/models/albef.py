"""The complete image-text model, ALBEF/BLIP-style: dual encoder, fusion encoder, VQA head, caption decoder (chapter 5).

    image  -> image encoder (CNN or ViT) -> image tokens (B, N, d) --------------+----------------+
    text   -> text encoder (transformer) -> text tokens (B, T, d)                |                |
    ITC:   pooled image / text -> projections W_I, W_T -> unit vectors -> InfoNCE  |                |
    fusion encoder: text tokens attend to themselves, then to the image tokens <--+                |
        ITM head (match / no match) on the fused first token                                      |
        MLM head (every position) on the fused tokens of a masked caption                         |
        VQA head (answer classes) on the fused first token of a question                          |
    caption decoder: causal self-attention + cross-attention to the image tokens <----------------+

Each head is small; the losses that train them live in mmlite.tasks.albef, their weights in its ALBEFObjectives.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mmlite.alignment import AlignmentHead
from mmlite.blocks import TransformerStack
from mmlite.encoders import CNNEncoder, EncoderOutput, TransformerTextEncoder, ViTEncoder
from mmlite.encoders.cnn import NORMS
from mmlite.models.caption import TextDecoder
from mmlite.objectives import LogitScale

IMAGE_ENCODERS = ("cnn", "vit")


@dataclass
class ALBEFConfig:
    vocab_size: int  # tokenizer size (len(tokenizer))
    n_answers: int  # VQA answer classes (len(mmlite.data.ANSWERS) for the shapes world)
    pad_id: int = 0  # id of [PAD]
    image_size: int = 32  # side of the square input images
    image_encoder: str = "cnn"  # "cnn" (a grid of region tokens; fast on a CPU) or "vit" (patch tokens)
    cnn_width: int = 32  # channels of the CNN's first stage
    cnn_depth: int = 3  # stride-2 stages of the CNN: 32x32 -> a 4x4 grid of region tokens
    cnn_norm: str = "batch"  # the CNN's normalisation: "batch", "group" (rank-independent under DDP) or "none"
    patch_size: int = 8  # ViT patch side (image_size must be a multiple of it)
    vit_depth: int = 4  # ViT blocks
    d_model: int = 64  # token width of every encoder, the fusion encoder and the decoder
    n_heads: int = 4  # attention heads everywhere (d_model must be a multiple of it)
    text_depth: int = 2  # text encoder blocks
    fusion_depth: int = 2  # fusion encoder blocks (self-attention, cross-attention to the image, feed-forward)
    decoder_depth: int = 2  # caption decoder blocks (causal self-attention, cross-attention, feed-forward)
    d_embed: int = 64  # width of the shared image-text space of ITC
    max_len: int = 32  # longest token sequence the text encoder and the decoder take
    dropout: float = 0.0  # dropout in every transformer block

    def __post_init__(self) -> None:
        if self.cnn_norm not in NORMS:
            raise ValueError(f"cnn_norm must be one of {NORMS}, got {self.cnn_norm!r}")
        if self.image_encoder not in IMAGE_ENCODERS:
            raise ValueError(f"image_encoder must be one of {IMAGE_ENCODERS}, got {self.image_encoder!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"ALBEFConfig.{f.name} must be an int, got {type(value).__name__} {value!r}")
        for name in ("vocab_size", "n_answers", "image_size", "cnn_width", "cnn_depth", "patch_size", "vit_depth",
                     "d_model", "n_heads", "text_depth", "fusion_depth", "decoder_depth", "d_embed", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"ALBEFConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"ALBEFConfig.pad_id {self.pad_id} is outside [0, vocab_size={self.vocab_size})")
        if self.d_model % self.n_heads:
            raise ValueError(f"ALBEFConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.image_encoder == "vit" and self.image_size % self.patch_size:
            raise ValueError(f"ALBEFConfig.image_size={self.image_size} is not divisible by "
                             f"patch_size={self.patch_size}")
        if self.image_encoder == "cnn" and self.image_size % 2**self.cnn_depth:
            raise ValueError(f"ALBEFConfig.image_size={self.image_size} is not a multiple of 2**cnn_depth="
                             f"{2**self.cnn_depth}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ALBEFConfig.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ALBEF(nn.Module):
    """The encoders, the fusion encoder and the heads of the module docstring; each method is one path."""

    def __init__(self, cfg: ALBEFConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        if cfg.image_encoder == "cnn":
            self.image_encoder: nn.Module = CNNEncoder(width=cfg.cnn_width, d_model=d, depth=cfg.cnn_depth,
                                                       norm=cfg.cnn_norm)
        else:
            self.image_encoder = ViTEncoder(cfg.image_size, cfg.patch_size, d_model=d, depth=cfg.vit_depth,
                                            n_heads=cfg.n_heads, pool="mean", dropout=cfg.dropout)
        # pool="first": the caption's [BOS] (position 0) plays BERT's [CLS] for ITC, ITM and VQA
        self.text_encoder = TransformerTextEncoder(cfg.vocab_size, d_model=d, depth=cfg.text_depth,
                                                   n_heads=cfg.n_heads, max_len=cfg.max_len, pad_id=cfg.pad_id,
                                                   pool="first", dropout=cfg.dropout)
        self.image_proj = AlignmentHead(d, cfg.d_embed)  # W_I, then L2 normalisation
        self.text_proj = AlignmentHead(d, cfg.d_embed)  # W_T, then L2 normalisation
        self.logit_scale = LogitScale()  # exp(t), t_0 = ln(1/0.07), clamped at ln 100 after each step
        self.fusion = TransformerStack(d, cfg.fusion_depth, cfg.n_heads, dropout=cfg.dropout, d_context=d)
        self.itm_head = nn.Linear(d, 2)  # class 1 = the text matches the image
        self.mlm_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d), nn.Linear(d, cfg.vocab_size))
        self.vqa_head = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, cfg.n_answers))
        self.decoder = TextDecoder(cfg.vocab_size, d_model=d, depth=cfg.decoder_depth, n_heads=cfg.n_heads,
                                   max_len=cfg.max_len, d_context=d, dropout=cfg.dropout, pad_id=cfg.pad_id)

    # ------------------------------------------------------------------ unimodal paths
    def encode_image(self, images: Tensor) -> EncoderOutput:
        """(B, 3, H, W) in [0, 1] -> EncoderOutput(tokens (B, N, d), mask (B, N), pooled (B, d))."""
        return self.image_encoder(images)

    def encode_text(self, ids: Tensor, mask: Tensor) -> EncoderOutput:
        """ids, mask (B, T) -> EncoderOutput(tokens (B, T, d), mask, pooled = the output at [BOS] (B, d))."""
        return self.text_encoder(ids, mask)

    def image_embedding(self, image: EncoderOutput) -> Tensor:
        """Unit vectors of ITC's shared space, (B, d_embed)."""
        return self.image_proj(image.pooled)

    def text_embedding(self, text: EncoderOutput) -> Tensor:
        """Unit vectors of ITC's shared space, (B, d_embed)."""
        return self.text_proj(text.pooled)

    # ------------------------------------------------------------------ multimodal paths
    def fuse(self, text: EncoderOutput, image: EncoderOutput) -> Tensor:
        """Text tokens (B, T, d) attend to themselves and to the image tokens (B, N, d) -> fused tokens (B, T, d)."""
        if text.tokens.shape[0] != image.tokens.shape[0]:
            raise ValueError(f"fuse needs one image per text: {image.tokens.shape[0]} images, "
                             f"{text.tokens.shape[0]} texts")
        return self.fusion(text.tokens, mask=text.mask, context=image.tokens, context_mask=image.mask)

    def itm_logits(self, fused: Tensor) -> Tensor:
        """Fused tokens (B, T, d) -> match logits (B, 2) from the first position."""
        return self.itm_head(fused[:, 0])

    def mlm_logits(self, fused: Tensor) -> Tensor:
        """Fused tokens (B, T, d) -> vocabulary logits (B, T, V) at every position."""
        return self.mlm_head(fused)

    def vqa_logits(self, fused: Tensor) -> Tensor:
        """Fused question tokens (B, T, d) -> answer logits (B, n_answers) from the first position."""
        return self.vqa_head(fused[:, 0])

    def caption_logits(self, image: EncoderOutput, ids: Tensor, mask: Tensor) -> Tensor:
        """Teacher forcing: decoder inputs ids, mask (B, T) over the image tokens -> next-token logits (B, T, V)."""
        return self.decoder(ids, mask, context=image.tokens, context_mask=image.mask)

    # ------------------------------------------------------------------ inference helpers
    @torch.no_grad()
    def match_probability(self, images: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """P(match) of each (image b, text b) pair, (B,)."""
        fused = self.fuse(self.encode_text(ids, mask), self.encode_image(images))
        return torch.softmax(self.itm_logits(fused).float(), dim=-1)[:, 1]

    @torch.no_grad()
    def answer(self, images: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """Answer-class probabilities (B, n_answers) of question b about image b."""
        fused = self.fuse(self.encode_text(ids, mask), self.encode_image(images))
        return torch.softmax(self.vqa_logits(fused).float(), dim=-1)
