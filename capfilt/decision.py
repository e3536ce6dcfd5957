"""The CapFilt decision: which texts of an image survive, and which one is its caption."""

from __future__ import annotations

from capfilt.sample import DROPPED, KEPT, Sample

WEB, SYNTHETIC = "web", "synthetic"


def decide(sample: Sample, threshold: float, selection: str) -> Sample:
    """Keep texts scoring ``>= threshold`` (BLIP's rule at 0.5), without duplicates.

    The web text comes first, so a synthetic caption equal to it is counted as web.
    """
    kept: list[tuple[str, str, float]] = []
    seen: set[str] = set()
    if sample.web_score is not None and sample.web_score >= threshold:
        kept.append((sample.web_text, WEB, sample.web_score))
        seen.add(sample.web_text)
    for text, score in zip(sample.captions, sample.caption_scores):
        if score >= threshold and text not in seen:
            kept.append((text, SYNTHETIC, score))
            seen.add(text)
    sample.kept_texts = kept
    sample.status = KEPT if kept else DROPPED
    sample.text = select(kept, selection) if kept else None
    return sample


def select(kept: list[tuple[str, str, float]], selection: str) -> str:
    if selection == "prefer_web" and kept[0][1] == WEB:
        return kept[0][0]
    # best_score (and prefer_web without a kept web text): the highest score, first on ties.
    return max(kept, key=lambda item: item[2])[0]
