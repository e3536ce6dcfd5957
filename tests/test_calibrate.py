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


SCORES = [0.9, 0.8, 0.35, 0.3, 0.2, 0.1]
LABELS = [True, True, True, False, False, False]


@pytest.mark.parametrize("target, value", [("recall", 2), ("recall", -1), ("precision", 0), ("precision", None)])
def test_an_impossible_target_value_is_an_error(target, value):
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        suggest(curve(SCORES, LABELS), target, value)


def test_a_precision_met_only_by_keeping_nothing_is_not_suggested_silently():
    from capfilt.calibrate import shortfall

    labels = [False, True, True, False, False, False]  # the best score is a non-match
    best = suggest(curve(SCORES, labels), "precision", 1.0)
    assert best.recall > 0  # it keeps something
    assert "no threshold reaches precision >= 1.0" in shortfall(best, "precision", 1.0)
    met = suggest(curve(SCORES, LABELS), "precision", 1.0)
    assert shortfall(met, "precision", 1.0) is None


@pytest.mark.parametrize("value, expected", [(True, True), (0, False), (1.0, True), ("yes", True), ("No", False),
                                             ("false", False), (" match ", True), ("1", True)])
def test_labels_are_read_as_what_they_say(value, expected):
    from capfilt.calibrate import parse_label

    assert parse_label(value, "x") is expected


@pytest.mark.parametrize("value", ["maybe", 2, 0.5, ""])
def test_a_label_that_says_neither_is_an_error_naming_where(value):
    from capfilt.calibrate import parse_label

    with pytest.raises(ValueError, match="in.tar: k1: label"):
        parse_label(value, "in.tar: k1")


def test_a_parquet_without_a_label_column_or_shards_without_labels_are_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import image_bytes, write_shard

    from capfilt.calibrate import load_labelled

    path = tmp_path / "l.parquet"
    pq.write_table(pa.table({"image": [image_bytes("red")], "text": ["a red square"]}), path)
    with pytest.raises(ValueError, match=r"l.parquet: a labelled parquet needs the columns .* lacks \['label'\]"):
        load_labelled(str(path))
    shard = write_shard(tmp_path / "s.tar", [{"key": "k", "jpg": image_bytes("red"), "txt": "a red square"}])
    with pytest.raises(ValueError, match="no labelled pair"):
        load_labelled(shard)


def test_an_itc_curve_spans_the_cosine_range_and_ties_break_between_the_classes():
    from capfilt.calibrate import SCORES, centre

    itc = SCORES["itc"]
    scores, labels = [0.42, 0.40, -0.2, -0.3], [True, True, False, False]  # any t in (-0.2, 0.4] separates
    points = curve(scores, labels, itc.steps, itc.low, itc.high)
    assert (len(points), points[0].threshold, points[-1].threshold) == (199, -0.99, 0.99)
    assert points[69].threshold == -0.3  # 0.01 apart, exactly: the key's value as printed
    assert {round(p.threshold, 2): p.recall for p in points}[-0.3] == 1.0
    middle = centre(scores, labels)
    assert middle == pytest.approx(0.08)  # midway between the means 0.41 and -0.25
    best = suggest(points, "balanced_accuracy", centre=middle)
    assert best.threshold == 0.08 and best.balanced_accuracy == 1.0
    assert suggest(points, "balanced_accuracy").threshold == 0.4  # 0.5's nearest, the ITM default
