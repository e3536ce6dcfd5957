"""``make bench``'s select section (issue 16): ``capfilt select`` against a plain tarfile loop.

select is I/O-bound: it loads no model, reads the run's parquet and the run's input tars and
writes the samples it keeps. Its floor is what a user would write by hand: for each input tar,
``tarfile`` reads the members, the keys to keep come from the run's parquet (pyarrow, the same
threshold), and webdataset's ``TarWriter`` writes the kept members as they are. Issue 16 asks
select for at least half that loop's samples/s, measured side by side in one process.

The run is a real one of the tiny models, on thousands of small JPEGs: each shard by
``CapFiltStep.run``, as each Ray worker runs it, in this process (Ray's start would cost more
than the run), then ``run.json`` as ``capfilt run`` writes it. It runs at a threshold that
keeps nothing; select and the loop both keep the images whose best score reaches the median.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import statistics
import tarfile
import time
from collections.abc import Callable
from typing import Any

RUN_THRESHOLD = 0.9  # the tiny filter scores near 0.47: the run keeps nothing, select about half


def write_small_shards(folder: str, shards: int, per_shard: int, size: tuple[int, int] = (80, 60)) -> list[str]:
    """``shards`` img2dataset-style tars of ``per_shard`` small textured JPEGs, each with a
    text of random words and a json."""
    import webdataset as wds
    from PIL import Image

    from capfilt.models.tiny import DEFAULT_WORDS

    os.makedirs(folder, exist_ok=True)
    rng = random.Random(0)
    paths = []
    for s in range(shards):
        path = os.path.join(folder, f"{s:05d}.tar")
        with wds.TarWriter(path, encoder=False) as tar:
            for i in range(per_shard):
                img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
                for _ in range(30):
                    img.putpixel((rng.randrange(size[0]), rng.randrange(size[1])), (rng.randrange(256),) * 3)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=85)
                key = f"{s:05d}{i:05d}"
                text = " ".join(rng.choice(DEFAULT_WORDS) for _ in range(rng.randint(4, 12)))
                tar.write({"__key__": key, "jpg": buf.getvalue(), "txt": text.encode(),
                           "json": json.dumps({"url": f"http://127.0.0.1/{key}.jpg", "key": key}).encode()})
        paths.append(path)
    return paths


def make_run(models: tuple[str, str], inputs: str, output: str, num_captions: int) -> None:
    """What ``capfilt run`` leaves in ``output``: every shard done, and its ``run.json``."""
    import torch

    from capfilt.config import load_config
    from capfilt.identity import fingerprint, output_identity
    from capfilt.io.fs import OutputDir, expand_input
    from capfilt.io.layout import RUN_FILE
    from capfilt.run import check_models, make_step, run_record
    from capfilt.runtime.shards import plan_shards

    cap, itm = models
    config = load_config("configs/tiny.yaml", [
        f"captioner.model={cap}", f"filter.model={itm}", f"captioner.num_captions={num_captions}",
        # short captions: sampling 20 tokens costs the tiny captioner 20x more, and select no more
        "captioner.max_length=8", "captioner.min_length=1",
        "runtime.batch_size=64", f"filter.threshold={RUN_THRESHOLD}"], input=inputs, output=output)
    identity = output_identity(config, check_models(config))
    fp = fingerprint(identity)
    tasks = plan_shards(expand_input(config.input), config.output)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as tiny.yaml's one-CPU worker: two threads on a busy machine ran 2-5x slower
    try:
        step = make_step(config, fp)
        for task in tasks:
            step.run(task)
    finally:
        torch.set_num_threads(threads)
    record = run_record(config, identity, fp, len(tasks))
    OutputDir(output).write_bytes(RUN_FILE, json.dumps(record, indent=2, sort_keys=True).encode())


def kept_keys(parquet: str, threshold: float) -> set[str]:
    """The keys a threshold keeps, from a run's parquet: an image the run judged whose best
    text (web or caption) scores at least ``threshold`` (``decision.decide``'s rule)."""
    import pyarrow.parquet as pq

    table = pq.read_table(parquet, columns=["key", "status", "web_score", "caption_scores"])
    kept = set()
    for key, status, web, captions in zip(*(table.column(n).to_pylist() for n in table.column_names)):
        scores = [s for s in (web, *(captions or ())) if s is not None]
        if status != "error" and scores and max(scores) >= threshold:
            kept.add(key)
    return kept


def tar_loop(run: str, inputs: list[str], threshold: float, output: str) -> int:
    """The plain loop: each input tar read with ``tarfile``, the members of the kept keys
    written as they are with ``TarWriter``. Returns the samples written."""
    import webdataset as wds

    os.makedirs(output, exist_ok=True)
    written: list[str] = []
    for url in inputs:
        name = os.path.basename(url)[:-len(".tar")]
        keep = kept_keys(os.path.join(run, f"{name}.parquet"), threshold)
        with tarfile.open(url, "r|*") as tar, \
                wds.TarWriter(os.path.join(output, f"{name}.tar"), encoder=False) as sink:
            sample: dict[str, Any] = {}
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if sample and key != sample["__key__"]:
                    _flush(sink, sample, keep, written)
                    sample = {}
                if key in keep:
                    sample["__key__"] = key
                    sample[ext] = tar.extractfile(member).read()
                else:
                    sample = {"__key__": key}
            _flush(sink, sample, keep, written)
    return len(written)


def _flush(sink, sample: dict[str, Any], keep: set[str], written: list[str]) -> None:
    if sample.get("__key__") in keep and len(sample) > 1:
        sink.write(sample)
        written.append(sample["__key__"])


def select_once(run: str, threshold: float, output: str) -> int:
    """``capfilt select RUN OUTPUT select.threshold=...``, as the command line calls it.
    Returns the samples in its tars."""
    from capfilt.config import load_config
    from capfilt.select import select

    config = load_config(None, [f"select.threshold={threshold!r}"], output=output)
    return select(run, config).stats["tar_samples"]


def tar_keys(folder: str) -> list[str]:
    """The keys of the samples in a folder's tars, as webdataset reads them."""
    import webdataset as wds

    tars = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".tar"))
    return [sample["__key__"] for url in tars for sample in wds.WebDataset(url, shardshuffle=False)]


