"""Choose the filter's threshold from labelled pairs: scores, precision/recall, a suggestion.

BLIP's 0.5 is right for its COCO-fine-tuned filter; another checkpoint, domain or
training recipe puts its match/no-match boundary elsewhere. Given (image, text, label)
pairs scored with the configured filter, this finds the threshold for a target: of the ITM
score (``filter.threshold``), or of the ITC similarity a run records beside it
(``select.itc_threshold``, applied by ``capfilt select``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Score:
    """A score a threshold can be calibrated for: its range, and the config key that sets it."""

    name: str
    key: str
    low: float
    high: float

    @property
    def steps(self) -> int:
        """Thresholds 0.01 apart, strictly inside the range."""
        return round((self.high - self.low) * 100) - 1


SCORES = {"itm": Score("itm", "filter.threshold", 0.0, 1.0),
          "itc": Score("itc", "select.itc_threshold", -1.0, 1.0)}  # a cosine


@dataclass(frozen=True)
class Point:
    threshold: float
    precision: float  # of "match" among pairs scored >= threshold
    recall: float  # of true matches kept
    specificity: float  # of non-matches dropped

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def balanced_accuracy(self) -> float:
        return (self.recall + self.specificity) / 2


def curve(scores: list[float], labels: list[bool], steps: int = 99, low: float = 0.0,
          high: float = 1.0) -> list[Point]:
    """Precision, recall and specificity at ``steps`` thresholds evenly inside (low, high), by
    default 0.01 .. 0.99 (keep when score >= t)."""
    positives = sum(labels)
    negatives = len(labels) - positives
    points = []
    for i in range(1, steps + 1):
        t = round(low + (high - low) * i / (steps + 1), 10)  # -0.7, not -0.7000000000000001
        kept = [label for score, label in zip(scores, labels) if score >= t]
        true_kept = sum(kept)
        dropped_neg = negatives - (len(kept) - true_kept)
        points.append(Point(t, true_kept / len(kept) if kept else 1.0,
                            true_kept / positives if positives else 0.0,
                            dropped_neg / negatives if negatives else 0.0))
    return points


def suggest(points: list[Point], target: str = "balanced_accuracy", value: float | None = None,
            centre: float = 0.5) -> Point:
    """The threshold for a goal: the best ``balanced_accuracy`` or ``f1`` (of equals, the one
    nearest ``centre``); or the highest threshold with recall >= value (``recall``); or the
    lowest with precision >= value (``precision``)."""
    if target in ("balanced_accuracy", "f1"):
        return max(points, key=lambda p: (getattr(p, target), -abs(p.threshold - centre)))
    if target not in ("recall", "precision"):
        raise ValueError(f"unknown calibration target {target!r}")
    if value is None or not 0 < value <= 1:
        raise ValueError(f"the {target} to reach must be in (0, 1], not {value}")
    if target == "recall":
        ok = [p for p in points if p.recall >= value]
        return max(ok, key=lambda p: p.threshold) if ok else min(points, key=lambda p: p.threshold)
    # A threshold that keeps nothing has no precision to speak of: it never meets the target.
    keeping = [p for p in points if p.recall > 0] or points
    ok = [p for p in keeping if p.precision >= value]
    return min(ok, key=lambda p: p.threshold) if ok else max(keeping, key=lambda p: (p.precision, -p.threshold))


def shortfall(point: Point, target: str, value: float | None) -> str | None:
    """Why ``point`` (from ``suggest``) does not meet a precision or recall target, or None."""
    if target == "recall" and point.recall < value:
        return f"no threshold keeps recall >= {value}; the suggestion keeps {point.recall:.3f}"
    if target == "precision" and (point.precision < value or point.recall == 0):
        return (f"no threshold reaches precision >= {value} while keeping any matching pair; "
                f"the suggestion reaches {point.precision:.3f}")
    return None


LABEL_FIELDS = ("label", "match", "is_match")
PARQUET_COLUMNS = ("image", "text", "label")
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "match"), ("0", "false", "no", "mismatch", "no_match")


def parse_label(value, where: str) -> bool:
    """A label as a bool: true/false, 1/0, or the words yes/no, true/false, match/mismatch."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise ValueError(f"{where}: label {value!r} is not a match or no-match "
                     "(true/false, 1/0, yes/no, match/mismatch)")


