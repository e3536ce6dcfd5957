"""A CapFilt run over an output folder: plan, refuse a folder of another config, run the
pending shards on Ray, then write the run's record (``run.json``), totals (``stats.json``)
and samples per tar (``sizes.json``).

``run`` returns a ``RunOutcome``; the command line prints its summary.
"""

from __future__ import annotations

import functools
import json
import logging
import platform
import posixpath
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from capfilt.config import Config
from capfilt.identity import RunRefused, fingerprint, output_identity, refuse_if_changed
from capfilt.io.fs import OutputDir, configure_storage, expand_input, location
from capfilt.io.lock import hold
from capfilt.io.layout import RUN_FILE, SELECT_FILE, SIZES_FILE, STATS_FILE, tar_name
from capfilt.runtime.defaults import resolved_config
from capfilt.runtime.executor import RayExecutor, ShardResult
from capfilt.runtime.progress import SampleBar, estimate_samples
from capfilt.runtime.shards import ShardTask, done_markers, plan_shards, split_done
from capfilt.redaction import redact_options, redact_strings, redact_text
from capfilt.stats import TIMING, Counts, ShardStats
from capfilt.step import CapFiltStep

log = logging.getLogger(__name__)

PACKAGES = ("capfilt", "torch", "transformers", "ray", "webdataset", "pyarrow", "fsspec", "pillow")


@dataclass
class RunOutcome:
    """What a run leaves: the totals written to ``stats.json`` and the shards that failed."""

    stats: dict[str, Any]
    failed: list[ShardResult] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def make_step(config: Config, fingerprint: str = "") -> CapFiltStep:
    return CapFiltStep(config, fingerprint)


def run(config: Config, mode: str = "incremental", verbose: bool = False,
        progress: bool = True) -> RunOutcome:
    """Process every pending shard of ``config.input`` into ``config.output``."""
    if not config.input:
        raise ValueError("no input: give --input or set 'input' in the config")
    if not config.output:
        raise ValueError("no output: give --output or set 'output' in the config")
    weights = check_models(config)
    config = resolved_config(config)  # what auto is here: device, dtype, batch size
    identity = output_identity(config, weights)
    fp = fingerprint(identity)
    configure_storage(config.storage_options)
    urls = expand_input(config.input)
    check_outside_input(urls, config.output)
    tasks = plan_shards(urls, config.output)
    out = OutputDir(config.output)
    with hold(out, "capfilt run"):  # before anything is removed or written
        return _run_held(config, out, tasks, identity, fp, mode, verbose, progress)


def _run_held(config: Config, out: OutputDir, tasks: list[ShardTask], identity: dict[str, Any], fp: str,
              mode: str, verbose: bool, progress: bool) -> RunOutcome:
    _remove_temporaries(out)
    check_compatible(out, identity, fp, mode)
    pending, done = split_done(tasks, out, fp) if mode == "incremental" else (tasks, [])
    record = run_record(config, identity, fp, len(tasks))
    out.write_bytes(RUN_FILE, _json(record))

    start = time.time()
    this_run = RunTally()
    executor = RayExecutor(functools.partial(make_step, config, fp), config.runtime)
    try:
        _execute(executor, pending, this_run, verbose, progress)
    except KeyboardInterrupt:  # Ray is shut down by now: tidy up and say what is done
        _remove_temporaries(out)
        _, done_now = split_done(tasks, out, fp)
        raise KeyboardInterrupt(f"{len(done_now)} of {len(tasks)} shards done in {out.url}; "
                                "rerun the same command to resume") from None
    _remove_temporaries(out)  # those of workers that died mid-shard
    if executor.worker_infos:
        record["models_resolved"] = executor.worker_infos[0].details
        out.write_bytes(RUN_FILE, _json(record))
    done_stats = done_markers(out, tasks, fp)
    stats = aggregate(done_stats, tasks, this_run)
    seconds = round(time.time() - start, 3)
    stats[TIMING].update(seconds=seconds, shards_skipped=len(done),
                         images_per_s=round(this_run.samples / seconds, 3) if seconds > 0 else None)
    out.write_bytes(STATS_FILE, _json(stats))
    out.write_bytes(SIZES_FILE, _json({tar_name(n): s.tar_samples for n, s in done_stats.items()}))
    return RunOutcome(stats, this_run.failed)


def _execute(executor: RayExecutor, pending: list[ShardTask], this_run: "RunTally",
             verbose: bool, progress: bool) -> None:
    bar = SampleBar(estimate_samples(pending), len(pending), disable=not progress)

    def on_result(result: ShardResult) -> None:
        bar.shard_done()
        this_run.add(result)
        if not result.ok:
            bar.write(f"shard {result.task.name} FAILED after {result.attempts} attempts: {result.error}")
        elif verbose:
            s = result.stats
            bar.write(f"shard {result.task.name}: {s.samples} samples, {s.kept} kept, "
                      f"{s.error} errors, {s.timing['seconds']:.1f}s")

    try:
        executor.run(pending, on_result=on_result, on_progress=bar.update, on_plan=bar.write)
    finally:
        bar.close()


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
        self.samples += result.stats.samples
        timing = result.stats.timing
        pid = str(timing["worker_pid"])
        self.peak_rss_mb[pid] = max(self.peak_rss_mb.get(pid, 0.0), timing["worker_peak_rss_mb"])


def _remove_temporaries(out: OutputDir) -> None:
    stale = out.remove_temporaries()
    if stale:
        log.info("removed %d temporary files left by an interrupted run or worker", len(stale))


