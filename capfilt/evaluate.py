"""Image-text retrieval of a BLIP filter checkpoint, as BLIP evaluates it (salesforce/BLIP
``train_retrieval.py``: ``evaluation`` and ``itm_eval``).

1. ITC: every image's and every text's unimodal feature, normalize(vision_proj(image [CLS]
   state)) and normalize(text_proj(text [CLS] state)) with the text encoder run without the
   image; ``sims`` is their cosine matrix (images x texts), no temperature.
2. For each image its ``k_test`` most similar texts, and for each text its ``k_test`` most
   similar images, are scored again: ITM's raw logit ``itm_head(...)[:, 1]`` plus the ITC
   similarity. Every other candidate scores -100, as in BLIP. ITM reads the text with the
   checkpoint's first token (``filter.first_token``: [ENC] for BLIP's own checkpoints).
3. TR@k: an image is right at k when any of its texts ranks among its first k; IR@k: a text
   is right when its image does. Their means, and the mean of both, as BLIP reports them.

Ties: candidates of equal score are ordered by index, the later one (in the data's order)
first, in the top-k choice and in the ranking alike: the order of ``np.argsort(scores,
kind="stable")[::-1]``. BLIP's ``itm_eval`` reverses numpy's default argsort, which is stable
for short rows and unspecified for long ones; here it is fixed.

ITM accuracy: each image's own texts are the positives; its hardest negative, the text of
another image with the highest ITC similarity to it (ties as above), is the negative. A pair is
predicted to match when softmax(itm logits)[1] >= ``evaluate.threshold``. Balanced accuracy is
the mean of the positives' and the negatives' accuracy (one negative per image, several
positives).

Memory is bounded by the similarity matrix, images x texts float32: 500 MB for COCO's Karpathy
test (5,000 x 25,000), on the GPU when there is one. Beside it: the features ((images + texts)
x projection dim float32, 31 MB for BLIP's 256), the tokens (14 MB), the top-k lists (8 bytes
per entry, 61 MB at k_test 256) and one block of rows being sorted (about 80 MB). Once the
top-k are chosen the matrix is freed, and the pairs ITM scores take 16 bytes each (at most
(images + texts) x k_test + texts + images: 123 MB for COCO). No score matrix is held whole:
rows of scores are built and ranked a block at a time. Measured on random features of COCO's
size on a CPU: 540 MiB at the peak above the process's own, 477 MiB of it the matrix. The images
are read twice, for the features and for ITM, so that no image's hidden states (577 x 1024
floats for BLIP-large) outlive their batch; each image's pairs of both directions are scored
together, after one vision pass, and a pair both directions share is scored once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from capfilt.config import Config, EvaluateConfig, ReaderConfig
from capfilt.io.images import ImageError, decode_rgb, model_input
from capfilt.io.reader import read_shard
from capfilt.redaction import redact_text
from capfilt.sample import Sample

log = logging.getLogger(__name__)

EVALUATE_FILE = "evaluate.json"
# BLIP's score of a candidate left out of the top k_test.
NOT_RERANKED = -100.0
RECALL_AT = (1, 5, 10)
# Rows of a score matrix built and ranked at once.
ROW_BLOCK = 256

Progress = Callable[[int, int], None]


# --- Ranking and recall ----------------------------------------------------------------------


def ranks(scores: np.ndarray, targets: Sequence[Sequence[int]]) -> np.ndarray:
    """Per row of ``scores``, the 0-based place of its best-placed target among all candidates
    ordered by score, highest first; ties: the higher index first (``np.argsort(row,
    kind="stable")[::-1]``)."""
    out = np.empty(len(scores), dtype=np.int64)
    for r, (row, wanted) in enumerate(zip(scores, targets)):
        wanted = np.asarray(wanted, dtype=np.int64)
        values = row[wanted]
        top = values.max()
        best = wanted[values == top].max()  # of equal targets, the later one is placed first
        out[r] = np.count_nonzero(row > top) + np.count_nonzero(row[best + 1:] == top)
    return out


def recalls(text_ranks: np.ndarray, image_ranks: np.ndarray) -> dict[str, float]:
    """BLIP's ``itm_eval`` report from the ranks: ``text_ranks`` per image (image -> text),
    ``image_ranks`` per text (text -> image), in percent."""
    report = {}
    for side, found in (("txt", text_ranks), ("img", image_ranks)):
        for k in RECALL_AT:
            report[f"{side}_r{k}"] = 100.0 * float(np.mean(found < k))
        report[f"{side}_r_mean"] = sum(report[f"{side}_r{k}"] for k in RECALL_AT) / len(RECALL_AT)
    report["r_mean"] = (report["txt_r_mean"] + report["img_r_mean"]) / 2
    return report


def descending(block, k: int):
    """(values, indices) of the ``k`` highest of each row of a torch ``block``, in the order
    ``ranks`` places them (ties: the higher index first)."""
    import torch

    values, flipped = torch.sort(block.flip(-1), dim=-1, descending=True, stable=True)
    return values[:, :k].clone(), block.shape[-1] - 1 - flipped[:, :k]  # not views of the whole rows


# --- The evaluation set ----------------------------------------------------------------------


@dataclass
class EvalSet:
    """Images and texts in the order read. An image is a sample whose image stands for every
    sample of its ``image_id`` (``refs``: its shard and key); each text names its image."""

    refs: list[tuple[str, str]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    text_image: list[int] = field(default_factory=list)
    _numbers: dict[Any, int] = field(default_factory=dict)

    def image_texts(self) -> list[list[int]]:
        grouped: list[list[int]] = [[] for _ in self.refs]
        for text, image in enumerate(self.text_image):
            grouped[image].append(text)
        return grouped

    def take(self, sample: Sample, cfg: EvaluateConfig) -> bool:
        """Add ``sample``'s texts; True when it starts a new image (its image is the one used)."""
        if sample.error is not None:
            raise ValueError(f"evaluation needs every sample: {sample.error}")
        if cfg.image_id_field in sample.meta:
            identity: Any = ("id", repr(sample.meta[cfg.image_id_field]))
        else:
            identity = ("sample", sample.source, sample.key)
        number = self._numbers.get(identity)
        new = number is None
        if new:
            number = self._numbers[identity] = len(self.refs)
            self.refs.append((sample.source, sample.key))
        for text in sample_texts(sample, cfg.captions_field):
            self.texts.append(text)
            self.text_image.append(number)
        return new

    def check(self) -> None:
        if len(self.refs) < 2:
            raise ValueError(f"retrieval needs at least 2 images, not {len(self.refs)}")
        lacking = [ref for ref, texts in zip(self.refs, self.image_texts()) if not texts]
        if lacking:
            source, key = lacking[0]
            raise ValueError(f"{len(lacking)} images have no text, the first {source}: {key} (a text "
                             "is an entry of the json's captions list, or a line of the .txt)")


