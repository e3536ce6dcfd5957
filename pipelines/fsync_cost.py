"""What making each shard durable costs: a shard's files written through ``OutputDir.staged``
(tar, parquet, stats; each fsynced before its rename, the folder after), with and without the
fsyncs, alternating in one run so both see the same disk.

    python -m pipelines.fsync_cost --output /tmp/capfilt_fsync --shards 50

The default shape is the soak test's (tests/test_faults.py: 50 shards of 4 samples, 48x40
JPEGs): small files, where an fsync weighs most. Prints the milliseconds per shard of each.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from unittest import mock

from capfilt.io.fs import OutputDir
from capfilt.io.layout import shard_files


def write_shard(out: OutputDir, name: str, sizes: tuple[int, int, int]) -> None:
    with out.staged() as staging:
        for file_name, size in zip(shard_files(name), sizes):
            with staging.open(file_name) as f:
                f.write(os.urandom(size))


def measure(output: str, shards: int, sizes: tuple[int, int, int]) -> dict[str, float]:
    out = OutputDir(output)
    seconds = {"fsync": 0.0, "no_fsync": 0.0}
    for i in range(shards):
        for kind in (("fsync", "no_fsync") if i % 2 else ("no_fsync", "fsync")):
            begin = time.perf_counter()
            if kind == "fsync":
                write_shard(out, f"{kind}{i:05d}", sizes)
            else:
                with mock.patch("os.fsync"):
                    write_shard(out, f"{kind}{i:05d}", sizes)
            seconds[kind] += time.perf_counter() - begin
    per_shard = {k: round(v / shards * 1000, 3) for k, v in seconds.items()}
    return {"shards": shards, "ms_per_shard": per_shard,
            "fsync_ms_per_shard": round(per_shard["fsync"] - per_shard["no_fsync"], 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="fsync_cost_output")
    parser.add_argument("--shards", type=int, default=50)
    parser.add_argument("--sizes", type=int, nargs=3, default=[10240, 16384, 1024],
                        help="bytes of the tar, parquet and stats (default: the soak test's)")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.output, args.shards, tuple(args.sizes)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
