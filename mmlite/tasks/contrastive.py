"""Contrastive image-text alignment as a task: a data-world batch through a dual encoder to CLIP's loss (chapters 2, 3)."""

from __future__ import annotations

from torch import Tensor, nn

from mmlite.objectives import contrastive_loss


def dual_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """CLIP's symmetric contrastive loss over a batch's (image, caption) pairs; the batch is on the model's device.

    `model(images, ids, mask)` returns (image embeddings, text embeddings) and has a `logit_scale`.
    """
    z_i, z_t = model(batch["image"], batch["caption_ids"], batch["caption_mask"])
    return contrastive_loss(z_i, z_t, model.logit_scale)
