"""Exact scoring against the scene: caption precision, object recall, hallucination and POPE (chapter 6).

A reference harness compares a generated caption with other captions; the shapes world knows the truth
of every sentence its grammar can say (mmlite.data.semantics), so a caption in any wording the grammar
parses is scored against the objects themselves. objects: the (N, slots, 6) int array of a split
(`split.objects`), one scene per text; margin: the relation margin the world was made with (15 % in
every preset). A text the grammar cannot parse (ungrammatical output) is never counted as correct.

Mentions. A parsed caption mentions objects with noun phrases, each a filter F = (shape, colour, size)
with None where the phrase does not say: a listing item ("a red circle") and each side of a relation
("the red circle", "a square") is one mention; a count "k F" with k >= 1 is one mention that stands for
k objects ("zero F" mentions nothing). A bare "object" / "shape" fixes no attribute and names nothing.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mmlite.data.semantics import Filter, Obj, claim_truth, count, matches, parse_caption, scene_list, truth
from mmlite.data.world import COLORS, SHAPE_PLURALS, SHAPES
from mmlite.metrics.vqa import normalize_answer

DEFAULT_MARGIN = 15  # DataConfig.relation_margin of every preset
_BARE: Filter = (None, None, None)


def _scenes(texts: Sequence[str], objects: np.ndarray) -> list[list[Obj]]:
    """Validate texts and their scenes; the valid objects of each scene."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ValueError(f"texts must be a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError("no texts to score")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"texts[{i}] must be a string, got {type(t).__name__}")
    objects = np.asarray(objects)
    if objects.ndim != 3 or objects.shape[2] != 6:
        raise ValueError(f"objects must have shape (N, slots, 6) like split.objects, got {tuple(objects.shape)}")
    if len(objects) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(objects)} scenes")
    return [scene_list(row) for row in objects]


def caption_mentions(text: str) -> list[tuple[Filter, int]] | None:
    """The mentions (filter, number of objects it stands for) of a caption, or None if it does not parse."""
    claims = parse_caption(text)
    if claims is None:
        return None
    out = []
    for c in claims:
        if c[0] == "all":
            out += [(f, 1) for f in c[1]]
        elif c[0] == "count":
            out += [(c[1], c[2])] if c[2] > 0 else []
        else:  # ("rel", Fa, def_a, r, Fb, def_b)
            out += [(c[1], 1), (c[4], 1)]
    return [(f, k) for f, k in out if f != _BARE]


def caption_precision(captions: Sequence[str], objects: np.ndarray, margin: int = DEFAULT_MARGIN
                      ) -> dict[str, object]:
    """Share of captions that are true of their scene: every claim True (`caption_truth` is True).

    precision = #true / N, where N counts every caption: an unparseable one (not a sentence of the grammar)
    and an undecidable one (a relation inside the margin, "the circle" with two circles) are not correct.
    Returns precision, false, undecidable, unparseable (the four shares sum to 1), n and the per-caption
    truth (True, False, None; None also for unparseable).
    """
    scenes = _scenes(captions, objects)
    values, unparseable = [], 0
    for text, objs in zip(captions, scenes):
        claims = parse_caption(text)
        unparseable += claims is None
        values.append(None if claims is None else truth(claims, objs, margin))
    n = len(values)
    undecidable = sum(v is None for v in values) - unparseable
    return {"precision": sum(v is True for v in values) / n, "false": sum(v is False for v in values) / n,
            "undecidable": undecidable / n, "unparseable": unparseable / n, "n": n, "truth": values}


def _max_matching(slots: list[Filter], objs: list[Obj]) -> int:
    """Size of a maximum one-to-one matching between slots and the objects their filters match (Kuhn)."""
    owner = [-1] * len(objs)

    def augment(s: int, seen: set[int]) -> bool:
        for j, o in enumerate(objs):
            if j not in seen and matches(o, slots[s]):
                seen.add(j)
                if owner[j] < 0 or augment(owner[j], seen):
                    owner[j] = s
                    return True
        return False

    return sum(augment(s, set()) for s in range(len(slots)))


def caption_recall(captions: Sequence[str], objects: np.ndarray) -> dict[str, object]:
    """Share of each scene's objects that its caption names, averaged over scenes.

    named = size of a maximum one-to-one matching between the caption's mention slots (one per listing item
    or relation side, k for a count "k F") and the objects, a slot matching an object when its filter fits
    the object's true attributes. So "a circle and a circle" names at most two circles, "two red objects"
    names min(2, #red) objects, "a purple circle" names nothing in a scene without one, and "three shapes"
    names nothing. Truth is not required (that is precision's job): "four circles" with two circles names
    both. An unparseable caption names nothing. recall_i = named_i / #objects_i.
    Returns recall (mean over scenes), micro (sum named / sum objects), per_image, unparseable (share).
    """
    scenes = _scenes(captions, objects)
    named, sizes, unparseable = [], [], 0
    for i, (text, objs) in enumerate(zip(captions, scenes)):
        if not objs:
            raise ValueError(f"scene {i} has no objects: recall is undefined")
        ms = caption_mentions(text)
        unparseable += ms is None
        slots = [f for f, k in ms or () for _ in range(k)]
        named.append(_max_matching(slots, objs))
        sizes.append(len(objs))
    per_image = np.array(named, dtype=np.float64) / np.array(sizes)
    return {"recall": float(per_image.mean()), "micro": sum(named) / sum(sizes), "per_image": per_image,
            "unparseable": unparseable / len(per_image)}


