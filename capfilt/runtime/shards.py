"""Shards as units of work, and which of them a rerun still has to do."""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from capfilt.io.fs import OutputDir, shard_name
from capfilt.io.layout import stats_name
from capfilt.stats import ShardStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardTask:
    url: str
    name: str
    output: str


def plan_shards(urls: list[str], output: str) -> list[ShardTask]:
    """One task per input URL; two inputs that would write the same output name are an error."""
    names = [shard_name(u) for u in urls]
    clashes = [n for n, c in Counter(names).items() if c > 1]
    if clashes:
        example = [u for u in urls if shard_name(u) == clashes[0]]
        raise ValueError(f"input shards share the output name {clashes[0]!r}: {example}")
    return [ShardTask(url=u, name=n, output=output) for u, n in zip(urls, names)]


def split_done(tasks: list[ShardTask], out: OutputDir, fingerprint: str
               ) -> tuple[list[ShardTask], list[ShardTask]]:
    """(pending, done): done are the shards whose done marker records ``fingerprint``."""
    done = done_markers(out, tasks, fingerprint)
    return [t for t in tasks if t.name not in done], [t for t in tasks if t.name in done]


def done_markers(out: OutputDir, tasks: list[ShardTask], fingerprint: str) -> dict[str, ShardStats]:
    """The stats of every shard whose done marker (``NAME_stats.json``, written last) records
    ``fingerprint``, by shard name. A marker of another config, weights or capfilt version,
    img2dataset's stats of the same name, and an empty or unreadable marker: not done."""
    present = set(out.listdir())
    names = [t.name for t in tasks if stats_name(t.name) in present]
    with ThreadPoolExecutor(MARKER_READERS) as pool:  # an object store answers each in ~10s of ms
        markers = pool.map(lambda name: _marker(out, name), names)
    return {name: stats for name, stats in zip(names, markers)
            if stats is not None and stats.fingerprint == fingerprint}


MARKER_READERS = 16


def _marker(out: OutputDir, name: str) -> ShardStats | None:
    try:
        return ShardStats.from_json(out.read_text(stats_name(name)))
    except Exception as exc:  # a marker cut short, or not capfilt's: the shard is redone
        log.info("%s: %s is not a done marker (%s); the shard is not done", out.url, stats_name(name), exc)
        return None
