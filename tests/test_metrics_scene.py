"""Exact scoring against the scene: the world's true captions and hard negatives, hand-made scenes for
recall and hallucination, and POPE against torchmetrics."""

import random

import numpy as np
import pytest
import torch

from mmlite.data import COLORS, NEGATIVE_KINDS, SHAPES, SIZES, caption_truth, load, parse_caption
from mmlite.metrics.scene import (caption_mentions, caption_precision, caption_recall, hallucination,
                                  pope_summary, pope_yes_ratio)


def scene(*objs: str) -> np.ndarray:
    """One scene row (4, 6) from "size colour shape x y" strings."""
    row = np.full((4, 6), -1, dtype=np.int64)
    row[:, 5] = 0
    for k, o in enumerate(objs):
        size, color, shape, x, y = o.split()
        row[k] = (SHAPES.index(shape), COLORS.index(color), SIZES.index(size), int(x), int(y), 1)
    return row


# a small red circle on the left, a large blue square in the middle, a small green star top right
ROW = scene("small red circle 10 50", "large blue square 50 50", "small green star 85 20")


def one(text: str, row: np.ndarray = ROW):
    return [text], row[None]


@pytest.fixture(scope="module")
def test_split():
    return load("tiny", seed=0)["test"]


# ------------------------------------------------------------------ the world's own captions and negatives
def test_true_captions_score_precision_one(test_split):
    caps = [c for cs in test_split.captions for c in cs]
    objs = test_split.objects.repeat(len(test_split.captions[0]), axis=0)  # (5N, 4, 6), aligned with caps
    prec = caption_precision(caps, objs)
    assert prec["precision"] == 1.0 and prec["unparseable"] == 0.0 and prec["n"] == len(caps)
    hall = hallucination(caps, objs)
    assert hall["chair_s"] == 0.0 and hall["chair_i"] == 0.0 and hall["relation_rate"] == 0.0
    assert hall["n_mentions"] > len(caps) // 2 and hall["n_relations"] > 100 and hall["word_level"] == 0.0
    # caption 1 lists every object: recall 1; the other families name fewer
    first = caption_recall([c[0] for c in test_split.captions], test_split.objects)
    assert first["recall"] == 1.0 and first["micro"] == 1.0
    assert caption_recall(caps, objs)["recall"] < 0.95


@pytest.mark.parametrize("kind", NEGATIVE_KINDS)
def test_hard_negatives_score_precision_zero(test_split, kind):
    idx = [i for i in range(len(test_split)) for _, k in test_split.negatives[i] if k == kind]
    negs = [c for i in range(len(test_split)) for c, k in test_split.negatives[i] if k == kind]
    assert len(negs) > 250
    prec = caption_precision(negs, test_split.objects[idx])
    assert prec["precision"] == 0.0 and prec["false"] == 1.0
    hall = hallucination(negs, test_split.objects[idx])
    if kind == "swap_relation":  # the same two objects, the relation reversed: a relation hallucination only
        assert hall["chair_i"] == 0.0 and hall["relation_rate"] == 1.0 and hall["chair_s"] == 1.0
    for text, hit in zip(negs, hall["per_item"]):
        if not hit:  # false without naming anything absent: only a listing's one-to-one count can do that
            assert [c[0] for c in parse_caption(text)] == ["all"], text


# ------------------------------------------------------------------ precision by hand
def test_precision_counts_unparseable_and_undecidable_as_wrong():
    near = scene("small red circle 10 50", "large blue square 20 50")  # 10 % apart: inside the 15 % margin
    texts = ["a red circle and a blue square and a green star",  # true
             "a red circle and a blue square",                    # false (the star is not listed)
             "the red circle is left of the blue square",         # undecidable in `near`
             "circle red a"]                                       # not a sentence of the grammar
    out = caption_precision(texts, np.stack([ROW, ROW, near, ROW]))
    assert out["truth"] == [True, False, None, None]
    assert (out["precision"], out["false"], out["undecidable"], out["unparseable"]) == (0.25, 0.25, 0.25, 0.25)
    assert caption_truth(texts[2], near) is None


# ------------------------------------------------------------------ recall by hand
@pytest.mark.parametrize("text, named", [
    ("a small red circle and a large blue square", 2),
    ("a red circle and a blue square and a green star", 3),
    ("a red circle and a red circle", 1),         # one-to-one: the same circle is named once
    ("two circles", 1),                           # k slots, one circle to fill them
    ("one red object and one green object", 2),
    ("three shapes", 0),                          # a bare noun names nothing
    ("zero purple objects", 0),
    ("the red circle is left of the blue square", 2),
    ("the blue square is left of the red circle", 2),  # false, but both objects are named (precision says false)
    ("a purple circle", 0),                       # the filter fits no object
    ("circle red a", 0),                          # unparseable: names nothing
])
def test_recall_by_hand(text, named):
    out = caption_recall(*one(text))
    assert out["per_image"].tolist() == [named / 3] and out["unparseable"] == (text == "circle red a")


def test_recall_uses_a_maximum_matching():
    # "a circle" could take the red circle first and leave "a red circle" nothing; the matching names both
    row = scene("small red circle 10 50", "small blue circle 60 50")
    assert caption_recall(*one("a circle and a red circle", row))["recall"] == 1.0
    texts, rows = ["a red circle", "a red circle and a blue square"], np.stack([ROW, ROW])
    out = caption_recall(texts, rows)
    assert out["recall"] == pytest.approx(0.5) and out["micro"] == pytest.approx(3 / 6)
    uneven = caption_recall(["a red circle", "a red circle"], np.stack([ROW, scene("small red circle 10 50")]))
    assert uneven["recall"] == pytest.approx((1 / 3 + 1) / 2) and uneven["micro"] == pytest.approx(2 / 4)


