"""Contrastive, image-text matching, masked LM and captioning LM objectives (derived in chapters 2, 3 and 4.2)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mmlite.alignment import l2_normalize
from mmlite.checks import check_tensors

IGNORE_INDEX = -100  # label of positions that no loss counts (F.cross_entropy's default ignore_index)


# --------------------------------------------------------------------------- cross-entropy
def cross_entropy(
    logits: Tensor,
    targets: Tensor,
    label_smoothing: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy from log-softmax, classes on the LAST axis: logits (..., C), targets (...) long.

    With smoothing e, the target distribution is (1 - e) one_hot(y) + e / C, so per position
        loss = -(1 - e) log p_y - (e / C) sum_c log p_c,   log p = logits - logsumexp(logits).
    Positions with target == ignore_index count neither in the sum nor in the mean's denominator.
    Same value as F.cross_entropy (with the class axis moved to dim 1), except that when every
    position is ignored the mean is 0 (with a zero gradient) instead of NaN.
    """
    check_tensors(logits=logits, targets=targets)
    if logits.dim() < 1 or targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal logits shape without its class axis, "
            f"{tuple(logits.shape[:-1])}"
        )
    if targets.dtype != torch.long:
        raise TypeError(f"targets must be a long tensor of class indices, got dtype {targets.dtype}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    n_classes = logits.shape[-1]
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    if bool(((safe_targets < 0) | (safe_targets >= n_classes)).any()):
        bad = safe_targets[(safe_targets < 0) | (safe_targets >= n_classes)][0].item()
        raise ValueError(f"targets contain class {bad}, outside [0, C={n_classes}) and not ignore_index")
    log_p = logits - torch.logsumexp(logits, dim=-1, keepdim=True)  # (..., C)
    nll = -log_p.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # (...)
    if label_smoothing > 0:
        smooth = -log_p.mean(dim=-1)  # (...): -(1/C) sum_c log p_c
        nll = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    nll = nll * valid.to(nll.dtype)
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / valid.sum().clamp_min(1).to(nll.dtype)


# --------------------------------------------------------------------------- contrastive (CLIP)
class LogitScale(nn.Module):
    """CLIP's learnable temperature: a parameter t with scale = exp(t), t_0 = ln(1/0.07) ~ 2.659.

    The scale is capped at exp(t_max) = 100 twice over: forward returns exp(min(t, t_max)), so the cap holds
    even if nobody clamps the parameter, and the gradient is exactly exp(t) below the cap (clamp passes
    gradients through inside its range); call `clamp_()` after each optimizer step, as open_clip does,
    so that t itself stays in [t_min, t_max] and can move back down once it reaches the cap.
    """

    def __init__(
        self, init: float = math.log(1 / 0.07), t_max: float = math.log(100.0), t_min: float = 0.0,
        learnable: bool = True,
    ) -> None:
        super().__init__()
        if not t_min <= init <= t_max:
            raise ValueError(f"init {init} must lie in [t_min, t_max] = [{t_min}, {t_max}]")
        self.t_max = t_max  # upper bound of t (scale <= exp(t_max))
        self.t_min = t_min  # lower bound of t used by clamp_() (scale >= exp(t_min))
        self.value = nn.Parameter(torch.tensor(float(init)), requires_grad=learnable)

    def forward(self) -> Tensor:
        """exp(min(t, t_max)) as a 0-d tensor."""
        return self.value.clamp(max=self.t_max).exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp t into [t_min, t_max] in place (call after optimizer.step())."""
        self.value.clamp_(self.t_min, self.t_max)


def contrastive_loss(
    image_feats: Tensor,
    text_feats: Tensor,
    logit_scale: Tensor | float | LogitScale,
    return_logits: bool = False,
    label_smoothing: float = 0.0,
    gather: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Symmetric InfoNCE exactly as CLIP: L = (CE(S, arange B) + CE(S^T, arange B)) / 2,

    S = scale * normalize(I) normalize(T)^T, so row i of S scores image i against every text.
    image_feats, text_feats: (B, D), pair i matched. Returns the loss (and S: (B, B) if asked).

    gather=True, under torch.distributed with W > 1 processes of B pairs each: every rank scores its own
    B images against all W*B texts (and its B texts against all W*B images), the negatives of the whole
    global batch, and returns the loss of its rows. The mean of the W rank losses is the single-process loss
    of the W*B pairs, and the all-gather passes gradients back to the rank that made each feature, so DDP's
    gradient average is that loss's gradient. S is then (B, W*B). Without a process group it is the plain loss.
    """
    check_tensors(image_feats=image_feats, text_feats=text_feats)
    for name, f in (("image_feats", image_feats), ("text_feats", text_feats)):
        if f.dim() != 2:
            raise ValueError(f"{name} must be (B, D), got shape {tuple(f.shape)}")
    if image_feats.shape != text_feats.shape:
        raise ValueError(
            f"image_feats shape {tuple(image_feats.shape)} and text_feats shape {tuple(text_feats.shape)} "
            f"must match (B, D)"
        )
    if image_feats.shape[0] < 1:
        raise ValueError("contrastive_loss needs a batch of at least one pair, got B=0")
    scale = logit_scale() if isinstance(logit_scale, nn.Module) else logit_scale
    z_i, z_t = l2_normalize(image_feats), l2_normalize(text_feats)  # (B, D) each
    b = z_i.shape[0]
    rank, world = _process_group() if gather else (0, 1)
    if world == 1:
        logits = scale * z_i @ z_t.T  # (B, B)
        labels = torch.arange(b, device=logits.device)
        loss = 0.5 * (
            cross_entropy(logits, labels, label_smoothing) + cross_entropy(logits.T, labels, label_smoothing)
        )
        return (loss, logits) if return_logits else loss
    all_i, all_t = _all_gather(z_i), _all_gather(z_t)  # (W*B, D) each, rank r's rows at r*B .. r*B + B - 1
    logits = scale * z_i @ all_t.T  # (B, W*B): my images against every text
    logits_t = scale * z_t @ all_i.T  # (B, W*B): my texts against every image
    labels = torch.arange(b, device=logits.device) + rank * b
    loss = 0.5 * (cross_entropy(logits, labels, label_smoothing) + cross_entropy(logits_t, labels, label_smoothing))
    return (loss, logits) if return_logits else loss


def _process_group() -> tuple[int, int]:
    """(rank, world size) of the default torch.distributed group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(x: Tensor) -> Tensor:
    """Concatenate x (B, D) of every rank, in rank order, with gradients flowing back to each rank's own rows."""
    import torch.distributed.nn.functional as dist_fn

    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(_process_group()[1])]
    torch.distributed.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    if len({int(n) for n in sizes}) != 1:
        raise ValueError(f"contrastive_loss(gather=True) needs the same batch on every rank, got {[int(n) for n in sizes]}")
    return torch.cat(dist_fn.all_gather(x), dim=0)


