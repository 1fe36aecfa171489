"""Binding and compositionality: Winoground-style text, image and group scores, and binding accuracy (chapter 6).

Winoground (Thrush et al., CVPR 2022): a group holds two images and two captions with the same words in
a different arrangement, caption a true of image a and caption b true of image b. With a model's score
s(image, caption), in a [G, 2, 2] tensor score[g, i, c] (image i, caption c; index 0 = a, 1 = b):
  text  = s(a, ca) > s(a, cb)  and  s(b, cb) > s(b, ca)     (each image picks its caption)
  image = s(a, ca) > s(b, ca)  and  s(b, cb) > s(a, cb)     (each caption picks its image)
  group = text and image
Comparisons are strict, so a tie fails. Chance, for scores drawn i.i.d. from a continuous distribution:
text 1/4 and image 1/4 (two independent coin flips each), group 1/6 (both s(a, ca) and s(b, cb) must be
the two largest of four: 2! 2! / 4!).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from mmlite.data.grammar import NEGATIVE_KINDS
from mmlite.data.semantics import parse_caption, scene_list, truth

if TYPE_CHECKING:
    from mmlite.data.splits import Split

CHANCE_TEXT: float = 0.25
CHANCE_IMAGE: float = 0.25
CHANCE_GROUP: float = 1 / 6
DEFAULT_MARGIN = 15  # DataConfig.relation_margin of every preset


def _as_float64(x: object, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x), dtype=torch.float64)
    if t.numel() and not torch.isfinite(t).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return t


def winoground_scores(scores: torch.Tensor | np.ndarray) -> dict[str, float]:
    """Text, image and group score rates of a [G, 2, 2] score tensor score[g, image, caption] (see the module)."""
    s = _as_float64(scores, "scores")
    if s.ndim != 3 or s.shape[1:] != (2, 2):
        raise ValueError(f"scores must have shape [G, 2, 2] (group, image, caption), got {tuple(s.shape)}")
    if s.shape[0] == 0:
        raise ValueError("scores holds no groups")
    aa, ab, ba, bb = s[:, 0, 0], s[:, 0, 1], s[:, 1, 0], s[:, 1, 1]  # each (G,): s(image, caption)
    text = (aa > ab) & (bb > ba)
    image = (aa > ba) & (bb > ab)
    return {"text": text.double().mean().item(), "image": image.double().mean().item(),
            "group": (text & image).double().mean().item(), "n": float(s.shape[0])}


def binding_accuracy(p_source: torch.Tensor | np.ndarray | Sequence[float],
                     p_negative: torch.Tensor | np.ndarray | Sequence[float]) -> float:
    """How often the true source caption outscores the hard negative edited from it, for the same image.

    accuracy = (1/n) sum_i ( [p_source_i > p_negative_i] + 0.5 [p_source_i == p_negative_i] )
    A tie counts half, so a model that cannot tell the two apart (equal scores) sits at chance, 0.5,
    rather than at 0 or 1 depending on the comparison (the AUC convention for ties).
    """
    ps, pn = _as_float64(p_source, "p_source"), _as_float64(p_negative, "p_negative")
    if ps.ndim != 1 or pn.ndim != 1:
        raise ValueError(f"p_source and p_negative must be 1-D, got shapes {tuple(ps.shape)} and {tuple(pn.shape)}")
    if len(ps) != len(pn):
        raise ValueError(f"{len(ps)} source scores but {len(pn)} negative scores")
    if len(ps) == 0:
        raise ValueError("no pairs to score")
    return ((ps > pn).double() + 0.5 * (ps == pn).double()).mean().item()


@dataclass
class WinogroundGroups:
    """Groups built from a split: image indices and caption texts, one entry per group."""

    image_a: np.ndarray  # (G,) int64: the image the negative was made for
    image_b: np.ndarray  # (G,) int64: another image for which caption_b is true and caption_a false
    caption_a: list[str]  # the true caption of image a that the negative was edited from (its source)
    caption_b: list[str]  # the hard negative of image a: same words, arrangement changed
    kind: list[str]  # negative kind of each group
    # per kind: {"negatives": candidates of that kind, "groups": those for which an image b was found}
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_a)


def winoground_groups(split: "Split", kinds: Sequence[str] = ("swap_attribute", "swap_relation"), seed: int = 0,
                      margin: int = DEFAULT_MARGIN) -> WinogroundGroups:
    """Winoground groups from the hard negatives of a split (`mmlite.data.Split`).

    For each negative of image a of a kind in `kinds`: caption_a = the true caption it was edited from
    (`split.negative_sources`), caption_b = the negative. image_b is the first image j != a, in an order
    drawn from numpy's default_rng([seed, a, k]) (k = the negative's index in split.negatives[a]), with
    caption_truth(caption_b, j) True and caption_truth(caption_a, j) False, so the group is one whose
    answer is known. A negative with no such image in the split makes no group. The choice of image b does
    not depend on `kinds` or on the other groups. `counts` says how many negatives found an image b: in the
    tiny test split (seed 0) 32 of 305 swap_attribute (most are swapped listings, which need another image
    with exactly the swapped objects) and 233 of 373 swap_relation negatives.
    """
    kinds = tuple(kinds)
    if not kinds or any(k not in NEGATIVE_KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {NEGATIVE_KINDS}, got {kinds}")
    n = len(split.objects)
    if len(split.negatives) != n or len(split.negative_sources) != n:
        raise ValueError(f"split {split.name!r} has no negative_sources aligned with its negatives "
                         "(a world cached by older code?)")
    scenes = [scene_list(row) for row in split.objects]
    image_a, image_b, caption_a, caption_b, kind_of = [], [], [], [], []
    counts = {k: {"negatives": 0, "groups": 0} for k in kinds}
    for a in range(n):
        if len(split.negative_sources[a]) != len(split.negatives[a]):
            raise ValueError(f"image {a}: {len(split.negatives[a])} negatives but "
                             f"{len(split.negative_sources[a])} sources")
        for k, ((negative, kind), source) in enumerate(zip(split.negatives[a], split.negative_sources[a])):
            if kind not in kinds:
                continue
            counts[kind]["negatives"] += 1
            claims_a, claims_b = parse_caption(source), parse_caption(negative)
            for j in np.random.default_rng([seed, a, k]).permutation(n).tolist():
                if j != a and truth(claims_b, scenes[j], margin) is True \
                        and truth(claims_a, scenes[j], margin) is False:
                    image_a.append(a)
                    image_b.append(j)
                    caption_a.append(source)
                    caption_b.append(negative)
                    kind_of.append(kind)
                    counts[kind]["groups"] += 1
                    break
    return WinogroundGroups(np.array(image_a, dtype=np.int64), np.array(image_b, dtype=np.int64),
                            caption_a, caption_b, kind_of, counts)


def score_groups(groups: WinogroundGroups,
                 scorer: Callable[[np.ndarray, list[str]], torch.Tensor | np.ndarray]) -> torch.Tensor:
    """Fill the [G, 2, 2] score tensor of `groups` with one call scorer(image_indices (4G,), captions (4G))."""
    if len(groups) == 0:
        raise ValueError("no groups to score")
    images = np.stack([groups.image_a, groups.image_a, groups.image_b, groups.image_b], axis=1)  # (G, 4)
    captions = [c for ca, cb in zip(groups.caption_a, groups.caption_b) for c in (ca, cb, ca, cb)]
    s = _as_float64(scorer(images.reshape(-1), captions), "scorer output")  # (4G,): (a,ca) (a,cb) (b,ca) (b,cb)
    if s.shape != (4 * len(groups),):
        raise ValueError(f"the scorer must return one score per pair, shape ({4 * len(groups)},), "
                         f"got {tuple(s.shape)}")
    return s.reshape(len(groups), 2, 2)  # (G, image, caption)