def test_mentions():
    assert caption_mentions("two red objects and one circle") == [((None, 0, None), 2), ((0, None, None), 1)]
    assert caption_mentions("there are three shapes") == []
    assert caption_mentions("shapes three") is None


# ------------------------------------------------------------------ hallucination by hand
@pytest.mark.parametrize("text, kinds", [
    ("a small red circle and a large blue square and a small green star", ()),
    ("a red triangle", ("object",)),                    # no triangle at all
    ("a purple circle", ("attribute",)),                # circles, but not purple
    ("a large red circle", ("attribute",)),             # the red circle is small
    ("two purple objects", ("attribute",)),             # a colour that is not there
    ("two red objects", ()),                            # a wrong count is false, not a hallucination
    ("the blue square is left of the red circle", ("relation",)),
    ("the red circle is left of the blue square", ()),
    ("the red triangle is left of the blue square", ("object",)),  # the relation is not judged then
    ("star", ()),                                        # word level: a star is there
    ("triangle", ("object",)),
    ("purple", ("attribute",)),
    ("yes", ()),
])
def test_hallucination_by_hand(text, kinds):
    out = hallucination(*one(text))
    assert out["per_item"] == [bool(kinds)]
    assert out["object_rate"] > 0 if "object" in kinds else out["object_rate"] == 0
    assert out["attribute_rate"] > 0 if "attribute" in kinds else out["attribute_rate"] == 0
    assert out["relation_rate"] > 0 if "relation" in kinds else out["relation_rate"] == 0
    assert out["word_level"] == (parse_caption(text) is None)


def test_hallucination_rates():
    texts = ["a red circle and a purple star", "a red circle", "the green star is above the blue square", "cross"]
    out = hallucination(texts, np.stack([ROW] * 4))
    # mentions: 2 + 1 + 2 + 1 = 6, of which "a purple star" (attribute) and "cross" (object) are hallucinated
    assert out["n_mentions"] == 6 and out["chair_i"] == pytest.approx(2 / 6)
    assert out["object_rate"] == pytest.approx(1 / 6) and out["attribute_rate"] == pytest.approx(1 / 6)
    assert out["n_relations"] == 1 and out["relation_rate"] == 0.0  # the star (y 20) is above the square
    assert out["chair_s"] == pytest.approx(2 / 4) and out["per_item"] == [True, False, False, True]
    assert hallucination(["yes", "no"], np.stack([ROW] * 2))["chair_i"] == 0.0  # no mentions: rate 0, n says so


# ------------------------------------------------------------------ POPE
def test_pope_against_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.classification")
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(2, 40)
        labels = [rng.choice(["yes", "no"]) for _ in range(n)]
        labels[0] = "yes"
        preds = [rng.choice(["yes", "no", "Yes.", "red"]) for _ in range(n)]
        out = pope_summary(preds, labels)
        p = torch.tensor([x.lower().strip(".") == "yes" for x in preds]).long()
        g = torch.tensor([x == "yes" for x in labels]).long()
        assert out["accuracy"] == pytest.approx(tm.binary_accuracy(p, g).item(), abs=1e-6)
        assert out["precision"] == pytest.approx(tm.binary_precision(p, g).item(), abs=1e-6)
        assert out["recall"] == pytest.approx(tm.binary_recall(p, g).item(), abs=1e-6)
        assert out["f1"] == pytest.approx(tm.binary_f1_score(p, g).item(), abs=1e-6)
        assert out["yes_ratio"] == p.sum().item() / n and out["n_other"] == preds.count("red")


def test_pope_on_world(test_split):
    answers = [a for qs in test_split.questions for _, a, _ in qs if a in ("yes", "no")]
    assert pope_yes_ratio(answers) == pytest.approx(0.5, abs=0.01)
    perfect = pope_summary(answers, answers)
    assert perfect["accuracy"] == perfect["f1"] == 1.0
    always = pope_summary(["yes"] * len(answers), answers)
    assert always["recall"] == 1.0 and always["yes_ratio"] == 1.0
    assert always["precision"] == pytest.approx(pope_yes_ratio(answers), abs=1e-15)
    never = pope_summary(["no"] * len(answers), answers)
    assert never["precision"] == never["recall"] == never["f1"] == 0.0 and never["yes_ratio"] == 0.0


# ------------------------------------------------------------------ bad input
def test_bad_input():
    rows = np.stack([ROW, ROW])
    with pytest.raises(ValueError, match="no texts"):
        caption_precision([], rows[:0])
    with pytest.raises(ValueError, match="1 texts but 2 scenes"):
        caption_recall(["a red circle"], rows)
    with pytest.raises(ValueError, match="shape"):
        hallucination(["a red circle"], ROW)  # one row, not (N, slots, 6)
    with pytest.raises(ValueError, match="list of strings"):
        caption_precision("a red circle", rows[:1])
    with pytest.raises(ValueError, match="no objects"):
        caption_recall(["a red circle"], scene()[None])
    with pytest.raises(ValueError, match="1 predictions but 2 labels"):
        pope_summary(["yes"], ["yes", "no"])
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope_summary(["yes"], ["red"])
    with pytest.raises(ValueError, match="no 'yes'"):
        pope_summary(["yes"], ["no"])
    with pytest.raises(ValueError, match="non-empty"):
        pope_yes_ratio([])
