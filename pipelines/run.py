"""``capfilt run``: the command line of ``capfilt.run``."""

from __future__ import annotations

import argparse

from capfilt.config import Config
from capfilt.run import format_summary, run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (defaults: BLIP large from the hub)")
    parser.add_argument("--input", nargs="+", help="shards: brace pattern, glob, folder or list; any fsspec URL")
    parser.add_argument("--output", help="output folder (local or fsspec URL)")
    parser.add_argument("--mode", choices=["incremental", "overwrite"], default="incremental",
                        help="incremental skips done shards; overwrite redoes them all")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="a line per finished shard")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")


def run_and_summarise(config: Config, mode: str, verbose: bool, progress: bool) -> int:
    """Run, print the summary, return the exit code (1 when a shard failed)."""
    outcome = run(config, mode=mode, verbose=verbose, progress=progress)
    print(format_summary(outcome.stats))
    return outcome.exit_code
