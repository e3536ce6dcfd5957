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
    """Run, print the summary, return the exit code (1 when a shard failed). Ctrl-C raises
    KeyboardInterrupt saying how many shards are done."""
    from capfilt.run import format_summary, run

    try:
        outcome = run(config, mode=mode, verbose=verbose, progress=progress)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(done_so_far(config)) from None
    print(format_summary(outcome.stats))
    return outcome.exit_code


def done_so_far(config: Config) -> str:
    from capfilt.io.fs import OutputDir, expand_input
    from capfilt.runtime.shards import plan_shards, split_done

    try:
        tasks = plan_shards(expand_input(config.input), config.output)
        _, done = split_done(tasks, OutputDir(config.output))
    except Exception:  # the count is a courtesy; the message must still come out
        return f"the shards done are kept in {config.output}; rerun the same command to resume"
    return f"{len(done)} of {len(tasks)} shards done in {config.output}; rerun the same command to resume"
