"""What filter.itc costs: ``CapFiltStep.process_batch`` with ITC on and off, alternating, in one process.

    python -m pipelines.itc_cost                         # BLIP-base shape, 8 images, N=5, 2 rounds
    python -m pipelines.itc_cost --rounds 1 --threads 1  # 9.5 min on one core of a busy 2-core machine
    python -m pipelines.itc_cost --shape small --images 4 --batch-size 4 --rounds 1   # 2 min

The models are BLIP-shaped with random weights (``pipelines/bench.py``'s, cached in OUTPUT). One
step is loaded; ITC is switched by the filter's config between calls, so both sides run the same
weights in the same warmed-up process. Each round times every batch off, on, on, off (drift
cancels), then the filter's own call on the captions just made, the same way: the filter-only
difference is ITC's extra text pass without the captioner's sampling noise. ``writer.embeddings``
stays on (its default) on both sides, so the image projection is not part of the difference.
Prints the seconds (wall, and this process's CPU: the steadier where other work shares the
cores), the ratios and ITC's share of the step, and writes OUTPUT/itc_cost.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any


Seconds = tuple[float, float]  # (wall, this process's CPU)


def clock() -> Seconds:
    return time.perf_counter(), time.process_time()


def since(start: Seconds) -> Seconds:
    """Wall and CPU seconds since ``start``. CPU time is the steadier on a machine that other
    work shares: it does not count the time this process waits for a core."""
    now = clock()
    return now[0] - start[0], now[1] - start[1]


def timed_batch(step, batch, seed: int) -> Seconds:
    """Seconds of one ``process_batch``; the batch's pixels kept for the next call."""
    pixels = [s.pixels for s in batch]
    start = clock()
    step.process_batch(batch, seed)
    seconds = since(start)
    for sample, kept in zip(batch, pixels):
        sample.pixels = kept
    return seconds


def timed_filter(step, batch) -> Seconds:
    """Seconds of the filter's call on the batch's web text and captions, as ``_judge`` makes it."""
    from capfilt.io.images import model_input
    from capfilt.prefetch import pixel_batch

    name = "filter" if "filter" in step.processors else "captioner"
    pixels = model_input(step.processors[name]).normalise(pixel_batch([s.pixels[name] for s in batch]), step.dtype)
    texts = [list(dict.fromkeys([s.web_text, *s.captions])) for s in batch]
    start = clock()
    step.filter(pixels, texts, embeddings=True)
    return since(start)


def measure(step, batches, rounds: int) -> dict[str, list[Seconds]]:
    """Per side, the (wall, CPU) seconds of each timed call (process_batch and filter alone)."""
    configs = {True: step.filter.cfg, False: dataclasses.replace(step.filter.cfg, itc=False)}
    times: dict[str, list[Seconds]] = {"step_on": [], "step_off": [], "filter_on": [], "filter_off": []}
    timed_batch(step, batches[0], 0)  # warm-up: oneDNN and the allocator settle per shape
    for r in range(rounds):
        for index, batch in enumerate(batches):
            for itc in (False, True, True, False):
                step.filter.cfg = configs[itc]
                times[f"step_{'on' if itc else 'off'}"].append(timed_batch(step, batch, 1000 * r + index))
            for itc in (False, True, True, False):
                step.filter.cfg = configs[itc]
                times[f"filter_{'on' if itc else 'off'}"].append(timed_filter(step, batch))
            print(f"round {r + 1}, batch {index + 1}: " + ", ".join(
                f"{k} {v[-1][0]:.2f} s ({v[-1][1]:.2f} CPU)" for k, v in times.items()), flush=True)
    step.filter.cfg = configs[True]
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["base", "small"], default="base")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-captions", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--output", default="bench_output")
    args = parser.parse_args(argv)

    import torch

    from capfilt.config import load_config
    from capfilt.runtime.executor import configure_worker_process
    from capfilt.step import CapFiltStep
    from pipelines.bench import build_models, load_samples, write_shards

    torch.set_num_threads(args.threads)
    cap, itm = build_models(os.path.join(args.output, f"models_{args.shape}"), args.shape)
    paths = write_shards(os.path.join(args.output, "itc_shards"), args.images, 1)
    config = load_config("configs/blip_base.yaml", [
        f"captioner.model={cap}", f"filter.model={itm}", f"captioner.num_captions={args.num_captions}",
        f"runtime.dtype={args.dtype}", "runtime.device=cpu", f"runtime.batch_size={args.batch_size}",
        "filter.itc=true", "writer.embeddings=true"])
    configure_worker_process(args.threads, config.runtime.retain_freed_memory)  # as a Ray worker
    step = CapFiltStep(config)
    prepared = [step.prepare(s) for s in load_samples(paths)]
    batches = [prepared[i:i + args.batch_size] for i in range(0, len(prepared), args.batch_size)]
    times = measure(step, batches, args.rounds)
    result = summary(times, args)
    print(json.dumps({k: v for k, v in result.items() if k != "times"}, indent=2))
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "itc_cost.json"), "w") as f:
        json.dump(result, f, indent=2)
    return 0


def summary(times: dict[str, list[Seconds]], args) -> dict[str, Any]:
    result: dict[str, Any] = {
        "shape": args.shape, "images": args.images, "batch_size": args.batch_size,
        "num_captions": args.num_captions, "dtype": args.dtype, "threads": args.threads, "rounds": args.rounds}
    for which, clock_name in ((0, "wall"), (1, "cpu")):
        series = {k: [t[which] for t in v] for k, v in times.items()}
        total = {k: sum(v) for k, v in series.items()}
        result[clock_name] = {
            "step_on/off": total["step_on"] / total["step_off"],
            "step_on/off_per_pair": [a / b for a, b in zip(series["step_on"], series["step_off"])],
            "filter_on/off": total["filter_on"] / total["filter_off"],
            # ITC's extra seconds, measured on the filter alone, as a share of the step without it
            "itc_share_of_step": (total["filter_on"] - total["filter_off"]) / total["step_off"],
            "median_seconds": {k: statistics.median(v) for k, v in series.items()},
        }
    result["times"] = times
    return result


if __name__ == "__main__":
    sys.exit(main())
