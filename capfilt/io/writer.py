"""Write one output shard: the kept samples' tar, a parquet row per input sample, stats last.

Each file is written under a temporary name; when all three are complete they are renamed
into place, the stats file last, so its presence means the whole shard is done. A shard
that fails, in its samples' loop or while its files are written, leaves none of them. File names come
from ``capfilt.io.layout``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.io.fs import OutputDir
from capfilt.io.layout import parquet_name, stats_name, tar_name
from capfilt.sample import ERROR, KEPT, Sample
from capfilt.stats import ShardStats

# Fixed so that identical inputs give byte-identical tars.
TAR_MTIME = 0

# Bytes a kept sample takes in the tar, headers and padding included (all its pairs in the
# pairs layout); null when it is not in the tar. capfilt reshard plans from it.
TAR_BYTES = "tar_bytes"

# Each image's normalised ITC embedding, float16 (writer.embeddings); null for an error row.
# Why in the parquet and not in a file beside it: ARCHITECTURE.md, "Image embeddings".
IMAGE_EMBEDDING = "image_embedding"

PARQUET_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("url", pa.string()),
    pa.field("image_ext", pa.string()),
    pa.field("image_bytes", pa.int64()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    # img2dataset's per-sample fields, from the input json (or the parquet beside the tar).
    pa.field("original_width", pa.int32()),
    pa.field("original_height", pa.int32()),
    pa.field("sha256", pa.string()),
    pa.field("web_text", pa.string()),
    pa.field("web_score", pa.float64()),
    # The ITC similarity (filter.itc); null without a web text or with filter.itc off.
    pa.field("web_itc", pa.float64()),
    pa.field("web_kept", pa.bool_()),
    pa.field("captions", pa.list_(pa.string())),
    pa.field("caption_scores", pa.list_(pa.float64())),
    pa.field("caption_itc", pa.list_(pa.float64())),  # aligned with captions; empty with filter.itc off
    pa.field("text", pa.string()),
    pa.field("text_origin", pa.string()),
    pa.field("text_score", pa.float64()),
    pa.field("kept_texts", pa.list_(pa.string())),
    pa.field("kept_origins", pa.list_(pa.string())),
    pa.field("kept_scores", pa.list_(pa.float64())),
    # The input json as it was, for every other field a downloader wrote.
    pa.field("input_json", pa.string()),
    pa.field(TAR_BYTES, pa.int64()),
    # What was wrong with the sample without costing it (a malformed json, a skipped member).
    pa.field("notes", pa.string()),
    pa.field(IMAGE_EMBEDDING, pa.list_(pa.float16())),
])


def run_schema(score_names: list[str]) -> pa.Schema:
    """A run's parquet schema: ``PARQUET_SCHEMA``, then two columns per recorded score (``scores:``),
    in the config's order: NAME_web (null without a web text) and NAME_captions (aligned with
    ``captions``)."""
    schema = PARQUET_SCHEMA
    for name in score_names:
        for column, kind in score_columns(name).items():
            if column in schema.names:
                raise ValueError(f"scores: {name!r} would write column {column}, which the parquet has already")
            schema = schema.append(pa.field(column, kind))
    return schema


def score_columns(name: str) -> dict[str, pa.DataType]:
    return {f"{name}_web": pa.float64(), f"{name}_captions": pa.list_(pa.float64())}


def recorded_score_names(schema: pa.Schema) -> list[str]:
    """The recorded scores a parquet ``schema`` holds, in its order: each NAME whose ``score_columns``
    (NAME_web and NAME_captions) it has beside the fixed columns. A run's, a selection's or a reshard's alike."""
    names = schema.names
    return [column[:-len("_web")] for column in names if column.endswith("_web")
            and column not in PARQUET_SCHEMA.names and set(score_columns(column[:-len("_web")])) <= set(names)]


# Columns added to the parquet after its first revision: a run written before one lacks it, and
# its readers (capfilt reshard) take it as null.
ADDED_COLUMNS = (TAR_BYTES, "web_itc", "caption_itc", IMAGE_EMBEDDING)