def sample_texts(sample: Sample, captions_field: str) -> list[str]:
    """The texts of a sample: its json's ``captions_field`` (a list of strings, or one string),
    else its .txt, one text per line. Blank texts are left out."""
    if captions_field in sample.meta:
        value = sample.meta[captions_field]
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{sample.source}: {sample.key}.json: {captions_field!r} must be a list of "
                             f"strings, not {type(value).__name__}")
    else:
        values = (sample.web_text or "").splitlines()
    return [v.strip() for v in values if v.strip()]


def read_set(urls: list[str], cfg: EvaluateConfig, reader: ReaderConfig, found: EvalSet) -> Iterator[Sample]:
    """The samples of ``urls`` that start a new image, in order; every sample's texts go to
    ``found`` as it is read."""
    for url in urls:
        for sample in read_shard(url, reader):
            if found.take(sample, cfg):
                yield sample


def read_again(urls: list[str], reader: ReaderConfig, found: EvalSet) -> Iterator[Sample]:
    """The samples of ``found``'s images, read again in the same order."""
    wanted = set(found.refs)
    for url in urls:
        for sample in read_shard(url, reader):
            if (sample.source, sample.key) in wanted:
                yield sample


# --- Models ----------------------------------------------------------------------------------


class Prepare:
    """Decode an image and resize it to the filter's input, uint8, as ``capfilt run`` does
    (``CapFiltStep.prepare``): the same decode and resize; normalised on the device."""

    def __init__(self, processor: Any, reader: ReaderConfig):
        self.input, self.reader = model_input(processor), reader

    def __call__(self, sample: Sample) -> Sample:
        height, width = self.input.size
        try:
            image = decode_rgb(sample.image, self.reader.max_image_pixels, self.reader.image_formats,
                               (width, height))
            sample.pixels = {"filter": self.input.resize(image)}
        except ImageError as exc:
            sample.fail(f"{sample.source}: {sample.key}.{sample.image_ext}: {exc}")
        return sample


