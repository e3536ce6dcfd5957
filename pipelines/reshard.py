"""``capfilt reshard``: repack a capfilt output folder into even shards, by samples or by bytes."""

from __future__ import annotations

import argparse
import re
from typing import Any

from capfilt.reshard import reshard
from capfilt.runtime.progress import DoneBar

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``500MB`` (decimal), ``1GiB`` (binary), ``123`` (bytes) -> a positive number of bytes."""
    match = SIZE.match(text)
    unit = match and match.group(2).lower()
    if not match or unit not in UNITS:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: a number with an optional unit (B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    size = int(float(match.group(1)) * UNITS[unit])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be at least one byte")
    return size


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: a positive integer")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="INPUT", help="a capfilt output folder (local or fsspec URL)")
    parser.add_argument("output", metavar="OUTPUT", help="the folder to write the new shards to")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--samples-per-shard", type=positive_int, metavar="N",
                        help="kept samples per output shard (the last one may hold fewer)")
    target.add_argument("--bytes-per-shard", type=parse_size, metavar="SIZE",
                        help="tar bytes per output shard, e.g. 500MB or 1GiB (a larger sample goes alone)")
    parser.add_argument("--mode", choices=["incremental", "overwrite"], default="incremental",
                        help="incremental skips output shards already done; overwrite redoes them all")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Reshard as ``args`` say; a bad input raises ``ReshardError`` (a ValueError) or OSError."""
    bar = DoneBar("reshard", disable=args.no_progress)
    try:
        summary = reshard(args.input, args.output, samples_per_shard=args.samples_per_shard,
                          bytes_per_shard=args.bytes_per_shard, overwrite=args.mode == "overwrite",
                          progress=bar)
    finally:
        bar.close()
    print_summary(summary, args.output)
    return 0


def run_from_args(args: argparse.Namespace) -> int:
    """``main`` as the command line runs it: 0 when done, 2 (with a one-line message) for a bad input."""
    from pipelines.cli import guarded

    return guarded(main, args)


def print_summary(summary: dict[str, Any], output: str) -> None:
    rows = [
        ("input shards (done)", summary["input_shards"]),
        ("kept samples", summary["samples"]),
        ("output shards", summary["output_shards"]),
        ("written", summary["written"]),
        ("skipped (already done)", summary["skipped"]),
        ("tar bytes", summary["bytes"]),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"\ncapfilt reshard -> {output}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