def capfilt_record(sample: Sample, threshold: float) -> dict[str, Any]:
    """The ``capfilt`` object added to each kept sample's json; the ITC similarities (``itc``,
    ``web_itc``) only when the filter recorded them."""
    captions = [{"text": t, "score": s} for t, s in zip(sample.captions, sample.caption_scores)]
    for caption, itc in zip(captions, sample.caption_itc):
        caption["itc"] = itc
    record = {
        "threshold": threshold,
        "web_text": sample.web_text,
        "web_score": sample.web_score,
        "captions": captions,
        "kept_texts": [{"text": t, "origin": o, "score": s} for t, o, s in sample.kept_texts],
        "text": sample.text,
    }
    if sample.web_itc is not None:
        record["web_itc"] = sample.web_itc
    return record


def parquet_row(sample: Sample, embeddings: bool = True) -> dict[str, Any]:
    """The sample's row; ``embeddings``: with its image embedding (never for an error row)."""
    chosen = next((k for k in sample.kept_texts if k[0] == sample.text), None)
    web_kept = None
    if sample.web_score is not None:
        web_kept = any(origin == "web" for _, origin, _ in sample.kept_texts)
    meta = sample.meta
    return {
        "key": sample.key,
        "status": sample.status,
        "error": sample.error,
        "url": _typed(meta.get("url"), str),
        "image_ext": sample.image_ext,
        "image_bytes": len(sample.image) if sample.image is not None else None,
        "width": sample.width,
        "height": sample.height,
        "original_width": _typed(meta.get("original_width"), int),
        "original_height": _typed(meta.get("original_height"), int),
        "sha256": _typed(meta.get("sha256"), str),
        "web_text": sample.web_text,
        "web_score": sample.web_score,
        "web_itc": sample.web_itc,
        "web_kept": web_kept,
        "captions": list(sample.captions),
        "caption_scores": list(sample.caption_scores),
        "caption_itc": list(sample.caption_itc),
        "text": sample.text,
        "text_origin": chosen[1] if chosen else None,
        "text_score": chosen[2] if chosen else None,
        "kept_texts": [k[0] for k in sample.kept_texts],
        "kept_origins": [k[1] for k in sample.kept_texts],
        "kept_scores": [k[2] for k in sample.kept_texts],
        "input_json": sample.raw_json if sample.raw_json is not None else
        json.dumps(meta, ensure_ascii=False, sort_keys=True) if meta else None,
        TAR_BYTES: None,
        "notes": "; ".join(sample.notes) or None,
        IMAGE_EMBEDDING: sample.embedding if embeddings and sample.status != ERROR else None,
        **{f"{name}_{part}": value for name, parts in sample.scores.items() for part, value in parts.items()},
    }


def error_row(sample: Sample) -> dict[str, Any]:
    """The parquet row of a failed sample, with every text made encodable (backslash escapes);
    at the least its key, status and reason."""
    try:
        row = _encodable(parquet_row(sample))
        pa.RecordBatch.from_pylist([row], schema=PARQUET_SCHEMA)
        return row
    except Exception:
        return _encodable({"key": sample.key, "status": ERROR, "error": sample.error})


def _check_utf8(row: dict[str, Any]) -> None:
    """Raise UnicodeEncodeError if a text of the row cannot be UTF-8 (a lone surrogate): the one
    thing of a row built by ``parquet_row`` that the parquet's columns cannot hold. Checked per
    row, so that the table is converted at once when the shard closes (per-row conversion
    cost 0.27 ms a sample)."""
    for value in row.values():
        if isinstance(value, str):
            value.encode("utf-8")
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, str):
                    item.encode("utf-8")


def _encodable(value: Any) -> Any:
    """``value`` with each string made valid UTF-8 (a lone surrogate becomes ``\\udXXX``)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list):
        return [_encodable(v) for v in value]
    if isinstance(value, dict):
        return {k: _encodable(v) for k, v in value.items()}
    return value


def _typed(value: Any, kind: type) -> Any:
    """``value`` when it has the column's type (web metadata is untrusted), else None."""
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        if kind is int and not -2**31 <= value < 2**31:
            return None
        return value
    return None


