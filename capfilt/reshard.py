"""Repack a capfilt output folder into shards of a target number of samples or bytes.

The kept samples of the done input shards (those with ``NAME_stats.json``), in shard
order then row order, are cut into contiguous runs, one per output shard. The plan
is made from the parquet files alone and written to ``reshard_plan.json`` first; each
output shard is then written as ``NNNNN.tar`` (the input members copied byte for
byte, headers included), ``NNNNN.parquet`` (the source rows plus ``source_shard``)
and, last, ``NNNNN_stats.json``. A row keeps the run's columns: the fixed ones and those of
the scores the run recorded (``scores:``, NAME_web and NAME_captions, named by its
``run.json``; in a folder without one, a selection's, the pairs its parquet holds). A rerun with the same inputs and target skips the
output shards already done and writes the same bytes for the others.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capfilt.io.fs import OutputDir, exists, expand_input, open_read, read_json
from capfilt.io.reader import split_key, unsafe_name
from capfilt.io.layout import (NUMBERED_SHARD_FILE, RESHARD_PLAN_FILE, RUN_FILE, STATS_SUFFIX, parquet_name,
                               shard_files, shard_of_stats, stats_name, tar_name)
from capfilt.io.writer import (ADDED_COLUMNS, PARQUET_SCHEMA, TAR_BYTES, recorded_score_names, run_schema,
                               score_columns)
from capfilt.stats import TIMING
from capfilt.sample import KEPT

log = logging.getLogger(__name__)

PLAN_VERSION = 1
SOURCE_SHARD = pa.field("source_shard", pa.string(), nullable=False)
OUTPUT_SCHEMA = PARQUET_SCHEMA.append(SOURCE_SHARD)  # of a run that recorded no score


def output_schema(score_names: list[str]) -> pa.Schema:
    """An output shard's parquet: the run's columns, its recorded scores' included, then ``source_shard``."""
    return run_schema(score_names).append(SOURCE_SHARD)

Progress = Callable[[int, int], None]  # (kept samples done, kept samples in the plan)
Range = list  # [input shard name, first kept index, end kept index (exclusive)]


class ReshardError(ValueError):
    """The input cannot be resharded as asked: bad folder, inconsistent shard, duplicate key."""


class ReshardRefused(ReshardError):
    """The output folder holds a different reshard; pass ``overwrite=True`` to redo it."""


@dataclass(frozen=True)
class Target:
    """Exactly one of: samples per output shard, or (estimated) tar bytes per output shard."""

    samples_per_shard: int | None = None
    bytes_per_shard: int | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.samples_per_shard, self.bytes_per_shard) if v is not None]
        if len(given) != 1:
            raise ReshardError("give exactly one of samples_per_shard and bytes_per_shard")
        if isinstance(given[0], bool) or not isinstance(given[0], int) or given[0] <= 0:
            raise ReshardError(f"the target must be a positive integer, not {given[0]!r}")

    def to_dict(self) -> dict[str, int]:
        if self.samples_per_shard is not None:
            return {"samples_per_shard": self.samples_per_shard}
        return {"bytes_per_shard": self.bytes_per_shard}


@dataclass
class InputShard:
    name: str
    kept: int
    sizes: list[int] | None  # tar bytes per kept sample (the writer's tar_bytes), when planning by bytes


@dataclass
class Inputs:
    folder: str  # the input folder as listed (absolute, or with its protocol)
    shards: list[InputShard]
    fingerprint: str
    score_names: list[str]  # the recorded scores whose columns are carried


# --- reading the input folder --------------------------------------------------------------------

def done_shards(input_url: str) -> list[tuple[str, str]]:
    """(name, stats URL) of every done shard in ``input_url``, sorted by shard name."""
    try:
        urls = expand_input(input_url.rstrip("/"), suffixes=(STATS_SUFFIX,))
    except FileNotFoundError:
        urls = []
    found = [(shard_of_stats(posixpath.basename(u)), u) for u in urls if shard_of_stats(posixpath.basename(u))]
    if not found:
        raise ReshardError(f"{input_url}: not a capfilt output folder with a done shard "
                           f"(no NAME{STATS_SUFFIX})")
    return sorted(found)


