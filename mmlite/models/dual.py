"""A dual encoder: image and text encoders aligned in one shared space by CLIP's contrastive loss (chapters 2, 3)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mmlite.alignment import AlignmentHead
from mmlite.encoders import CNNEncoder, GRUTextEncoder
from mmlite.objectives import LogitScale, contrastive_loss
from mmlite.text import Tokenizer
from mmlite.train.modes import evaluating

if TYPE_CHECKING:
    from mmlite.data import Split
    from mmlite.train import FitConfig, History


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
        self.text_encoder = GRUTextEncoder(vocab_size, d_embed=d_model, d_model=d_model, pad_id=pad_id)
        self.image_head = AlignmentHead(d_model, d_embed)  # W_I, then L2 normalisation
        self.text_head = AlignmentHead(d_model, d_embed)  # W_T, then L2 normalisation
        self.logit_scale = LogitScale()  # exp(t), t initialised to ln(1/0.07), clamped at ln 100

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> unit vectors (B, d_embed)."""
        return self.image_head(self.image_encoder.pooled(images))

    def encode_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        """(B, T) ids and bool mask -> unit vectors (B, d_embed)."""
        return self.text_head(self.text_encoder(ids, mask)[1])

    def forward(self, images: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Both embeddings: ((B, d_embed), (B, d_embed))."""
        return self.encode_image(images), self.encode_text(ids, mask)


def dual_loss(model: DualEncoder, batch: dict[str, Tensor]) -> Tensor:
    """CLIP's symmetric contrastive loss over a data-world batch's (image, caption) pairs."""
    device = next(model.parameters()).device
    z_i, z_t = model(batch["image"].to(device), batch["caption_ids"].to(device), batch["caption_mask"].to(device))
    return contrastive_loss(z_i, z_t, model.logit_scale)


def train_dual_encoder(model: DualEncoder, split: "Split", tokenizer: Tokenizer, cfg: "FitConfig",
                       batch_size: int = 64, seed: int = 0) -> "History":
    """Contrastive training on a split (a random caption per image each epoch); clamps the logit scale per step."""
    from mmlite.data import make_loader
    from mmlite.train import cycle, fit

    loader = make_loader(split, tokenizer, batch_size=batch_size, shuffle=True, seed=seed, drop_last=True)
    return fit(model, cycle(loader), dual_loss, cfg, after_step=lambda m: m.logit_scale.clamp_())


def embed_split(model: DualEncoder, split: "Split", tokenizer: Tokenizer, caption: int = 0,
                batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """Unit embeddings of every image of a split and of its caption number `caption`: ((N, d), (N, d)) on the CPU."""
    device = next(model.parameters()).device
    z_i, z_t = [], []
    with evaluating(model):  # eval mode and no autograd; the previous mode comes back even after an error
        for start in range(0, len(split), batch_size):
            rows = list(range(start, min(start + batch_size, len(split))))
            ids, mask = tokenizer.encode_batch([split.captions[i][caption] for i in rows], add_bos_eos=True,
                                               strict=True)
            z_i.append(model.encode_image(split.image_tensor(rows).to(device)).cpu())
            z_t.append(model.encode_text(ids.to(device), mask.to(device)).cpu())
    return torch.cat(z_i), torch.cat(z_t)