@dataclass
class Models:
    """The filter and where it runs."""

    itm: Any  # ITMFilter
    device: str
    dtype: Any  # torch dtype
    runtime: Any  # RuntimeConfig, resolved


def image_batches(samples: Iterator[Sample], models: Models, cfg: EvaluateConfig, reader: ReaderConfig
                  ) -> Iterator[tuple[list[Sample], Any]]:
    """(samples, the filter's vision states of their images) per batch of ``cfg.batch_size``."""
    from capfilt.prefetch import pixel_batch, prefetch_batches

    rt, prepare = models.runtime, Prepare(models.itm.image_processor, reader)
    for batch in prefetch_batches(samples, prepare, cfg.batch_size, rt.decode_threads, rt.prefetch_batches,
                                  pin_memory=models.device == "cuda"):
        failed = next((s for s in batch if s.error is not None), None)
        if failed is not None:
            raise ValueError(f"evaluation needs every image: {failed.error}")
        pixels = pixel_batch([s.pixels["filter"] for s in batch]).to(models.device, non_blocking=True)
        yield batch, models.itm.image_states(prepare.input.normalise(pixels, models.dtype))


def encode_texts(itm, texts: list[str], batch_size: int, device: str):
    """(input ids, attention masks, ITC features) of ``texts``: tokens padded to
    ``max_text_tokens`` on the host, features float32 on ``device``."""
    import torch

    ids, masks, feats = [], [], []
    for start in range(0, len(texts), batch_size):
        tokens = itm.tokenize(texts[start:start + batch_size], padding="max_length")
        ids.append(tokens.input_ids)
        masks.append(tokens.attention_mask)
        feats.append(itm.text_features(tokens.input_ids.to(device), tokens.attention_mask.to(device)))
    return torch.cat(ids), torch.cat(masks), torch.cat(feats)


def pair_logits(itm, states, input_ids, attention_mask, images, texts, batch_size: int) -> np.ndarray:
    """ITM logits (pairs x 2, float32) of the pairs (``images[n]``, ``texts[n]``): ``images``
    index rows of ``states`` and must be sorted; ``texts`` index rows of the tokens."""
    import torch

    out = np.empty((len(images), 2), dtype=np.float32)
    for start in range(0, len(images), batch_size):
        rows = torch.as_tensor(images[start:start + batch_size], device=states.device)
        picked = torch.as_tensor(texts[start:start + batch_size])
        mask = attention_mask[picked]
        width = int(mask.sum(dim=1).max())  # the tokens as padded to the longest
        ids, mask = input_ids[picked, :width].to(states.device), mask[:, :width].to(states.device)
        present, index = torch.unique_consecutive(rows, return_inverse=True)
        logits = itm.itm_logits(states.index_select(0, present), ids, mask, index)
        out[start:start + len(rows)] = logits.cpu().numpy()
    return out


