"""``make gpu-check``: what the first lent GPU should measure, in one command and one JSON file.

    python3 -m pipelines.gpu_check --output gpu_check/gpu_check.json            # on a GPU, ~8 minutes at most
    python -m pipelines.gpu_check --device cpu --shape tiny --output /tmp/g.json  # here, to see it run

The lent machine has its own Python with torch, transformers, pyarrow and pillow, no network,
and neither Ray nor webdataset: so this imports neither (a test holds it to that), works on
in-memory JPEGs and pre-decoded batches, and builds BLIP models with random weights at the real
BLIP-base and BLIP-large shapes from their config (no hub). Each measurement is guarded: a
failure is recorded in its own key and the rest still run. Once ``--budget-s`` is spent, nothing
new starts and the file says what was left out. The JSON is rewritten after each section, so a
run cut short still leaves what it measured.

Sections (keys of the JSON):
- ``throughput``: model-only images/s, capfilt (``CapFiltStep.process_batch`` on pre-decoded
  samples; ``capfilt_staged`` with the next batch staged as ``CapFiltStep.run`` does) against the
  naive loop (transformers' ``generate`` then ``BlipForImageTextRetrieval`` per pair, as
  ``pipelines/bench.py``'s naive baseline), per shape and batch size, in ``--dtype``; ``auto``: the
  batch size and dtype ``auto`` resolves to on this device (that batch is measured too), with the
  per-image memory estimate to hold against the measured peak;
- ``decode``: JPEG decode + preprocess images/s through ``CapFiltStep.prepare``: one thread,
  a thread pool over every core (as a worker's decode threads), a process pool over every core;
- ``parity``: capfilt's ITM scores against ``BlipForImageTextRetrieval`` per pair ([CLS] and
  [ENC]), and greedy captions against ``generate``, in float32 on ``--device``;
- ``syncs``: ``Tensor.__bool__``/``.item``/``.tolist`` calls per decoding step inside one
  ``generate``, capfilt's and the naive one's (and on CUDA the syncs torch itself reports);
- ``finetune``: 20 optimiser steps of ``CaptionerTask`` and ``FilterTask`` on random pairs;
- ``peak_memory``: ``torch.cuda.max_memory_allocated`` of each section (CUDA only);
- ``environment``, ``skipped`` (what was not measured, and why) and ``stopped_early``.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import random
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any

# BLIP's own shapes: ViT-B/16 (base) or ViT-L/16 (large) at 384 with a BERT-base text model and
# BERT's vocabulary, as the Salesforce/blip-image-captioning-* and blip-itm-*-coco checkpoints.
# pipelines/bench.py's table has no large shape, and tiny_config gives both towers one width,
# so the shapes are spelled out here. Each tower: (hidden, layers, heads, intermediate).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(image_size=64, vision=(64, 2, 2, 128), text=(64, 2, 2, 128), vocab=None),
    "base": dict(image_size=384, vision=(768, 12, 12, 3072), text=(768, 12, 12, 3072), vocab=30524),
    "large": dict(image_size=384, vision=(1024, 24, 16, 4096), text=(768, 12, 12, 3072), vocab=30524),
}
DECODE_SIZES = ((1024, 768), (384, 384))  # a web photo, and one already at BLIP's size
PROMPT = "a picture of "
MB = 1 << 20


class Budget:
    """Seconds left to the run; what could not start in time is recorded, not silently dropped."""

    def __init__(self, seconds: float):
        self.seconds, self.deadline = seconds, time.monotonic() + seconds
        self.stopped_at: str | None = None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, what: str) -> bool:
        if self.left() > 0:
            return True
        self.stopped_at = self.stopped_at or what
        return False

    def skipped(self) -> dict[str, str]:
        return {"skipped": f"the budget of {self.seconds:g} s ran out before this started"}


def guarded(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or what went wrong, so that one failure does not lose the other measurements."""
    try:
        return fn(*args)
    except Exception as exc:  # an out-of-memory error or a CUDA error included: recorded, not fatal
        failure = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}",
                   "traceback": traceback.format_exc(limit=6)[-2000:]}
    _free_device_memory()  # out of the handler, whose traceback held the failed call's tensors
    return failure


def _free_device_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        try:
            torch.cuda.empty_cache()
        except Exception:  # a CUDA error poisons the context: the next measurement reports it
            pass


_high_water = 0  # bytes: the section's highest peak so far, across its measurements' resets


