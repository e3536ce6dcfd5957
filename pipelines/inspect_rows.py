"""``capfilt inspect``: print samples of an input or output shard, or an output folder, as a table."""

from __future__ import annotations

import argparse
from itertools import islice

STATUSES = ["kept", "dropped", "error", "input"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="an output folder, a .parquet, an output .tar or an input .tar")
    parser.add_argument("--status", choices=STATUSES,
                        help="only rows of this status (input: a sample of an input shard); default: all")
    parser.add_argument("--key", help="only the sample with this key; default: all")
    parser.add_argument("--limit", type=int, default=20, help="at most this many rows")


def main(args: argparse.Namespace) -> int:
    from capfilt.inspection import format_table, iter_rows

    if args.limit < 0:
        raise ValueError(f"--limit {args.limit}: give a number of rows, 0 or more")
    print(format_table(list(islice(iter_rows(args.path, args.status, args.key), args.limit))))
    return 0
