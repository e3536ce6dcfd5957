"""``capfilt run``: clean webdataset shards with a BLIP captioner and ITM filter on Ray."""

from __future__ import annotations

import functools
import json
import logging
import platform
import sys
import time
from importlib import metadata
from typing import Any

from capfilt.config import Config
from capfilt.io.fs import OutputDir, expand_input
from capfilt.runtime.executor import RayExecutor, ShardResult
from capfilt.runtime.progress import SampleBar, estimate_samples
from capfilt.runtime.shards import done_marker, plan_shards, split_done
from capfilt.step import CapFiltStep

log = logging.getLogger("capfilt")

RUN_FILE, STATS_FILE = "run.json", "stats.json"
PACKAGES = ("capfilt", "torch", "transformers", "ray", "webdataset", "pyarrow", "fsspec", "pillow")


class RunRefused(RuntimeError):
    """The output folder was made by a different config; say ``--mode overwrite`` to replace it."""


def make_step(config: Config) -> CapFiltStep:
    return CapFiltStep(config)


def run(config: Config, mode: str = "incremental", verbose: bool = False,
        progress: bool = True) -> int:
    """Process every pending shard; return the exit code (1 when any shard failed)."""
    if not config.input:
        raise ValueError("no input: give --input or set 'input' in the config")
    if not config.output:
        raise ValueError("no output: give --output or set 'output' in the config")
    tasks = plan_shards(expand_input(config.input), config.output)
    out = OutputDir(config.output)
    stale = out.remove_temporaries()
    if stale:
        log.info("removed %d temporary files left by an interrupted run", len(stale))
    _check_compatible(out, config, mode)
    pending, done = split_done(tasks, out) if mode == "incremental" else (tasks, [])
    record = _run_record(config, len(tasks))
    out.write_bytes(RUN_FILE, _json(record))

    start = time.time()
    bar = SampleBar(estimate_samples(pending), len(pending), disable=not progress)
    failed: list[ShardResult] = []
    processed = [0]

    def on_result(result: ShardResult) -> None:
        bar.shard_done()
        if not result.ok:
            failed.append(result)
            bar.write(f"shard {result.task.name} FAILED after {result.attempts} attempts: {result.error}")
            return
        processed[0] += result.stats["samples"]
        if verbose:
            s = result.stats
            bar.write(f"shard {result.task.name}: {s['samples']} samples, {s['kept']} kept, "
                      f"{s['error']} errors, {s['seconds']:.1f}s")

    executor = RayExecutor(functools.partial(make_step, config), config.runtime)
    try:
        executor.run(pending, on_result=on_result, on_progress=bar.update)
    finally:
        bar.close()
    if executor.worker_infos:
        record["models_resolved"] = executor.worker_infos[0].details
        out.write_bytes(RUN_FILE, _json(record))
    stats = _aggregate(out, tasks, len(done), failed, processed[0], time.time() - start)
    out.write_bytes(STATS_FILE, _json(stats))
    print_summary(stats)
    return 1 if failed else 0


def _check_compatible(out: OutputDir, config: Config, mode: str) -> None:
    if mode == "overwrite" or not out.exists(RUN_FILE):
        return
    previous = json.loads(out.read_text(RUN_FILE))
    if previous.get("fingerprint") != config.fingerprint():
        raise RunRefused(
            f"{out.url} holds output made with a different config "
            f"(fingerprint {previous.get('fingerprint')} != {config.fingerprint()}); "
            "use another output folder, or --mode overwrite to redo it"
        )


def _run_record(config: Config, shards: int) -> dict[str, Any]:
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "config": config.to_dict(),
        "fingerprint": config.fingerprint(),
        "versions": versions,
        "models": {
            "captioner": {"model": config.captioner.model, "revision": config.captioner.revision},
            "filter": {"model": config.filter.model, "revision": config.filter.revision},
        },
        "shards": shards,
        "command": sys.argv,
    }


SUM_KEYS = ("samples", "kept", "dropped", "error", "web_texts", "web_kept", "captions", "captions_kept")


def _aggregate(out: OutputDir, tasks, skipped: int, failed: list[ShardResult],
               processed_now: int, seconds: float) -> dict[str, Any]:
    """Totals over every done shard of the input, from their stats files."""
    totals = dict.fromkeys(SUM_KEYS, 0)
    present = set(out.listdir())
    done = 0
    for task in tasks:
        if done_marker(task.name) not in present:
            continue
        done += 1
        shard = json.loads(out.read_text(done_marker(task.name)))
        for key in SUM_KEYS:
            totals[key] += shard.get(key, 0)
    return {
        "shards": len(tasks),
        "shards_done": done,
        "shards_skipped": skipped,
        "shards_failed": len(failed),
        "failed": [{"shard": r.task.name, "input": r.task.url, "attempts": r.attempts,
                    "error": r.error} for r in failed],
        **totals,
        "web_kept_pct": _pct(totals["web_kept"], totals["web_texts"]),
        "captions_kept_pct": _pct(totals["captions_kept"], totals["captions"]),
        "seconds": round(seconds, 3),
        "images_per_s": round(processed_now / seconds, 3) if seconds > 0 else None,
    }


def _pct(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 2) if whole else None


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8")


def print_summary(stats: dict[str, Any]) -> None:
    rows = [
        ("shards done", f"{stats['shards_done']} of {stats['shards']}"),
        ("shards skipped (already done)", stats["shards_skipped"]),
        ("shards failed", stats["shards_failed"]),
        ("samples in", stats["samples"]),
        ("kept", stats["kept"]),
        ("dropped", stats["dropped"]),
        ("errors", stats["error"]),
        ("web texts kept", _fmt_pct(stats["web_kept"], stats["web_kept_pct"])),
        ("synthetic captions kept", _fmt_pct(stats["captions_kept"], stats["captions_kept_pct"])),
        ("images/s (this run)", stats["images_per_s"]),
    ]
    width = max(len(name) for name, _ in rows)
    print("\ncapfilt summary")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    for f in stats["failed"]:
        print(f"  FAILED {f['shard']} ({f['input']}): {f['error']}")


def _fmt_pct(count: int, pct: float | None) -> str:
    return f"{count} ({pct:.1f}%)" if pct is not None else f"{count}"