_WORD_FILTERS = {**{w: (i, None, None) for i, w in enumerate(SHAPES)},
                 **{w: (i, None, None) for i, w in enumerate(SHAPE_PLURALS)},
                 **{w: (None, i, None) for i, w in enumerate(COLORS)}}


def hallucination(texts: Sequence[str], objects: np.ndarray, margin: int = DEFAULT_MARGIN) -> dict[str, object]:
    """CHAIR-style hallucination rates (Rohrbach et al., EMNLP 2018) of captions or answers against their scenes.

    A mention is hallucinated when no object of the scene fits its filter: an object hallucination if the
    scene has no object of the named shape ("a triangle", no triangle), an attribute hallucination otherwise
    ("a purple circle" with circles but no purple one: a colour or size bound to the wrong object). A relation
    is hallucinated when both its sides are in the scene but the relation is False (inside the margin it is
    undecided, not hallucinated). A text the grammar cannot parse (an answer such as "star", or ungrammatical
    output) is read word by word: each shape and colour word is a mention of that shape or colour.
      chair_i = hallucinated mentions / mentions        chair_s = texts with any hallucination / texts
      object_rate, attribute_rate: the two kinds / mentions;  relation_rate = hallucinated / decidable relations
    A rate with an empty denominator is 0 (n_mentions, n_relations say so). Also returns word_level (share of
    texts read word by word), n_texts and per_item (did each text hallucinate).
    """
    scenes = _scenes(texts, objects)
    n_mentions = n_object = n_attribute = n_relations = n_false_rel = word_level = 0
    per_item = []
    for text, objs in zip(texts, scenes):
        claims = parse_caption(text)
        if claims is None:
            word_level += 1
            filters = [_WORD_FILTERS[w] for w in normalize_answer(text).split() if w in _WORD_FILTERS]
            relations = []
        else:
            filters = [f for f, _ in caption_mentions(text)]
            relations = [c for c in claims if c[0] == "rel"]
        hit = False
        for f in filters:
            n_mentions += 1
            if count(objs, f) == 0:
                hit = True
                if f[0] is not None and count(objs, (f[0], None, None)) == 0:
                    n_object += 1
                else:
                    n_attribute += 1
        for c in relations:
            if count(objs, c[1]) > 0 and count(objs, c[4]) > 0:
                n_relations += 1
                if claim_truth(c, objs, margin) is False:
                    n_false_rel += 1
                    hit = True
        per_item.append(hit)
    rate = lambda a, b: a / b if b else 0.0  # noqa: E731
    return {"chair_s": sum(per_item) / len(per_item), "chair_i": rate(n_object + n_attribute, n_mentions),
            "object_rate": rate(n_object, n_mentions), "attribute_rate": rate(n_attribute, n_mentions),
            "relation_rate": rate(n_false_rel, n_relations), "n_texts": len(per_item), "n_mentions": n_mentions,
            "n_relations": n_relations, "word_level": word_level / len(per_item), "per_item": per_item}


def _yes(answers: Sequence[str], name: str) -> list[bool]:
    if isinstance(answers, str) or not isinstance(answers, Sequence) or len(answers) == 0:
        raise ValueError(f"{name} must be a non-empty list of strings")
    return [normalize_answer(a) == "yes" for a in answers]


def pope_yes_ratio(answers: Sequence[str]) -> float:
    """Share of answers that are "yes" after VQA normalisation (POPE's yes-ratio; about 0.5 on balanced questions)."""
    yes = _yes(answers, "answers")
    return sum(yes) / len(yes)


def pope_summary(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE-style scores (Li et al., EMNLP 2023) of yes/no answers, with "yes" (the object is there) as positive.

    accuracy = (TP + TN) / n; precision = TP / (TP + FP); recall = TP / (TP + FN); F1 = 2PR / (P + R);
    yes_ratio = (TP + FP) / n. Every prediction that is not "yes" after normalisation counts as a "no"
    (n_other says how many were neither yes nor no). Precision is 0 when nothing is predicted "yes"
    (and F1 then 0); labels must be yes/no and hold at least one "yes" (else recall is undefined).
    """
    pred, gold = _yes(predictions, "predictions"), _yes(labels, "labels")
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions but {len(gold)} labels")
    bad = [a for a in labels if normalize_answer(a) not in ("yes", "no")]
    if bad:
        raise ValueError(f"labels must be 'yes' or 'no', got {bad[0]!r}")
    if not any(gold):
        raise ValueError("labels hold no 'yes': recall is undefined")
    tp = sum(p and g for p, g in zip(pred, gold))
    fp, fn = sum(pred) - tp, sum(gold) - tp
    n = len(pred)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    other = sum(normalize_answer(a) not in ("yes", "no") for a in predictions)
    return {"accuracy": (n - fp - fn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(pred) / n, "n": float(n), "n_other": float(other)}
