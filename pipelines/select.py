"""``capfilt select RUN NEW``: a new cleaned webdataset from a finished run's scores, no model loaded."""

from __future__ import annotations

import argparse

from capfilt.select import SelectOutcome, select
from capfilt.runtime.progress import DoneBar
from pipelines.arguments import add_config, add_mode, add_progress, load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="the output folder of a finished capfilt run")
    parser.add_argument("new", metavar="NEW", help="the folder to write the selection to")
    parser.add_argument("--input", nargs="+", help="the run's input shards, when they are not where its "
                        "run.json says (moved, or recorded with their credentials masked)")
    add_config(parser, "YAML config: its select: section is the policy")
    add_mode(parser, "incremental skips the shards already selected by this policy; overwrite redoes "
                     "them all, and may change the policy of NEW")
    add_progress(parser)


def main(args: argparse.Namespace) -> int:
    config = load(args, input=args.input, output=args.new)
    bar = DoneBar("select", disable=args.no_progress)
    try:
        outcome = select(args.run, config, args.mode, progress=bar)
    finally:
        bar.close()
    print(format_summary(outcome, args.new))
    return 0


def format_summary(outcome: SelectOutcome, output: str) -> str:
    stats = outcome.stats
    rows = [("shards done", f"{stats['shards_done']} of {stats['shards']}"),
            ("shards written (this run)", stats["timing"]["shards_written"]),
            ("samples in", stats["samples"]), ("kept", stats["kept"]),
            ("samples in the tars", stats["tar_samples"])]
    rows += [(f"left: {reason}", count) for reason, count in stats["reasons"].items() if reason != "kept"]
    rows += [(f"texts taken by {policy}", count) for policy, count in stats["texts_removed"].items()]
    width = max(len(name) for name, _ in rows)
    return "\n".join([f"\ncapfilt select -> {output}"] + [f"  {name:<{width}}  {value}" for name, value in rows])
