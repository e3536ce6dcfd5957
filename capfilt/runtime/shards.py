"""Shards as units of work, and which of them a rerun still has to do."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from capfilt.io.fs import OutputDir, shard_name
from capfilt.io.layout import stats_name


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


def split_done(tasks: list[ShardTask], out: OutputDir) -> tuple[list[ShardTask], list[ShardTask]]:
    """(pending, done): a shard is done when its stats file, written last, exists."""
    present = set(out.listdir())
    done = [t for t in tasks if stats_name(t.name) in present]
    pending = [t for t in tasks if stats_name(t.name) not in present]
    return pending, done
