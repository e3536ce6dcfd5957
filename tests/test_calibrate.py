"""capfilt.calibrate: precision/recall against the threshold, and the suggested threshold."""

import pytest

from capfilt.calibrate import curve, suggest


def test_curve_counts_precision_recall_specificity():
    scores = [0.9, 0.8, 0.35, 0.3, 0.2, 0.1]
    labels = [True, True, True, False, False, False]
    points = {round(p.threshold, 2): p for p in curve(scores, labels)}
    at = points[0.33]  # keeps 0.9, 0.8, 0.35
    assert (at.precision, at.recall, at.specificity) == (1.0, 1.0, 1.0)
    at = points[0.5]  # keeps 0.9, 0.8
    assert at.precision == 1.0 and at.recall == pytest.approx(2 / 3) and at.specificity == 1.0
    at = points[0.15]  # keeps all but 0.1
    assert at.precision == pytest.approx(3 / 5) and at.recall == 1.0 and at.specificity == pytest.approx(1 / 3)


def test_suggest_for_each_goal():
    scores = [0.9, 0.8, 0.35, 0.3, 0.2, 0.1]
    labels = [True, True, True, False, False, False]
    points = curve(scores, labels)
    best = suggest(points, "balanced_accuracy")
    assert 0.3 < best.threshold <= 0.35 and best.balanced_accuracy == 1.0
    assert suggest(points, "recall", 1.0).threshold == pytest.approx(0.35)  # highest keeping all
    assert suggest(points, "precision", 1.0).threshold == pytest.approx(0.31)  # lowest with no false match
    with pytest.raises(ValueError):
        suggest(points, "accuracy")
