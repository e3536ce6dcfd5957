"""``capfilt run``: the command line of ``capfilt.run``."""

from __future__ import annotations

import argparse

from capfilt.config import Config
from pipelines.arguments import add_config, add_mode, add_progress, load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config(parser)
    parser.add_argument("--input", nargs="+", help="shards: brace pattern, glob, folder or list; any fsspec URL "
                                                  "(default: the config's input)")
    parser.add_argument("--output", help="output folder, local or fsspec URL (default: the config's output)")
    add_mode(parser, "incremental skips done shards; overwrite redoes them all")
    add_progress(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="a line per finished shard")


def main(args: argparse.Namespace) -> int:
    inputs = args.input[0] if args.input and len(args.input) == 1 else args.input
    config = load(args, input=inputs, output=args.output)
    return run_and_summarise(config, mode=args.mode, verbose=args.verbose, progress=not args.no_progress)


def run_and_summarise(config: Config, mode: str, verbose: bool, progress: bool) -> int:
    """Run, print the summary, return the exit code (1 when a shard failed)."""
    from capfilt.run import format_summary, run

    outcome = run(config, mode=mode, verbose=verbose, progress=progress)
    print(format_summary(outcome.stats))
    return outcome.exit_code
