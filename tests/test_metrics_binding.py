"""Winoground-style scores: chance levels exactly and by simulation, hand cases, groups built from the
world checked with its truth functions, and binding accuracy with ties."""

from itertools import permutations

import numpy as np
import pytest
import torch

from mmlite.data import caption_truth, load
from mmlite.metrics.binding import (CHANCE_GROUP, CHANCE_IMAGE, CHANCE_TEXT, binding_accuracy, score_groups,
                                    winoground_groups, winoground_scores)


@pytest.fixture(scope="module")
def test_split():
    return load("tiny", seed=0)["test"]


@pytest.fixture(scope="module")
def groups(test_split):
    return winoground_groups(test_split)


# ------------------------------------------------------------------ the three scores
def test_hand_cases():
    perfect = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert winoground_scores(perfect) == {"text": 1.0, "image": 1.0, "group": 1.0, "n": 1.0}
    caption_a_always = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # prefers caption a whatever the image
    assert winoground_scores(caption_a_always)["text"] == 0.0
    text_only = torch.tensor([[[2.0, 1.0], [3.0, 4.0]]])  # each image picks its caption; image b wins caption a
    assert winoground_scores(text_only) == {"text": 1.0, "image": 0.0, "group": 0.0, "n": 1.0}
    image_only = torch.tensor([[[2.0, 3.0], [1.0, 4.0]]])  # each caption picks its image; image a prefers cb
    assert winoground_scores(image_only) == {"text": 0.0, "image": 1.0, "group": 0.0, "n": 1.0}
    ties = torch.ones(3, 2, 2)
    assert winoground_scores(ties)["text"] == winoground_scores(ties)["image"] == 0.0  # strict: a tie fails
    mixed = torch.cat([perfect, text_only, image_only, ties[:1]])
    assert winoground_scores(mixed.numpy()) == {"text": 0.5, "image": 0.5, "group": 0.25, "n": 4.0}


def test_chance_levels_exactly():
    # every ordering of four distinct scores is equally likely under i.i.d. continuous scores
    rates = [winoground_scores(torch.tensor(p, dtype=torch.float64).reshape(1, 2, 2)) for p in permutations(range(4))]
    assert sum(r["text"] for r in rates) / 24 == CHANCE_TEXT == 0.25
    assert sum(r["image"] for r in rates) / 24 == CHANCE_IMAGE == 0.25
    assert sum(r["group"] for r in rates) / 24 == pytest.approx(CHANCE_GROUP, abs=1e-15)


def test_chance_levels_by_simulation():
    g = torch.Generator().manual_seed(0)
    out = winoground_scores(torch.randn(200_000, 2, 2, generator=g))
    # standard error sqrt(p (1 - p) / G) < 0.001: allow 5 of them
    assert abs(out["text"] - CHANCE_TEXT) < 0.005 and abs(out["image"] - CHANCE_IMAGE) < 0.005
    assert abs(out["group"] - CHANCE_GROUP) < 0.005


# ------------------------------------------------------------------ groups from the world
def test_groups_are_valid(test_split, groups):
    assert len(groups) > 200
    for a, b, ca, cb, kind in zip(groups.image_a, groups.image_b, groups.caption_a, groups.caption_b, groups.kind):
        assert a != b
        k = test_split.negatives[a].index((cb, kind))
        assert test_split.negative_sources[a][k] == ca  # compared with its own source, never another caption
        assert caption_truth(ca, test_split.objects[a]) is True and caption_truth(cb, test_split.objects[a]) is False
        assert caption_truth(cb, test_split.objects[b]) is True and caption_truth(ca, test_split.objects[b]) is False
        assert sorted(ca.split()) == sorted(cb.split())  # same words, different arrangement


def test_group_counts(test_split, groups):
    assert set(groups.counts) == {"swap_attribute", "swap_relation"}
    for kind, c in groups.counts.items():
        assert c["negatives"] == sum(k == kind for negs in test_split.negatives for _, k in negs)
        assert c["groups"] == groups.kind.count(kind) and 0 < c["groups"] <= c["negatives"]
    # measured on tiny seed 0: a swapped listing needs another image with exactly the swapped objects
    assert groups.counts["swap_attribute"] == {"negatives": 305, "groups": 32}
    assert groups.counts["swap_relation"] == {"negatives": 373, "groups": 233}


