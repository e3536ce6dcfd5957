"""Turn a URL list into webdataset shards with img2dataset's own downloader.

capfilt does not download anything itself: this maps ``DownloadConfig`` onto
``img2dataset.download`` and reads back what it wrote.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from capfilt.config import DownloadConfig
from capfilt.io.fs import OutputDir

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

    ``mode`` is img2dataset's ``incremental_mode``: ``incremental`` skips shards whose
    ``NNNNN_stats.json`` exists, so a rerun after a crash resumes.
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
        incremental_mode=mode,
        enable_wandb=False,
    )
    return download_totals(output)


def download_totals(output: str) -> dict[str, Any]:
    """Sum img2dataset's ``NNNNN_stats.json`` files in ``output``."""
    out = OutputDir(output)
    totals = {"shards": 0, "count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
    for name in out.listdir():
        if not name.endswith("_stats.json"):
            continue
        stats = json.loads(out.read_text(name))
        totals["shards"] += 1
        for key in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[key] += int(stats.get(key, 0))
    return totals