def pair_samples(sample: Sample, meta: dict[str, Any]):
    """(key, text, json) of each kept (image, text) pair: ``KEY_0``, ``KEY_1``, ... in kept order."""
    for index, (text, origin, score) in enumerate(sample.kept_texts):
        pair_meta = dict(meta)
        pair_meta["capfilt_pair"] = {"image_key": sample.key, "text": text, "origin": origin, "score": score}
        yield f"{sample.key}_{index}", text, pair_meta


class ShardWriter:
    """Context manager writing ``NAME.tar``, ``NAME.parquet`` and, when the block ends without
    an exception, ``NAME_stats.json``: the counts of every sample written (``stats``).

    If the body raises, the temporary files are removed and nothing appears.
    """

    def __init__(self, out: OutputDir, shard: str, threshold: float, layout: str = "per_image",
                 stats: ShardStats | None = None, embeddings: bool = True, schema: pa.Schema = PARQUET_SCHEMA):
        self.out, self.shard, self.threshold, self.layout = out, shard, threshold, layout
        self.schema = schema  # the parquet's: PARQUET_SCHEMA, or one with columns after it (select)
        self.embeddings = embeddings  # writer.embeddings: the image_embedding column, else null
        self.stats = stats if stats is not None else ShardStats(shard=shard)
        self.rows: list[dict[str, Any]] = []  # a parquet row per sample, each checked as written
        self._stack = contextlib.ExitStack()
        self._tar = None

    def __enter__(self) -> "ShardWriter":
        import webdataset as wds

        self._staging = self._stack.enter_context(self.out.staged())
        stream = self._stack.enter_context(self._staging.open(tar_name(self.shard)))
        self._tar = wds.TarWriter(stream, encoder=False, mtime=TAR_MTIME, format="PAX_FORMAT")
        return self

    def write(self, sample: Sample) -> None:
        """Write one judged sample. What of it cannot be written (a text or a json value the tar
        or the parquet cannot encode) makes it an error row instead: it never costs the shard."""
        try:
            row, records = self._encode(sample)
        except Exception as exc:
            sample.fail(f"{sample.source}: {sample.key}: cannot be written: {type(exc).__name__}: {exc}")
            row, records = error_row(sample), []
        self.stats.add(sample)
        if records:
            row[TAR_BYTES] = self._write_records(records)
        self.rows.append(row)

    def _encode(self, sample: Sample) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The sample's parquet row and tar records, every value encoded: nothing is written yet."""
        row = parquet_row(sample, self.embeddings)
        _check_utf8(row)
        if sample.status != KEPT:
            return row, []
        meta = dict(sample.meta)
        meta["capfilt"] = capfilt_record(sample, self.threshold)
        if self.layout == "pairs":
            pairs = list(pair_samples(sample, meta))
        else:
            pairs = [(sample.key, sample.text, meta)]
        records = [{
            "__key__": key,
            sample.image_ext: sample.image,
            "txt": text.encode("utf-8"),
            "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
        } for key, text, meta in pairs]
        for record in records:  # member names go into tar headers as UTF-8
            f"{record['__key__']}.{sample.image_ext}".encode("utf-8")
        return row, records

    def _write_records(self, records: list[dict[str, Any]]) -> int:
        """Write a kept sample's records; return the bytes they take in the tar. tarfile counts
        what it has written (headers, data, padding) in ``offset``, also in stream mode, where
        the file's own position lags behind its buffer."""
        start = self._tar.tarstream.offset
        for record in records:
            self._tar.write(record)
        self.stats.tar_samples += len(records)
        return self._tar.tarstream.offset - start

    def __exit__(self, exc_type, exc, tb) -> None:
        """Tar, parquet and stats appear together (renamed in that order), or none of them."""
        if exc_type is not None:
            with contextlib.suppress(Exception):
                self._tar.close()
            self._stack.__exit__(exc_type, exc, tb)
            return
        try:
            self._tar.close()
            self._write_parquet()
            self.stats.finish()
            with self._staging.open(stats_name(self.shard)) as f:
                f.write(self.stats.to_json())
        except BaseException:
            self._stack.__exit__(*sys.exc_info())
            raise
        self._stack.__exit__(None, None, None)

    def _write_parquet(self) -> None:
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        with self._staging.open(parquet_name(self.shard)) as f:
            pq.write_table(table, f)