def test_groups_are_deterministic_and_independent_of_kinds(test_split, groups):
    again = winoground_groups(test_split, seed=0)
    assert np.array_equal(again.image_b, groups.image_b) and again.caption_b == groups.caption_b
    relation = winoground_groups(test_split, kinds=("swap_relation",))
    sel = np.array([k == "swap_relation" for k in groups.kind])
    assert np.array_equal(relation.image_b, groups.image_b[sel])
    other = winoground_groups(test_split, kinds=("swap_relation",), seed=1)
    assert len(other) == len(relation) and not np.array_equal(other.image_b, relation.image_b)


def test_truth_oracle_and_bag_of_words_scorers(test_split, groups):
    def truth_scorer(images, captions):  # knows the scene: solves every group
        return torch.tensor([float(caption_truth(c, test_split.objects[i]) is True) for i, c in zip(images, captions)])

    def bag_scorer(images, captions):  # word overlap with the image's own captions: blind to arrangement
        return torch.tensor([float(sum(w in set(" ".join(test_split.captions[i]).split()) for w in c.split()))
                             for i, c in zip(images, captions)])

    s = score_groups(groups, truth_scorer)
    assert s.shape == (len(groups), 2, 2) and s.dtype == torch.float64
    assert winoground_scores(s) == {"text": 1.0, "image": 1.0, "group": 1.0, "n": float(len(groups))}
    bag = winoground_scores(score_groups(groups, bag_scorer))
    assert bag["text"] == 0.0 and bag["group"] == 0.0  # the same bag of words: each image ties its two captions
    assert binding_accuracy(s[:, 0, 0], s[:, 0, 1]) == 1.0


def test_score_groups_layout(groups):
    code = lambda images, captions: [i * 10 + (c in groups.caption_b) for i, c in zip(images, captions)]  # noqa: E731
    s = score_groups(groups, code)
    g = 0
    assert s[g].tolist() == [[groups.image_a[g] * 10, groups.image_a[g] * 10 + 1],
                             [groups.image_b[g] * 10, groups.image_b[g] * 10 + 1]]
    with pytest.raises(ValueError, match="one score per pair"):
        score_groups(groups, lambda images, captions: np.zeros(3))


# ------------------------------------------------------------------ binding accuracy
def test_binding_accuracy():
    assert binding_accuracy([1.0, 2.0, 3.0], [0.0, 2.0, 4.0]) == pytest.approx(0.5)  # win, tie (half), loss
    assert binding_accuracy(np.ones(5), np.ones(5)) == 0.5  # a model that cannot tell them apart: chance
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 50))
        ps, pn = rng.integers(0, 4, n).astype(float), rng.integers(0, 4, n).astype(float)  # many ties
        literal = sum(1.0 if s > t else 0.5 if s == t else 0.0 for s, t in zip(ps, pn)) / n
        assert binding_accuracy(torch.tensor(ps), pn) == pytest.approx(literal, abs=1e-12)


# ------------------------------------------------------------------ bad input
def test_bad_input(test_split):
    with pytest.raises(ValueError, match=r"\[G, 2, 2\]"):
        winoground_scores(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="no groups"):
        winoground_scores(torch.zeros(0, 2, 2))
    with pytest.raises(ValueError, match="NaN"):
        winoground_scores(torch.full((1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="3 source scores but 2"):
        binding_accuracy([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="1-D"):
        binding_accuracy(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="no pairs"):
        binding_accuracy([], [])
    with pytest.raises(ValueError, match="NaN"):
        binding_accuracy([float("nan")], [0.0])
    with pytest.raises(ValueError, match="kinds"):
        winoground_groups(test_split, kinds=("swap_colour",))
    with pytest.raises(ValueError, match="kinds"):
        winoground_groups(test_split, kinds=())