def reset_peak(device: str, section: bool = False) -> None:
    """A new peak for the next measurement (or, with ``section``, for a new section)."""
    global _high_water
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        _high_water = 0 if section else max(_high_water, torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()


def section_peak_mb() -> float:
    import torch

    torch.cuda.synchronize()
    return round(max(_high_water, torch.cuda.max_memory_allocated()) / MB, 1)


def peak(device: str) -> dict[str, float]:
    """The peak of GPU memory allocated since ``reset_peak``; nothing on the CPU."""
    import torch

    if device != "cuda":
        return {}
    torch.cuda.synchronize()
    return {"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / MB, 1)}


# -- models ---------------------------------------------------------------------------------------


def build_tokenizer(shape: str):
    """The tiny tokenizer, or one of BERT's vocabulary size (filler words), as pipelines/bench.py."""
    from capfilt.models.tiny import DEFAULT_WORDS, build_tokenizer as tiny_tokenizer
    from pipelines.bench import VOCAB

    if SHAPES[shape]["vocab"] is None:
        return tiny_tokenizer(DEFAULT_WORDS)
    filler = [f"w{i}" for i in range(VOCAB - len(tiny_tokenizer(DEFAULT_WORDS)))]
    return tiny_tokenizer(list(DEFAULT_WORDS) + filler)


def blip_config(tokenizer, shape: str):
    from transformers import BlipConfig

    spec = SHAPES[shape]
    (vh, vl, vn, vi), (th, tl, tn, ti) = spec["vision"], spec["text"]
    text = dict(vocab_size=len(tokenizer), hidden_size=th, num_hidden_layers=tl, num_attention_heads=tn,
                intermediate_size=ti, encoder_hidden_size=vh, max_position_embeddings=512,
                bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    # BlipVisionConfig's default initializer_range is 1e-10: random vision weights that small make
    # every image embed alike (post_layernorm of near-zero states), and a score blind to the image
    # cannot show a mix-up of images. BERT's 0.02, as the text model has, makes images count.
    vision = dict(hidden_size=vh, num_hidden_layers=vl, num_attention_heads=vn, intermediate_size=vi,
                  image_size=spec["image_size"], patch_size=16, initializer_range=0.02)
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=256, image_text_hidden_size=256)


def new_model(model_cls, shape: str, tokenizer, device: str):
    """Random weights, initialised on ``device`` (BLIP-large's 470M parameters take long on a CPU)."""
    import torch

    torch.manual_seed(0)
    with torch.device(device):
        return model_cls(blip_config(tokenizer, shape))


class Checkpoints:
    """Random-weight captioner and filter folders per shape, saved once as users' checkpoints are."""

    def __init__(self, folder: str, device: str):
        self.folder, self.device, self.paths, self.build_seconds = folder, device, {}, {}

    def __call__(self, shape: str) -> tuple[str, str]:
        if shape not in self.paths:
            from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

            from capfilt.models.tiny import save_checkpoint

            start = time.perf_counter()
            tokenizer = build_tokenizer(shape)
            paths = []
            for cls, name in ((BlipForConditionalGeneration, "captioner"), (BlipForImageTextRetrieval, "filter")):
                model = new_model(cls, shape, tokenizer, self.device)
                path = os.path.join(self.folder, shape, name)
                paths.append(save_checkpoint(model, tokenizer, SHAPES[shape]["image_size"], path))
                del model
                _free_device_memory()
            self.paths[shape] = tuple(paths)
            self.build_seconds[shape] = round(time.perf_counter() - start, 1)
        return self.paths[shape]


def capfilt_config(cap: str, itm: str, device: str, dtype: str, *overrides: str):
    from capfilt.config import load_config

    return load_config(None, [f"captioner.model={cap}", f"filter.model={itm}", f"runtime.device={device}",
                              f"runtime.dtype={dtype}", *overrides])


def load_naive(cap: str, itm: str, device: str, dtype: str):
    """The models as a user loads them with plain transformers."""
    import torch
    from transformers import AutoTokenizer, BlipForConditionalGeneration, BlipForImageTextRetrieval

    kind = getattr(torch, dtype)
    captioner = BlipForConditionalGeneration.from_pretrained(cap, dtype=kind).eval().to(device)
    itm_model = BlipForImageTextRetrieval.from_pretrained(itm, dtype=kind).eval().to(device)
    return captioner, itm_model, AutoTokenizer.from_pretrained(cap)


# -- inputs ---------------------------------------------------------------------------------------


def make_jpegs(count: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs: shapes over some noise, so that they do not compress to nothing."""
    from PIL import Image, ImageDraw

    rng, (w, h), out = random.Random(seed), size, []
    for _ in range(count):
        img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(8):
            x, y = rng.randrange(w), rng.randrange(h)
            draw.ellipse((x, y, x + w // 5, y + h // 5), fill=tuple(rng.randrange(256) for _ in range(3)))
        noise = Image.effect_noise(size, 40).convert("RGB")
        buf = io.BytesIO()
        Image.blend(img, noise, 0.25).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def random_text(rng: random.Random) -> str:
    from capfilt.models.tiny import DEFAULT_WORDS

    return " ".join(rng.choice(DEFAULT_WORDS) for _ in range(rng.randint(4, 14)))


def decoded(jpegs: list[bytes], processor) -> Any:
    """A float32 batch on the host, as a plain transformers user makes it (PIL, then the
    checkpoint's image processor): what the naive loop and the parity references are fed."""
    from PIL import Image

    images = [Image.open(io.BytesIO(data)).convert("RGB") for data in jpegs]
    return processor(images=images, return_tensors="pt")["pixel_values"]


def prepared_pool(step, jpegs: list[bytes]) -> list[Any]:
    """The images as samples prepared by the step (its decode and resize), reused batch after batch."""
    from capfilt.sample import Sample

    rng, pool = random.Random(0), []
    for i, data in enumerate(jpegs):
        sample = step.prepare(Sample(key=f"{i:06d}", image=data, image_ext="jpg", web_text=random_text(rng)))
        if sample.error:
            raise RuntimeError(sample.error)
        pool.append(sample)
    return pool


def batch_of(pool: list[Any], size: int, offset: int) -> list[Any]:
    """Fresh samples sharing the pool's pixels (``process_batch`` drops each sample's pixels)."""
    from capfilt.sample import Sample

    chosen = [pool[(offset + j) % len(pool)] for j in range(size)]
    return [Sample(key=f"{offset + j:09d}", web_text=s.web_text, pixels=dict(s.pixels)) for j, s in enumerate(chosen)]


# -- throughput -----------------------------------------------------------------------------------


def capfilt_rate(step, pool: list[Any], batch: int, images: int, device: str,
                 staged: bool = False) -> dict[str, Any]:
    """Images/s of ``CapFiltStep.process_batch`` (host arrays in, decisions out), after one warm-up
    batch; ``staged``: batch after batch as ``CapFiltStep.run`` goes, each next batch's copy to the
    device and vision passes queued before this one's scores come back (the overlap)."""
    from capfilt.models.captioner import batch_seed
    from pipelines.bench import timed

    used = []  # the batches judged from a stage

    def run(first: int, batches: int) -> None:
        ahead = None
        for index in range(first, first + batches):
            samples = ahead[0] if ahead else batch_of(pool, batch, index * batch)
            if ahead and ahead[1] is not None and ahead[1].holds([s for s in samples if s.error is None]):
                used.append(index)
            finish = step.launch_batch(samples, batch_seed(0, "gpu_check", index), ahead and ahead[1])
            ahead = None
            if staged and index + 1 < first + batches:
                upcoming = batch_of(pool, batch, (index + 1) * batch)
                ahead = (upcoming, step.stage(upcoming))
            finish()
            failed = [s.error for s in samples if s.error]
            if failed:  # judged one by one after a failure: the timing would mean nothing
                raise RuntimeError(f"{len(failed)} of {batch} samples failed: {failed[0]}")

    reset_peak(device)
    run(0, 1)
    batches = max(1, -(-images // batch))
    rate = {**timed(device, batches * batch, lambda: run(1, batches)), **peak(device)}
    return {**rate, "staged_batches": len(used)} if staged else rate


def auto_runtime(step, args) -> dict[str, Any]:
    """``runtime.batch_size: auto`` and ``dtype: auto`` as a run on this device resolves them, with
    the per-image memory estimate they come from: beside the measured peak at that batch, it
    shows whether the estimate holds."""
    import dataclasses

    from capfilt.runtime.defaults import Held, local_facts, per_image_bytes, resolve_runtime, sized

    models = [Held("captioner", "blip", step.captioner.model.config.to_dict()),
              Held("filter", "blip", step.filter.model.config.to_dict())]
    facts = local_facts(args.device)
    auto = dataclasses.replace(step.config.runtime, batch_size="auto", dtype="auto")
    rt = sized(auto, facts, models, step.config.captioner, step.config.filter)
    estimate = per_image_bytes(models, step.config.captioner.num_captions, step.config.captioner.max_length,
                               step.config.filter.max_text_tokens, resolve_runtime(auto, facts).dtype)
    return {"batch_size": rt.batch_size, "dtype": rt.dtype, "tf32": rt.tf32,
            "per_image_estimate_mb": round(estimate / MB, 1), "device_memory_mb": facts.memory_bytes and
            round(facts.memory_bytes / MB)}


def naive_batch(models, pixels, web_texts: list[str], n: int, device: str) -> None:
    """pipelines/bench.py's naive loop on pixels already decoded: a sampled ``generate``, then
    ``BlipForImageTextRetrieval`` on every (image, text) pair, the image re-encoded each time."""
    import torch

    captioner, itm, tokenizer = models
    prompt = tokenizer([PROMPT] * len(web_texts), return_tensors="pt").to(device)
    out = captioner.generate(pixel_values=pixels, input_ids=prompt.input_ids, attention_mask=prompt.attention_mask,
                             do_sample=True, top_p=0.9, max_length=20, min_length=5, repetition_penalty=1.1,
                             num_return_sequences=n)
    captions = tokenizer.batch_decode(out, skip_special_tokens=True)
    for j, web_text in enumerate(web_texts):
        for text in [web_text] + captions[j * n:(j + 1) * n]:
            tokens = tokenizer(text, truncation=True, max_length=35, return_tensors="pt").to(device)
            logits = itm(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                         pixel_values=pixels[j:j + 1]).itm_score
            torch.softmax(logits.float(), dim=-1)[0, 1].item()


def naive_rate(models, pool: list[Any], pixels, batch: int, n: int, device: str, dtype: str) -> dict[str, Any]:
    """Images/s of the naive loop over one batch (its per-pair ITM does not batch), after a warm-up.
    ``pixels``: the pool's images as the user's image processor gives them."""
    import torch

    from pipelines.bench import timed

    def run(size: int) -> None:
        chosen = [j % len(pool) for j in range(size)]
        with torch.no_grad():
            naive_batch(models, pixels[chosen].to(device, getattr(torch, dtype)),
                        [pool[j].web_text for j in chosen], n, device)

    reset_peak(device)
    run(min(batch, 2))
    return {**timed(device, batch, lambda: run(batch)), **peak(device)}


def throughput(shape: str, checkpoints: Checkpoints, args, budget: Budget) -> dict[str, Any]:
    """capfilt and naive images/s at each batch size; each model set loaded once, then freed."""
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from capfilt.step import CapFiltStep

    cap, itm = checkpoints(shape)
    out: dict[str, Any] = {"dtype": args.dtype, "num_captions": args.num_captions,
                           "model_build_seconds": checkpoints.build_seconds[shape]}
    rows = {b: out.setdefault(f"batch_{b}", {}) for b in args.batch_sizes}
    step = CapFiltStep(capfilt_config(cap, itm, args.device, args.dtype,
                                      f"captioner.num_captions={args.num_captions}"))
    jpegs = make_jpegs(min(32, max(args.batch_sizes)), (480, 360))
    pool = prepared_pool(step, jpegs)
    auto = out["auto"] = guarded(auto_runtime, step, args)  # what runtime: auto gives this device
    if args.device == "cuda" and isinstance(auto.get("batch_size"), int) and auto["batch_size"] not in rows:
        rows[auto["batch_size"]] = out.setdefault(f"batch_{auto['batch_size']}", {})
    for batch, row in rows.items():
        for name, staged in (("capfilt", False), ("capfilt_staged", True)):
            row[name] = (guarded(capfilt_rate, step, pool, batch, args.images, args.device, staged)
                         if budget.allows(f"throughput.{shape}.batch_{batch}.{name}") else budget.skipped())
    del step
    _free_device_memory()
    models = load_naive(cap, itm, args.device, args.dtype)
    pixels = decoded(jpegs, BlipImageProcessorPil.from_pretrained(cap))
    for batch, row in rows.items():
        row["naive"] = (guarded(naive_rate, models, pool, pixels, batch, args.num_captions, args.device, args.dtype)
                        if budget.allows(f"throughput.{shape}.batch_{batch}.naive") else budget.skipped())
        rates = [row[k].get("images_per_s") for k in ("capfilt", "naive")]
        if all(rates):
            row["capfilt_vs_naive"] = round(rates[0] / rates[1], 2)
        staged = [row[k].get("images_per_s") for k in ("capfilt_staged", "capfilt")]
        if all(staged):
            row["staged_vs_unstaged"] = round(staged[0] / staged[1], 2)
    del models
    _free_device_memory()
    return out


# -- decode ---------------------------------------------------------------------------------------

_PREPARE: Callable[[Any], Any] | None = None  # set in each decode worker


def preparer(image_size: int) -> Callable[[Any], Any]:
    """``CapFiltStep.prepare`` without loading models: it reads only the step's ``config`` and
    ``processors``, so a stand-in holding those two runs the step's own code (a change to it is
    measured; a change that needs more of the step fails here, loudly)."""
    from functools import partial
    from types import SimpleNamespace

    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from capfilt.config import load_config
    from capfilt.step import CapFiltStep

    processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return partial(CapFiltStep.prepare, SimpleNamespace(config=load_config(None), processors={"captioner": processor}))


def _init_decoder(image_size: int) -> None:
    global _PREPARE
    _PREPARE = preparer(image_size)


def _prepare_all(jpegs: list[bytes]) -> int:
    from capfilt.sample import Sample

    for i, data in enumerate(jpegs):
        sample = _PREPARE(Sample(key=f"{i:06d}", image=data, image_ext="jpg"))
        if sample.error:
            raise RuntimeError(sample.error)
    return len(jpegs)


def _rate(images: int, run: Callable[[], Any]) -> dict[str, Any]:
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 1)}


def decode(image_size: int, count: int, workers: int) -> dict[str, Any]:
    """Decode + preprocess images/s: one thread, ``workers`` threads, ``workers`` processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    import torch

    # fork while CUDA is untouched (this runs first): the workers start warm, with capfilt imported
    fork = "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized()
    method = "fork" if fork else "spawn"
    _init_decoder(image_size)
    out: dict[str, Any] = {"image_size": image_size, "workers": workers, "start_method": method}
    for w, h in DECODE_SIZES:
        distinct = make_jpegs(16, (w, h))
        jpegs = [distinct[i % len(distinct)] for i in range(count)]
        single = jpegs[:max(2, count // workers)]
        row = out[f"{w}x{h}"] = {"jpeg_kb": round(sum(map(len, distinct)) / len(distinct) / 1024, 1)}
        row["one_thread"] = _rate(len(single), lambda: _prepare_all(single))
        with ThreadPoolExecutor(workers) as pool:
            row["threads"] = _rate(count, lambda: list(pool.map(_prepare_all, [[j] for j in jpegs])))
        chunks = [jpegs[i:i + 4] for i in range(0, count, 4)]
        with ProcessPoolExecutor(workers, multiprocessing.get_context(method), _init_decoder, (image_size,)) as pool:
            list(pool.map(_prepare_all, [jpegs[:1]] * workers))  # started and warm
            row["processes"] = _rate(count, lambda: list(pool.map(_prepare_all, chunks)))
        row["processes_per_core"] = round(row["processes"]["images_per_s"] / workers, 1)
    return out


# -- parity ---------------------------------------------------------------------------------------


def first_token_overrides(token: str) -> list[str]:
    import dataclasses

    from capfilt.config import FilterConfig

    if "first_token" in {f.name for f in dataclasses.fields(FilterConfig)}:
        return [f"filter.first_token={token}"]
    if token == "cls":
        return []  # before filter.first_token, capfilt's ITM read [CLS]
    raise RuntimeError("this capfilt has no filter.first_token: it cannot score with [ENC]")


def reference_score(model, tokenizer, pixels, text: str, first_id: int | None) -> float:
    """``BlipForImageTextRetrieval`` on one pair, as transformers runs it (``first_id`` in place of [CLS])."""
    import torch

    tokens = tokenizer(text, truncation=True, max_length=35, return_tensors="pt").to(pixels.device)
    if first_id is not None:
        tokens.input_ids[:, 0] = first_id
    with torch.no_grad():
        logits = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels).itm_score
    return torch.softmax(logits.float(), dim=-1)[0, 1].item()


def itm_parity(paths, token: str, dtype: str, reference, pixels, texts: list[list[str]], device: str) -> dict[str, Any]:
    """capfilt's ITM scores (``dtype``) against the float32 per-pair forward, first token ``token``."""
    import torch

    from capfilt.models.itm_filter import ITMFilter

    cfg = capfilt_config(*paths, device, dtype, *first_token_overrides(token)).filter
    itm = ITMFilter(cfg, device, dtype)
    got = itm(pixels.to(device, getattr(torch, dtype)), texts).itm
    first_id = itm.tokenizer.convert_tokens_to_ids("[ENC]") if token == "enc" else None

    def want(image: int, text: str) -> float:
        return reference_score(reference, itm.tokenizer, pixels[image:image + 1].to(device), text, first_id)

    pairs = [(i, k, text) for i, image_texts in enumerate(texts) for k, text in enumerate(image_texts)]
    diffs = [abs(got[i][k] - want(i, text)) for i, k, text in pairs]
    # the control: how far the score moves when the text meets the next image instead; parity
    # means anything only well below it (random weights score every pair near one value)
    other = [abs(want(i, text) - want((i + 1) % len(texts), text)) for i, _, text in pairs]
    return {"pairs": len(diffs), "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
            "other_image_max_diff": max(other)}


def caption_parity(paths, pixels, device: str) -> dict[str, Any]:
    """capfilt's captioner at top_k 1 against greedy ``generate``: the same captions, or a bug."""
    from transformers import BlipForConditionalGeneration

    from capfilt.models.captioner import Captioner

    cfg = capfilt_config(*paths, device, "float32", "captioner.top_k=1", "captioner.num_captions=1").captioner
    captioner = Captioner(cfg, device, "float32")
    got = [caps[0] for caps in captioner(pixels.to(device), seed=0)]
    model = BlipForConditionalGeneration.from_pretrained(paths[0]).eval().to(device)
    prompt = captioner.tokenizer([cfg.prompt] * len(got), return_tensors="pt").to(device)
    out = model.generate(pixel_values=pixels.to(device), input_ids=prompt.input_ids,
                         attention_mask=prompt.attention_mask, do_sample=False, num_beams=1,
                         max_length=cfg.max_length, min_length=cfg.min_length,
                         repetition_penalty=cfg.repetition_penalty)
    want = [captioner._strip_prompt(t) for t in captioner.tokenizer.batch_decode(out, skip_special_tokens=True)]
    return {"captions": len(got), "equal": sum(a == b for a, b in zip(got, want)), "first": [got[0], want[0]]}


def parity(shape: str, checkpoints: Checkpoints, device: str) -> dict[str, Any]:
    """Float32 scores and captions against transformers' classes on ``device`` (and bf16's distance)."""
    from transformers import BlipForImageTextRetrieval
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    paths = checkpoints(shape)
    rng = random.Random(1)
    pixels = decoded(make_jpegs(4, (480, 360), seed=1), BlipImageProcessorPil.from_pretrained(paths[1]))
    # texts of several lengths per image: capfilt pads them into one batch, the reference does not
    texts = [[random_text(rng) for _ in range(3)] for _ in range(len(pixels))]
    reference = BlipForImageTextRetrieval.from_pretrained(paths[1]).eval().to(device)
    out: dict[str, Any] = {"shape": shape, "device": device}
    for name, token, dtype in (("itm_cls_float32", "cls", "float32"), ("itm_enc_float32", "enc", "float32"),
                               ("itm_cls_bfloat16", "cls", "bfloat16")):
        out[name] = guarded(itm_parity, paths, token, dtype, reference, pixels, texts, device)
    out["captions_greedy_float32"] = guarded(caption_parity, paths, pixels, device)
    return out


# -- syncs ----------------------------------------------------------------------------------------


class SyncCounter:
    """Counts ``Tensor.__bool__``, ``.item()`` and ``.tolist()`` (each a host sync on a GPU) while
    ``active``, by call site; on CUDA also the syncs torch reports in its sync debug mode."""

    NAMES = ("__bool__", "item", "tolist")

    def __init__(self, device: str):
        self.device, self.active = device, False
        self.calls: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()
        self.cuda_syncs, self.steps = 0, 0

    def __enter__(self) -> "SyncCounter":
        import torch

        self.saved = {n: torch.Tensor.__dict__.get(n) for n in self.NAMES}
        for name in self.NAMES:
            setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))
        return self

    def __exit__(self, *exc) -> None:
        import torch

        for name, original in self.saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)

    def _counting(self, name: str, original):
        def counted(tensor, *args, **kwargs):
            if self.active:
                self.calls[name] += 1
                caller = sys._getframe(1).f_code
                where = "/".join(caller.co_filename.split(os.sep)[-2:])
                self.sites[f"{name} in {where}:{caller.co_name}"] += 1
            return original(tensor, *args, **kwargs)
        return counted

    def around(self, generate):
        """``generate``, counted: the decoding loop alone, not the vision encoder before it."""
        import warnings

        import torch

        def wrapped(*args, **kwargs):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if self.device == "cuda":
                    torch.cuda.set_sync_debug_mode("warn")
                self.active = True
                try:
                    out = generate(*args, **kwargs)
                finally:
                    self.active = False
                    if self.device == "cuda":
                        torch.cuda.set_sync_debug_mode("default")
            self.cuda_syncs += sum("synchroniz" in str(w.message) for w in caught)
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            self.steps += out.shape[-1] - input_ids.shape[-1]
            return out
        return wrapped

    def summary(self) -> dict[str, Any]:
        total = sum(self.calls.values())
        out = {"steps": self.steps, "calls": dict(self.calls), "per_step": round(total / max(self.steps, 1), 2),
               "sites": dict(self.sites.most_common(8))}
        out["cuda_syncs_per_step"] = (round(self.cuda_syncs / max(self.steps, 1), 2) if self.device == "cuda"
                                      else {"skipped": "CPU: torch's sync debug mode reports CUDA syncs only"})
        return out


def count_syncs(model, call: Callable[[], Any], device: str) -> dict[str, Any]:
    """Syncs per step of ``model.text_decoder.generate`` during ``call()``."""
    counter = SyncCounter(device)
    decoder = model.text_decoder
    decoder.generate = counter.around(decoder.generate)  # on the instance: the class is untouched
    try:
        with counter:
            call()
    finally:
        del decoder.generate
    return counter.summary()


def syncs(shape: str, checkpoints: Checkpoints, device: str, dtype: str, batch: int, n: int) -> dict[str, Any]:
    """Host syncs per decoding step, in capfilt's captioner and in transformers' sampled generate."""
    import torch

    from capfilt.models.captioner import Captioner

    paths = checkpoints(shape)
    cfg = capfilt_config(*paths, device, dtype, f"captioner.num_captions={n}").captioner
    captioner = Captioner(cfg, device, dtype)
    pixels = decoded(make_jpegs(batch, (480, 360), seed=2), captioner.image_processor).to(device, getattr(torch, dtype))
    captioner(pixels, seed=0)  # warm-up, uncounted
    out: dict[str, Any] = {"shape": shape, "batch": batch, "num_captions": n, "dtype": dtype}
    out["capfilt"] = guarded(count_syncs, captioner.model, lambda: captioner(pixels, seed=1), device)
    del captioner
    models = load_naive(*paths, device, dtype)
    with torch.no_grad():
        out["naive"] = guarded(count_syncs, models[0], lambda: naive_generate(models, pixels, n, device), device)
    return out


def naive_generate(models, pixels, n: int, device: str) -> None:
    captioner, _, tokenizer = models
    prompt = tokenizer([PROMPT] * len(pixels), return_tensors="pt").to(device)
    captioner.generate(pixel_values=pixels, input_ids=prompt.input_ids, attention_mask=prompt.attention_mask,
                       do_sample=True, top_p=0.9, max_length=20, min_length=5, repetition_penalty=1.1,
                       num_return_sequences=n)


# -- fine-tuning ----------------------------------------------------------------------------------


def train_steps(kind: str, shape: str, tokenizer, device: str, batch: int, steps: int) -> dict[str, Any]:
    """``steps`` optimiser steps of the kind's task on random pairs, as ``Trainer._epoch`` steps
    (AdamW, float32; the learning-rate schedule left out, it costs nothing), then one ``evaluate``."""
    import math

    import torch
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    from capfilt.config import TrainConfig
    from capfilt.training.tasks import CaptionerTask, FilterTask

    cfg = TrainConfig(max_text_tokens=40 if kind == "captioner" else 35)
    model_cls = BlipForConditionalGeneration if kind == "captioner" else BlipForImageTextRetrieval
    model = new_model(model_cls, shape, tokenizer, device).train()
    task = CaptionerTask(model, tokenizer, cfg, PROMPT) if kind == "captioner" else FilterTask(model, tokenizer, cfg)
    for p in task.extra_parameters.values():
        p.data = p.data.to(device)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(task.extra_parameters.values()),
                                  lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng, size, losses = random.Random(0), SHAPES[shape]["image_size"], []
    reset_peak(device)
    for step in range(steps):
        if step == 1:  # the first step (allocations, kernel choice) is not timed
            start = time.perf_counter()
        pixels = torch.randn(batch, 3, size, size, device=device)
        texts = [random_text(rng) for _ in range(batch)]
        loss, logs = task.loss(pixels, texts, torch.Generator().manual_seed(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(logs["loss"])  # .item() in the task: the step has finished
    seconds = time.perf_counter() - start
    out = {"steps": steps, "batch": batch, "steps_per_s": round((steps - 1) / seconds, 3),
           "first_loss": losses[0], "last_loss": losses[-1], "loss_finite": all(map(math.isfinite, losses))}
    out["evaluate"] = guarded(task.evaluate, [(pixels, texts)])
    return {**out, **peak(device)}


def finetune(shape: str, device: str, batch: int, steps: int) -> dict[str, Any]:
    tokenizer = build_tokenizer(shape)
    return {"shape": shape, "dtype": "float32",
            **{kind: guarded(train_steps, kind, shape, tokenizer, device, batch, steps)
               for kind in ("captioner", "filter")}}


# -- the run --------------------------------------------------------------------------------------


def environment(args) -> dict[str, Any]:
    import importlib.util

    import numpy
    import PIL
    import torch
    import transformers

    def present(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except Exception:  # a finder that refuses it (the test's) counts as absent
            return False

    return {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "transformers": transformers.__version__, "numpy": numpy.__version__, "pillow": PIL.__version__,
            "torch_threads": torch.get_num_threads(), "absent": [m for m in ("ray", "webdataset") if not present(m)],
            "args": {k: v for k, v in vars(args).items()}}


def device_info(device: str) -> dict[str, Any]:
    import torch

    if device != "cuda":
        return {"device": "cpu", "name": platform.processor() or platform.machine()}
    props = torch.cuda.get_device_properties(0)
    return {"device": "cuda", "name": props.name, "memory_mb": round(props.total_memory / MB),
            "multiprocessors": props.multi_processor_count, "capability": f"{props.major}.{props.minor}",
            "devices": torch.cuda.device_count(), "bf16": torch.cuda.is_bf16_supported()}


# Not measured here, whatever the machine: they need what the lent machine lacks.
NOT_HERE = {
    "end_to_end": "tar to tar through Ray needs ray and webdataset, which the GPU machine lacks: "
                  "`make bench BENCH_ARGS=\"--device cuda ...\"` measures it where they are installed",
}


def found(tree: Any, key: str, path: str = "") -> dict[str, str]:
    """Every ``key`` (skipped, error) in the result, by its dotted path."""
    if not isinstance(tree, dict):
        return {}
    out = {path: tree[key]} if key in tree and isinstance(tree[key], str) else {}
    for name, value in tree.items():
        out.update(found(value, key, f"{path}.{name}" if path else name))
    return out


def write(path: str, result: dict[str, Any]) -> None:
    """Whole or not at all: a run cut short keeps the last complete file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
        json.dump(result, f, indent=2, default=str)
    os.replace(f.name, path)


def plan(args, checkpoints: Checkpoints, budget: Budget) -> list[tuple[str, Callable[[], Any], bool]]:
    """(key, measurement, uses the device), in order: decode first (its workers fork before CUDA
    starts), the first shape's throughput next (issue 15's goal is at BLIP-base), the rest last."""
    first, cores = args.shape[0], len(os.sched_getaffinity(0))
    size = SHAPES[first]["image_size"]
    decode_images = args.decode_images or 32 * cores
    steps = [("decode", lambda: decode(size, decode_images, cores), False)]
    steps += [(f"throughput.{first}", lambda: throughput(first, checkpoints, args, budget), True),
              ("parity", lambda: parity(first, checkpoints, args.device), True),
              ("syncs", lambda: syncs(first, checkpoints, args.device, args.dtype, min(args.batch_sizes),
                                      args.num_captions), True),
              ("finetune", lambda: finetune(first, args.device, args.finetune_batch, args.finetune_steps), True)]
    for shape in args.shape[1:]:
        steps.append((f"throughput.{shape}", lambda s=shape: throughput(s, checkpoints, args, budget), True))
    return steps


def place(result: dict[str, Any], key: str, value: Any) -> None:
    head, _, tail = key.partition(".")
    if tail:
        result.setdefault(head, {})[tail] = value
    else:
        result[head] = value


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="gpu_check/gpu_check.json")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--shape", default=None, help="comma-separated, of tiny, base, large; the first is also "
                        "the shape of parity, syncs and fine-tuning (default: base,large on cuda, tiny on cpu)")
    parser.add_argument("--budget-s", type=float, default=480, help="nothing new starts after this many seconds")
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    parser.add_argument("--batch-sizes", default=None, help="default: 16,64,256 on cuda, 2,4 on cpu")
    parser.add_argument("--images", type=int, default=None, help="at least this many per capfilt timing "
                        "(default: 512 on cuda, 8 on cpu); naive times one batch")
    parser.add_argument("--num-captions", type=int, default=5)
    parser.add_argument("--decode-images", type=int, default=0, help="per pool timing (default: 32 per core)")
    parser.add_argument("--finetune-steps", type=int, default=20)
    parser.add_argument("--finetune-batch", type=int, default=None, help="default: 16 on cuda, 2 on cpu")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    args.shape = (args.shape or ("base,large" if gpu else "tiny")).split(",")
    unknown = [s for s in args.shape if s not in SHAPES]
    if unknown:
        parser.error(f"--shape: unknown {', '.join(unknown)}; one of {', '.join(SHAPES)}")
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("16,64,256" if gpu else "2,4")).split(",")]
    args.images = args.images or (512 if gpu else 8)
    args.finetune_batch = args.finetune_batch or (16 if gpu else 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    began, budget = time.monotonic(), Budget(args.budget_s)
    result: dict[str, Any] = {"environment": guarded(environment, args)}
    write(args.output, result)
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    peaks: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder:
        checkpoints = Checkpoints(folder, args.device)
        for key, measure, on_device in plan(args, checkpoints, budget):
            if not budget.allows(key):
                place(result, key, budget.skipped())
                continue
            if on_device and "device" not in result:  # after decode's workers have forked
                result["device"] = guarded(device_info, args.device)
            if on_device:
                reset_peak(args.device, section=True)
            place(result, key, guarded(measure))
            if on_device and args.device == "cuda":
                peaks[key] = guarded(section_peak_mb)
            write(args.output, result)
            print(f"gpu_check [{time.monotonic() - began:5.0f} s] {key}: "
                  f"{json.dumps(result[key.partition('.')[0]], default=str)[:600]}", flush=True)
    result.setdefault("device", guarded(device_info, args.device))
    result["peak_memory"] = peaks if args.device == "cuda" else {
        "skipped": "CPU: torch.cuda.max_memory_allocated is for CUDA devices"}
    result["skipped"] = {**NOT_HERE, **found(result, "skipped")}
    result["errors"] = found(result, "error")
    result["stopped_early"] = (f"the budget of {args.budget_s:g} s ran out at {budget.stopped_at}; "
                               "what did not start is marked skipped" if budget.stopped_at else None)
    result["wall_seconds"] = round(time.monotonic() - began, 1)
    write(args.output, result)
    print(f"gpu_check: {args.output} in {result['wall_seconds']} s; errors: {len(result['errors'])}; "
          f"stopped early: {result['stopped_early'] or 'no'}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
