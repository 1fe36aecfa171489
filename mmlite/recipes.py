"""Training recipes: a model, a split and a task's loss put through the trainer (chapters 2-4).

Each recipe makes the loader (a seeded epoch order), does the CPU side of its task there (making matching pairs
needs the scenes), and lets `fit` move the batches to the model's device.
"""

from __future__ import annotations

import torch
from torch import nn

from mmlite.data import Split, make_loader
from mmlite.tasks import dual_loss, matching_pairs, pair_loss
from mmlite.text import Tokenizer
from mmlite.train import FitConfig, History, cycle, fit


def train_matching(model: nn.Module, split: Split, tokenizer: Tokenizer, cfg: FitConfig, batch_size: int = 64,
                   hard_fraction: float = 0.5, seed: int = 0) -> History:
    """Train a matching model on a split's images with true pairs, hard negatives and easy negatives."""
    loader = make_loader(split, tokenizer, batch_size=batch_size, shuffle=True, seed=seed, drop_last=True)
    generator = torch.Generator().manual_seed(seed)
    pairs = (matching_pairs(batch, tokenizer, generator, hard_fraction) for batch in cycle(loader))
    return fit(model, pairs, pair_loss, cfg)


def train_dual_encoder(model: nn.Module, split: Split, tokenizer: Tokenizer, cfg: FitConfig, batch_size: int = 64,
                       seed: int = 0) -> History:
    """Contrastive training on a split (a random caption per image each epoch); clamps the logit scale per step."""
    loader = make_loader(split, tokenizer, batch_size=batch_size, shuffle=True, seed=seed, drop_last=True)
    return fit(model, cycle(loader), dual_loss, cfg, after_step=lambda m: m.logit_scale.clamp_())
