"""``capfilt download``: a URL list (parquet, csv, tsv, txt, json) to webdataset shards via img2dataset."""

from __future__ import annotations

import argparse
from typing import Any

from capfilt.config import Config
from capfilt.ingest import download
from pipelines.arguments import add_config, add_mode, load

MODE_HELP = "incremental skips finished shards; overwrite redoes them"
URL_LIST_HELP = "parquet, csv, tsv, txt or json file (or folder) of URLs (default: the config's download.url_list)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config(parser)
    add_mode(parser, MODE_HELP)
    parser.add_argument("--url-list", help=URL_LIST_HELP)
    parser.add_argument("--output", required=True, help="folder for the shards")


def main(args: argparse.Namespace) -> int:
    totals = run(load_with_url_list(args), args.output, mode=args.mode)
    return 0 if totals["successes"] else 1


def load_with_url_list(args: argparse.Namespace) -> Config:
    config = load(args)
    if args.url_list:
        config.download.url_list = args.url_list
    return config


def run(config: Config, output: str, mode: str = "incremental") -> dict[str, Any]:
    totals = download(config.download, output, mode=mode)
    print_summary(totals, output)
    return totals


def print_summary(totals: dict[str, Any], output: str) -> None:
    print(f"\ndownload summary ({output})")
    for key in ("shards", "count", "successes", "failed_to_download", "failed_to_resize"):
        print(f"  {key.replace('_', ' '):<20}  {totals[key]}")
    if totals.get("why"):
        print("  every URL failed; the commonest reasons:")
        for reason, urls in totals["why"]:
            print(f"    {urls:>6} x {reason}")