# --- The evaluation --------------------------------------------------------------------------


@dataclass
class Candidates:
    """What ITC decides: each image's top texts and each text's top images (indices and
    similarities), each image's hardest negative text, and the ranks ITC alone gives."""

    i2t: tuple[np.ndarray, np.ndarray]  # (images x k) indices, similarities
    t2i: tuple[np.ndarray, np.ndarray]  # (texts x k)
    negatives: np.ndarray  # per image
    itc_ranks: tuple[np.ndarray, np.ndarray]  # per image, per text


def candidates(sims, image_texts: list[list[int]], text_image: np.ndarray, k_test: int) -> Candidates:
    """Top-k both ways, hardest negatives and ITC ranks from the similarity matrix (torch,
    images x texts), read in blocks of rows. The results are allocated whole first: no small
    array outlives a block's big temporaries, so the heap can reuse their memory."""
    import torch

    n_images, n_texts = sims.shape
    k_i2t, k_t2i = min(k_test, n_texts), min(k_test, n_images)
    found = Candidates((np.empty((n_images, k_i2t), np.int32), np.empty((n_images, k_i2t), np.float32)),
                       (np.empty((n_texts, k_t2i), np.int32), np.empty((n_texts, k_t2i), np.float32)),
                       np.empty(n_images, np.int64), (np.empty(n_images, np.int64), np.empty(n_texts, np.int64)))
    for start in range(0, n_images, ROW_BLOCK):
        rows = slice(start, start + ROW_BLOCK)
        block = sims[rows]
        _top_into(block, k_i2t, found.i2t, rows)
        found.itc_ranks[0][rows] = ranks(block.cpu().numpy(), image_texts[rows])
        others = block.clone()
        for r, texts in enumerate(image_texts[rows]):
            others[r, texts] = -torch.inf
        found.negatives[rows] = (n_texts - 1 - others.flip(-1).argmax(dim=-1)).cpu().numpy()
        del block, others
    for start in range(0, n_texts, ROW_BLOCK):
        rows = slice(start, start + ROW_BLOCK)
        block = sims[:, rows].T
        _top_into(block, k_t2i, found.t2i, rows)
        found.itc_ranks[1][rows] = ranks(block.cpu().numpy(), text_image[rows, None])
        del block
    return found


def _top_into(block, k: int, into: tuple[np.ndarray, np.ndarray], rows: slice) -> None:
    values, index = descending(block, k)
    into[0][rows] = index.cpu().numpy()
    into[1][rows] = values.cpu().numpy()


def pairs_to_score(found: Candidates, text_image: np.ndarray, n_texts: int) -> np.ndarray:
    """Every (image, text) pair ITM scores, once, as sorted codes ``image * n_texts + text``:
    the top-k both ways, each text with its image, each image with its hardest negative."""
    i2t, t2i = found.i2t[0].astype(np.int64), found.t2i[0].astype(np.int64)
    images = np.arange(len(i2t), dtype=np.int64)
    texts = np.arange(len(t2i), dtype=np.int64)
    codes = np.concatenate([
        (images[:, None] * n_texts + i2t).ravel(),
        (t2i * n_texts + texts[:, None]).ravel(),
        text_image * n_texts + texts,
        images * n_texts + found.negatives,
    ])
    codes.sort()  # then drop repeats: np.unique takes 20 times as long on COCO's 7.7 million
    return codes[np.concatenate(([True], codes[1:] != codes[:-1]))]


