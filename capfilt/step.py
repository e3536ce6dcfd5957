"""The CapFilt step: one shard in, its cleaned tar, parquet and stats out.

read -> decode and preprocess (threads) -> caption -> score -> decide -> write.
The step knows nothing of how it is scheduled; the Ray executor calls ``run``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from capfilt.config import Config
from capfilt.decision import decide
from capfilt.io.fs import OutputDir, configure_storage
from capfilt.io.images import ImageError, decode_rgb
from capfilt.io.reader import ReaderOptions, read_shard
from capfilt.io.writer import TIMING, ShardWriter
from capfilt.models.captioner import Captioner, batch_seed
from capfilt.models.itm_filter import ITMFilter
from capfilt.models.loading import resolve_device, torch_dtype
from capfilt.prefetch import prefetch_batches
from capfilt.runtime.shards import ShardTask
from capfilt.sample import DROPPED, ERROR, KEPT, Sample

log = logging.getLogger(__name__)

Report = Callable[[dict[str, int]], None]


class CapFiltStep:
    """Holds the captioner and the filter, loaded once, and processes whole shards."""

    def __init__(self, config: Config):
        self.config = config
        configure_storage(config.storage_options)
        rt = config.runtime
        self.device = resolve_device(rt.device)
        self.dtype = torch_dtype(rt.dtype, self.device)
        self.captioner = Captioner(config.captioner, self.device, rt.dtype)
        self.filter = ITMFilter(config.filter, self.device, rt.dtype)
        cap_proc, itm_proc = self.captioner.image_processor, self.filter.image_processor
        # One preprocessing when both checkpoints preprocess alike (the usual case).
        self.processors = {"captioner": cap_proc}
        if itm_proc.to_dict() != cap_proc.to_dict():
            self.processors["filter"] = itm_proc
        self.reader_options = ReaderOptions(image_extensions=config.reader.image_extensions,
                                            max_member_bytes=config.reader.max_member_bytes)

    def revisions(self) -> dict[str, Any]:
        return {
            "captioner": {"model": self.config.captioner.model, "resolved": self.captioner.loaded.revision},
            "filter": {"model": self.config.filter.model, "resolved": self.filter.loaded.revision},
        }

    def prepare(self, sample: Sample) -> Sample:
        """Decode and preprocess one image (runs on a decode thread)."""
        if sample.error is not None:
            return sample
        try:
            image = decode_rgb(sample.image, self.config.reader.max_image_pixels)
        except ImageError as exc:
            return sample.fail(f"{sample.source}: {sample.key}.{sample.image_ext}: {exc}")
        sample.width, sample.height = image.size
        sample.pixels = {
            name: proc(images=image, return_tensors="np")["pixel_values"][0]
            for name, proc in self.processors.items()
        }
        return sample

    def run(self, task: ShardTask, report: Report | None = None,
            worker: dict[str, Any] | None = None) -> dict[str, Any]:
        """Process one shard. ``worker`` (who runs it, from the executor) goes into the stats' timing."""
        start = time.time()
        rt = self.config.runtime
        counts: Counter = Counter()
        out = OutputDir(task.output)
        samples = read_shard(task.url, self.reader_options)
        batches = prefetch_batches(samples, self.prepare, rt.batch_size, rt.decode_threads,
                                   rt.prefetch_batches)
        model_seconds = 0.0  # in the models, to tell compute from I/O, decoding and Ray
        with ShardWriter(out, task.name, self.config.filter.threshold, self.config.writer.layout) as writer:
            for index, batch in enumerate(batches):
                begin = time.perf_counter()
                self.process_batch(batch, batch_seed(rt.seed, task.name, index))
                model_seconds += time.perf_counter() - begin
                for sample in batch:
                    writer.write(sample)
                    _count(counts, sample, self.config.filter.threshold)
                if report:
                    report(dict(counts))
        stats = _shard_stats(task, counts, start, time.time(), worker or {"worker_pid": os.getpid()})
        stats[TIMING]["model_seconds"] = round(model_seconds, 3)
        stats["tar_samples"] = writer.written
        writer.finish(stats)
        return stats

    def process_batch(self, batch: list[Sample], seed: int) -> None:
        good = [s for s in batch if s.error is None]
        if good:
            self._judge(good, seed)
        for sample in batch:
            sample.pixels = None  # free the tensors before the sample is written

    def _judge(self, samples: list[Sample], seed: int) -> None:
        import torch

        pixels = {
            name: torch.from_numpy(np.stack([s.pixels[name] for s in samples]))
            for name in self.processors
        }
        if self.device == "cuda":
            pixels = {n: p.pin_memory().to("cuda", non_blocking=True) for n, p in pixels.items()}
        pixels = {n: p.to(self.dtype) for n, p in pixels.items()}
        captions = self.captioner(pixels["captioner"], seed)
        texts = []
        for sample, caps in zip(samples, captions):
            sample.captions = caps
            texts.append(_unique(([sample.web_text] if _scorable(sample.web_text) else []) + caps))
        scores = self.filter(pixels.get("filter", pixels["captioner"]), texts)
        cfg = self.config.filter
        for sample, image_texts, image_scores in zip(samples, texts, scores):
            by_text = dict(zip(image_texts, image_scores))
            if _scorable(sample.web_text):
                sample.web_score = by_text[sample.web_text]
            sample.caption_scores = [by_text[c] for c in sample.captions]
            decide(sample, cfg.threshold, cfg.selection)


def _scorable(text: str | None) -> bool:
    return text is not None and text.strip() != ""


def _unique(texts: list[str]) -> list[str]:
    return list(dict.fromkeys(texts))


def _count(counts: Counter, sample: Sample, threshold: float) -> None:
    counts["samples"] += 1
    counts[sample.status] += 1
    if sample.status == ERROR:
        return
    counts["web_texts"] += sample.web_text is not None
    counts["web_scored"] += sample.web_score is not None
    counts["web_kept"] += any(origin == "web" for _, origin, _ in sample.kept_texts)
    counts["captions"] += len(sample.captions)
    counts["captions_kept"] += sum(score >= threshold for score in sample.caption_scores)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _shard_stats(task: ShardTask, counts: Counter, start: float, end: float,
                 worker: dict[str, Any]) -> dict[str, Any]:
    """Counts, then what varies from run to run under ``timing``."""
    return {
        "shard": task.name,
        "input": task.url,
        "samples": counts["samples"],
        KEPT: counts[KEPT],
        DROPPED: counts[DROPPED],
        ERROR: counts[ERROR],
        "web_texts": counts["web_texts"],
        "web_kept": counts["web_kept"],
        "captions": counts["captions"],
        "captions_kept": counts["captions_kept"],
        TIMING: {
            "seconds": round(end - start, 3),
            "started_at": start,
            "finished_at": end,
            **worker,
            "worker_peak_rss_mb": peak_rss_mb(),
        },
    }
