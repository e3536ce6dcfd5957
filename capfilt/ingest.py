"""Turn a URL list into webdataset shards with img2dataset's own downloader.

capfilt does not download anything itself: this maps ``DownloadConfig`` onto
``img2dataset.download`` and reads back what it wrote.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import gzip
import io
import json
import logging
import os
from typing import Any

from fsspec.core import url_to_fs

from capfilt.config import DownloadConfig
from capfilt.identity import RunRefused, fingerprint, refuse_if_changed
from capfilt.io.fs import OutputDir, expand_input, open_read, read_parquet, read_parquet_schema
from capfilt.io.layout import DOWNLOAD_FILE, NUMBERED_SHARD_FILE, PARQUET_SUFFIX, shard_of_stats
from capfilt.io.lock import hold
from capfilt.redaction import redact_text

log = logging.getLogger(__name__)

FORMATS = ("txt.gz", "csv.gz", "tsv.gz", "json.gz", "jsonl.gz", "txt", "csv", "tsv", "jsonl", "json", "parquet")


def infer_input_format(url_list: str) -> str:
    for fmt in FORMATS:
        if url_list.endswith("." + fmt):
            return fmt
    raise ValueError(f"download.input_format: cannot tell the format of {url_list!r} from its "
                     f"extension; set it to one of {', '.join(FORMATS)}")


def download(cfg: DownloadConfig, output: str, mode: str = "incremental") -> dict[str, Any]:
    """Download ``cfg.url_list`` into webdataset shards in ``output``; return img2dataset's totals.

    ``incremental`` resumes: img2dataset skips shards whose ``NNNNN_stats.json`` exists. The
    folder's ``DOWNLOAD_FILE`` records what decided its shards (``download_identity``); a rerun
    with another URL list or settings is refused, naming the change, unless ``overwrite``,
    which removes the earlier shards first. One download at a time holds the folder.
    """
    if not cfg.url_list:
        raise ValueError("download.url_list: no URL list given (--url-list)")
    # albumentations, which img2dataset imports, checks for updates over the network.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        from img2dataset import download as img2dataset_download
    except ImportError as exc:
        raise ImportError("capfilt download needs img2dataset: pip install 'img2dataset' "
                          "(it needs webdataset<0.3)") from exc
    input_format = infer_input_format(cfg.url_list) if cfg.input_format == "auto" else cfg.input_format
    check_url_list(cfg, input_format)
    identity = download_identity(cfg, input_format)
    fp = fingerprint(identity)
    out = OutputDir(output)
    with hold(out, "capfilt download"):
        if mode == "overwrite":
            _remove_shards(out)
        else:
            record = json.loads(out.read_text(DOWNLOAD_FILE)) if out.exists(DOWNLOAD_FILE) else None
            if record is None and any(shard_of_stats(n) for n in out.listdir()):
                raise RunRefused(f"{output} holds shards of a download capfilt has no record of; use "
                                 "another output folder, or --mode overwrite to download again")
            refuse_if_changed(output, record, identity, fp, "shards downloaded")
        out.write_bytes(DOWNLOAD_FILE, json.dumps({"identity": identity, "fingerprint": fp},
                                                  indent=2, sort_keys=True).encode())
        _img2dataset(img2dataset_download, cfg, output, input_format)
    return download_totals(output)


# Settings that change how fast img2dataset downloads, not what: a rerun may change them.
PLACEMENT_KEYS = ("processes_count", "thread_count")


def download_identity(cfg: DownloadConfig, input_format: str) -> dict[str, Any]:
    """What decides a download's shards: the settings (not their placement), and each URL list
    file with its checksum as its filesystem gives it (size and mtime locally, ETag on S3)."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in PLACEMENT_KEYS}
    settings["input_format"] = input_format
    files = {}
    for url in expand_input(cfg.url_list, suffixes=("." + input_format,)):
        fs, path = url_to_fs(url)
        files[redact_text(url)] = str(fs.checksum(path))
    return {"download": settings, "url_list_files": files}