def _read_bytes(url: str) -> bytes:
    with open_read(url) as f:
        return f.read()


def _read_stats(url: str) -> dict[str, Any]:
    try:
        stats = json.loads(_read_bytes(url))
    except ValueError as exc:
        raise ReshardError(f"{url}: unreadable stats file: {exc}") from exc
    if not isinstance(stats, dict):
        raise ReshardError(f"{url}: unreadable stats file: not a json object")
    return {k: v for k, v in stats.items() if k != TIMING}


def _kept_rows(url: str, data: bytes, score_names: list[str] = ()) -> pa.Table:
    """The rows with status 'kept', in file order, with exactly the run's schema (``run_schema``:
    the recorded scores' columns of ``score_names`` after the fixed ones)."""
    table = pq.read_table(pa.BufferReader(data))
    for name in ADDED_COLUMNS:  # written before capfilt recorded it: null
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, PARQUET_SCHEMA.field(name).type))
    missing = [n for n in PARQUET_SCHEMA.names if n not in table.column_names]
    if missing:
        raise ReshardError(f"{url}: not a capfilt parquet (missing columns {missing})")
    unrecorded = [c for name in score_names for c in score_columns(name) if c not in table.column_names]
    if unrecorded:
        raise ReshardError(f"{url}: no {unrecorded[0]} column, where the run recorded score "
                           f"{unrecorded[0].rsplit('_', 1)[0]!r} (its other shards have it)")
    schema = run_schema(score_names)
    table = table.select(schema.names).cast(schema)
    return table.filter(pc.equal(table["status"], KEPT))


def recorded_scores(folder: str, first_parquet: bytes) -> list[str]:
    """The names of the scores whose columns a reshard carries: those ``run.json``'s config
    records (``scores:``); in a folder without ``run.json`` (a selection), every NAME whose
    NAME_web and NAME_captions the first shard's parquet holds after the fixed columns."""
    run_file = posixpath.join(folder, RUN_FILE)
    if exists(run_file):
        return [item["name"] for item in (read_json(run_file).get("config") or {}).get("scores") or []]
    return recorded_score_names(pq.read_schema(pa.BufferReader(first_parquet)))


def scan_inputs(input_url: str, with_sizes: bool) -> Inputs:
    """The done input shards and a fingerprint of them; duplicate kept keys are an error."""
    found = done_shards(input_url)
    folder = posixpath.dirname(found[0][1])
    shards, records = [], []
    owner: dict[str, str] = {}
    score_names = None
    for name, stats_url in found:
        url = posixpath.join(folder, parquet_name(name))
        data = _read_bytes(url)
        if score_names is None:
            score_names = recorded_scores(folder, data)
        kept = _kept_rows(url, data, score_names)
        _claim_keys(owner, kept["key"].to_pylist(), name)
        sizes = _sizes(url, kept) if with_sizes else None
        shards.append(InputShard(name, kept.num_rows, sizes))
        records.append({"shard": name, "stats": _read_stats(stats_url),
                        "parquet_sha256": hashlib.sha256(data).hexdigest()})
    _check_one_config(folder, records)
    return Inputs(folder, shards, _digest(records), score_names)


def _check_one_config(folder: str, records: list[dict[str, Any]]) -> None:
    """The done shards were all made by one config: the one ``run.json`` records, if any (an
    overwrite that did not finish leaves shards of two). Markers written before capfilt
    recorded fingerprints in them (output revision < 4) have none and are taken as they are."""
    run_file = posixpath.join(folder, RUN_FILE)
    expected = read_json(run_file).get("fingerprint") if exists(run_file) else None
    made_by = {r["shard"]: r["stats"]["fingerprint"] for r in records if "fingerprint" in r["stats"]}
    if expected is None and len(set(made_by.values())) > 1:
        expected = Counter(made_by.values()).most_common(1)[0][0]  # the rest: the most shards
    other = sorted(name for name, fp in made_by.items() if fp != expected and expected is not None)
    if other:
        raise ReshardError(f"{folder}: shards {other[:5]}{' ...' if len(other) > 5 else ''} were made by "
                           f"another config than the rest ({expected}); finish the run (capfilt run, same "
                           "command) before resharding")


