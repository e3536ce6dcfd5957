"""``capfilt download``: a URL list (parquet, csv, tsv, txt, json) to webdataset shards via img2dataset."""

from __future__ import annotations

from typing import Any

from capfilt.config import Config
from capfilt.ingest import download


def run(config: Config, output: str, mode: str = "incremental") -> dict[str, Any]:
    totals = download(config.download, output, mode=mode)
    print_summary(totals, output)
    return totals


def print_summary(totals: dict[str, Any], output: str) -> None:
    print(f"\ndownload summary ({output})")
    for key in ("shards", "count", "successes", "failed_to_download", "failed_to_resize"):
        print(f"  {key.replace('_', ' '):<20}  {totals[key]}")