def reranked_ranks(index: np.ndarray, sims: np.ndarray, itm_of: Callable[[np.ndarray], np.ndarray],
                   targets: Sequence[Sequence[int]], candidates_count: int) -> np.ndarray:
    """Ranks after BLIP's re-ranking: each row's top candidates (``index``, ``sims``) score
    ITM logit + similarity (``itm_of(rows, index)``), the others -100."""
    out = []
    for start in range(0, len(index), ROW_BLOCK):
        block = slice(start, start + ROW_BLOCK)
        rows = np.arange(start, min(start + ROW_BLOCK, len(index)))
        scores = np.full((len(rows), candidates_count), NOT_RERANKED, dtype=np.float32)
        scores[np.arange(len(rows))[:, None], index[block]] = itm_of(rows, index[block]) + sims[block]
        out.append(ranks(scores, targets[block]))
    return np.concatenate(out)


def itm_accuracy(logits: np.ndarray, codes: np.ndarray, positives: np.ndarray, negatives: np.ndarray,
                 threshold: float) -> dict[str, Any]:
    """Balanced accuracy of ITM's match (softmax(logits)[1] >= threshold) on the positive and
    the negative pairs (codes)."""
    def score(pairs: np.ndarray) -> np.ndarray:
        found = logits[np.searchsorted(codes, pairs)].astype(np.float64)
        return 1.0 / (1.0 + np.exp(found[:, 0] - found[:, 1]))  # softmax(logits)[1]

    positive, negative = score(positives), score(negatives)
    tpr, tnr = float(np.mean(positive >= threshold)), float(np.mean(negative < threshold))
    return {"balanced_accuracy": 100.0 * (tpr + tnr) / 2, "positives_matched": 100.0 * tpr,
            "negatives_rejected": 100.0 * tnr, "positives": len(positives), "negatives": len(negatives),
            "threshold": threshold, "positives_mean_score": float(positive.mean()),
            "negatives_mean_score": float(negative.mean())}


def versions() -> dict[str, str | None]:
    from capfilt.run import package_versions

    return package_versions(("capfilt", "torch", "transformers", "pillow"))


def load_models(config: Config) -> Models:
    from capfilt.models.itm_filter import ITMFilter
    from capfilt.models.loading import check_checkpoint, resolve_device, torch_dtype
    from capfilt.models.slots import slot_kind
    from capfilt.runtime.defaults import apply_precision, local_facts, resolve_runtime

    cfg = config.filter
    kind = slot_kind("filter", cfg.kind, check_checkpoint("filter.model", cfg.model, cfg.revision), cfg.model)
    if kind != "blip":  # BLIP's re-ranking reads ITM against any image's states (ITMFilter's parts)
        raise ValueError(f"filter.model: {cfg.model} is a {kind} checkpoint; capfilt evaluate follows BLIP's "
                         "evaluation and takes blip checkpoints only")
    rt = resolve_runtime(config.runtime, local_facts(config.runtime.device))
    device = resolve_device(rt.device)
    apply_precision(rt)
    itm = ITMFilter(dataclasses.replace(config.filter, itc=True), device, rt.dtype)
    return Models(itm, device, torch_dtype(rt.dtype, device), rt)


def evaluate(urls: list[str], config: Config, models: Models | None = None,
             progress: Progress | None = None) -> dict[str, Any]:
    """Evaluate ``config.filter.model`` on the shards ``urls``; the report ``evaluate.json`` holds."""
    import torch

    cfg = config.evaluate
    models = models or load_models(config)
    begin = time.perf_counter()
    found = EvalSet()
    with torch.inference_mode():
        input_ids, attention_mask, chosen = itc_pass(urls, config, models, found)
        image_texts, text_image = found.image_texts(), np.asarray(found.text_image, dtype=np.int64)
        n_images, n_texts = len(found.refs), len(found.texts)
        codes = pairs_to_score(chosen, text_image, n_texts)
        logits = score_pairs(urls, config.reader, found, models, cfg, codes, input_ids, attention_mask, progress)

    def itm_of(rows: np.ndarray, index: np.ndarray, by_text: bool) -> np.ndarray:
        index = index.astype(np.int64)
        pair = index * n_texts + rows[:, None] if by_text else rows[:, None] * n_texts + index
        return logits[np.searchsorted(codes, pair), 1]

    text_ranks = reranked_ranks(*chosen.i2t, lambda r, i: itm_of(r, i, False), image_texts, n_texts)
    image_ranks = reranked_ranks(*chosen.t2i, lambda r, i: itm_of(r, i, True), text_image[:, None], n_images)
    return {
        **provenance(config, models, urls),
        "images": n_images, "texts": n_texts,
        "k_test": {"i2t": min(cfg.k_test, n_texts), "t2i": min(cfg.k_test, n_images)},
        "retrieval": recalls(text_ranks, image_ranks),
        "itc_retrieval": recalls(*chosen.itc_ranks),
        "itm": itm_accuracy(logits, codes, text_image * n_texts + np.arange(n_texts),
                            np.arange(n_images) * n_texts + chosen.negatives, cfg.threshold),
        "pairs_scored": len(codes),
        "seconds": round(time.perf_counter() - begin, 3),
    }


