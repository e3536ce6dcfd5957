"""``capfilt report``: a self-contained HTML report of an output folder."""

from __future__ import annotations

import argparse

from capfilt.config import Config
from pipelines.arguments import add_config, load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a capfilt output folder, local or fsspec URL")
    parser.add_argument("--html", default="report.html", help="the HTML file to write")
    parser.add_argument("--max-shards", type=int, default=16,
                        help="shards whose parquet feeds the histograms and examples, spread over the run")
    parser.add_argument("--examples", type=int, default=12, help="examples per grid")
    parser.add_argument("--image-shards", type=int, default=4,
                        help="tars to stream for thumbnails (more only if a grid would be empty)")
    add_config(parser, "YAML config, for its storage_options and reader.max_image_pixels")


def main(args: argparse.Namespace) -> int:
    write(load(args), args.path, args.html, max_shards=args.max_shards, examples=args.examples,
          image_shards=args.image_shards)
    return 0


def write(config: Config, path: str, html: str, max_shards: int = 16, examples: int = 12,
          image_shards: int = 4) -> None:
    """Write the report of ``path`` to ``html`` and print a line of its totals."""
    from capfilt.io.fs import configure_storage
    from capfilt.report import build_report, write_report

    configure_storage(config.storage_options)
    data = build_report(path, max_shards=max_shards, examples=examples, image_shards=image_shards,
                        max_pixels=config.reader.max_image_pixels)
    write_report(data, html)
    t = data.totals
    print(f"capfilt report: {t['shards']:,} shards, {t['samples']:,} samples, {t['kept']:,} kept, "
          f"{t['dropped']:,} dropped, {t['error']:,} errors; examples from "
          f"{len(data.sampled_shards)} shards -> {html}")
