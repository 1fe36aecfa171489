"""Scoring image-text pairs and the matching evaluation of chapters 3 and 4: accuracy, hard negatives, binding."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from mmlite.data import NEGATIVE_KINDS, Split, caption_truth
from mmlite.text import Tokenizer
from mmlite.train.modes import evaluating


def score_pairs(model: nn.Module, split: Split, owners: Sequence[int], texts: Sequence[str], tokenizer: Tokenizer,
                batch_size: int = 256, device: torch.device | str = "cpu") -> Tensor:
    """P(match) of each (image owners[k] of `split`, texts[k]) pair, in batches, without gradients: (len(texts),)."""
    if len(owners) != len(texts):
        raise ValueError(f"got {len(owners)} image indices but {len(texts)} texts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    probs = [torch.zeros(0)]
    with evaluating(model):  # eval mode and no autograd; the previous mode comes back even after an error
        for start in range(0, len(texts), batch_size):
            rows = list(owners[start:start + batch_size])
            ids, mask = tokenizer.encode_batch(list(texts[start:start + batch_size]), add_bos_eos=True, strict=True)
            images = split.image_tensor(rows).to(device)  # (b, 3, H, W)
            probs.append(model.match_probability(images, ids.to(device), mask.to(device)).float().cpu())
    return torch.cat(probs)


def evaluate_matching(model: nn.Module, split: Split, tokenizer: Tokenizer, batch_size: int = 256,
                      device: torch.device | str = "cpu") -> dict[str, float]:
    """Match accuracy of `model` on a split, in the ways that tell different failures apart.

    For every image i: its first caption (a true pair), the first caption of image i+1 when that caption is
    false for image i (an easy negative), and each of its hard negatives (kinds in NEGATIVE_KINDS).
    Returns
      accuracy   - mean of the true-pair and easy-negative accuracies (balanced, threshold 0.5);
      positive, easy - those two accuracies;  hard - rejection rate of all hard negatives;
      hard/<kind> - rejection rate per kind;  binding/<kind> - how often P(match) of the true caption a hard
      negative was edited from beats P(match) of that negative (same words or one colour apart, so only the
      arrangement differs; threshold-free, 0.5 is chance);
      n_images.
    """
    n = len(split)
    if len(split.negative_sources) != n:
        raise ValueError(f"split {split.name!r} has no negative_sources (a world cached by older code?)")
    texts, owners, groups = [], [], []  # one row per (image, text) pair to score
    for i in range(n):
        texts.append(split.captions[i][0]); owners.append(i); groups.append("positive")
        easy = split.captions[(i + 1) % n][0]
        if caption_truth(easy, split.objects[i]) is False:
            texts.append(easy); owners.append(i); groups.append("easy")
        for (caption, kind), source in zip(split.negatives[i], split.negative_sources[i]):
            texts.append(caption); owners.append(i); groups.append(kind)
            texts.append(source); owners.append(i); groups.append("source")
    p = score_pairs(model, split, owners, texts, tokenizer, batch_size, device)  # in eval mode, restored after
    is_group = {g: torch.tensor([x == g for x in groups]) for g in ["positive", "easy", *NEGATIVE_KINDS]}
    result = {"positive": (p[is_group["positive"]] > 0.5).float().mean().item(),
              "easy": (p[is_group["easy"]] <= 0.5).float().mean().item()}
    result["accuracy"] = (result["positive"] + result["easy"]) / 2
    hard = torch.zeros(len(p), dtype=torch.bool)
    for kind in NEGATIVE_KINDS:
        sel = is_group[kind]
        if sel.any():
            hard |= sel
            result[f"hard/{kind}"] = (p[sel] <= 0.5).float().mean().item()
            p_source = p[torch.nonzero(sel).flatten() + 1]  # each negative's source is scored right after it
            result[f"binding/{kind}"] = (p_source > p[sel]).float().mean().item()
    result["hard"] = (p[hard] <= 0.5).float().mean().item()
    result["n_images"] = float(n)
    return result
