"""The CapFilt step: one shard in, its cleaned tar, parquet and stats out.

read -> decode and preprocess (threads) -> caption -> score -> decide -> write.
The step knows nothing of how it is scheduled; the Ray executor calls ``run``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from capfilt.config import Config
from capfilt.decision import decide
from capfilt.io.fs import OutputDir, configure_storage
from capfilt.io.images import SOURCE_SIZE, ImageError, UnsupportedProcessor, decode_rgb, model_input
from capfilt.io.reader import read_shard
from capfilt.io.writer import ShardWriter, run_schema
from capfilt.models.captioner import batch_seed
from capfilt.models.loading import poisons_device, resolve_device, torch_dtype
from capfilt.models.scorers import load_scorer
from capfilt.models.slots import load_captioner, load_filter, shares_vision
from capfilt.prefetch import pixel_batch, prefetch_batches
from capfilt.runtime.defaults import apply_precision, held, worker_runtime
from capfilt.runtime.shards import ShardTask
from capfilt.redaction import redact_text
from capfilt.sample import Sample
from capfilt.stats import ShardStats

log = logging.getLogger(__name__)

Report = Callable[[dict[str, int]], None]


class CapFiltStep:
    """Holds the captioner and the filter, loaded once, and processes whole shards."""

    def __init__(self, config: Config, fingerprint: str = ""):
        self.config = config
        self.fingerprint = fingerprint  # recorded in each shard's done marker
        configure_storage(config.storage_options)
        rt = worker_runtime(config.runtime)  # resolved at the run's start, unless on a cluster
        self.device = resolve_device(rt.device)
        self.dtype = torch_dtype(rt.dtype, self.device)
        apply_precision(rt)
        self.captioner = load_captioner(config.captioner, self.device, rt.dtype)  # of its checkpoint's kind
        self.filter = load_filter(config.filter, self.device, rt.dtype)
        cap_proc, itm_proc = self.captioner.image_processor, self.filter.image_processor
        # One preprocessing when both checkpoints preprocess alike (the usual case).
        self.processors = {"captioner": cap_proc}
        if itm_proc.to_dict() != cap_proc.to_dict():
            self.processors["filter"] = itm_proc
        # One vision pass per image for both when they preprocess alike and hold the same vision
        # weights (BLIP-2's captioners and ITM keep the frozen ViT they were trained on).
        self.shared_vision = "filter" not in self.processors and shares_vision(self.captioner, self.filter)
        if self.shared_vision:
            log.info("the captioner and the filter hold the same vision weights: one vision pass per image serves both")
        # Recorded scores (scores:): each scorer's pixels are under the key of a processor that
        # preprocesses as its own does, else under its own.
        self.scorers = {s.name: load_scorer(s, self.device, rt.dtype) for s in config.scores}
        self.score_inputs: dict[str, str] = {}
        for name, scorer in self.scorers.items():
            own = scorer.image_processor.to_dict()
            key = next((k for k, p in self.processors.items() if p.to_dict() == own), f"score:{name}")
            self.processors.setdefault(key, scorer.image_processor)
            self.score_inputs[name] = key
        self.reader_options = config.reader
        held_models = [held("captioner", config.captioner.kind, self.captioner.model.config.to_dict(),
                            config.captioner.model),
                       held("filter", config.filter.kind, self.filter.model.config.to_dict(), config.filter.model)]
        held_models += [held("score", s.cfg.kind, s.model.config.to_dict(), s.cfg.model) for s in self.scorers.values()]
        self.runtime = worker_runtime(rt, held_models, config.captioner, config.filter)

    def revisions(self) -> dict[str, Any]:
        return {
            "captioner": {"model": self.config.captioner.model, "resolved": self.captioner.loaded.revision},
            "filter": {"model": self.config.filter.model, "resolved": self.filter.loaded.revision},
            **{f"scores.{name}": {"model": s.cfg.model, "resolved": s.revision} for name, s in self.scorers.items()},
        }

    def prepare(self, sample: Sample) -> Sample:
        """Decode one image and resize it for each model input, to uint8 (runs on a decode
        thread). The rescale and normalise run on the model's device, in ``_judge``."""
        if sample.error is not None:
            return sample
        try:
            inputs = {name: model_input(proc) for name, proc in self.processors.items()}
            # A JPEG may decode at reduced scale, never below the largest size a model resizes to.
            at_least = (max(i.at_least[1] for i in inputs.values()), max(i.at_least[0] for i in inputs.values()))
            reader = self.config.reader
            image = decode_rgb(sample.image, reader.max_image_pixels, reader.image_formats, at_least)
            sample.width, sample.height = image.info[SOURCE_SIZE]
            sample.pixels = {name: model_in.resize(image) for name, model_in in inputs.items()}
        except UnsupportedProcessor:  # the checkpoint's, not the image's: every image would fail
            raise
        except ImageError as exc:
            return sample.fail(f"{sample.source}: {sample.key}.{sample.image_ext}: {exc}")
        except Exception as exc:  # whatever else this one image does costs only itself
            return sample.fail(f"{sample.source}: {sample.key}.{sample.image_ext}: cannot preprocess "
                               f"image: {type(exc).__name__}: {exc}")
        return sample

    def run(self, task: ShardTask, report: Report | None = None,
            worker: dict[str, Any] | None = None) -> ShardStats:
        """Process one shard. ``worker`` (who runs it, from the executor) goes into the stats' timing."""
        rt = self.runtime
        stats = ShardStats(shard=task.name, input=redact_text(task.url), fingerprint=self.fingerprint)
        stats.start(worker or {"worker_pid": os.getpid()})
        out = OutputDir(task.output)
        samples = read_shard(task.url, self.reader_options)
        batches = prefetch_batches(samples, self.prepare, rt.batch_size, rt.decode_threads,
                                   rt.prefetch_batches, pin_memory=self.device == "cuda")
        model_seconds = 0.0  # in the models, to tell compute from I/O, decoding and Ray
        with ShardWriter(out, task.name, self.config.filter.threshold, self.config.writer.layout,
                         stats, embeddings=self.config.writer.embeddings,
                         schema=run_schema(list(self.scorers))) as writer:
            staged = None
            for index, (batch, upcoming) in enumerate(_with_next(batches)):
                begin = time.perf_counter()
                finish = self.launch_batch(batch, batch_seed(rt.seed, task.name, index), staged)
                # The next batch's copy to the device and vision passes are queued before this
                # batch's post-processing (its scores' copy to the host, decisions, writing).
                staged = self.stage(upcoming) if upcoming is not None else None
                finish()
                model_seconds += time.perf_counter() - begin
                stats.timing["model_seconds"] = round(model_seconds, 3)
                for sample in batch:
                    writer.write(sample)
                if report:
                    report(stats.counts())
        return stats

    def process_batch(self, batch: list[Sample], seed: int) -> None:
        """Judge one batch, each sample's decision made (its pixels dropped)."""
        self.launch_batch(batch, seed)()

    def stage(self, batch: list[Sample]) -> "Staged | None":
        """A batch's pixels on the device and both vision passes, queued. None when that fails:
        the batch is then judged from its pixels (and, failing again, one sample at a time)."""
        good = [s for s in batch if s.error is None]
        if not good:
            return None
        try:
            pixels = self._pixels(good)
            return Staged(good, pixels, *self._vision(pixels))
        except Exception as exc:
            if poisons_device(exc):
                raise
            return None

    def launch_batch(self, batch: list[Sample], seed: int, staged: "Staged | None" = None) -> Callable[[], None]:
        """Caption the batch and queue its scores; returns what completes its decisions."""
        good = [s for s in batch if s.error is None]

        def done() -> None:
            for sample in batch:
                sample.pixels = None  # free the tensors before the sample is written

        if not good:
            return done
        try:
            finish = self._launch(good, seed, staged if staged is not None and staged.holds(good) else None)
        except Exception as exc:
            if poisons_device(exc):  # no sample of it would be judged: the worker must go
                raise
            self._judge_one_by_one(good, seed)
            return done

        def complete() -> None:
            try:
                finish()
            except Exception as exc:
                if poisons_device(exc):
                    raise
                self._judge_one_by_one(good, seed)
            done()

        return complete

    def _judge_one_by_one(self, samples: list[Sample], seed: int) -> None:
        """After a batch failed: each sample alone, so that one that fails costs only itself.
        When every one fails alone, the fault is not theirs (a device, the models): it is raised."""
        failures = []
        for position, sample in enumerate(samples):
            try:
                self._judge([sample], seed + position + 1)
            except Exception as exc:
                failures.append(exc)
                sample.fail(f"{sample.source}: {sample.key}: cannot be judged: {type(exc).__name__}: {exc}")
        if len(failures) == len(samples):
            raise failures[0]

    def _judge(self, samples: list[Sample], seed: int) -> None:
        self._launch(samples, seed)()

    def _pixels(self, samples: list[Sample]) -> dict[str, Any]:
        pixels = {}
        for name, proc in self.processors.items():
            batch = pixel_batch([s.pixels[name] for s in samples])  # uint8, pinned when prefetched for cuda
            if self.device == "cuda":
                batch = batch.to("cuda", non_blocking=True)
            pixels[name] = model_input(proc).normalise(batch, self.dtype)  # on the device
        return pixels

    def _vision(self, pixels: dict[str, Any]) -> tuple[Any, Any]:
        """(the captioner's states, the filter's) of a batch: both vision passes, or, when the two
        share their vision weights and preprocessing, one pass serving both."""
        import torch

        with torch.inference_mode():  # no autograd graph held with the states until the batch is decided
            filter_states = self.filter.image_states(pixels.get("filter", pixels["captioner"]))
            return (self.captioner.encode(pixels["captioner"], filter_states if self.shared_vision else None),
                    filter_states)

    def _launch(self, samples: list[Sample], seed: int, staged: "Staged | None" = None) -> Callable[[], None]:
        """Caption ``samples`` and queue their scores; returns what assigns the scores and decides."""
        pixels = staged.pixels if staged is not None else self._pixels(samples)
        if staged is not None:
            caption_states, filter_states = staged.caption_states, staged.filter_states
        elif self.shared_vision:
            caption_states, filter_states = self._vision(pixels)
        else:  # each model runs its own vision pass
            caption_states = filter_states = None
        captions = self.captioner(pixels["captioner"], seed, caption_states)
        texts = []
        for sample, caps in zip(samples, captions):
            sample.captions = caps
            texts.append(_unique(([sample.web_text] if _scorable(sample.web_text) else []) + caps))
        pending = self.filter.launch(pixels.get("filter", pixels["captioner"]), texts,
                                     embeddings=self.config.writer.embeddings, states=filter_states)
        # The recorded scores, of the same texts; the filter's alone decide.
        recorded = {name: scorer.launch(pixels[self.score_inputs[name]], texts)
                    for name, scorer in self.scorers.items()}
        return lambda: self._decide(samples, texts, pending.result(),
                                    {name: r.result() for name, r in recorded.items()})

    def _decide(self, samples: list[Sample], texts: list[list[str]], scores, recorded=None) -> None:
        cfg = self.config.filter
        for i, (sample, image_texts) in enumerate(zip(samples, texts)):
            by_text = dict(zip(image_texts, scores.itm[i]))
            itc = dict(zip(image_texts, scores.itc[i])) if scores.itc is not None else None
            if _scorable(sample.web_text):
                sample.web_score = by_text[sample.web_text]
                sample.web_itc = itc[sample.web_text] if itc is not None else None
            sample.caption_scores = [by_text[c] for c in sample.captions]
            sample.caption_itc = [itc[c] for c in sample.captions] if itc is not None else []
            if scores.embeddings is not None:
                sample.embedding = scores.embeddings[i].astype("float16")
            for name, result in (recorded or {}).items():
                theirs = dict(zip(image_texts, result.scores[i]))
                sample.scores[name] = {"web": theirs[sample.web_text] if _scorable(sample.web_text) else None,
                                       "captions": [theirs[c] for c in sample.captions]}
            decide(sample, cfg.threshold, cfg.selection)


@dataclass
class Staged:
    """A batch's judged samples with their pixels on the device and both vision passes queued."""

    samples: list[Sample]
    pixels: dict[str, Any]
    caption_states: Any
    filter_states: Any

    def holds(self, samples: list[Sample]) -> bool:
        return len(samples) == len(self.samples) and all(a is b for a, b in zip(samples, self.samples))


def _with_next(batches: Iterator[list[Sample]]) -> Iterator[tuple[list[Sample], list[Sample] | None]]:
    """Each batch with the one after it (None for the last): the next is prepared by then."""
    current = next(batches, None)
    while current is not None:
        upcoming = next(batches, None)
        yield current, upcoming
        current = upcoming


def _scorable(text: str | None) -> bool:
    return text is not None and text.strip() != ""


def _unique(texts: list[str]) -> list[str]:
    return list(dict.fromkeys(texts))