def _claim_keys(owner: dict[str, str], keys: list[str], shard: str) -> None:
    """Record which input shard holds each kept key; a key seen before is an error naming both."""
    for key in keys:
        first = owner.get(key)
        if first is not None:
            where = f"twice in input shard {first!r}" if first == shard else \
                f"in input shards {first!r} and {shard!r}"
            raise ReshardError(f"duplicate key {key!r} {where}: output keys must be unique")
        owner[key] = shard


def _sizes(url: str, kept: pa.Table) -> list[int]:
    sizes = kept[TAR_BYTES].to_pylist()
    if None in sizes:
        raise ReshardError(f"{url}: no {TAR_BYTES} for kept sample {kept['key'][sizes.index(None)]}"
                           " (written by an older capfilt): reshard it by --samples-per-shard")
    return sizes


def tar_file_bytes(member_bytes: int) -> int:
    """The size of a tar whose members take ``member_bytes``: they, the two zero blocks that
    end the archive, and padding to a whole record, as tarfile writes it."""
    return -(-(member_bytes + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


# --- planning -------------------------------------------------------------------------------------

def plan_reshard(input_url: str, target: Target) -> dict[str, Any]:
    """The plan for ``input_url``, made from its parquet files only (see ``make_plan``)."""
    return make_plan(input_url, scan_inputs(input_url, target.bytes_per_shard is not None), target)


def make_plan(input_url: str, inputs: Inputs, target: Target) -> dict[str, Any]:
    """Per output shard, its ranges ``[input shard, first kept index, end kept index]``."""
    counts = _shard_counts(inputs.shards, target)
    width = max(5, len(str(len(counts) - 1)))
    ranges = _ranges([(s.name, s.kept) for s in inputs.shards], counts)
    # The recorded scores carried only when there are some: a plan without them is as before.
    scores = {"scores": inputs.score_names} if inputs.score_names else {}
    return {
        "version": PLAN_VERSION,
        "input": input_url,
        "target": target.to_dict(),
        "fingerprint": inputs.fingerprint,
        "input_shards": [s.name for s in inputs.shards],
        "samples": sum(counts),
        "shards": [{"name": f"{i:0{width}d}", "ranges": r} for i, r in enumerate(ranges)],
        **scores,
    }


def _shard_counts(shards: list[InputShard], target: Target) -> list[int]:
    """Samples per output shard; never 0. A tar's size is at most the byte target, unless it
    holds a single sample that alone is larger."""
    total = sum(s.kept for s in shards)
    if target.samples_per_shard is not None:
        full, rest = divmod(total, target.samples_per_shard)
        return [target.samples_per_shard] * full + ([rest] if rest else [])
    counts, count, size = [], 0, 0
    for sample_size in (n for s in shards for n in s.sizes):
        if count and tar_file_bytes(size + sample_size) > target.bytes_per_shard:
            counts.append(count)
            count, size = 0, 0
        count, size = count + 1, size + sample_size
    return counts + ([count] if count else [])


def _ranges(kept: list[tuple[str, int]], counts: list[int]) -> list[list[Range]]:
    """Cut the kept samples, shard after shard, into runs of ``counts`` samples."""
    result, index, position = [], 0, 0
    for count in counts:
        ranges: list[Range] = []
        while count:
            name, available = kept[index]
            take = min(count, available - position)
            if take:
                ranges.append([name, position, position + take])
            position, count = position + take, count - take
            if position == available:
                index, position = index + 1, 0
        result.append(ranges)
    return result


# --- the output folder ----------------------------------------------------------------------------

def _adopt_plan(out: OutputDir, plan: dict[str, Any], overwrite: bool) -> None:
    """Write the plan, or check it against the one there; overwrite clears earlier shards first."""
    previous = json.loads(out.read_text(RESHARD_PLAN_FILE)) if out.exists(RESHARD_PLAN_FILE) else None
    if overwrite:
        _remove_output_shards(out)
    elif previous is None and any(NUMBERED_SHARD_FILE.match(n) for n in out.listdir()):
        raise ReshardRefused(f"{out.url} holds shard files but no {RESHARD_PLAN_FILE}; use another output "
                             "folder, or overwrite to replace them")
    elif previous is not None and (why := _difference(previous, plan)):
        raise ReshardRefused(f"{out.url} holds a different reshard ({why}); use another output "
                             "folder, or overwrite to redo it")
    if previous != plan:  # one line: a plan can list many thousands of ranges
        out.write_bytes(RESHARD_PLAN_FILE, json.dumps(plan, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Why ``old`` cannot be resumed as ``new``; the input's URL alone may change."""
    for key, what in (("version", "plan version"), ("target", "target"), ("fingerprint", "input shards"),
                      ("scores", "recorded scores carried")):
        if old.get(key) != new.get(key):
            return f"{what} changed: {old.get(key)} -> {new.get(key)}"
    if old.get("shards") != new.get("shards"):
        return "the planned shards differ"
    return None


def _remove_output_shards(out: OutputDir) -> None:
    """Done markers first, so that a crash half-way never leaves a stale shard marked done."""
    names = [n for n in out.listdir() if NUMBERED_SHARD_FILE.match(n)]
    for name in sorted(names, key=lambda n: not n.endswith(STATS_SUFFIX)):
        out.remove(name)
    if names:
        log.info("%s: removed %d files of an earlier reshard", out.url, len(names))


def _is_done(present: set[str], shard: str) -> bool:
    return set(shard_files(shard)) <= present


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True).encode("utf-8")


# --- copying ---------------------------------------------------------------------------------------

def _member_groups(url: str) -> Iterator[tuple[str, list[tuple[tarfile.TarInfo, bytes]]]]:
    """(key, members) of a tar, streaming: memory holds one sample's members."""
    with open_read(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        key, members = None, []
        for info in tar:
            if not info.isreg() or unsafe_name(info.name):
                raise ReshardError(f"{url}: unexpected member {info.name!r} in a capfilt tar")
            member_key = split_key(info.name)[0]
            if members and member_key != key:
                yield key, members
                members = []
            key = member_key
            members.append((info, tar.extractfile(info).read()))
            tar.members = []  # stream mode: keep no history of members
        if members:
            yield key, members


class _Sources:
    """The input shards' kept rows and tar samples, by range; one tar stays open between ranges."""

    def __init__(self, folder: str, score_names: list[str] = ()):
        self.folder, self.score_names = folder, list(score_names)
        self._table: tuple[str, pa.Table] | None = None
        self._tar: tuple[str, Iterator, int] | None = None  # name, groups, next index

    def rows(self, name: str, start: int, end: int) -> pa.Table:
        if self._table is None or self._table[0] != name:
            url = posixpath.join(self.folder, parquet_name(name))
            self._table = (name, _kept_rows(url, _read_bytes(url), self.score_names))
        rows = self._table[1].slice(start, end - start)
        if rows.num_rows != end - start:
            raise ReshardError(f"input shard {name!r} keeps fewer samples than planned: "
                               "it changed during the reshard")
        return rows

    def samples(self, name: str, start: int, end: int) -> Iterator[tuple[str, list]]:
        url = posixpath.join(self.folder, tar_name(name))
        if self._tar is None or self._tar[0] != name or self._tar[2] > start:
            self.close()
            self._tar = (name, _member_groups(url), 0)
        _, groups, index = self._tar
        while index < end:
            group = next(groups, None)
            if group is None:
                raise ReshardError(f"{url}: the tar ends after {index} samples; its parquet keeps more")
            index += 1
            self._tar = (name, groups, index)
            if index > start:
                yield group

    def close(self) -> None:
        if self._tar is not None:
            self._tar[1].close()
            self._tar = None


def _write_tar(f: IO[bytes], ranges: list[Range], tables: list[pa.Table], sources: _Sources,
               on_sample: Callable[[], None]) -> None:
    with tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for (name, start, end), table in zip(ranges, tables):
            expected = table["key"].to_pylist()
            for want, (key, members) in zip(expected, sources.samples(name, start, end)):
                if key != want:
                    raise ReshardError(f"input shard {name!r}: tar holds key {key!r} where its "
                                       f"parquet's kept rows have {want!r}")
                for info, data in members:
                    tar.addfile(info, io.BytesIO(data))
                on_sample()


def _write_shard(out: OutputDir, shard: dict[str, Any], sources: _Sources,
                 on_sample: Callable[[], None]) -> dict[str, Any]:
    """Tar, parquet, then the stats file that marks the output shard done."""
    name, ranges = shard["name"], shard["ranges"]
    tables = [sources.rows(*r) for r in ranges]
    with out.atomic_open(tar_name(name)) as f:
        _write_tar(f, ranges, tables, sources, on_sample)
        size = f.tell()
    rows = pa.concat_tables([t.append_column("source_shard", pa.array([r[0]] * t.num_rows, pa.string()))
                             for r, t in zip(ranges, tables)]).cast(output_schema(sources.score_names))
    with out.atomic_open(parquet_name(name)) as f:
        pq.write_table(rows, f)
    stats = {"shard": name, "samples": rows.num_rows, "bytes": size,
             "sources": [{"shard": s, "first": a, "end": b} for s, a, b in ranges]}
    out.write_bytes(stats_name(name), _json(stats))
    return stats


# --- the whole run ------------------------------------------------------------------------------

def reshard(input_url: str, output_url: str, *, samples_per_shard: int | None = None,
            bytes_per_shard: int | None = None, overwrite: bool = False,
            progress: Progress | None = None) -> dict[str, Any]:
    """Reshard ``input_url`` into ``output_url``; returns a summary of the run.

    Raises ``ReshardError`` for a bad input or target, ``ReshardRefused`` when the
    output holds a different reshard and ``overwrite`` is False.
    """
    input_url = input_url.rstrip("/")
    target = Target(samples_per_shard, bytes_per_shard)
    inputs = scan_inputs(input_url, with_sizes=target.bytes_per_shard is not None)
    plan = make_plan(input_url, inputs, target)
    out = OutputDir(output_url)
    if inputs.folder in (out.root, out.fs.unstrip_protocol(out.root)):
        raise ReshardError(f"the output folder {output_url} is the input folder")
    stale = out.remove_temporaries()
    if stale:
        log.info("%s: removed %d temporary files of an interrupted run", out.url, len(stale))
    _adopt_plan(out, plan, overwrite)
    return _execute(out, plan, _Sources(inputs.folder, inputs.score_names), progress)


def _execute(out: OutputDir, plan: dict[str, Any], sources: _Sources,
             progress: Progress | None) -> dict[str, Any]:
    present, total = set(out.listdir()), plan["samples"]
    summary = {"input_shards": len(plan["input_shards"]), "samples": total,
               "output_shards": len(plan["shards"]), "written": 0, "skipped": 0, "bytes": 0}
    done = 0

    def on_sample() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    try:
        for shard in plan["shards"]:
            if _is_done(present, shard["name"]):
                stats = json.loads(out.read_text(stats_name(shard["name"])))
                summary["skipped"] += 1
                done += stats["samples"]
                if progress:
                    progress(done, total)
            else:
                stats = _write_shard(out, shard, sources, on_sample)
                summary["written"] += 1
                log.info("%s: %d samples, %d bytes", shard["name"], stats["samples"], stats["bytes"])
            summary["bytes"] += stats["bytes"]
    finally:
        sources.close()
    return summary
