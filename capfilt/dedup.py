"""Near-duplicate images by their embeddings, over a whole run: which to drop, and for which.

**The rule.** Images are ranked best first: the highest score, ties broken by key (the caller's
key: select passes (key, shard, row), so the order is total). Walking that order, an image is
dropped as a duplicate of the best-ranked image *already kept* whose embedding has cosine
similarity ``>= threshold`` with its own; an image with no such kept image is kept. Only kept
images remove others, so in a chain A ~ B ~ C (A best, A and C below the threshold of each
other), A is kept, B is dropped as a duplicate of A, and C is kept: B, dropped, removes nothing.
So every dropped image names a better-ranked kept one within the threshold, and (with the exact
index) no two kept images are within it. The groups are the kept images, each with those it
removed; they do not chain.

**The comparison.** ``cosine >= threshold - TOLERANCE``, the dot product of the rows as given
(unit rows: select normalizes them again after their float16 storage), in float32, as faiss
computes it. ``TOLERANCE`` is far below float16's resolution (about 3 significant digits) and
makes ``threshold: 1.0`` mean "the same embedding" in spite of float32 rounding of a unit
vector's squared norm (``1 - 6e-8`` is common).

**The search.** faiss' ``range_search``, batch by batch in rank order, against an index of the
images kept so far; within a batch, an exact flat index of the batch itself. Dropped images are
never added, so the index holds the kept images only and each image finds at most a few of them
(kept images are pairwise below the threshold): the results stay small even when thousands of
copies of one image are in the run.

- Up to ``EXACT_LIMIT`` images: ``IndexFlatIP``, exact; time ~ N²·D/2 multiply-adds (10⁵
  images: about a minute of 2 cores).
- Above it: ``IndexIVFFlat`` (inner product, spherical k-means, ``nlist = √(NPROBE·N)`` cells
  trained on ``TRAIN_PER_CELL`` seeded samples per cell), ``NPROBE`` cells searched per image.
  Per image, the cells (nlist·D) and the kept images in its cells (at most NPROBE·N/nlist·D):
  that nlist makes the two equal, so time ~ 2·√NPROBE·N^1.5·D, and the training
  ~ TRAIN_PER_CELL·NPROBE·N·D per k-means iteration (faiss does 10); within batches,
  N·BATCH·D/2. Cosines are still computed exactly for the images in the searched cells, so no
  image is dropped wrongly; an image whose kept duplicate lies in a cell it does not search is
  kept (a missed duplicate), and may then remove others itself. BENCHMARKS.md ("select: dedup")
  gives the times and the recall of planted near-duplicates: all of them among 10⁵ and 10⁶
  clustered embeddings, 99.5% among 10⁵ spread uniformly (no clusters: the worst case for cells).

**Memory.** The caller's N×D float32 matrix, the index's copy of the kept images (at most the
same again, and faiss' lists grow by doubling), one batch's results, and N·24 bytes of ranks and
answers: 2.6 GB measured at 10⁶ images of D=256, whose matrix is 1 GB. The answer is
deterministic for given embeddings, scores and keys: changing a constant here changes which
images a selection keeps (raise select's ``SELECT_REVISION``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

TOLERANCE = 1e-5
EXACT_LIMIT = 100_000  # images; BENCHMARKS.md: the flat search's time at 10⁵
NPROBE = 8
TRAIN_PER_CELL = 39  # faiss' least without a warning
BATCH = 2048  # images per range_search: bounds the within-batch search (N·BATCH·D/2) and its results
SEED = 0


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:  # a dependency of capfilt; fails loudly rather than keep every image
        raise ImportError("select.dedup needs faiss: pip install faiss-cpu") from e
    return faiss


@dataclass(frozen=True)
class IndexPlan:
    """The search used for N images: ``flat`` (exact), or ``ivf`` with ``nlist`` cells of which
    ``nprobe`` are searched per image."""

    kind: str
    nlist: int = 0
    nprobe: int = 0

    @classmethod
    def for_size(cls, n: int, exact_limit: int = EXACT_LIMIT) -> "IndexPlan":
        if n <= exact_limit:
            return cls("flat")
        nlist = round(math.sqrt(NPROBE * n))
        return cls("ivf", nlist, min(NPROBE, nlist))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "nlist": self.nlist, "nprobe": self.nprobe}


def rank_order(scores: Sequence[float], keys: Sequence[Any]):
    """The images' indices best first: the highest score, then the smallest key."""
    import numpy as np

    return np.array(sorted(range(len(scores)), key=lambda i: (-scores[i], keys[i])), dtype=np.int64)


