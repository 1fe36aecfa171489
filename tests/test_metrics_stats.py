"""Tests for mmlite.metrics.stats: bootstrap coverage, clustered resampling, the paired permutation test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from mmlite.metrics.stats import Interval, bootstrap_ci, format_ci, paired_test


def test_bootstrap_coverage_of_a_bernoulli_mean():
    # 200 experiments of 50 Bernoulli(0.7) draws: a 95 % interval should cover 0.7 in ~95 % of them. The count of
    # covering experiments is Binomial(200, ~0.95), sd ~ 3 experiments (1.5 %); [0.90, 0.99] is about +-3 sd
    # (measured: 0.96 over 400 experiments; the percentile bootstrap of a discrete mean is slightly conservative).
    rng = np.random.default_rng(1)
    covered = 0
    for e in range(200):
        ci = bootstrap_ci(np.mean, rng.random(50) < 0.7, n=400, seed=e)
        covered += ci.low <= 0.7 <= ci.high
    assert 0.90 <= covered / 200 <= 0.99


def test_bootstrap_interval_width_matches_theory_and_is_deterministic():
    rng = np.random.default_rng(2)
    x = rng.standard_normal(400)
    ci = bootstrap_ci(np.mean, x, n=2000, seed=5)
    assert isinstance(ci, Interval) and ci.estimate == pytest.approx(x.mean())
    # normal theory: half-width 1.96 sd / sqrt(n); the bootstrap estimate is within 10 % of it
    assert (ci.high - ci.low) / 2 == pytest.approx(1.96 * x.std() / math.sqrt(len(x)), rel=0.1)
    assert bootstrap_ci(np.mean, x, n=2000, seed=5) == ci
    assert bootstrap_ci(np.mean, x, n=2000, seed=6) != ci
    assert bootstrap_ci(np.mean, torch.from_numpy(x), n=2000, seed=5) == ci  # tensors too


def test_several_arrays_are_resampled_together():
    rng = np.random.default_rng(3)
    pred = rng.integers(0, 3, 200)
    target = np.where(rng.random(200) < 0.8, pred, rng.integers(0, 3, 200))
    acc = lambda p, t: float((p == t).mean())  # noqa: E731
    ci = bootstrap_ci(acc, pred, target, n=500)
    assert ci.estimate == acc(pred, target) and ci.low < ci.estimate < ci.high
    # resampled together, identical arrays stay identical: accuracy of an array against itself is always 1
    assert bootstrap_ci(acc, pred, pred, n=200) == (1.0, 1.0, 1.0)


def test_clustered_interval_is_wider_for_correlated_clusters():
    # 100 images, 5 captions each; a caption's hit mostly follows its image (correlated within a cluster)
    rng = np.random.default_rng(4)
    image_hit = rng.random(100) < 0.6
    clusters = np.repeat(np.arange(100), 5)
    hits = np.where(rng.random(500) < 0.9, image_hit[clusters], rng.random(500) < 0.6).astype(float)
    plain = bootstrap_ci(np.mean, hits, n=1000)
    grouped = bootstrap_ci(np.mean, hits, n=1000, clusters=clusters)
    assert grouped.estimate == plain.estimate
    assert (grouped.high - grouped.low) > 1.6 * (plain.high - plain.low)  # design effect ~ sqrt(1 + 4 * 0.8) ~ 2
    # independent captions: clustering changes little
    iid = (rng.random(500) < 0.6).astype(float)
    w_plain = np.diff(bootstrap_ci(np.mean, iid, n=1000)[1:])[0]
    w_grouped = np.diff(bootstrap_ci(np.mean, iid, n=1000, clusters=clusters)[1:])[0]
    assert 0.75 < w_grouped / w_plain < 1.33


def test_bootstrap_bad_input():
    with pytest.raises(ValueError, match="at least 2 examples"):
        bootstrap_ci(np.mean, [1.0])
    with pytest.raises(ValueError, match="at least 2 examples"):
        bootstrap_ci(np.mean, [])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci(np.mean, [1.0, np.nan, 2.0])
    with pytest.raises(ValueError, match="different lengths"):
        bootstrap_ci(lambda a, b: 0.0, [1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="one cluster id per example"):
        bootstrap_ci(np.mean, [1.0, 2.0, 3.0], clusters=[0, 1])
    with pytest.raises(ValueError, match="single cluster"):
        bootstrap_ci(np.mean, [1.0, 2.0, 3.0], clusters=[0, 0, 0])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(np.mean, [1.0, 2.0], level=95)
    with pytest.raises(ValueError, match="finite"):
        bootstrap_ci(lambda x: float("nan"), [1.0, 2.0])
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_ci(np.mean, [1.0, 2.0], n=0)


# --------------------------------------------------------------------------- paired test
def test_paired_exact_p_value_matches_scipy():
    rng = np.random.default_rng(5)
    worst = 0.0
    for case in range(40):
        m = int(rng.integers(3, 10))
        a = rng.integers(0, 2, m).astype(float) if case % 2 else rng.standard_normal(m)
        b = rng.integers(0, 2, m).astype(float) if case % 2 else rng.standard_normal(m) + 0.5
        ours = paired_test(np.mean, a, b, n=2 ** m, seed=case)  # 2^m >= every swap pattern: exact
        ref = scipy.stats.permutation_test((a, b), lambda x, y: np.mean(x) - np.mean(y), permutation_type="samples",
                                           n_resamples=np.inf, alternative="two-sided", vectorized=False)
        worst = max(worst, abs(ours.p_value - ref.pvalue))
        assert ours.difference == pytest.approx(ref.statistic)
    assert worst <= 1e-12


def test_paired_exact_by_hand_and_clusters():
    a, b = np.array([1.0, 1.0, 1.0]), np.array([0.0, 0.0, 0.0])
    # d = 1; of the 8 swap patterns only "none" and "all" give |d*| = 1 -> p = 2/8
    assert paired_test(np.mean, a, b, n=8).p_value == pytest.approx(0.25)
    # clusters {0, 1} and {2}: 4 patterns, |d*| = 1 for "none" and "all" -> 2/4
    assert paired_test(np.mean, a, b, n=8, clusters=[0, 0, 1]).p_value == pytest.approx(0.5)
    assert paired_test(np.mean, a, a, n=8).p_value == 1.0  # identical models


def test_paired_p_small_when_one_model_is_better():
    rng = np.random.default_rng(6)
    truth = rng.random(300)
    a = (truth < 0.75).astype(float)  # model A right 75 % of the time, B 60 %, on the same examples
    b = (truth < 0.60).astype(float)
    r = paired_test(np.mean, a, b, n=2000)
    assert r.difference == pytest.approx(a.mean() - b.mean())
    assert r.p_value < 0.01 and r.low > 0  # every B hit is an A hit: the paired interval excludes 0
    flipped = paired_test(np.mean, b, a, n=2000)
    assert flipped.difference == -r.difference and flipped.p_value < 0.01 and flipped.high < 0


def test_paired_p_roughly_uniform_under_the_null():
    # 150 experiments with two exchangeable models: P(p < 0.1) ~ 0.1 (Binomial sd 0.025); mean p ~ 0.5
    rng = np.random.default_rng(7)
    ps = []
    for e in range(150):
        a, b = (rng.random(60) < 0.6).astype(float), (rng.random(60) < 0.6).astype(float)
        ps.append(paired_test(np.mean, a, b, n=200, seed=e).p_value)
    ps = np.array(ps)
    assert 0.02 <= (ps < 0.1).mean() <= 0.2 and 0.4 <= ps.mean() <= 0.62


def test_paired_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        paired_test(np.mean, np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="different lengths"):
        paired_test(np.mean, [1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="at least 2"):
        paired_test(np.mean, [1.0], [2.0])


def test_format_ci():
    assert format_ci(0.73214, 0.7049, 0.75799) == "0.732 [0.705, 0.758]"
    assert format_ci(*Interval(12.5, 11.0, 14.25), digits=1) == "12.5 [11.0, 14.2]"
    with pytest.raises(ValueError, match="above high"):
        format_ci(0.5, 0.6, 0.4)
    with pytest.raises(ValueError, match="finite"):
        format_ci(float("nan"), 0.1, 0.2)
    with pytest.raises(ValueError, match="digits"):
        format_ci(0.5, 0.4, 0.6, digits=-1)


def test_a_cluster_draw_concatenates_the_drawn_clusters_members():
    """The vectorised draw equals the plain loop over the drawn clusters, for the same random numbers."""
    from mmlite.metrics.stats import _draw, _units

    clusters = np.random.default_rng(0).integers(0, 40, 250)
    units = _units(clusters, 250)
    for seed in range(5):
        got = _draw(units, np.random.default_rng(seed))
        picked = np.random.default_rng(seed).integers(0, units.n, units.n)
        assert np.array_equal(got, np.concatenate([units.members[u] for u in picked]))
