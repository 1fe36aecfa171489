"""Embedding a whole split with a dual encoder, for retrieval and the modality gap (chapters 2, 3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmlite.data import Split
from mmlite.text import Tokenizer
from mmlite.train import model_device
from mmlite.train.modes import evaluating


def embed_split(model: nn.Module, split: Split, tokenizer: Tokenizer, caption: int = 0,
                batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """Unit embeddings of every image of a split and of its caption number `caption`: ((N, d), (N, d)) on the CPU."""
    device = model_device(model)
    z_i, z_t = [], []
    with evaluating(model):  # eval mode and no autograd; the previous mode comes back even after an error
        for start in range(0, len(split), batch_size):
            rows = list(range(start, min(start + batch_size, len(split))))
            ids, mask = tokenizer.encode_batch([split.captions[i][caption] for i in rows], add_bos_eos=True,
                                               strict=True)
            z_i.append(model.encode_image(split.image_tensor(rows).to(device)).cpu())
            z_t.append(model.encode_text(ids.to(device), mask.to(device)).cpu())
    return torch.cat(z_i), torch.cat(z_t)
