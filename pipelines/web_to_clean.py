"""``capfilt web2clean``: URL list -> img2dataset shards -> CapFilt, with one config and one root.

ROOT/shards holds img2dataset's output and ROOT/clean capfilt's. Both stages are
incremental, so a rerun after a crash skips what either stage finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import posixpath

from capfilt.config import Config
from pipelines import download as download_pipeline
from pipelines import run as run_pipeline
from pipelines.arguments import add_config, add_mode, add_progress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config(parser)
    add_mode(parser, download_pipeline.MODE_HELP)
    parser.add_argument("--url-list", help=download_pipeline.URL_LIST_HELP)
    parser.add_argument("--output", required=True, help="root folder: ROOT/shards and ROOT/clean")
    add_progress(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="a line per finished shard")


def main(args: argparse.Namespace) -> int:
    config = download_pipeline.load_with_url_list(args)
    return run(config, args.output, mode=args.mode, verbose=args.verbose, progress=not args.no_progress)


def stage_folders(root: str) -> tuple[str, str]:
    root = root.rstrip("/")
    return posixpath.join(root, "shards"), posixpath.join(root, "clean")


def run(config: Config, root: str, mode: str = "incremental", verbose: bool = False,
        progress: bool = True) -> int:
    shards, clean = stage_folders(root)
    totals = download_pipeline.run(config, shards, mode=mode)
    if totals["successes"] == 0:
        print(f"capfilt: no image was downloaded into {shards}; nothing to clean")
        return 1
    config = dataclasses.replace(config, input=shards, output=clean)
    return run_pipeline.run_and_summarise(config, mode=mode, verbose=verbose, progress=progress)
