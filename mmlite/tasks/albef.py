"""The complete model's pre-training task: one batch of the world through ITC, ITM, MLM, VQA and captioning (chapter 5).

    loss = w_itc L_itc + w_itm L_itm + w_mlm L_mlm + w_vqa L_vqa + w_caption L_caption

Every weight can be 0, which switches the term off (its forward pass is skipped), so the same task trains a
pure dual encoder (itc only) or the whole model. The image is encoded once per batch and shared by all terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmlite.encoders import EncoderOutput
from mmlite.metrics.retrieval import truth_matrix
from mmlite.objectives import (caption_loss, contrastive_loss, cross_entropy, itm_loss, mask_tokens, mlm_loss,
                               sample_hard_negatives, shift_for_lm)
from mmlite.text import Tokenizer

TERMS = ("itc", "itm", "mlm", "vqa", "caption")
FALSE_NEGATIVES = ("truth", "image", "none")


@dataclass
class ALBEFObjectives:
    itc: float = 1.0  # weight of the image-text contrastive loss (0 switches a term off)
    itm: float = 1.0  # weight of image-text matching on hard negatives drawn from the ITC similarities
    mlm: float = 1.0  # weight of masked language modelling conditioned on the image
    vqa: float = 1.0  # weight of answer classification from the fused question-image tokens
    caption: float = 1.0  # weight of the caption decoder's next-token loss
    mlm_prob: float = 0.15  # share of caption tokens MLM selects (of those 80% [MASK], 10% random, 10% kept)
    false_negatives: str = "truth"  # which in-batch pairs ITM may never draw as negatives: "truth" (the caption
    #   is true of the image, judged by the world: batch["truth"]), "image" (same image index), "none"
    gather: bool = False  # ITC over the features of every rank (torch.distributed); False on one process

    def __post_init__(self) -> None:
        for name in (*TERMS, "mlm_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"ALBEFObjectives.{name} must be a finite number, got {value!r}")
            if value < 0:
                raise ValueError(f"ALBEFObjectives.{name} must be >= 0, got {value}")
        if not any(getattr(self, t) > 0 for t in TERMS):
            raise ValueError(f"ALBEFObjectives: every weight is 0, nothing would be trained (terms {TERMS})")
        if not 0 < self.mlm_prob <= 1:
            raise ValueError(f"ALBEFObjectives.mlm_prob must be in (0, 1], got {self.mlm_prob}")
        if self.false_negatives not in FALSE_NEGATIVES:
            raise ValueError(f"ALBEFObjectives.false_negatives must be one of {FALSE_NEGATIVES}, "
                             f"got {self.false_negatives!r}")

    def active(self) -> tuple[str, ...]:
        return tuple(t for t in TERMS if getattr(self, t) > 0)


_NEEDS = {"itc": ("image", "caption_ids"), "itm": ("image", "caption_ids"), "mlm": ("image", "caption_ids"),
          "vqa": ("image", "question_ids", "answer"), "caption": ("image", "caption_ids")}


def add_truth(batch: dict[str, Tensor], tokenizer: Tokenizer, margin: int = 15) -> dict[str, Tensor]:
    """batch["truth"] (B, B) bool: caption j of the batch is true of scene i, judged by the world (on the CPU).

    Needs batch["objects"]; the captions are read back from their ids. `margin` is the world's relation margin.
    """
    if "objects" not in batch:
        raise KeyError("add_truth needs batch['objects'] (the scenes); a batch from disk has none: "
                       "use ALBEFObjectives(false_negatives='image')")
    texts = [tokenizer.decode(row) for row in batch["caption_ids"]]
    return {**batch, "truth": torch.from_numpy(truth_matrix(batch["objects"].cpu().numpy(), texts, margin))}


def _false_negatives(batch: dict[str, Tensor], kind: str) -> Tensor | None:
    """(B, B) bool, True where (image i, text j) must not be a negative pair, or None."""
    if kind == "none":
        return None
    if kind == "image":
        index = batch["image_index"]
        return index.unsqueeze(1) == index.unsqueeze(0)
    if "truth" not in batch:
        raise KeyError("ALBEFObjectives(false_negatives='truth') needs batch['truth']: make batches with "
                       "mmlite.tasks.add_truth, or choose false_negatives='image'")
    return batch["truth"].bool()


def _select(out: EncoderOutput, index: Tensor) -> EncoderOutput:
    return EncoderOutput(out.tokens[index], out.mask[index], None if out.pooled is None else out.pooled[index])


def itm_pairs(model: nn.Module, image: EncoderOutput, text: EncoderOutput, z_i: Tensor, z_t: Tensor,
              exclude: Tensor | None) -> tuple[Tensor, Tensor]:
    """ALBEF's ITM batch: B positives, then a hard negative text per image and a hard negative image per text,
    drawn with P proportional to softmax(scale * sim) over the pairs `exclude` allows. -> (logits (P, 2), labels (P,))."""
    b = z_i.shape[0]
    sim = model.logit_scale().detach() * (z_i @ z_t.T)  # (B, B)
    neg_text, neg_image = sample_hard_negatives(sim, exclude=exclude)  # (B,), (B,); -1 = no negative left
    own = torch.arange(b, device=z_i.device)
    keep_t, keep_i = neg_text >= 0, neg_image >= 0
    image_index = torch.cat([own, neg_image[keep_i], own[keep_t]])  # (P,)
    text_index = torch.cat([own, own[keep_i], neg_text[keep_t]])  # (P,)
    labels = torch.cat([torch.ones(b, dtype=torch.long, device=own.device),
                        own.new_zeros(int(keep_i.sum()) + int(keep_t.sum()))])
    fused = model.fuse(_select(text, text_index), _select(image, image_index))  # (P, T, d)
    return model.itm_logits(fused), labels


def albef_loss(model: nn.Module, batch: dict[str, Tensor], objectives: ALBEFObjectives,
               tokenizer: Tokenizer) -> dict[str, Tensor]:
    """{"loss": the weighted sum, "itc": ..., ...} for one batch on the model's device (terms with weight 0 absent).

    Random draws (hard negatives, MLM masks) use torch's global generator, which checkpoints store and restore.
    """
    for term in objectives.active():
        missing = [k for k in _NEEDS[term] if k not in batch]
        if missing:
            raise KeyError(f"objective {term!r} needs batch keys {missing}; switch it off with weight 0")
    w = {t: getattr(objectives, t) for t in objectives.active()}
    image = model.encode_image(batch["image"])  # tokens (B, N, d)
    terms: dict[str, Tensor] = {}
    ids, mask = batch["caption_ids"], batch["caption_mask"]
    if "itc" in w or "itm" in w:
        text = model.encode_text(ids, mask)
        z_i, z_t = model.image_embedding(image), model.text_embedding(text)  # (B, d_embed) unit vectors
        if "itc" in w:
            terms["itc"] = contrastive_loss(z_i, z_t, model.logit_scale, gather=objectives.gather)
        if "itm" in w:
            logits, labels = itm_pairs(model, image, text, z_i.detach(), z_t.detach(),
                                       _false_negatives(batch, objectives.false_negatives))
            terms["itm"] = itm_loss(logits, labels)
    if "mlm" in w:
        specials = [tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.unk_id, tokenizer.bos_id,
                    tokenizer.eos_id]
        masked, labels = mask_tokens(ids, mask, tokenizer.mask_id, len(tokenizer), specials, objectives.mlm_prob)
        fused = model.fuse(model.encode_text(masked, mask), image)  # (B, T, d)
        terms["mlm"] = mlm_loss(model.mlm_logits(fused), labels)
    if "vqa" in w:
        fused = model.fuse(model.encode_text(batch["question_ids"], batch["question_mask"]), image)
        terms["vqa"] = cross_entropy(model.vqa_logits(fused), batch["answer"])
    if "caption" in w:
        lm = shift_for_lm(ids, mask)
        logits = model.caption_logits(image, lm.inputs, lm.input_mask)  # (B, T-1, V)
        terms["caption"] = caption_loss(logits, lm.targets, lm.target_mask)
    total = sum(w[t] * terms[t] for t in terms)
    return {"loss": total, **{t: v.detach() for t, v in terms.items()}}



class ALBEFPretraining(nn.Module):
    """The model and its objectives as one module whose forward(batch) is albef_loss: what the trainer trains.

    Under DistributedDataParallel the whole loss must run inside the wrapped module's forward (DDP syncs the
    gradients of what one forward computed), so the trainer wraps this, never the model's separate paths.
    Its state_dict is the model's with the prefix "model.".
    """

    def __init__(self, model: nn.Module, objectives: ALBEFObjectives, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.model = model
        self.objectives = objectives
        self.tokenizer = tokenizer

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return albef_loss(self.model, batch, self.objectives, self.tokenizer)

    def after_step(self) -> None:
        """Clamp the learnable temperature into its range (after every optimizer step)."""
        self.model.logit_scale.clamp_()