# --------------------------------------------------------------------------- image-text matching
def sample_hard_negatives(sim: Tensor, generator: torch.Generator | None = None, exclude: Tensor | None = None
                          ) -> tuple[Tensor, Tensor]:
    """ALBEF's hard negatives: for image i draw text j != i with P(j) proportional to softmax(sim[i])_j.

    Equivalently a softmax over row i with the diagonal set to -inf, so the positive has probability
    exactly 0 even when all similarities are equal or one dominates. Likewise for each text over the
    column. sim: (B, B), sim[i, j] = score(image i, text j), B >= 2; no gradient flows through sampling;
    a generator must live on sim's device. Returns (neg_text_for_image (B,), neg_image_for_text (B,)) long.

    exclude (B, B) bool, True = (image i, text j) must never be drawn as a negative pair: the in-batch false
    negatives (text j is also true of image i: the same scene twice, or "one red circle" under two images).
    A row (or column) with nothing left to draw gets index -1; drop that pair from the ITM batch.
    """
    check_tensors(sim=sim)
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sim must be a square (B, B) matrix, got shape {tuple(sim.shape)}")
    if sim.shape[0] < 2:
        raise ValueError(f"hard negatives need B >= 2 (no negative exists otherwise), got B={sim.shape[0]}")
    sim = sim.detach().float()
    if not bool(torch.isfinite(sim).all()):
        raise ValueError("sim contains inf or NaN")
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    if exclude is not None:
        if exclude.dtype != torch.bool or exclude.shape != sim.shape:
            raise ValueError(f"exclude must be a bool tensor of sim's shape {tuple(sim.shape)}, got "
                             f"{exclude.dtype} {tuple(exclude.shape)}")
        eye = eye | exclude.to(sim.device)
    masked = sim.masked_fill(eye, float("-inf"))
    none_text, none_image = eye.all(dim=1), eye.all(dim=0)  # (B,) rows / columns with no negative left
    if exclude is not None:  # give empty rows a dummy distribution, so that the draws below stay defined
        masked = masked.masked_fill(none_text.unsqueeze(1), 0.0)
    p_text = torch.softmax(masked, dim=1)  # (B, B): row i = P(text j | image i)
    masked_t = sim.T.masked_fill(eye.T, float("-inf"))
    if exclude is not None:
        masked_t = masked_t.masked_fill(none_image.unsqueeze(1), 0.0)
    p_image = torch.softmax(masked_t, dim=1)  # (B, B): row j = P(image i | text j)
    neg_text = torch.multinomial(p_text, 1, generator=generator).squeeze(1)  # (B,)
    neg_image = torch.multinomial(p_image, 1, generator=generator).squeeze(1)  # (B,)
    if exclude is not None:
        neg_text = neg_text.masked_fill(none_text, -1)
        neg_image = neg_image.masked_fill(none_image, -1)
    return neg_text, neg_image


