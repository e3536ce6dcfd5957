"""``capfilt web2clean``: URL list -> img2dataset shards -> CapFilt, with one config and one root.

ROOT/shards holds img2dataset's output and ROOT/clean capfilt's. Both stages are
incremental, so a rerun after a crash skips what either stage finished.
"""

from __future__ import annotations

import dataclasses
import posixpath

from capfilt.config import Config
from pipelines import download as download_pipeline
from pipelines import run as run_pipeline


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
