"""``capfilt run``: clean webdataset shards with a BLIP captioner and ITM filter on Ray."""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import time
from importlib import metadata
from typing import Any

from capfilt.config import Config
from capfilt.io.fs import OutputDir, configure_storage, expand_input
from capfilt.runtime.executor import RayExecutor, ShardResult
from capfilt.runtime.progress import SampleBar, estimate_samples
from capfilt.runtime.shards import done_marker, plan_shards, split_done
from capfilt.io.writer import TIMING
from capfilt.step import CapFiltStep

log = logging.getLogger("capfilt")

RUN_FILE, STATS_FILE = "run.json", "stats.json"
# webdataset's and open_clip's convention: samples per tar, so loaders know the epoch size.
SIZES_FILE = "sizes.json"
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
    _check_models(config)
    configure_storage(config.storage_options)
    tasks = plan_shards(expand_input(config.input), config.output)
    out = OutputDir(config.output)
    _remove_temporaries(out)
    _check_compatible(out, config, mode)
    pending, done = split_done(tasks, out) if mode == "incremental" else (tasks, [])
    record = _run_record(config, len(tasks))
    out.write_bytes(RUN_FILE, _json(record))

    start = time.time()
    bar = SampleBar(estimate_samples(pending), len(pending), disable=not progress)
    this_run = RunTally()

    def on_result(result: ShardResult) -> None:
        bar.shard_done()
        this_run.add(result)
        if not result.ok:
            bar.write(f"shard {result.task.name} FAILED after {result.attempts} attempts: {result.error}")
        elif verbose:
            s = result.stats
            bar.write(f"shard {result.task.name}: {s['samples']} samples, {s['kept']} kept, "
                      f"{s['error']} errors, {s[TIMING]['seconds']:.1f}s")

    executor = RayExecutor(functools.partial(make_step, config), config.runtime)
    try:
        executor.run(pending, on_result=on_result, on_progress=bar.update)
    finally:
        bar.close()
    _remove_temporaries(out)  # those of workers that died mid-shard
    if executor.worker_infos:
        record["models_resolved"] = executor.worker_infos[0].details
        out.write_bytes(RUN_FILE, _json(record))
    done_stats = _read_done_stats(out, tasks)
    stats = _aggregate(done_stats, tasks, this_run)
    stats[TIMING].update(seconds=round(time.time() - start, 3), shards_skipped=len(done))
    seconds = stats[TIMING]["seconds"]
    stats[TIMING]["images_per_s"] = round(this_run.samples / seconds, 3) if seconds > 0 else None
    out.write_bytes(STATS_FILE, _json(stats))
    out.write_bytes(SIZES_FILE, _json(_sizes(done_stats)))
    print_summary(stats)
    return 1 if this_run.failed else 0


class RunTally:
    """What this run did, as opposed to what the output folder holds."""

    def __init__(self):
        self.samples = 0
        self.processed = 0
        self.failed: list[ShardResult] = []
        self.peak_rss_mb: dict[str, float] = {}

    def add(self, result: ShardResult) -> None:
        if not result.ok:
            self.failed.append(result)
            return
        self.processed += 1
        self.samples += result.stats["samples"]
        timing = result.stats[TIMING]
        pid = str(timing["worker_pid"])
        self.peak_rss_mb[pid] = max(self.peak_rss_mb.get(pid, 0.0), timing["worker_peak_rss_mb"])


def _remove_temporaries(out: OutputDir) -> None:
    stale = out.remove_temporaries()
    if stale:
        log.info("removed %d temporary files left by an interrupted run or worker", len(stale))


def _check_models(config: Config) -> None:
    """A model that can only be a local path must exist, before any worker tries to load it."""
    for key, name in (("captioner.model", config.captioner.model), ("filter.model", config.filter.model)):
        looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
        if looks_local and not os.path.isdir(os.path.expanduser(name)):
            raise ValueError(f"{key}: {name!r} is not a folder, nor a hub id like 'Salesforce/blip-itm-large-coco'"
                             " (make tiny local models with: capfilt tiny-models DIR)")