class ITMBatch(NamedTuple):
    """Index batch for image-text matching: pair k is (images[image_index[k]], texts[text_index[k]])."""

    image_index: Tensor  # (3B,) long
    text_index: Tensor  # (3B,) long, into the text pool (the batch's captions, then any explicit negatives)
    labels: Tensor  # (3B,) long: 1 = matched pair, 0 = mismatched


def build_itm_batch(neg_text_for_image: Tensor, neg_image_for_text: Tensor) -> ITMBatch:
    """The 3B pairs: B positives (i, i), B negative images (n_img[j], j), B negative texts (i, n_txt[i]).

    Labels are [1]*B + [0]*2B. Explicit hard-negative captions (from the data world) enter by putting
    them after the batch's B captions in the text pool and passing
    neg_text_for_image = explicit_negative_index(B) (i.e. B + i for image i). Indices must be non-negative
    integers (a negative one would silently wrap around to the end of the pool).
    """
    check_tensors(neg_text_for_image=neg_text_for_image, neg_image_for_text=neg_image_for_text)
    for name, t in (("neg_text_for_image", neg_text_for_image), ("neg_image_for_text", neg_image_for_text)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer (long) tensor of indices, got dtype {t.dtype}")
    if neg_text_for_image.dim() != 1 or neg_text_for_image.shape != neg_image_for_text.shape:
        raise ValueError(
            f"neg_text_for_image {tuple(neg_text_for_image.shape)} and neg_image_for_text "
            f"{tuple(neg_image_for_text.shape)} must both be (B,)"
        )
    b = neg_text_for_image.shape[0]
    for name, t in (("neg_text_for_image", neg_text_for_image), ("neg_image_for_text", neg_image_for_text)):
        if t.numel() and int(t.min()) < 0:
            raise ValueError(f"{name} holds the negative index {int(t.min())}; indices must be >= 0 "
                             "(-1 would silently pick the last item)")
    own = torch.arange(b, device=neg_text_for_image.device)
    if bool((neg_text_for_image == own).any()) or bool((neg_image_for_text == own).any()):
        raise ValueError("a negative index equals its own positive: negatives must differ from the pair's index")
    image_index = torch.cat([own, neg_image_for_text, own])
    text_index = torch.cat([own, own, neg_text_for_image])
    labels = torch.cat([torch.ones(b, dtype=torch.long, device=own.device), own.new_zeros(2 * b)])
    return ITMBatch(image_index, text_index, labels)


def explicit_negative_index(batch_size: int, device: torch.device | str | None = None) -> Tensor:
    """Text-pool indices B + i of explicit negative captions placed after the batch's B captions."""
    return torch.arange(batch_size, 2 * batch_size, device=device)


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Binary matching as 2-way cross-entropy: logits (N, 2), labels (N,) with 1 = match."""
    check_tensors(logits=logits, labels=labels)
    if logits.dim() != 2 or logits.shape[1] != 2:
        raise ValueError(f"logits must be (N, 2), got shape {tuple(logits.shape)}")
    return cross_entropy(logits, labels)


# --------------------------------------------------------------------------- masked language modelling
def mask_tokens(
    ids: Tensor,
    mask: Tensor,
    mask_id: int,
    vocab_size: int,
    special_ids: list[int] | tuple[int, ...] | Tensor,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT's corruption: select each real, non-special token with probability `prob`; of those
    80% -> mask_id, 10% -> a uniform random non-special id, 10% unchanged.

    A row with candidates but no selection gets one candidate chosen uniformly, so its expected number
    of selections is n * prob + (1 - prob)^n for n candidates. Returns (input_ids, labels) with
    labels = original id where selected and -100 elsewhere. A generator must live on ids' device.
    An empty batch or empty sequences (B = 0 or T = 0) select nothing and draw no random numbers.
    """
    check_tensors(ids=ids, mask=mask)
    if ids.dim() != 2 or ids.dtype != torch.long:
        raise ValueError(f"ids must be a (B, T) long tensor, got shape {tuple(ids.shape)} dtype {ids.dtype}")
    if mask.dtype != torch.bool or mask.shape != ids.shape:
        raise ValueError(
            f"mask must be a bool tensor of ids' shape {tuple(ids.shape)}, got {mask.dtype} {tuple(mask.shape)}"
        )
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"prob must be in (0, 1], got {prob}")
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id {mask_id} is outside [0, vocab_size={vocab_size})")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"ids contain a token id outside [0, vocab_size={vocab_size})")
    dev = ids.device
    special = torch.as_tensor(list(special_ids) if not isinstance(special_ids, Tensor) else special_ids,
                              dtype=torch.long, device=dev).flatten()
    special = torch.cat([special, torch.tensor([mask_id], device=dev)])
    allowed = (~torch.isin(torch.arange(vocab_size, device=dev), special)).nonzero().squeeze(1)  # (V',)
    if allowed.numel() == 0:
        raise ValueError("every id in the vocabulary is special: no random replacement word exists")
    if ids.numel() == 0:  # nothing to select (e.g. encode_batch([""]) gives T = 0)
        return ids.clone(), torch.full_like(ids, IGNORE_INDEX)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator, device=dev)

    candidates = mask & ~torch.isin(ids, special)  # (B, T)
    selected = candidates & (rand(*ids.shape) < prob)
    # rows with candidates but nothing selected: pick one candidate uniformly (largest random key)
    empty = candidates.any(dim=1) & ~selected.any(dim=1)  # (B,)
    keys = torch.where(candidates, rand(*ids.shape), torch.full(ids.shape, -1.0, device=dev))
    forced = torch.zeros_like(selected).scatter_(1, keys.argmax(dim=1, keepdim=True), True)
    selected = selected | (forced & empty.unsqueeze(1))

    action = rand(*ids.shape)  # < 0.8: [MASK]; [0.8, 0.9): random word; >= 0.9: unchanged
    random_words = allowed[torch.randint(allowed.numel(), ids.shape, generator=generator, device=dev)]
    input_ids = torch.where(selected & (action < 0.8), torch.full_like(ids, mask_id), ids)
    input_ids = torch.where(selected & (action >= 0.8) & (action < 0.9), random_words, input_ids)
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
    return input_ids, labels


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the selected positions: logits (B, T, V), labels (B, T) with -100 elsewhere."""
    check_tensors(logits=logits, labels=labels)
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    return cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


# --------------------------------------------------------------------------- captioning LM
class LMBatch(NamedTuple):
    """Teacher-forcing inputs and next-token targets made by `shift_for_lm`."""

    inputs: Tensor  # (B, T-1) ids[:, :-1], fed to the decoder
    input_mask: Tensor  # (B, T-1) mask[:, :-1]
    targets: Tensor  # (B, T-1) ids[:, 1:], what position t must predict
    target_mask: Tensor  # (B, T-1) mask[:, 1:], True where the target is a real token


def shift_for_lm(ids: Tensor, mask: Tensor) -> LMBatch:
    """Shift once, here, for teacher forcing: position t of the inputs predicts token t + 1.

    The training step calls this; `caption_loss` takes the already shifted targets, and a decoder
    never shifts. ids, mask: (B, T) with T >= 2 (e.g. [BOS] w1 ... wn [EOS] [PAD]...).
    """
    check_tensors(ids=ids, mask=mask)
    if ids.dim() != 2 or mask.shape != ids.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"ids must be (B, T) with a bool mask of the same shape, got {tuple(ids.shape)} and {tuple(mask.shape)}"
        )
    if ids.shape[1] < 2:
        raise ValueError(f"ids need T >= 2 to form (input, next token) pairs, got T={ids.shape[1]}")
    return LMBatch(ids[:, :-1], mask[:, :-1], ids[:, 1:], mask[:, 1:])


def caption_loss(logits: Tensor, targets: Tensor, mask: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean next-token cross-entropy over real target tokens: logits (B, T, V), targets, mask (B, T)."""
    check_tensors(logits=logits, targets=targets, mask=mask)
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if mask.dtype != torch.bool or mask.shape != targets.shape:
        raise ValueError(
            f"mask must be a bool tensor of targets' shape {tuple(targets.shape)}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    masked_targets = torch.where(mask, targets, torch.full_like(targets, IGNORE_INDEX))
    return cross_entropy(logits, masked_targets, label_smoothing=label_smoothing, ignore_index=IGNORE_INDEX)
