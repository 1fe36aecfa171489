"""Statistics of a shapes-world split, as a JSON-able dict (introduced in chapter 1)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from mmlite.data.grammar import NEGATIVE_KINDS
from mmlite.data.questions import ANSWERS, QUESTION_TYPES
from mmlite.data.splits import Split
from mmlite.data.world import COLOR, COLORS, SHAPE, SHAPES, SIZE, SIZES, VALID, is_held_out


def _hist(values: list[int] | np.ndarray) -> dict[str, int]:
    counts = Counter(int(v) for v in values)
    return {str(k): counts[k] for k in sorted(counts)}


def describe(split: Split) -> dict[str, object]:
    """Counts per shape/colour/size, objects per image, caption lengths, answers per question type,
    negative kinds and the share of "yes" among yes/no answers."""
    objects = split.objects
    valid = objects[..., VALID] == 1
    shape, color, size = objects[..., SHAPE][valid], objects[..., COLOR][valid], objects[..., SIZE][valid]
    answers: dict[str, Counter] = {t: Counter() for t in QUESTION_TYPES}
    for qs in split.questions:
        for _, answer, qtype in qs:
            answers[qtype][answer] += 1
    yes_no = Counter(a for qs in split.questions for _, a, _ in qs if a in ("yes", "no"))
    negatives = Counter(kind for ns in split.negatives for _, kind in ns)
    return {
        "images": len(split),
        "image_size": int(split.images.shape[1]) if len(split) else 0,
        "objects": int(valid.sum()),
        "objects_per_image": _hist(valid.sum(axis=1)),
        "shape": {s: int((shape == i).sum()) for i, s in enumerate(SHAPES)},
        "color": {c: int((color == i).sum()) for i, c in enumerate(COLORS)},
        "size": {z: int((size == i).sum()) for i, z in enumerate(SIZES)},
        "held_out_objects": int(is_held_out(shape, color).sum()),
        "caption_words": _hist([len(c.split()) for cs in split.captions for c in cs]),
        "answers": {t: {a: answers[t][a] for a in ANSWERS if answers[t][a]} for t in QUESTION_TYPES},
        "yes_fraction": round(yes_no["yes"] / max(1, yes_no["yes"] + yes_no["no"]), 4),
        "negatives": {k: negatives[k] for k in NEGATIVE_KINDS},
        "negatives_per_image": _hist([len(ns) for ns in split.negatives]),
    }