def itc_pass(urls: list[str], config: Config, models: Models, found: EvalSet):
    """Read the set into ``found``, and choose the candidates by ITC: (the texts' tokens and
    masks, ``Candidates``). The similarity matrix lives only here."""
    import torch

    cfg, reader = config.evaluate, config.reader
    image_feats = [models.itm.image_features(states)
                   for _, states in image_batches(read_set(urls, cfg, reader, found), models, cfg, reader)]
    found.check()
    log.info("evaluate: %d images, %d texts", len(found.refs), len(found.texts))
    input_ids, attention_mask, text_feats = encode_texts(models.itm, found.texts, cfg.text_batch_size,
                                                         models.device)
    sims = torch.cat(image_feats) @ text_feats.T
    del image_feats, text_feats
    return input_ids, attention_mask, candidates(sims, found.image_texts(),
                                                 np.asarray(found.text_image, dtype=np.int64), cfg.k_test)


def provenance(config: Config, models: Models, urls: list[str]) -> dict[str, Any]:
    """What made the numbers: checkpoint, data, settings, device, versions."""
    return {
        "model": {"name": config.filter.model, "revision": config.filter.revision,
                  "resolved": models.itm.loaded.revision, "first_token": models.itm.first_token,
                  "max_text_tokens": config.filter.max_text_tokens},
        "data": [redact_text(u) for u in urls],
        "evaluate": dataclasses.asdict(config.evaluate),
        "runtime": {"device": models.device, "dtype": models.runtime.dtype, "tf32": models.runtime.tf32},
        "versions": versions(),
    }


def score_pairs(urls, reader, found: EvalSet, models: Models, cfg: EvaluateConfig, codes: np.ndarray,
                input_ids, attention_mask, progress: Progress | None) -> np.ndarray:
    """ITM logits of the pairs ``codes`` (sorted, so each image's pairs are together), the
    images read again in order and each put through the vision encoder once."""
    n_texts, n_images = len(found.texts), len(found.refs)
    number = {ref: i for i, ref in enumerate(found.refs)}
    logits = np.empty((len(codes), 2), dtype=np.float32)
    done = 0
    for batch, states in image_batches(read_again(urls, reader, found), models, cfg, reader):
        first = number[(batch[0].source, batch[0].key)]
        if [number[(s.source, s.key)] for s in batch] != list(range(first, first + len(batch))) or first != done:
            raise ValueError("the shards changed while they were evaluated: their images came back in "
                             "another order")
        lo, hi = np.searchsorted(codes, [first * n_texts, (first + len(batch)) * n_texts])
        if hi > lo:
            logits[lo:hi] = pair_logits(models.itm, states, input_ids, attention_mask,
                                        codes[lo:hi] // n_texts - first, codes[lo:hi] % n_texts,
                                        cfg.itm_batch_size)
        done += len(batch)
        if progress:
            progress(done, n_images)
    if done != n_images:
        raise ValueError(f"the shards changed while they were evaluated: {done} of {n_images} images "
                         "came back")
    return logits