def median_best_score(run: str) -> float:
    """The median over the run's judged images of their best score: a threshold that keeps about half."""
    import pyarrow.parquet as pq

    best = []
    for name in sorted(os.listdir(run)):
        if name.endswith(".parquet"):
            for row in pq.read_table(os.path.join(run, name)).to_pylist():
                scores = [s for s in (row["web_score"], *(row["caption_scores"] or ())) if s is not None]
                if row["status"] != "error" and scores:
                    best.append(max(scores))
    return statistics.median(best)


def select_vs_loop(folder: str, shards: int, per_shard: int, repeats: int, num_captions: int = 1) -> dict[str, Any]:
    """samples/s of ``capfilt select`` and of the plain loop, alternating, the fastest of
    ``repeats`` each kept; a sample is one of the run's input samples (kept or not)."""
    from capfilt.models.tiny import build_tiny_models

    run, shard_folder = os.path.join(folder, "select_run"), os.path.join(folder, "select_in")
    for path in (run, shard_folder):  # a run of another size may have left more shards
        shutil.rmtree(path, ignore_errors=True)
    inputs = write_small_shards(shard_folder, shards, per_shard)
    models = build_tiny_models(os.path.join(folder, "select_models"))
    begin = time.perf_counter()
    make_run(models, shard_folder, run, num_captions)
    run_seconds = time.perf_counter() - begin
    threshold = median_best_score(run)
    outputs = {name: os.path.join(folder, f"select_{name}_out") for name in ("select", "loop")}
    calls = {"select": lambda: select_once(run, threshold, outputs["select"]),
             "loop": lambda: tar_loop(run, inputs, threshold, outputs["loop"])}
    samples = shards * per_shard
    rates, cpu_rates, written = alternate(calls, outputs, samples, repeats)
    keys = {name: tar_keys(out) for name, out in outputs.items()}
    return {"samples": samples, "shards": shards, "num_captions": num_captions, "threshold": threshold,
            "input_mb": round(sum(os.path.getsize(p) for p in inputs) / 2**20, 1),
            "run_seconds": round(run_seconds, 1), "kept": written["select"], "loop_kept": written["loop"],
            # the same samples in the same order, read back from both outputs' tars
            "same_keys": keys["select"] == keys["loop"] and len(keys["loop"]) == written["loop"],
            "select_samples_per_s": max(rates["select"]), "loop_samples_per_s": max(rates["loop"]),
            "all_select": rates["select"], "all_loop": rates["loop"],
            "select/loop": max(rates["select"]) / max(rates["loop"]),
            # each repeat's select against the loop just after it: less at the mercy of one fast spell
            "select/loop_per_repeat": [a / b for a, b in zip(rates["select"], rates["loop"])],
            # per second of this process's CPU time: steadier than wall time on a shared machine
            # (both are CPU-bound on tarfile's headers here; the input is in the page cache)
            "select_cpu_samples_per_s": max(cpu_rates["select"]), "loop_cpu_samples_per_s": max(cpu_rates["loop"]),
            "select/loop_cpu": max(cpu_rates["select"]) / max(cpu_rates["loop"])}


def alternate(calls: dict[str, Callable[[], int]], outputs: dict[str, str], samples: int,
              repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, int]]:
    """Each call in turn, ``repeats`` times, into an emptied output folder: (samples per second
    of wall time, per second of CPU time, what each call returned), by name."""
    rates: dict[str, list[float]] = {name: [] for name in calls}
    cpu_rates: dict[str, list[float]] = {name: [] for name in calls}
    written: dict[str, int] = {}
    for _ in range(repeats):
        for name, call in calls.items():
            shutil.rmtree(outputs[name], ignore_errors=True)
            start, cpu = time.perf_counter(), time.process_time()
            written[name] = call()
            rates[name].append(samples / (time.perf_counter() - start))
            cpu_rates[name].append(samples / (time.process_time() - cpu))
    return rates, cpu_rates, written


def report(result: dict[str, Any]) -> None:
    print(f"\nselect vs a tarfile loop: {result['samples']} samples in {result['shards']} shards "
          f"({result['input_mb']} MB), {result['kept']} kept at {result['threshold']:.6f} "
          f"(the loop kept {result['loop_kept']}, same keys: {result['same_keys']}):")
    print(f"  capfilt select  {result['select_samples_per_s']:9.0f} samples/s "
          f"(all: {', '.join(f'{r:.0f}' for r in result['all_select'])})")
    print(f"  tarfile loop    {result['loop_samples_per_s']:9.0f} samples/s "
          f"(all: {', '.join(f'{r:.0f}' for r in result['all_loop'])})")
    print(f"  select/loop     {result['select/loop']:9.2f}x (issue 16's target: at least 0.5x; per repeat: "
          f"{', '.join(f'{r:.2f}' for r in result['select/loop_per_repeat'])}; per CPU second: "
          f"{result['select/loop_cpu']:.2f}x, {result['select_cpu_samples_per_s']:.0f} against "
          f"{result['loop_cpu_samples_per_s']:.0f} samples/s)")
