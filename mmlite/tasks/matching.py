"""Image-text matching as a task: data-world batches turned into labelled pairs, and their loss (chapters 3, 4.3).

The one place where the shapes world and the matching objective meet: `matching_pairs` decides, from the scene
itself, which texts are true of which image; `matching_loss` is the cross-entropy of a model on those pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmlite.data import caption_truth
from mmlite.objectives import itm_loss
from mmlite.text import Tokenizer


def _pad_cat(ids_a: Tensor, mask_a: Tensor, ids_b: Tensor, mask_b: Tensor, pad_id: int = 0
             ) -> tuple[Tensor, Tensor]:
    """Stack two padded id batches along the batch axis, padding both to the longer length."""
    t = max(ids_a.shape[1], ids_b.shape[1])
    pad = lambda x, v: nn.functional.pad(x, (0, t - x.shape[1]), value=v)  # noqa: E731  (B, t)
    return (torch.cat([pad(ids_a, pad_id), pad(ids_b, pad_id)]),  # (Ba + Bb, t)
            torch.cat([pad(mask_a, False), pad(mask_b, False)]))


def matching_pairs(batch: dict[str, Tensor], tokenizer: Tokenizer, generator: torch.Generator | None = None,
                   hard_fraction: float = 0.5) -> dict[str, Tensor]:
    """Turn a data-world batch of B images into 2B matching examples: B true pairs, then B false ones.

    Each image's false text is, with probability `hard_fraction`, its own hard-negative caption (same words,
    broken meaning: swapped attributes, swapped relation or a changed color; always false for the image),
    and otherwise the caption of another image of the batch (an easy negative). An easy negative can happen to
    be true of the image ("a red circle" fits many scenes), so its label comes from the scene itself through
    mmlite.data.caption_truth, never from where the caption came from.
    Returns image (2B,3,H,W), ids/mask (2B,T), label (2B,) and kind (2B,): -2 true pair, -1 easy negative,
    else the index of the hard negative's kind in NEGATIVE_KINDS.
    """
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"hard_fraction must be in [0, 1], got {hard_fraction}")
    b = batch["image"].shape[0]
    if b < 2:
        raise ValueError(f"matching_pairs needs a batch of at least 2 images, got {b}")
    hard = torch.rand(b, generator=generator) < hard_fraction  # (B,)
    other = (torch.arange(b) + torch.randint(1, b, (b,), generator=generator)) % b  # never the image itself
    neg_ids, neg_mask = _pad_cat(batch["negative_ids"], batch["negative_mask"],
                                 batch["caption_ids"][other], batch["caption_mask"][other])  # (2B, t)
    pick = torch.where(hard, torch.arange(b), torch.arange(b) + b)  # row of each image's false text
    neg_ids, neg_mask = neg_ids[pick], neg_mask[pick]  # (B, t)
    labels = torch.zeros(b, dtype=torch.long)
    for i in torch.nonzero(~hard).flatten().tolist():
        text = tokenizer.decode(batch["caption_ids"][int(other[i])])
        labels[i] = int(caption_truth(text, batch["objects"][i].numpy()) is True)
    ids, mask = _pad_cat(batch["caption_ids"], batch["caption_mask"], neg_ids, neg_mask)  # (2B, T)
    return {
        "image": torch.cat([batch["image"], batch["image"]]),  # (2B, 3, H, W)
        "ids": ids, "mask": mask,
        "label": torch.cat([torch.ones(b, dtype=torch.long), labels]),  # (2B,)
        "kind": torch.cat([torch.full((b,), -2), torch.where(hard, batch["negative_kind"], -1)]),  # (2B,)
    }


def pair_loss(model: nn.Module, pairs: dict[str, Tensor]) -> Tensor:
    """Cross-entropy of match / no match of `model`'s logits on pairs made by `matching_pairs` (on the model's device)."""
    return itm_loss(model(pairs["image"], pairs["ids"], pairs["mask"]), pairs["label"])


def matching_loss(model: nn.Module, batch: dict[str, Tensor], tokenizer: Tokenizer,
                  generator: torch.Generator | None = None, hard_fraction: float = 0.5) -> Tensor:
    """Cross-entropy of match / no match over the 2B pairs that `matching_pairs` makes from a (CPU) batch."""
    pairs = matching_pairs(batch, tokenizer, generator, hard_fraction)
    device = next(model.parameters()).device
    return pair_loss(model, {k: v.to(device) for k, v in pairs.items()})