def _check_compatible(out: OutputDir, config: Config, mode: str) -> None:
    if mode == "overwrite" or not out.exists(RUN_FILE):
        return
    previous = json.loads(out.read_text(RUN_FILE))
    if previous.get("fingerprint") != config.fingerprint():
        raise RunRefused(
            f"{out.url} holds output made with a different config, or by a capfilt version "
            f"that makes other output from it "
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
    resolved = config.to_dict()
    resolved["storage_options"] = _redact(resolved["storage_options"])
    return {
        "config": resolved,
        "fingerprint": config.fingerprint(),
        "versions": versions,
        "models": {
            "captioner": {"model": config.captioner.model, "revision": config.captioner.revision},
            "filter": {"model": config.filter.model, "revision": config.filter.revision},
        },
        "shards": shards,
    }


SECRET_WORDS = ("key", "secret", "token", "password", "credential")


def _redact(options: Any) -> Any:
    """Storage options without credentials, at any depth (``client_kwargs`` too), for run.json."""
    if isinstance(options, dict):
        return {k: "***" if any(w in str(k).lower() for w in SECRET_WORDS) and not isinstance(v, dict)
                else _redact(v) for k, v in options.items()}
    if isinstance(options, list):
        return [_redact(v) for v in options]
    return options


SUM_KEYS = ("samples", "kept", "dropped", "error", "web_texts", "web_kept", "captions", "captions_kept")


def _read_done_stats(out: OutputDir, tasks) -> dict[str, dict[str, Any]]:
    """The stats file of every done shard of the input, by shard name."""
    present = set(out.listdir())
    return {t.name: json.loads(out.read_text(done_marker(t.name)))
            for t in tasks if done_marker(t.name) in present}


def _aggregate(done_stats: dict[str, dict], tasks, this_run: RunTally) -> dict[str, Any]:
    """Totals over every done shard of the input."""
    totals = dict.fromkeys(SUM_KEYS, 0)
    for shard in done_stats.values():
        for key in SUM_KEYS:
            totals[key] += shard.get(key, 0)
    return {
        "shards": len(tasks),
        "shards_done": len(done_stats),
        "shards_failed": len(this_run.failed),
        "failed": [{"shard": r.task.name, "input": r.task.url, "attempts": r.attempts,
                    "error": r.error} for r in this_run.failed],
        **totals,
        "web_kept_pct": _pct(totals["web_kept"], totals["web_texts"]),
        "captions_kept_pct": _pct(totals["captions_kept"], totals["captions"]),
        TIMING: {
            "shards_processed": this_run.processed,
            "samples_processed": this_run.samples,
            "worker_peak_rss_mb": this_run.peak_rss_mb,
        },
    }


def _sizes(done_stats: dict[str, dict]) -> dict[str, int]:
    return {f"{name}.tar": shard.get("tar_samples", shard.get("kept", 0)) for name, shard in done_stats.items()}


def _pct(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 2) if whole else None


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8")


def print_summary(stats: dict[str, Any]) -> None:
    rows = [
        ("shards done", f"{stats['shards_done']} of {stats['shards']}"),
        ("shards skipped (already done)", stats[TIMING]["shards_skipped"]),
        ("shards failed", stats["shards_failed"]),
        ("samples in", stats["samples"]),
        ("kept", stats["kept"]),
        ("dropped", stats["dropped"]),
        ("errors", stats["error"]),
        ("web texts kept", _fmt_pct(stats["web_kept"], stats["web_kept_pct"])),
        ("synthetic captions kept", _fmt_pct(stats["captions_kept"], stats["captions_kept_pct"])),
        ("images/s (this run)", stats[TIMING]["images_per_s"]),
    ]
    width = max(len(name) for name, _ in rows)
    print("\ncapfilt summary")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    for f in stats["failed"]:
        print(f"  FAILED {f['shard']} ({f['input']}): {f['error']}")


def _fmt_pct(count: int, pct: float | None) -> str:
    return f"{count} ({pct:.1f}%)" if pct is not None else f"{count}"
