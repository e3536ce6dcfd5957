"""The one sample type that flows through every stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KEPT, DROPPED, ERROR = "kept", "dropped", "error"


@dataclass(slots=True)
class Sample:
    """One image and its texts as read from a shard, then as judged by the models.

    ``error`` is set by any stage that cannot handle the sample; later stages pass
    such samples through untouched so that every input key still becomes a row.
    """

    key: str
    source: str = ""  # the shard URL, so that every error names the shard and the key
    image: bytes | None = None
    image_ext: str | None = None
    web_text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # The json as read, when it could not be parsed into ``meta`` (bad metadata costs only itself).
    raw_json: str | None = None
    # What was wrong with the sample without costing it (a malformed json, a skipped member).
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    # Filled by the prepare stage: model inputs keyed by preprocessor name.
    pixels: dict[str, Any] | None = None
    width: int | None = None
    height: int | None = None
    # Filled by the captioner and the filter.
    captions: list[str] = field(default_factory=list)
    web_score: float | None = None
    caption_scores: list[float] = field(default_factory=list)
    # ITC similarities (filter.itc), recorded beside the ITM scores; the ITM scores decide.
    web_itc: float | None = None
    caption_itc: list[float] = field(default_factory=list)
    # The image's normalised ITC embedding, a float16 numpy vector (writer.embeddings).
    embedding: Any = None
    # Recorded scores (``scores:``), by scorer name: {"web": float | None, "captions": [float, ...]},
    # the captions' aligned with ``captions``. The parquet's NAME_web and NAME_captions.
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Filled by the decision stage.
    status: str | None = None
    kept_texts: list[tuple[str, str, float]] = field(default_factory=list)  # (text, origin, score)
    text: str | None = None

    def fail(self, reason: str) -> "Sample":
        self.error = reason
        self.status = ERROR
        self.pixels = None
        return self
