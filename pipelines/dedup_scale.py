"""What select's dedup costs as the run grows: ``capfilt.dedup.near_duplicates`` on synthetic
normalized embeddings, timed, its peak RSS measured, and its recall of planted near-duplicates.

    python -m pipelines.dedup_scale                       # 10^5 (flat and IVF) and 10^6 (IVF)
    python -m pipelines.dedup_scale --sizes 20000 --exact-up-to 20000   # a quick look

Each measurement runs in a fresh process. The embeddings (D=256, BLIP's embed dim) are drawn
around 1,000 random centres (``--background clustered``: images of one centre at cosine ~0.3,
as real embeddings come in groups) or uniformly on the sphere (``uniform``: no structure, the
worst case for an IVF index); a ``--planted`` share of them are copies of other images with
noise, at cosine 0.95 to 1 with their source. Recall: the share of planted pairs at cosine >=
the threshold of which one image was dropped. With the flat index it must be 1. At sizes up to
``--exact-up-to``, both the flat and the IVF index run, and the IVF's drops are compared with the
flat's. Peak RSS: the process' VmHWM while deduplicating (reset after the embeddings are made),
and ``matrix_mb``, the N x D float32 matrix select reads from the parquet.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CENTRES = 1000
SPREAD = 1.5  # noise norm around a centre: cosine 1/(1+SPREAD²) ~ 0.3 within a centre
MAX_NOISE = 0.33  # a planted copy's noise norm: cosine 1/√(1+0.33²) ~ 0.95 at most


def synthetic(n: int, dim: int, planted: float, background: str, seed: int = 0):
    """(embeddings N x dim float32 unit rows, sources, copies, scores): the last ``planted·n``
    rows are noisy copies of the rows ``sources``; made in chunks, never 2 matrices at once."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 65536):
        rows = rng.standard_normal((min(65536, n - start), dim), dtype=np.float32) * (SPREAD / dim ** 0.5)
        if background == "clustered":
            rows += centres[rng.integers(0, CENTRES, len(rows))]
        x[start:start + len(rows)] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    copies = np.arange(n - round(planted * n), n)
    sources = rng.choice(copies[0] if len(copies) else n, len(copies), replace=False)
    for start in range(0, len(copies), 65536):
        part = slice(start, start + 65536)
        noise = rng.uniform(0, MAX_NOISE, len(sources[part])).astype(np.float32)[:, None]
        rows = x[sources[part]] + noise * rng.standard_normal((len(noise), dim), dtype=np.float32) / dim ** 0.5
        x[copies[part]] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return x, sources, copies, rng.random(n)


def _status(field: str) -> int:
    """A /proc/self/status value in kB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_one(n: int, kind: str, args: argparse.Namespace) -> dict:
    """One dedup in this process: seconds, peak RSS, recall of the planted pairs."""
    import numpy as np

    from capfilt import dedup

    x, sources, copies, scores = synthetic(n, args.dim, args.planted, args.background)
    close = np.einsum("ij,ij->i", x[sources], x[copies]) >= args.threshold
    keys = list(range(n))
    plan = dedup.IndexPlan("flat") if kind == "flat" else dedup.IndexPlan.for_size(n, exact_limit=0)
    faiss = dedup._faiss()  # imported before the peak is reset: the library's own RSS is not dedup's
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS: the peak from here on
    begin, cpu = time.perf_counter(), time.process_time()
    duplicate_of = dedup.near_duplicates(x, scores, keys, args.threshold, plan)
    seconds, cpu = time.perf_counter() - begin, time.process_time() - cpu
    found = (duplicate_of[sources] >= 0) | (duplicate_of[copies] >= 0)
    if args.dump:
        np.save(args.dump, duplicate_of)
    return {"n": n, "dim": args.dim, "background": args.background, "plan": plan.to_dict(),
            "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "threads": faiss.omp_get_max_threads(),
            "rss_before_mb": before // 1024, "peak_rss_mb": _status("VmHWM") // 1024,
            "matrix_mb": n * args.dim * 4 // 2**20, "dropped": int((duplicate_of >= 0).sum()),
            "planted_pairs": int(close.sum()), "planted_recall": round(float(found[close].mean()), 5)}


def run_child(n: int, kind: str, args: argparse.Namespace, dump: str) -> dict:
    argv = [sys.executable, "-m", "pipelines.dedup_scale", "--one", str(n), kind, "--dump", dump,
            "--dim", str(args.dim), "--planted", str(args.planted), "--threshold", str(args.threshold),
            "--background", args.background]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(flat: str, ivf: str) -> dict:
    """The IVF index's drops against the flat (exact) one's."""
    import numpy as np

    exact, approx = np.load(flat), np.load(ivf)
    dropped = exact >= 0
    return {"exact_drops": int(dropped.sum()), "ivf_drops": int((approx >= 0).sum()),
            "ivf_recall_of_exact_drops": round(float((approx[dropped] >= 0).mean()), 5) if dropped.any() else None,
            "same_answer": bool((exact == approx).all())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--exact-up-to", type=int, default=100_000,
                        help="at these sizes and below, run the flat index too and compare")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--planted", type=float, default=0.01, help="share of images that are noisy copies")
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--background", choices=["clustered", "uniform"], default="clustered")
    parser.add_argument("--output", default="bench_output/dedup_scale.json")
    parser.add_argument("--one", nargs=2, metavar=("N", "KIND"), help=argparse.SUPPRESS)
    parser.add_argument("--dump", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(int(args.one[0]), args.one[1], args)))
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            kinds = ["flat", "ivf"] if n <= args.exact_up_to else ["ivf"]
            found = {kind: run_child(n, kind, args, os.path.join(tmp, f"{n}_{kind}.npy")) for kind in kinds}
            for result in found.values():
                print(json.dumps(result), flush=True)
            if len(kinds) == 2:
                found["ivf"]["against_flat"] = compare(*(os.path.join(tmp, f"{n}_{k}.npy") for k in kinds))
                print(json.dumps(found["ivf"]["against_flat"]), flush=True)
            results += found.values()
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
