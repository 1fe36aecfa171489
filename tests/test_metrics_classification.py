"""Tests for mmlite.metrics.classification against torchmetrics, on hand-checked examples and on bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.classification import (BinaryAUROC, BinaryCalibrationError, MulticlassAccuracy,
                                         MulticlassCalibrationError, MulticlassConfusionMatrix)

from mmlite.metrics.classification import (accuracy, calibration_bins, confusion_matrix, expected_calibration_error,
                                           per_class_accuracy, roc_auc)

# AUC: ours is a float64 rank sum, torchmetrics integrates its exact ROC curve in float32; both are ratios of
# counts <= 300^2, so they agree to float32 resolution (~1e-7). ECE: torchmetrics sums confidences per bin in
# float32 (<= 400 terms, rounding ~1e-7 relative), we sum in float64. 1e-6 covers both and is far below
# the size of a bin-edge mistake (one example moving bin changes the ECE by ~1/N > 2.5e-3).
TOL = 1e-6
CASES = 200


def _binary_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.integers(2, 300))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]  # both classes present
    scores = np.clip(rng.random(n) * 0.6 + 0.4 * labels * rng.random(n), 0, 1).astype(np.float32)
    if rng.random() < 0.5:  # many ties: scores on a coarse grid
        scores = np.round(scores * 8) / 8
    return scores, labels


def test_roc_auc_matches_torchmetrics():
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(CASES):
        s, y = _binary_case(rng)
        ref = float(BinaryAUROC()(torch.from_numpy(s), torch.from_numpy(y)))
        worst = max(worst, abs(roc_auc(s, y) - ref))
    assert worst <= TOL


def test_roc_auc_hand_checked_and_ties():
    # positives 0.8, 0.4; negatives 0.4, 0.1: pairs (0.8>0.4) (0.8>0.1) (0.4=0.4 -> 1/2) (0.4>0.1) -> 3.5/4
    assert roc_auc([0.8, 0.4, 0.4, 0.1], [1, 1, 0, 0]) == pytest.approx(0.875)
    assert roc_auc([1.0, 1.0, 1.0], [0, 1, 1]) == pytest.approx(0.5)  # all tied: half credit everywhere
    assert roc_auc([-5.0, 3.0], [True, False]) == 0.0  # any real scores, bool labels
    brute = lambda s, y: np.mean([(a > b) + 0.5 * (a == b) for a in s[y == 1] for b in s[y == 0]])  # noqa: E731
    rng = np.random.default_rng(1)
    for _ in range(50):
        s, y = rng.integers(0, 4, 20).astype(float), rng.integers(0, 2, 20)
        y[:2] = [0, 1]
        assert roc_auc(s, y) == pytest.approx(brute(s, y), abs=1e-12)


def test_roc_auc_bad_input():
    with pytest.raises(ValueError, match="only class 1"):
        roc_auc([0.2, 0.9], [1, 1])
    with pytest.raises(ValueError, match="only class 0"):
        roc_auc([0.2, 0.9], [0, 0])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0.2, np.nan], [0, 1])
    with pytest.raises(ValueError, match="one score per label"):
        roc_auc([0.2, 0.3, 0.4], [0, 1])
    with pytest.raises(ValueError, match="0/1"):
        roc_auc([0.2, 0.3], [0, 2])
    with pytest.raises(ValueError, match="empty"):
        roc_auc([], [])


def test_binary_ece_matches_torchmetrics():
    rng = np.random.default_rng(2)
    worst = 0.0
    for case in range(CASES):
        p, y = _binary_case(rng)
        if case % 4 == 0:  # values exactly on bin edges, 0 and 1
            p[: len(p) // 2] = rng.integers(0, 16, len(p) // 2) / 15
        n_bins = int(rng.choice([5, 10, 15]))
        ref = float(BinaryCalibrationError(n_bins=n_bins, norm="l1")(torch.from_numpy(p), torch.from_numpy(y)))
        worst = max(worst, abs(expected_calibration_error(p, y, n_bins) - ref))
    assert worst <= TOL


def _multiclass_case(rng: np.random.Generator, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.integers(1, 400))
    logits = rng.standard_normal((n, n_classes)) * rng.uniform(0.5, 6)
    p = torch.softmax(torch.from_numpy(logits).float(), dim=1).numpy()
    labels = np.where(rng.random(n) < 0.6, p.argmax(1), rng.integers(0, n_classes, n))
    return p, labels


def test_multiclass_ece_matches_torchmetrics():
    rng = np.random.default_rng(3)
    worst = 0.0
    for case in range(CASES):
        c = int(rng.integers(2, 8))
        p, y = _multiclass_case(rng, c)
        if case % 4 == 0:  # rows of one-hot probabilities: confidence exactly 1.0, torchmetrics' extra bin
            hot = rng.random(len(p)) < 0.3
            p[hot] = np.eye(c, dtype=np.float32)[p[hot].argmax(1)]
        ref = float(MulticlassCalibrationError(num_classes=c, n_bins=15, norm="l1")(
            torch.from_numpy(p), torch.from_numpy(y)))
        worst = max(worst, abs(expected_calibration_error(p, y) - ref))
    assert worst <= TOL


def test_calibration_bins_hand_checked():
    probs = np.array([0.0, 0.1, 0.5, 0.5, 0.99, 1.0, 1.0])
    labels = np.array([0, 1, 1, 0, 1, 1, 0])
    b = calibration_bins(probs, labels, n_bins=2)
    # bins [0, .5), [.5, 1), [1, 1]: 0.5 is in the upper bin (left-closed), 1.0 in the extra one
    assert b.count.tolist() == [2, 3, 2] and b.lower.tolist() == [0.0, 0.5, 1.0] and b.upper.tolist() == [0.5, 1, 1]
    assert b.confidence == pytest.approx([0.05, (0.5 + 0.5 + 0.99) / 3, 1.0])
    assert b.accuracy == pytest.approx([0.5, 2 / 3, 0.5])
    ece = (2 * abs(0.5 - 0.05) + 3 * abs(2 / 3 - 1.99 / 3) + 2 * abs(0.5 - 1.0)) / 7
    assert expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(ece)
    # multiclass: confidence is the max prob, correct is argmax == label
    pm = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1]])
    bm = calibration_bins(pm, [0, 2], n_bins=10)
    assert bm.count[6] == 1 and bm.count[7] == 1 and bm.accuracy[7] == 1.0 and bm.accuracy[6] == 0.0
    assert expected_calibration_error(pm, [0, 2], n_bins=10) == pytest.approx((0.3 + 0.6) / 2)


def test_calibration_bad_input():
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        expected_calibration_error([0.2, 1.3], [0, 1])
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        expected_calibration_error([-0.1, 0.3], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        expected_calibration_error([np.nan, 0.3], [0, 1])
    with pytest.raises(ValueError, match="sum to 1"):
        expected_calibration_error([[0.5, 0.6], [0.5, 0.5]], [0, 1])
    with pytest.raises(ValueError, match="examples but labels"):
        expected_calibration_error([0.5, 0.6], [0, 1, 1])
    with pytest.raises(ValueError, match="outside"):
        expected_calibration_error([0.5, 0.6], [0, 2])
    with pytest.raises(ValueError, match="floating"):
        expected_calibration_error([0, 1], [0, 1])
    with pytest.raises(ValueError, match="n_bins"):
        calibration_bins([0.5], [1], n_bins=0)


def test_confusion_and_accuracy_match_torchmetrics():
    rng = np.random.default_rng(4)
    worst_cm, worst_acc = 0, 0.0
    for _ in range(CASES):
        c = int(rng.integers(2, 10))
        n = int(rng.integers(3 * c, 300))
        target = np.r_[np.arange(c), rng.integers(0, c, n - c)]  # every class present
        pred = np.where(rng.random(n) < 0.5, target, rng.integers(0, c, n))
        ref_cm = MulticlassConfusionMatrix(num_classes=c)(torch.from_numpy(pred), torch.from_numpy(target)).numpy()
        worst_cm = max(worst_cm, int(np.abs(confusion_matrix(pred, target, c) - ref_cm).max()))
        ref_pc = MulticlassAccuracy(num_classes=c, average=None)(torch.from_numpy(pred), torch.from_numpy(target))
        ref_micro = MulticlassAccuracy(num_classes=c, average="micro")(torch.from_numpy(pred), torch.from_numpy(target))
        worst_acc = max(worst_acc, float(np.abs(per_class_accuracy(pred, target, c) - ref_pc.numpy()).max()),
                        abs(accuracy(pred, target) - float(ref_micro)))
    assert worst_cm == 0 and worst_acc <= TOL


def test_classification_hand_checked_and_bad_input():
    pred, target = np.array([0, 1, 1, 2, 2, 2]), np.array([0, 1, 0, 2, 1, 2])
    assert accuracy(pred, target) == pytest.approx(4 / 6)
    assert confusion_matrix(pred, target, 3).tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    assert per_class_accuracy(pred, target, 3) == pytest.approx([0.5, 0.5, 1.0])
    scores = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 1.0]])  # the tie in row 2 goes to class 0
    assert accuracy(scores, [0, 1, 0]) == 1.0
    with pytest.raises(ValueError, match=r"classes \[3\] have no example"):
        per_class_accuracy(pred, target, 4)
    assert np.isnan(per_class_accuracy(pred, target, 4, absent="nan")[3])
    with pytest.raises(ValueError, match="examples but target"):
        accuracy(pred[:-1], target)
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(pred, target, 2)
    with pytest.raises(ValueError, match="n_classes"):
        confusion_matrix(pred, target, 1)
    with pytest.raises(ValueError, match="integer class ids"):
        accuracy(np.array([0.5, 1.0]), [0, 1])