def near_duplicates(embeddings, scores: Sequence[float], keys: Sequence[Any], threshold: float,
                    plan: IndexPlan | None = None):
    """For each image (a row of ``embeddings``, N×D float32, rows of unit norm): -1 if it is
    kept, else the index of the kept image it duplicates, by the rule of this module."""
    import numpy as np

    n = len(embeddings)
    if len(scores) != n or len(keys) != n:
        raise ValueError(f"{n} embeddings, {len(scores)} scores and {len(keys)} keys")
    duplicate_of = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return duplicate_of
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    order = rank_order(scores, keys)
    plan = plan or IndexPlan.for_size(n)
    index = _empty_index(embeddings, plan)
    kept_rank = np.empty(n, dtype=np.int64)  # index id -> rank position
    best = np.empty(n, dtype=np.int64)  # rank position -> rank position of its keeper, n: kept
    for start in range(0, n, BATCH):
        queries = embeddings[order[start:start + BATCH]]
        kept = _decide_batch(index, queries, start, threshold, kept_rank, best, n)
        kept_rank[index.ntotal:index.ntotal + len(kept)] = start + kept
        index.add(queries[kept])
    dropped = np.flatnonzero(best < n)
    duplicate_of[order[dropped]] = order[best[dropped]]
    log.info("dedup: %d of %d images are near-duplicates of kept ones (%s index)", len(dropped), n, plan.kind)
    return duplicate_of


def _empty_index(embeddings, plan: IndexPlan):
    """An inner-product index to add the kept images to; the IVF one trained on a seeded sample."""
    import numpy as np

    faiss = _faiss()
    d = embeddings.shape[1]
    if plan.kind == "flat":
        return faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, plan.nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical, index.cp.seed = True, 1234
    sample = min(len(embeddings), plan.nlist * TRAIN_PER_CELL)
    rows = np.sort(np.random.default_rng(SEED).choice(len(embeddings), sample, replace=False))
    index.train(embeddings[rows])
    index.nprobe = plan.nprobe
    return index


def _radius(threshold: float) -> tuple[float, float]:
    """faiss keeps results strictly above its radius: the radius just below the bound, and the
    bound, both as the float32 that faiss compares."""
    import numpy as np

    bound = np.float32(threshold - TOLERANCE)
    return float(np.nextafter(bound, np.float32(-np.inf))), bound


def _hits(index, queries, threshold: float):
    """(query, index id) of every pair at cosine ``>= threshold - TOLERANCE``."""
    import numpy as np

    radius, bound = _radius(threshold)
    lims, sims, ids = index.range_search(queries, radius)
    query = np.repeat(np.arange(len(queries)), np.diff(lims.astype(np.int64)))
    close = sims >= bound
    return query[close], ids[close]


def _decide_batch(index, queries, start: int, threshold: float, kept_rank, best, n: int):
    """Decide the images at rank positions ``start..start+len(queries)``: first against the kept
    images of earlier batches (each takes the best-ranked one it is close to), then, for those
    left, against each other in rank order. Returns the batch positions of the kept ones."""
    import numpy as np

    faiss = _faiss()
    size = len(queries)
    mine = np.full(size, n, dtype=np.int64)
    if index.ntotal:
        query, ids = _hits(index, queries, threshold)
        np.minimum.at(mine, query, kept_rank[ids])
    left = np.flatnonzero(mine == n)  # ascending: rank order
    within = faiss.IndexFlatIP(queries.shape[1])
    within.add(queries[left])
    worse, better = _hits(within, queries[left], threshold)  # the worse one always the query
    closer = better < worse
    worse, better = worse[closer], better[closer]
    by_rank = np.lexsort((better, worse))
    dropped = np.zeros(len(left), dtype=bool)
    for image, other in zip(worse[by_rank].tolist(), better[by_rank].tolist()):
        # by worse, then better: its best-ranked kept one comes first; ``other`` is decided
        if not dropped[image] and not dropped[other]:
            dropped[image] = True
            mine[left[image]] = start + left[other]
    best[start:start + size] = mine
    return left[~dropped]
