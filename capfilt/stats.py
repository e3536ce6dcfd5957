"""What a shard's processing counted, typed: the one definition the writer, the run, the
progress bar and the report share.

A shard's counts come from each sample's decision (its status and ``kept_texts``), never
from the threshold a second time. ``timing`` holds what differs from run to run of the same
input and config (seconds, worker, memory); everything else is reproducible.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import time
from dataclasses import dataclass, field
from typing import Any

from capfilt.decision import SYNTHETIC, WEB
from capfilt.sample import DROPPED, ERROR, KEPT, Sample

TIMING = "timing"


@dataclass
class Counts:
    """Sample counts, summable over shards and runs."""

    samples: int = 0
    kept: int = 0
    dropped: int = 0
    error: int = 0
    web_texts: int = 0
    web_kept: int = 0
    captions: int = 0
    captions_kept: int = 0

    def add(self, sample: Sample) -> None:
        """Count one sample by its decision."""
        self.samples += 1
        if sample.status == KEPT:
            self.kept += 1
        elif sample.status == DROPPED:
            self.dropped += 1
        if sample.status == ERROR:
            self.error += 1
            return
        origins = [origin for _, origin, _ in sample.kept_texts]
        self.web_texts += sample.web_text is not None
        self.web_kept += WEB in origins
        self.captions += len(sample.captions)
        # As the parquet's kept_texts: distinct captions, one equal to the web text counted as web.
        self.captions_kept += origins.count(SYNTHETIC)

    def __iadd__(self, other: "Counts") -> "Counts":
        for f in dataclasses.fields(Counts):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(Counts)}

    @classmethod
    def total(cls, many) -> "Counts":
        total = cls()
        for counts in many:
            total += counts
        return total

    @property
    def web_kept_pct(self) -> float | None:
        return percent(self.web_kept, self.web_texts)

    @property
    def captions_kept_pct(self) -> float | None:
        return percent(self.captions_kept, self.captions)


@dataclass
class ShardStats(Counts):
    """A shard's ``NAME_stats.json``: its counts, the samples in its tar, and its timing."""

    shard: str = ""
    input: str = ""
    # The fingerprint of what made the shard (capfilt/identity.py): the marker counts only for it.
    fingerprint: str = ""
    tar_samples: int = 0  # kept images, or kept (image, text) pairs in the pairs layout
    timing: dict[str, Any] = field(default_factory=dict)

    def start(self, worker: dict[str, Any]) -> None:
        self.timing.update(started_at=time.time(), **worker)

    def finish(self) -> None:
        """Time a started shard (the writer calls this when the shard's files are written)."""
        if "started_at" not in self.timing:
            return
        end = time.time()
        self.timing.update(seconds=round(end - self.timing["started_at"], 3), finished_at=end,
                           worker_peak_rss_mb=peak_rss_mb())

    def counts(self) -> dict[str, int]:
        return Counts.as_dict(self)

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str) -> "ShardStats":
        """A stats file as written; fields a newer or older capfilt wrote are ignored or zero."""
        raw = json.loads(data)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def percent(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 2) if whole else None


def peak_rss_mb() -> float:
    """This process's peak resident memory so far."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
