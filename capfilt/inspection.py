"""Rows to look at: an output's parquet, an output shard, or an input shard, filtered."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any

from capfilt.io.fs import exists, expand_input, isdir, read_parquet, read_parquet_schema, shard_name
from capfilt.io.writer import IMAGE_EMBEDDING
from capfilt.io.layout import PARQUET_SUFFIX, parquet_name
from capfilt.io.reader import read_shard


def iter_rows(path: str, status: str | None = None, key: str | None = None) -> Iterator[dict[str, Any]]:
    """Rows of ``path``: an output folder (all its parquet), a ``.parquet``, an output ``.tar``
    (its parquet beside it), or an input ``.tar`` (read directly, status ``input``)."""
    for row in _rows(path):
        if (status is None or row["status"] == status) and (key is None or row["key"] == key):
            yield row


def _rows(path: str) -> Iterator[dict[str, Any]]:
    if isdir(path):
        for found in expand_input(path, suffixes=(PARQUET_SUFFIX,)):
            yield from _parquet_rows(found)
        return
    if path.endswith(PARQUET_SUFFIX):
        yield from _parquet_rows(path)
        return
    sidecar = posixpath.join(posixpath.dirname(path), parquet_name(shard_name(path)))
    if exists(sidecar) and _is_capfilt_parquet(sidecar):
        yield from _parquet_rows(sidecar)
        return
    for sample in read_shard(path):
        yield {"key": sample.key, "status": "input" if sample.error is None else "error",
               "error": sample.error, "web_text": sample.web_text, "web_score": None,
               "captions": [], "caption_scores": [], "text": None, "url": sample.meta.get("url")}


def _parquet_rows(path: str) -> Iterator[dict[str, Any]]:
    """The rows, without the image embeddings: 256 numbers a row that inspect never shows."""
    columns = [name for name in read_parquet_schema(path).names if name != IMAGE_EMBEDDING]
    yield from read_parquet(path, columns=columns).to_pylist()


def _is_capfilt_parquet(path: str) -> bool:
    return "web_score" in read_parquet_schema(path).names


def printable(text: str) -> str:
    """Web text as a terminal shows it harmlessly: escape sequences and other control or
    format characters as ``\\x1b``-style escapes, never sent to the terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def format_table(rows: list[dict[str, Any]], width: int = 48) -> str:
    """A plain terminal table: key, status, web text and score, captions and scores."""
    def cut(text: str | None) -> str:
        text = "" if text is None else printable(" ".join(str(text).split()))
        return text if len(text) <= width else text[: width - 1] + "…"

    def score(value: float | None) -> str:
        return "" if value is None else f"{value:.3f}"

    lines = [f"{'key':<16} {'status':<8} {'score':>6}  {'web text / captions'}"]
    for row in rows:
        mark = "*" if row.get("text") is not None and row.get("text") == row.get("web_text") else " "
        lines.append(f"{cut(row['key'])[:16]:<16} {row['status']:<8} {score(row.get('web_score')):>6} "
                     f"{mark}{cut(row.get('web_text'))}")
        for caption, value in zip(row.get("captions") or [], row.get("caption_scores") or []):
            mark = "*" if caption == row.get("text") else " "
            lines.append(f"{'':<16} {'':<8} {score(value):>6} {mark}  {cut(caption)}")
        if row.get("error"):
            lines.append(f"{'':<16} {'':<8} {'':>6}  error: {cut(row['error'])}")
    return "\n".join(lines)
