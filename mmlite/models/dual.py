"""A dual encoder: image and text encoders aligned in one shared space by CLIP's contrastive loss (chapters 2, 3)."""

from __future__ import annotations

from torch import Tensor, nn

from mmlite.alignment import AlignmentHead
from mmlite.encoders import CNNEncoder, GRUTextEncoder
from mmlite.objectives import LogitScale


class DualEncoder(nn.Module):
    """CNN image encoder and word embeddings + GRU text encoder, each followed by an alignment head
    (linear projection W_I or W_T, then L2 normalisation), and a learnable logit scale.

    encode_image: (B, 3, H, W) in [0, 1] -> unit vectors (B, d_embed), from the mean of the region tokens;
    encode_text: ids (B, T), mask (B, T) -> unit vectors (B, d_embed), from the GRU state at the last real token.
    """

    def __init__(self, vocab_size: int, d_model: int = 64, d_embed: int = 64, cnn_width: int = 16,
                 cnn_depth: int = 2, pad_id: int = 0) -> None:
        super().__init__()
        self.image_encoder = CNNEncoder(width=cnn_width, d_model=d_model, depth=cnn_depth)
        self.text_encoder = GRUTextEncoder(vocab_size, d_word=d_model, d_model=d_model, pad_id=pad_id)
        self.image_head = AlignmentHead(d_model, d_embed)  # W_I, then L2 normalisation
        self.text_head = AlignmentHead(d_model, d_embed)  # W_T, then L2 normalisation
        self.logit_scale = LogitScale()  # exp(t), t initialised to ln(1/0.07), clamped at ln 100

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> unit vectors (B, d_embed)."""
        return self.image_head(self.image_encoder(images).pooled)

    def encode_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        """(B, T) ids and bool mask -> unit vectors (B, d_embed)."""
        return self.text_head(self.text_encoder(ids, mask).pooled)

    def forward(self, images: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Both embeddings: ((B, d_embed), (B, d_embed))."""
        return self.encode_image(images), self.encode_text(ids, mask)