def _remove_shards(out: OutputDir) -> None:
    """Before ``--mode overwrite``: the shards of the earlier download (img2dataset's own
    overwrite would delete the whole folder, the lock and the record with it)."""
    for name in out.listdir():
        if NUMBERED_SHARD_FILE.match(name):
            out.remove(name)


def _img2dataset(img2dataset_download, cfg: DownloadConfig, output: str, input_format: str) -> None:
    img2dataset_download(
        url_list=cfg.url_list,
        output_folder=output,
        output_format="webdataset",
        input_format=input_format,
        url_col=cfg.url_col,
        caption_col=cfg.caption_col if input_format not in ("txt", "txt.gz") else None,
        save_additional_columns=cfg.save_additional_columns or None,
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        resize_only_if_bigger=cfg.resize_only_if_bigger,
        encode_format=cfg.encode_format,
        encode_quality=cfg.encode_quality,
        processes_count=cfg.processes_count,
        thread_count=cfg.thread_count,
        number_sample_per_shard=cfg.number_sample_per_shard,
        timeout=cfg.timeout,
        retries=cfg.retries,
        min_image_size=cfg.min_image_size,
        incremental_mode="incremental",
        enable_wandb=False,
    )


def check_url_list(cfg: DownloadConfig, input_format: str) -> None:
    """Raise ValueError, before img2dataset starts its processes, when the URL list is missing
    or its first file lacks a column the config names (json lists are not looked into)."""
    try:
        first = expand_input(cfg.url_list, suffixes=("." + input_format,))[0]
        columns = _columns(first, input_format)
    except FileNotFoundError:
        raise ValueError(f"download.url_list: {cfg.url_list}: no such file, nor a folder of "
                         f".{input_format} files") from None
    if columns is None:
        return
    wanted = [("download.url_col", cfg.url_col), ("download.caption_col", cfg.caption_col)]
    wanted += [("download.save_additional_columns", c) for c in cfg.save_additional_columns or []]
    for key, column in wanted:
        if column is not None and column not in columns:
            raise ValueError(f"{key}: {first} has no column {column!r} (it has {', '.join(columns)})"
                             + ("; set download.caption_col=null for none" if key.endswith("caption_col") else ""))


def _columns(url: str, input_format: str) -> list[str] | None:
    """The column names of a URL list file; None for a txt or json list."""
    if input_format == "parquet":
        return read_parquet_schema(url).names
    if input_format.startswith(("txt", "json.")) or input_format == "json":
        return None
    with open_read(url) as raw:
        text = io.TextIOWrapper(gzip.GzipFile(fileobj=raw) if url.endswith(".gz") else raw, encoding="utf-8")
        first_line = text.readline()
    if input_format.startswith("jsonl"):
        return list(json.loads(first_line)) if first_line.strip() else []
    return next(csv.reader([first_line], delimiter="\t" if input_format.startswith("tsv") else ","), [])


def download_totals(output: str) -> dict[str, Any]:
    """Sum img2dataset's ``NNNNN_stats.json`` files in ``output``; when no URL succeeded, the
    commonest reasons, from the ``error_message`` column of img2dataset's parquet files."""
    out = OutputDir(output)
    totals: dict[str, Any] = {"shards": 0, "count": 0, "successes": 0, "failed_to_download": 0,
                              "failed_to_resize": 0}
    for name in out.listdir():
        if shard_of_stats(name) is None:
            continue
        stats = json.loads(out.read_text(name))
        totals["shards"] += 1
        for key in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[key] += int(stats.get(key, 0))
    if totals["count"] and not totals["successes"]:
        totals["why"] = failure_reasons(out)
    return totals


def failure_reasons(out: OutputDir, top: int = 5) -> list[tuple[str, int]]:
    """``[(reason, URLs), ...]``, commonest first, over the folder's img2dataset parquet files."""
    reasons: collections.Counter = collections.Counter()
    for name in out.listdir():
        if NUMBERED_SHARD_FILE.match(name) and name.endswith(PARQUET_SUFFIX):
            messages = read_parquet(f"{out.url}/{name}", columns=["error_message"]).column(0).to_pylist()
            reasons.update(redact_text(m) for m in messages if m)
    return reasons.most_common(top)