def load_labelled(spec: str | list[str]) -> tuple[list, list[str], list[bool]]:
    """(RGB images, texts, labels) of a labelled set: webdataset shards whose json has a
    ``label`` (or ``match``) field, or parquet files with ``text``, ``label`` and ``image``
    (bytes) columns."""
    from capfilt.config import MAX_IMAGE_PIXELS
    from capfilt.io.fs import expand_input, read_parquet, read_parquet_schema
    from capfilt.io.images import decode_rgb
    from capfilt.io.reader import read_shard

    specs = [spec] if isinstance(spec, str) else spec
    images, texts, labels = [], [], []
    for url in expand_input(specs, suffixes=(".tar", ".tar.gz", ".tgz", ".parquet")):
        if url.endswith(".parquet"):
            missing = [c for c in PARQUET_COLUMNS if c not in read_parquet_schema(url).names]
            if missing:
                raise ValueError(f"{url}: a labelled parquet needs the columns {list(PARQUET_COLUMNS)}; "
                                 f"it lacks {missing}")
            rows = read_parquet(url, columns=list(PARQUET_COLUMNS)).to_pylist()
            records = [(r["image"], r["text"], r["label"], f"{url} row {i}") for i, r in enumerate(rows)]
        else:
            records = [(s.image, s.web_text, _label(s.meta), f"{url}: {s.key}")
                       for s in read_shard(url) if s.error is None]
        for image, text, label, where in records:
            if image is None or text is None or label is None:
                continue
            labels.append(parse_label(label, where))
            images.append(decode_rgb(bytes(image), MAX_IMAGE_PIXELS))
            texts.append(text)
    if not labels:
        raise ValueError(f"{spec}: no labelled pair (a shard sample's json needs a field "
                         f"{' or '.join(LABEL_FIELDS)}; a parquet row a label)")
    if all(labels) or not any(labels):
        raise ValueError(f"{spec}: a labelled set needs both matching and non-matching pairs "
                         f"(found {sum(labels)} of {len(labels)} matching)")
    return images, texts, labels


def _label(meta: dict):
    for name in LABEL_FIELDS:
        if name in meta:
            return meta[name]
    return None


def centre(scores: list[float], labels: list[bool]) -> float:
    """Midway between the mean score of the matching pairs and that of the others: where ``suggest``
    breaks ties for a score whose range has no natural middle (ITC)."""
    matching = [s for s, label in zip(scores, labels) if label]
    others = [s for s, label in zip(scores, labels) if not label]
    return (sum(matching) / len(matching) + sum(others) / len(others)) / 2


def score_pairs(itm_filter, images: list, texts: list[str], batch_size: int = 32,
                score: str = "itm") -> list[float]:
    """ITM scores (or, ``score="itc"``, ITC similarities) of (image, text) pairs, as the filter
    scores them in a run; images are RGB PIL images. ITC needs the filter built with ``itc`` on."""
    if score == "itc" and not itm_filter.cfg.itc:
        raise ValueError("ITC similarities need the filter with filter.itc: true")
    import numpy as np
    import torch

    scores: list[float] = []
    processor = itm_filter.image_processor
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        pixels = torch.from_numpy(np.stack([processor(images=im, return_tensors="np")["pixel_values"][0]
                                            for im in chunk]))
        result = itm_filter(pixels, [[t] for t in texts[start:start + batch_size]])
        scores += [row[0] for row in (result.itc if score == "itc" else result.itm)]
    return scores