def check_models(config: Config) -> dict[str, str | None]:
    """Both models, and each recorded score's, can be loaded, whole and of their slot's class (a
    checkpoint folder, or a hub id in reach), before any worker tries. Returns what pins each slot's weights
    (``loading.checkpoint_identity``)."""
    from capfilt.models.loading import (check_checkpoint, check_itm_first_token, check_loads_whole,
                                        checkpoint_identity, text_positions)
    from capfilt.models.slots import model_class, slot_kind

    weights = {}
    for slot, section, length_key in (("captioner", config.captioner, "max_length"),
                                      ("filter", config.filter, "max_text_tokens")):
        checkpoint = check_checkpoint(f"{slot}.model", section.model, section.revision)
        kind = slot_kind(slot, section.kind, checkpoint, section.model)
        check_loads_whole(f"{slot}.model", section.model, section.revision, model_class(slot, kind), checkpoint)
        if slot == "filter" and kind == "blip":  # the ITM first token the checkpoint's tokenizer can give
            check_itm_first_token(f"{slot}.model", section.model, section.revision, section.first_token, checkpoint)
        # A longer text would index past the position embeddings in every batch of every shard.
        positions, wanted = text_positions(checkpoint, slot, kind), getattr(section, length_key)
        if positions is not None and wanted > positions:
            raise ValueError(f"{slot}.{length_key}: {wanted} tokens, but {section.model}'s text model "
                             f"has {positions} positions; set it to {positions} or less")
        weights[slot] = checkpoint_identity(section.model, section.revision)
    weights.update(check_scorers(config))
    return weights


def check_scorers(config: Config) -> dict[str, str | None]:
    """Each recorded score's checkpoint (``scores:``) is of a kind capfilt scores with and loads
    whole as its class; returns what pins each one's weights, keyed ``scores.NAME``."""
    from capfilt.models.loading import check_checkpoint, check_loads_whole, checkpoint_identity
    from capfilt.models.scorers import model_class, scorer_kind

    weights = {}
    for index, score in enumerate(config.scores):
        key = f"scores[{index}].model"
        checkpoint = check_checkpoint(key, score.model, score.revision)
        kind = scorer_kind(score.kind, checkpoint, key, score.model)
        check_loads_whole(key, score.model, score.revision, model_class(kind), checkpoint)
        weights[f"scores.{score.name}"] = checkpoint_identity(score.model, score.revision)
    return weights


def check_outside_input(urls: list[str], output: str) -> None:
    """Refuse an output folder that is the folder of an input shard or lies inside one: it would
    write over the input (img2dataset's ``NAME_stats.json`` is the done marker's name), and a
    later run's input would take its own output."""
    target = location(output)
    for url in urls:
        if url.startswith(("http://", "https://")):
            continue
        folder = posixpath.dirname(location(url))
        if target == folder or target.startswith(folder.rstrip("/") + "/"):
            raise ValueError(f"output {output} is {'an' if target == folder else 'inside an'} input "
                             f"folder ({posixpath.dirname(url)}, which holds {posixpath.basename(url)}); "
                             "capfilt never writes where it reads: give another output folder")


def check_compatible(out: OutputDir, identity: dict[str, Any], fp: str, mode: str) -> None:
    """Refuse, naming what changed, an output folder whose run.json records another identity,
    and a folder that holds a selection (``capfilt select``'s output, not a run's)."""
    if mode == "overwrite":
        return
    if out.exists(SELECT_FILE):
        raise RunRefused(f"{out.url} holds a selection made by capfilt select, not a run's output; use "
                         "another output folder, or --mode overwrite to replace it")
    if not out.exists(RUN_FILE):
        return
    refuse_if_changed(out.url, json.loads(out.read_text(RUN_FILE)), redact_strings(identity), fp, "output")


def run_record(config: Config, identity: dict[str, Any], fp: str, shards: int) -> dict[str, Any]:
    """``run.json``: the resolved config (credentials redacted), what decides the output
    (``identity``) and its fingerprint, versions, models."""
    versions = package_versions()
    resolved = redact_strings(config.to_dict())
    resolved["storage_options"] = redact_options(config.storage_options)
    return {
        "config": resolved,
        "identity": redact_strings(identity),
        "fingerprint": fp,
        "versions": versions,
        "models": {
            "captioner": {"model": config.captioner.model, "revision": config.captioner.revision},
            "filter": {"model": config.filter.model, "revision": config.filter.revision},
        },
        "shards": shards,
    }


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Python's version and each package's (None when it is not installed), as records hold them."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def aggregate(done_stats: dict[str, ShardStats], tasks: list[ShardTask],
              this_run: RunTally) -> dict[str, Any]:
    """``stats.json``: totals over every done shard of the input, and what this run did."""
    totals = Counts.total(done_stats.values())
    return {
        "shards": len(tasks),
        "shards_done": len(done_stats),
        "shards_failed": len(this_run.failed),
        "failed": [{"shard": r.task.name, "input": redact_text(r.task.url), "attempts": r.attempts,
                    "error": redact_text(r.error)} for r in this_run.failed],
        **totals.as_dict(),
        "web_kept_pct": totals.web_kept_pct,
        "captions_kept_pct": totals.captions_kept_pct,
        TIMING: {
            "shards_processed": this_run.processed,
            "samples_processed": this_run.samples,
            "worker_peak_rss_mb": this_run.peak_rss_mb,
        },
    }


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8")


def format_summary(stats: dict[str, Any]) -> str:
    """The run's summary, as the command line prints it."""
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
    lines = ["", "capfilt summary"] + [f"  {name:<{width}}  {value}" for name, value in rows]
    lines += [f"  FAILED {f['shard']} ({f['input']}): {f['error']}" for f in stats["failed"]]
    return "\n".join(lines)


def _fmt_pct(count: int, pct: float | None) -> str:
    return f"{count} ({pct:.1f}%)" if pct is not None else f"{count}"
