"""Choose the filter's threshold from labelled pairs: scores, precision/recall, a suggestion.

BLIP's 0.5 is right for its COCO-fine-tuned filter; another checkpoint, domain or
training recipe puts its match/no-match boundary elsewhere. Given (image, text, label)
pairs scored with the configured filter, this finds the threshold for a target.
"""

from __future__ import annotations

from dataclasses import dataclass


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


def curve(scores: list[float], labels: list[bool], steps: int = 99) -> list[Point]:
    """Precision, recall and specificity at thresholds 0.01 .. 0.99 (keep when score >= t)."""
    positives = sum(labels)
    negatives = len(labels) - positives
    points = []
    for i in range(1, steps + 1):
        t = i / (steps + 1)
        kept = [label for score, label in zip(scores, labels) if score >= t]
        true_kept = sum(kept)
        dropped_neg = negatives - (len(kept) - true_kept)
        points.append(Point(t, true_kept / len(kept) if kept else 1.0,
                            true_kept / positives if positives else 0.0,
                            dropped_neg / negatives if negatives else 0.0))
    return points


def suggest(points: list[Point], target: str = "balanced_accuracy", value: float | None = None) -> Point:
    """The threshold for a goal: the best ``balanced_accuracy`` or ``f1``; or the highest
    threshold with recall >= value (``recall``); or the lowest with precision >= value (``precision``)."""
    if target in ("balanced_accuracy", "f1"):
        return max(points, key=lambda p: (getattr(p, target), -abs(p.threshold - 0.5)))
    if target == "recall":
        ok = [p for p in points if p.recall >= value]
        return max(ok, key=lambda p: p.threshold) if ok else min(points, key=lambda p: p.threshold)
    if target == "precision":
        ok = [p for p in points if p.precision >= value]
        return min(ok, key=lambda p: p.threshold) if ok else max(points, key=lambda p: p.threshold)
    raise ValueError(f"unknown calibration target {target!r}")


LABEL_FIELDS = ("label", "match", "is_match")


def load_labelled(spec: str | list[str]) -> tuple[list, list[str], list[bool]]:
    """(RGB images, texts, labels) of a labelled set: webdataset shards whose json has a
    ``label`` (or ``match``) field, or parquet files with ``text``, ``label`` and ``image``
    (bytes) columns."""
    from capfilt.config import MAX_IMAGE_PIXELS
    from capfilt.io.fs import expand_input, read_parquet
    from capfilt.io.images import decode_rgb
    from capfilt.io.reader import read_shard

    specs = [spec] if isinstance(spec, str) else spec
    images, texts, labels = [], [], []
    for url in expand_input(specs, suffixes=(".tar", ".tar.gz", ".tgz", ".parquet")):
        if url.endswith(".parquet"):
            rows = read_parquet(url, columns=["image", "text", "label"]).to_pylist()
            records = [(r["image"], r["text"], r["label"]) for r in rows]
        else:
            records = [(s.image, s.web_text, _label(s.meta)) for s in read_shard(url) if s.error is None]
        for image, text, label in records:
            if image is None or text is None or label is None:
                continue
            images.append(decode_rgb(bytes(image), MAX_IMAGE_PIXELS))
            texts.append(text)
            labels.append(bool(label))
    if not labels or all(labels) or not any(labels):
        raise ValueError(f"{spec}: a labelled set needs both matching and non-matching pairs "
                         f"(found {sum(labels)} of {len(labels)} matching)")
    return images, texts, labels


def _label(meta: dict):
    for name in LABEL_FIELDS:
        if name in meta:
            return meta[name]
    return None


def score_pairs(itm_filter, images: list, texts: list[str], batch_size: int = 32) -> list[float]:
    """ITM scores of (image, text) pairs; images are RGB PIL images."""
    import numpy as np
    import torch

    scores: list[float] = []
    processor = itm_filter.image_processor
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        pixels = torch.from_numpy(np.stack([processor(images=im, return_tensors="np")["pixel_values"][0]
                                            for im in chunk]))
        result = itm_filter(pixels, [[t] for t in texts[start:start + batch_size]])
        scores += [row[0] for row in result]
    return scores
