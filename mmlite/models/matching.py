"""Image-text matching: image encoder, text encoder, a fusion strategy and a match classifier (chapters 3, 4.3).

The seed article's worked case: a CNN extracts image features; word embeddings and an RNN extract text
features; cross-attention lets each attend to the other; the attention outputs are added to the original
features and passed through a feed-forward network; the two fused representations are concatenated and
classified as match / no match. `fusion` swaps the middle step for any strategy of mmlite.fusion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor, nn

from mmlite.encoders import CNNEncoder, GRUTextEncoder, TransformerTextEncoder, ViTEncoder
from mmlite.fusion import FUSIONS, make_fusion
from mmlite.text import Tokenizer
from mmlite.train.modes import evaluating

if TYPE_CHECKING:
    from mmlite.data import Split
    from mmlite.train import FitConfig, History

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
            self.text_encoder = GRUTextEncoder(cfg.vocab_size, d_embed=d, d_model=d, pad_id=cfg.pad_id)
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
        self.classifier = nn.Sequential(nn.Linear(self.fusion.out_dim, cfg.hidden), nn.GELU(),
                                        nn.Linear(cfg.hidden, cfg.n_classes))

    def image_tokens(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> region tokens (B, N, d_model) (the ViT's class token is dropped)."""
        tokens = self.image_encoder(images)
        return tokens[:, 1:] if self.cfg.image_encoder == "vit" else tokens  # (B, N, d_model)

    def forward(self, images: Tensor, ids: Tensor, mask: Tensor, return_weights: bool = False
                ) -> Tensor | tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Logits (B, n_classes); with return_weights (cross-attention fusion only) also its attention maps."""
        if return_weights and self.cfg.fusion != "cross_attention":
            raise ValueError(f"return_weights needs fusion='cross_attention', this model uses {self.cfg.fusion!r}")
        if self.cfg.fusion == "hierarchical":
            tokens, levels = self.image_encoder(images, return_levels=True)
            mid = levels[-2] if len(levels) > 1 else levels[0]  # (B, h*w, C_mid)
            words = self.text_encoder.embed(ids)  # (B, T, d_model)
            text, _ = self.text_encoder(ids, mask)  # (B, T, d_model)
            fused = self.fusion([mid, tokens], [words, text], text_mask=mask)
            return self.classifier(fused)
        image = self.image_tokens(images)
        text, _ = self.text_encoder(ids, mask)  # (B, T, d_model)
        if return_weights:
            fused, weights = self.fusion(image, text, text_mask=mask, return_weights=True)
            return self.classifier(fused), weights
        return self.classifier(self.fusion(image, text, text_mask=mask))

    def match_probability(self, images: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """P(match) per pair, (B,)."""
        return torch.softmax(self.forward(images, ids, mask), dim=-1)[:, 1]


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
    from mmlite.data import caption_truth

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


def score_pairs(model: MatchingModel, split: "Split", owners: Sequence[int], texts: Sequence[str], tokenizer: Tokenizer,
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


def evaluate_matching(model: MatchingModel, split: "Split", tokenizer: Tokenizer, batch_size: int = 256,
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
    from mmlite.data import NEGATIVE_KINDS, caption_truth

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


def matching_loss(model: MatchingModel, batch: dict[str, Tensor], tokenizer: Tokenizer,
                  generator: torch.Generator | None = None, hard_fraction: float = 0.5) -> Tensor:
    """Cross-entropy of match / no match over the 2B pairs that `matching_pairs` makes from a batch."""
    from mmlite.objectives import itm_loss

    pairs = matching_pairs(batch, tokenizer, generator, hard_fraction)
    device = next(model.parameters()).device
    logits = model(pairs["image"].to(device), pairs["ids"].to(device), pairs["mask"].to(device))
    return itm_loss(logits, pairs["label"].to(device))


def train_matching(model: MatchingModel, split: "Split", tokenizer: Tokenizer, cfg: "FitConfig",
                   batch_size: int = 64, hard_fraction: float = 0.5, seed: int = 0) -> "History":
    """Train `model` on a split's images with true pairs, hard negatives and easy negatives; returns the History."""
    from mmlite.data import make_loader
    from mmlite.train import cycle, fit

    loader = make_loader(split, tokenizer, batch_size=batch_size, shuffle=True, seed=seed, drop_last=True)
    generator = torch.Generator().manual_seed(seed)
    return fit(model, cycle(loader), lambda m, b: matching_loss(m, b, tokenizer, generator, hard_fraction), cfg)
