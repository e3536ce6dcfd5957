"""Stream samples out of a webdataset tar shard, one group of members at a time.

The tar is read in stream mode (``r|*``), so memory holds one sample, never the
whole shard; gzip-compressed shards are read the same way. Member data is only
ever read into memory: nothing is extracted to disk, and nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
from collections.abc import Iterator

from capfilt.config import ReaderConfig
from capfilt.io.fs import open_read, read_parquet, shard_name
from capfilt.io.layout import parquet_name
from capfilt.redaction import redact_text
from capfilt.sample import Sample

log = logging.getLogger(__name__)


class ShardReadError(OSError):
    """The shard is not a readable tar at all: a failure of the shard, to retry and report."""


def split_key(name: str) -> tuple[str, str]:
    """webdataset's convention: the key runs to the first dot of the file name."""
    directory, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(directory, stem) if directory else stem, ext.lower() if dot else ""


def unsafe_name(name: str) -> str | None:
    """Why a member name could escape a folder it is written into, or None."""
    if name.startswith("/") or name.startswith("\\"):
        return "absolute member name"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return "member name contains '..'"
    if any(ord(c) < 32 for c in name):
        return "member name contains control characters"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # tarfile keeps undecodable bytes as surrogates
        return "member name is not UTF-8"
    return None


def printable_key(key: str) -> str:
    """``key`` as valid UTF-8 text: undecodable bytes of a member name as ``\\xNN``."""
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def parse_json(data: bytes) -> tuple[dict | None, str | None]:
    """(the json as a dict, None), or (None, what is wrong with it). Valid JSON that the output
    cannot hold (a lone surrogate, nesting past the recursion limit) is wrong too."""
    try:
        meta = json.loads(data)
        json.dumps(meta, ensure_ascii=False).encode("utf-8")
    except Exception as exc:  # ValueError, RecursionError, UnicodeError: any of them
        return None, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return (meta if isinstance(meta, dict) else {"value": meta}), None


def read_shard(url: str, options: ReaderConfig | None = None) -> Iterator[Sample]:
    """Yield one ``Sample`` per key in ``url``; unreadable parts become error samples.

    Opening the shard can raise (missing file, network): that is a shard failure for
    the caller to retry. A tar that ends in the middle of a member yields the
    samples before it and one error sample for the cut-off key.
    """
    options = options or ReaderConfig()
    extra = sidecar_metadata(url)
    with open_read(url) as stream:
        # Samples and messages name the shard without the credentials its URL may hold.
        for sample in _read_stream(stream, redact_text(url), options):
            for field_name, value in extra.get(sample.key, {}).items():
                sample.meta.setdefault(field_name, value)
            yield sample


def sidecar_metadata(url: str) -> dict[str, dict]:
    """Rows of the ``NAME.parquet`` img2dataset writes beside ``NAME.tar``, by key.

    They fill in fields a sample's json lacks. Absent or unreadable: no extra fields.
    """
    path = posixpath.join(posixpath.dirname(url), parquet_name(shard_name(url)))
    try:
        rows = read_parquet(path).to_pylist()
    except FileNotFoundError:
        return {}
    except Exception as exc:  # a broken sidecar must not cost the shard
        log.warning("%s: ignoring unreadable metadata parquet: %s", path, exc)
        return {}
    return {row["key"]: {k: v for k, v in row.items() if v is not None and k != "key" and _jsonable(v)}
            for row in rows if isinstance(row.get("key"), str)}


def _jsonable(value) -> bool:
    """Whether the output's json can hold ``value`` (not bytes, datetimes, NaN, lone surrogates)."""
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except Exception:
        return False
    return True


MAX_NOTES = 10  # per sample; more are counted, not kept


def _note(notes: list[str], note: str) -> None:
    if len(notes) < MAX_NOTES:
        notes.append(note)
    elif len(notes) == MAX_NOTES:
        notes.append("more members skipped")


def _read_stream(stream, url: str, options: ReaderConfig) -> Iterator[Sample]:
    wanted = set(options.image_extensions) | {"txt", "json"}
    seen: set[str] = set()
    group_key: str | None = None
    members: dict[str, bytes] = {}
    notes: list[str] = []
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
        for info in tar:
            tar.members = []  # stream mode: keep no history of members, read or skipped
            if info.isdir():
                continue
            key, ext = split_key(info.name)
            if key != group_key:
                if group_key is not None:
                    yield _assemble(group_key, members, notes, seen, url, options)
                group_key, members, notes = key, {}, []
            # Memory per key is bounded: only the members a sample is made of are read, once each.
            if not info.isreg():
                _note(notes, f"skipped non-regular member {info.name!r}")
                continue
            if ext not in wanted:
                _note(notes, f"skipped member {info.name!r}")
                continue
            if info.size > options.max_member_bytes:
                _note(notes, f"member {info.name!r} is {info.size} bytes, over the limit")
                continue
            if ext in members:
                _note(notes, f"duplicate member {info.name!r}")
                continue
            members[ext] = tar.extractfile(info).read()
    except (tarfile.TarError, EOFError) as exc:
        if group_key is None:
            raise ShardReadError(f"{url}: not a readable tar: {exc}") from exc
        cut = group_key
        log.warning("%s: tar is truncated or corrupt after key %r: %s", url, cut, exc)
        yield Sample(key=cut, source=url).fail(f"tar truncated or corrupt in {url} at key {cut!r}: {exc}")
        return
    if group_key is not None:
        yield _assemble(group_key, members, notes, seen, url, options)


def _assemble(key: str, members: dict[str, bytes], notes: list[str], seen: set[str],
              url: str, options: ReaderConfig) -> Sample:
    sample = Sample(key=key, source=url)
    reason = unsafe_name(key)
    if reason:
        sample.key = printable_key(key)
        return sample.fail(f"{url}: {reason}: {sample.key!r}")
    if key in seen:
        return sample.fail(f"{url}: duplicate key {key!r} (its members are not adjacent or repeat)")
    seen.add(key)
    if "txt" in members:
        sample.web_text = members["txt"].decode("utf-8", errors="replace")
    if "json" in members:
        meta, problem = parse_json(members["json"])
        if problem is None:
            sample.meta = meta
        else:  # bad metadata costs the metadata, not the sample
            sample.raw_json = members["json"].decode("utf-8", errors="backslashreplace")
            notes.append(f"{key}.json is not usable metadata ({problem}); kept as read in input_json")
    image_ext = next((e for e in options.image_extensions if e in members), None)
    if image_ext is None:
        detail = "; ".join(notes) if notes else f"members: {sorted(members)}"
        return sample.fail(f"{url}: sample {key!r} has no image ({detail})")
    sample.image, sample.image_ext = members[image_ext], image_ext
    if notes:
        sample.notes = notes
        log.info("%s: %s: %s", url, key, "; ".join(notes))
    return sample
