"""``capfilt select``: a new cleaned webdataset from a finished run's scores, with no model loaded.

A run's parquet holds the ITM score (and ITC similarity) of every text, kept or not, and each
image's embedding, so any decision made from them can be made again without the models: another
threshold or selection, a threshold on the ITC similarities too, or on the scores of the models
the run recorded (``scores:``, such as CLIP's), the top share of the whole run by any of these
(a global quantile, as DataComp's top 30%), the k best captions per image, near-duplicate images
removed, a web/synthetic mix of pairs, another layout. Each output shard is made from the run's
parquet (the scores) and the run's input tar (the image and metadata bytes: the run's own tar lacks the images
it dropped), through the run's decision (``decision.decide``) and writer (``ShardWriter``), so at
the run's own policy select writes the run's bytes.

Before any shard: the global cut reads one score column's worth of the run, then only the keys
tied at the cut (``top_cutoff``); the near-duplicates are found among the images the other
policies keep (``Duplicates.find``: one float32 matrix of their embeddings, ``capfilt.dedup``);
the mix counts the pairs the other policies keep over the run (``Mix.count``). Each shard's
marker records select's fingerprint: the run's plus the policy.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import itertools
import json
import logging
import math
import os
import posixpath
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any, NamedTuple

import pyarrow as pa

from capfilt.config import Config, ReaderConfig, SelectConfig, build
from capfilt.decision import SYNTHETIC, WEB, decide
from capfilt.dedup import IndexPlan, near_duplicates
from capfilt.identity import OUTPUT_REVISION, fingerprint, refuse_if_changed
from capfilt.io.fs import OutputDir, configure_storage, expand_input, read_json, read_parquet, read_parquet_schema
from capfilt.io.layout import RUN_FILE, SELECT_FILE, SIZES_FILE, STATS_FILE, parquet_name, stats_name, tar_name
from capfilt.io.lock import hold
from capfilt.io.reader import read_shard
from capfilt.io import writer
from capfilt.io.writer import IMAGE_EMBEDDING, PARQUET_SCHEMA, ShardWriter, run_schema
from capfilt.redaction import MASK, redact_text
from capfilt.run import check_outside_input
from capfilt.runtime.shards import ShardTask, done_markers, plan_shards, split_done
from capfilt.sample import ERROR, Sample
from capfilt.stats import TIMING, Counts, ShardStats

log = logging.getLogger(__name__)

# Raised when select makes other output from the same run and policy (part of its fingerprint).
# 2: the ITC policies and dedup; the ITC similarities and embeddings carried into the parquet.
# Not raised by the policies on recorded scores (score_thresholds, top_score: NAME): a policy
# without them has the identity and the output it had, and one with them is new.
SELECT_REVISION = 2

# Why a sample left: the run's error, or the first policy that took its last text.
ERROR_REASON, BELOW_THRESHOLD, BELOW_ITC_THRESHOLD, BELOW_SCORE_THRESHOLD, NOT_TOP_FRACTION, MAX_CAPTIONS, \
    DUPLICATE, MIX = ("error", "below_threshold", "below_itc_threshold", "below_score_threshold",
                      "not_top_fraction", "max_captions", "duplicate_of", "mix")
KEPT_REASON = "kept"  # in the counts of reasons, the samples that did not leave
# The parquet column of that reason (null for a kept sample), after the run's own columns; a
# near-duplicate's names the image kept for it, "duplicate_of KEY", counted as "duplicate_of".
REASON = "select_reason"
SELECT_SCHEMA = PARQUET_SCHEMA.append(pa.field(REASON, pa.string()))

# Of the run's parquet: what the decision needs, and what shows the tar is the one the run read.
ROW_COLUMNS = ["key", "status", "error", "image_bytes", "width", "height", "web_score", "captions",
               "caption_scores"]
ITC_COLUMNS = ["web_itc", "caption_itc"]
# Read when the run has them (a run older than them has not), and carried into the selection.
CARRIED_COLUMNS = [*ITC_COLUMNS, IMAGE_EMBEDDING]
# What ranks an image (its scores), and a text (the texts too: ``candidates`` counts each once).
SCORE_COLUMNS = {"images": ["status", "web_score", "caption_scores"],
                 "texts": ["status", "web_text", "web_score", "captions", "caption_scores"]}
# The run's setting that records each column the ITC policies read.
RECORDED_BY = {"web_itc": "filter.itc", "caption_itc": "filter.itc", IMAGE_EMBEDDING: "writer.embeddings"}
# The filter's scores, by top_score's names for them; any other top_score names a recorded score.
FILTER_SCORES = ("itm", "itc")

Progress = Callable[[int, int], None]  # (samples done, samples to do)


class SelectError(ValueError):
    """The run cannot be selected from as asked: not a finished run, an input that changed."""


# --- the run and the policy ----------------------------------------------------------------------

@dataclass(frozen=True)
class RunFolder:
    """A finished run as select reads it: its ``run.json`` (fingerprint, config) and parquet."""

    url: str
    fingerprint: str
    config: dict[str, Any]

    @classmethod
    def read(cls, url: str) -> "RunFolder":
        url = url.rstrip("/") or "/"
        record = read_json(posixpath.join(url, RUN_FILE))
        if not isinstance(record, dict) or not record.get("fingerprint") or "config" not in record:
            raise SelectError(f"{url}: not the output folder of a capfilt run (no {RUN_FILE} with its "
                              "fingerprint and config)")
        return cls(url, record["fingerprint"], record["config"])

    def parquet(self, shard: str) -> str:
        return posixpath.join(self.url, parquet_name(shard))

    @property
    def score_names(self) -> list[str]:
        """The names of the scores the run recorded beside the filter's (``scores:``)."""
        return [item["name"] for item in self.config.get("scores") or []]

    def schema(self) -> pa.Schema:
        """The selection's parquet schema: the run's (its recorded scores' columns included),
        then ``select_reason``."""
        return run_schema(self.score_names).append(pa.field(REASON, pa.string()))

    def recorded(self, column: str) -> bool:
        """Whether the run's config says it recorded ``column`` (an older run's lacks the setting)."""
        section, key = RECORDED_BY[column].split(".")
        return bool((self.config.get(section) or {}).get(key))

    def reader_options(self) -> ReaderConfig:
        """The run's reader section: the input tars are read into the samples the run read."""
        return build(ReaderConfig, self.config.get("reader") or {}, "reader.")

    def input_urls(self, given: str | list[str] | None) -> list[str]:
        """The run's input shards: where ``given`` says, else where its run.json says."""
        if given:
            return expand_input(given)
        spec = self.config.get("input")
        if not spec:
            raise SelectError(f"{self.url}/{RUN_FILE} records no input: give the run's input with --input")
        if MASK in json.dumps(spec):
            raise SelectError(f"{self.url}/{RUN_FILE} records the input with its credentials masked "
                              f"({spec}): give it again with --input")
        return expand_input(spec)


@dataclass(frozen=True)
class Policy:
    """``select:`` with every null resolved from the run: what decides a selection's bytes."""

    threshold: float
    selection: str
    layout: str
    top_fraction: float | None
    top_of: str
    top_score: str
    max_captions: int | None
    synthetic_share: float | None
    seed: int
    itc_threshold: float | None = None
    dedup: bool = False
    dedup_threshold: float = 0.95
    score_thresholds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The policy as its fingerprint and select.json record it: score_thresholds only when
        there are some, so that a policy without them keeps the fingerprint it had."""
        values = asdict(self)
        if not values["score_thresholds"]:
            del values["score_thresholds"]
        return values

    @property
    def ranks(self) -> bool:
        """Whether anything ranks by ``top_score``: the top fraction, and dedup's order."""
        return bool(self.top_fraction or self.dedup)

    def needs(self) -> dict[str, str]:
        """The run's columns this policy reads beyond the ITM scores, each with the setting that needs it."""
        needs = {}
        if self.itc_threshold is not None:
            needs.update(dict.fromkeys(ITC_COLUMNS, "select.itc_threshold"))
        if self.top_score == "itc" and self.ranks:
            needs.update(dict.fromkeys(ITC_COLUMNS, "select.top_score: itc"))
        if self.dedup:
            needs[IMAGE_EMBEDDING] = "select.dedup"
        for name, setting in self.scores_read().items():
            needs.update(dict.fromkeys(writer.score_columns(name), setting))
        return needs

    def scores_read(self) -> dict[str, str]:
        """The recorded scores (``scores:``) this policy reads, each with the setting that reads it."""
        read = {name: f"select.score_thresholds.{name}" for name in sorted(self.score_thresholds)}
        if self.top_score not in FILTER_SCORES and self.ranks:
            read.setdefault(self.top_score, f"select.top_score: {self.top_score}")
        return read


def resolve_policy(section: SelectConfig, run_config: dict[str, Any]) -> Policy:
    """The policy of ``section``; threshold, selection and layout default to the run's."""
    values = asdict(section)
    for key, (run_section, run_key) in {"threshold": ("filter", "threshold"),
                                        "selection": ("filter", "selection"),
                                        "layout": ("writer", "layout")}.items():
        if values[key] is None:
            values[key] = run_config[run_section][run_key]
    values["score_thresholds"] = dict(values["score_thresholds"] or {})
    policy = Policy(**values)
    if policy.synthetic_share is not None and policy.layout != "pairs":
        raise SelectError(f"select.synthetic_share: a mix of pairs needs select.layout: pairs "
                          f"(the layout is {policy.layout})")
    return policy


def check_recorded(run: RunFolder, policy: Policy, shard: str) -> None:
    """Refuse a policy that reads a column the run did not record: off in its config (a score not
    among its ``scores:``), or missing from its parquet (``shard``'s: a run older than the column)."""
    if not policy.needs():
        return
    columns = read_parquet_schema(run.parquet(shard)).names
    for name, setting in policy.scores_read().items():
        if name not in run.score_names:
            raise SelectError(f"{redact_text(run.url)}: {setting} needs the run's recorded score {name!r}, which the "
                              f"run did not record (its scores: {', '.join(run.score_names) or 'none'}): run "
                              f"again with scores: [{{name: {name}, model: ...}}]")
        missing = [column for column in writer.score_columns(name) if column not in columns]
        if missing:
            raise SelectError(f"{redact_text(run.parquet(shard))}: {setting} needs the run's {missing[0]} column, "
                              "which its parquet lacks")
    for column, setting in policy.needs().items():
        if column not in RECORDED_BY:  # a recorded score's, checked above
            continue
        if not run.recorded(column) or column not in columns:
            raise SelectError(f"{redact_text(run.url)}: {setting} needs the run's {column} column, which the run "
                              f"did not record ({RECORDED_BY[column]} off, or a capfilt older than it): "
                              f"run again with {RECORDED_BY[column]}: true")


# --- the texts of an image, ranked over the run ------------------------------------------------

def candidates(sample: Sample) -> list[tuple[str, str, float]]:
    """Every text of a judged image that a threshold can keep, as ``decide`` counts them: once
    each, the web text first (a caption equal to it counts as web), then the captions."""
    probe = Sample(key=sample.key, web_text=sample.web_text, web_score=sample.web_score,
                   captions=list(sample.captions), caption_scores=list(sample.caption_scores))
    return decide(probe, -math.inf, "best_score").kept_texts


def _value_of(sample: Sample, text: tuple[str, str, float], web: float | None, captions: list) -> float | None:
    """The value, in ``web`` or ``captions`` (aligned with the captions), of one of ``decide``'s
    kept texts: the web text's, or that of the first caption of that text and ITM score (the one
    ``decide`` kept)."""
    words, origin, score = text
    if origin == WEB:
        return web
    return next((value for caption, itm, value in zip(sample.captions, sample.caption_scores, captions)
                 if caption == words and itm == score), None)


def itc_of(sample: Sample, text: tuple[str, str, float]) -> float:
    """The ITC similarity of one of ``decide``'s kept texts (``_value_of``); none is an error."""
    itc = _value_of(sample, text, sample.web_itc, sample.caption_itc)
    if itc is None:
        raise SelectError(f"key {sample.key!r}: its {text[1]} text {text[0][:60]!r} has no ITC similarity in the "
                          "run's parquet")
    return itc


def recorded_of(sample: Sample, text: tuple[str, str, float], name: str) -> float | None:
    """The recorded score ``name`` (``scores:``) of one of ``decide``'s kept texts (``_value_of``);
    None when the run recorded none for it."""
    values = sample.scores.get(name) or {}
    return _value_of(sample, text, values.get("web"), values.get("captions") or [])


def ranked(sample: Sample, top_of: str, top_score: str = "itm") -> list[tuple[int, str | None, float]]:
    """(position, text, score) of what ``top_fraction`` ranks in an image: the image itself,
    scored by its best text (position 0, no text: its scores are enough), or each of its
    candidate texts; by ITM score, by ITC similarity (``top_score: itc``) or by a recorded
    score (``top_score: NAME``), a text without a recorded score being left unranked."""
    if top_of == "images":
        if top_score in FILTER_SCORES:
            scores = [sample.web_itc, *sample.caption_itc] if top_score == "itc" else \
                [sample.web_score, *sample.caption_scores]
        else:
            values = sample.scores.get(top_score) or {}
            scores = [values.get("web"), *(values.get("captions") or [])]
        scores = [score for score in scores if score is not None]
        return [(0, None, max(scores))] if scores else []
    if top_score in FILTER_SCORES:
        return [(position, text[0], itc_of(sample, text) if top_score == "itc" else text[2])
                for position, text in enumerate(candidates(sample))]
    items = [(position, text[0], recorded_of(sample, text, top_score))
             for position, text in enumerate(candidates(sample))]
    return [item for item in items if item[2] is not None]


def rank_columns(top_score: str) -> list[str]:
    """The run's columns of ``top_score`` beyond the ITM scores."""
    if top_score in FILTER_SCORES:
        return ITC_COLUMNS if top_score == "itc" else []
    return list(writer.score_columns(top_score))


def score_columns(top_of: str, top_score: str) -> list[str]:
    """The run's columns ``ranked`` reads."""
    return SCORE_COLUMNS[top_of] + rank_columns(top_score)


class Place(NamedTuple):
    """Where a sample is: its shard, and its row in the shard's parquet (keys may repeat)."""

    shard: str
    row: int


def _probe(row: dict[str, Any], score_names: list[str] = ()) -> Sample:
    """A sample made of a run's parquet row: its texts and scores, no image; the recorded
    scores of ``score_names`` (``Sample.scores``) those the row holds."""
    scores = {name: {"web": row[f"{name}_web"], "captions": row.get(f"{name}_captions")}
              for name in score_names if f"{name}_web" in row}
    return Sample(key=row.get("key") or "", web_text=row.get("web_text"), web_score=row["web_score"],
                  captions=list(row.get("captions") or []), caption_scores=list(row["caption_scores"] or []),
                  web_itc=row.get("web_itc"), caption_itc=list(row.get("caption_itc") or []),
                  scores=scores, status=row["status"])


def _scored_rows(run: RunFolder, names: list[str], columns: list[str]) -> Iterator[tuple[Place, Sample]]:
    """(place, sample) of every row the run judged, one shard's columns in memory at a time."""
    for name in names:
        for index, row in enumerate(read_parquet(run.parquet(name), columns=list(dict.fromkeys(columns))).to_pylist()):
            if row["status"] != ERROR:
                yield Place(name, index), _probe(row, run.score_names)


@dataclass(frozen=True)
class Cutoff:
    """The top ``keep`` of the run's ``of`` items by score, ties broken by (key, shard, position):
    an item is in when its score is above ``score``, or equal to it with a rank at most ``last``
    (None: every item of that score is in)."""

    keep: int
    of: int
    score: float | None = None
    last: tuple[str, str, int] | None = None

    def admits(self, score: float, rank: tuple[str, str, int]) -> bool:
        if self.keep == 0:
            return False
        return score > self.score or (score == self.score and (self.last is None or rank <= self.last))

    def to_dict(self) -> dict[str, Any]:
        return {"keep": self.keep, "of": self.of, "score": self.score,
                "last": list(self.last) if self.last is not None else None}


def top_cutoff(run: RunFolder, names: list[str], fraction: float, top_of: str, top_score: str = "itm") -> Cutoff:
    """The cut that keeps exactly ``floor(fraction * items)`` of the run's images or texts.

    Two passes over the parquet: the first holds one float per item (the score column), the
    second only the ranks of the items tied at the cut, at most as many as it keeps of them.
    """
    import numpy as np

    columns = score_columns(top_of, top_score)
    scores = np.fromiter((score for _, sample in _scored_rows(run, names, columns)
                          for _, _, score in ranked(sample, top_of, top_score)), dtype=np.float64)
    of = len(scores)
    keep = math.floor(Fraction(repr(fraction)) * of)  # exact: 0.3 of 10 is 3, not 3.0000000000000004
    if keep == 0:
        return Cutoff(0, of)
    score = float(np.partition(scores, of - keep)[of - keep])
    need = keep - int(np.count_nonzero(scores > score))
    tied = int(np.count_nonzero(scores == score))
    del scores
    if tied == need:
        return Cutoff(keep, of, score)
    ranks = ((sample.key, place.shard, position)
             for place, sample in _scored_rows(run, names, ["key", *columns])
             for position, _, item_score in ranked(sample, top_of, top_score) if item_score == score)
    return Cutoff(keep, of, score, heapq.nsmallest(need, ranks)[-1])


# --- the mix --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mix:
    """Pairs kept with a chance per origin, so that ``share`` of the run's pairs are synthetic in
    expectation while as many pairs as can be are kept. ``web`` and ``synthetic``: the pairs the
    other policies keep over the run. A pair's draw depends on the seed and the pair alone."""

    share: float
    seed: int
    web: int
    synthetic: int

    @property
    def chances(self) -> tuple[float, float]:
        """(web, synthetic) chance of a pair to stay. With pairs of one origin only, no mix."""
        share, web, synthetic = self.share, self.web, self.synthetic
        if web == 0 or synthetic == 0:
            return 1.0, 1.0
        if synthetic * (1 - share) > share * web:  # more synthetic than the share
            return 1.0, share * web / ((1 - share) * synthetic)
        return (1 - share) * synthetic / (share * web), 1.0

    def keeps(self, shard: str, key: str, text: tuple[str, str, float]) -> bool:
        chance = self.chances[0 if text[1] == WEB else 1]
        return chance >= 1.0 or draw(self.seed, shard, key, text[1], text[0]) < chance

    def to_dict(self) -> dict[str, Any]:
        web, synthetic = self.chances
        return {"share": self.share, "seed": self.seed, "web_pairs": self.web,
                "synthetic_pairs": self.synthetic, "web_chance": web, "synthetic_chance": synthetic}

    @classmethod
    def count(cls, run: RunFolder, names: list[str], policy: "Redecision") -> "Mix":
        """The mix of ``policy.policy``, counted over the run with ``policy`` (without a mix)."""
        web = synthetic = 0
        for place, sample in _scored_rows(run, names, policy.columns()):
            policy(sample, place, {})
            origins = [origin for _, origin, _ in sample.kept_texts]
            web, synthetic = web + origins.count(WEB), synthetic + origins.count(SYNTHETIC)
        return cls(policy.policy.synthetic_share, policy.policy.seed, web, synthetic)


def draw(seed: int, shard: str, key: str, origin: str, text: str) -> float:
    """A number in [0, 1) fixed by its arguments: the same pair draws the same in any order."""
    blob = json.dumps([seed, shard, key, origin, text], ensure_ascii=False).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "big") / 2**64


# --- one sample -------------------------------------------------------------------------------------

Texts = list[tuple[str, str, float]]


class Redecision:
    """The policy applied to one sample the run judged: ``decide`` at the threshold, then each
    policy narrows the kept texts, in this order: the ITC threshold, the recorded scores'
    thresholds, the top fraction, the k best captions, the near-duplicates (found among the images the policies before keep), the
    mix. Returns why the sample left (None: kept); counts the texts each policy took in
    ``removed``. Built without the later policies, it is what those are found over."""

    def __init__(self, policy: Policy, cutoff: Cutoff | None = None, duplicates: "Duplicates | None" = None,
                 mix: Mix | None = None):
        self.policy, self.cutoff, self.duplicates, self.mix = policy, cutoff, duplicates, mix
        self.stages: list[tuple[str, Callable[[Texts, Sample, Place], Texts]]] = []
        if policy.itc_threshold is not None:
            self.stages.append((BELOW_ITC_THRESHOLD, self._itc))
        if policy.score_thresholds:
            self.stages.append((BELOW_SCORE_THRESHOLD, self._recorded))
        if cutoff is not None:
            self.stages.append((NOT_TOP_FRACTION, self._top))
        if policy.max_captions is not None:
            self.stages.append((MAX_CAPTIONS, self._max_captions))
        if duplicates is not None:
            self.stages.append((DUPLICATE, self._duplicate))
        if mix is not None:
            self.stages.append((MIX, self._mix))

    def columns(self) -> list[str]:
        """The run's columns it reads: the texts and their scores."""
        policy = self.policy
        columns = ["key", *SCORE_COLUMNS["texts"], *(ITC_COLUMNS if policy.itc_threshold is not None else [])]
        for name in sorted(policy.score_thresholds):
            columns += writer.score_columns(name)
        if self.cutoff is not None:
            columns += rank_columns(policy.top_score)
        return list(dict.fromkeys(columns))

    def __call__(self, sample: Sample, place: Place, removed: dict[str, int]) -> str | None:
        if sample.status == ERROR:
            return ERROR_REASON
        decide(sample, self.policy.threshold, self.policy.selection)
        kept = sample.kept_texts
        if not kept:
            return BELOW_THRESHOLD
        reason = None
        for reason, narrow in self.stages:
            narrowed = narrow(kept, sample, place)
            if len(narrowed) < len(kept):
                removed[reason] = removed.get(reason, 0) + len(kept) - len(narrowed)
            kept = narrowed
            if not kept:
                break
        if kept != sample.kept_texts:
            self._decide_among(sample, kept)
        if kept:
            return None
        return f"{DUPLICATE} {self.duplicates.dropped[place]}" if reason == DUPLICATE else reason

    def _decide_among(self, sample: Sample, kept: Texts) -> None:
        """The decision over the texts the policies left: ``decide`` itself, on those alone."""
        web = next((text for text in kept if text[1] == WEB), None)
        probe = Sample(key=sample.key, web_text=web[0] if web else None, web_score=web[2] if web else None,
                       captions=[t for t, origin, _ in kept if origin == SYNTHETIC],
                       caption_scores=[s for _, origin, s in kept if origin == SYNTHETIC])
        decide(probe, self.policy.threshold, self.policy.selection)
        sample.kept_texts, sample.status, sample.text = probe.kept_texts, probe.status, probe.text

    def _itc(self, kept: Texts, sample: Sample, place: Place) -> Texts:
        return [text for text in kept if itc_of(sample, text) >= self.policy.itc_threshold]

    def _recorded(self, kept: Texts, sample: Sample, place: Place) -> Texts:
        def passes(text, name: str, threshold: float) -> bool:
            value = recorded_of(sample, text, name)
            return value is not None and value >= threshold

        return [text for text in kept if all(passes(text, name, threshold)
                                             for name, threshold in self.policy.score_thresholds.items())]

    def _top(self, kept: Texts, sample: Sample, place: Place) -> Texts:
        items = ranked(sample, self.policy.top_of, self.policy.top_score)
        if self.policy.top_of == "images":
            if not items:  # no text scored by a recorded score: not ranked
                return []
            position, _, score = items[0]
            return kept if self.cutoff.admits(score, (sample.key, place.shard, position)) else []
        rank = {text: (score, (sample.key, place.shard, position)) for position, text, score in items}
        return [text for text in kept if text[0] in rank and self.cutoff.admits(*rank[text[0]])]

    def _max_captions(self, kept: Texts, sample: Sample, place: Place) -> Texts:
        synthetic = [text for text in kept if text[1] == SYNTHETIC]
        best = sorted(synthetic, key=lambda text: -text[2])[:self.policy.max_captions]  # earlier first on ties
        return [text for text in kept if text[1] == WEB or text in best]

    def _duplicate(self, kept: Texts, sample: Sample, place: Place) -> Texts:
        return [] if place in self.duplicates.dropped else kept

    def _mix(self, kept: Texts, sample: Sample, place: Place) -> Texts:
        return [text for text in kept if self.mix.keeps(place.shard, sample.key, text)]


# --- the near-duplicates ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Duplicates:
    """The near-duplicate images among those the policies before dedup keep, over the whole run,
    by ``capfilt.dedup``'s rule: images ranked by their best text's ``top_score``, then (key,
    shard, row); each dropped image's place, with the key of the kept image it duplicates."""

    threshold: float
    images: int
    plan: IndexPlan
    dropped: dict[Place, str]

    def to_dict(self) -> dict[str, Any]:
        listed = json.dumps(sorted([*place, key] for place, key in self.dropped.items())).encode()
        return {"threshold": self.threshold, "images": self.images, "duplicates": len(self.dropped),
                "index": self.plan.to_dict(), "digest": hashlib.sha256(listed).hexdigest()}

    @classmethod
    def find(cls, run: RunFolder, names: list[str], policy: Redecision) -> "Duplicates":
        """Those of ``policy.policy``, among the images ``policy`` (without dedup) keeps."""
        places, scores, keys = [], [], []
        top_score = policy.policy.top_score
        columns = [*policy.columns(), *rank_columns(top_score)]
        for place, sample in _scored_rows(run, names, columns):
            if policy(sample, place, {}) is None:
                score = ranked(sample, "images", top_score)
                if not score:
                    raise SelectError(f"{redact_text(run.parquet(place.shard))}: key {sample.key!r} has no "
                                      f"{top_score} score to rank it among its near-duplicates")
                places.append(place)
                scores.append(score[0][2])
                keys.append((sample.key, *place))
        plan = IndexPlan.for_size(len(places))
        duplicate_of = near_duplicates(embeddings(run, places, keys), scores, keys, policy.policy.dedup_threshold,
                                       plan)
        dropped = {places[i]: keys[of][0] for i, of in enumerate(duplicate_of.tolist()) if of >= 0}
        return cls(policy.policy.dedup_threshold, len(places), plan, dropped)


def embeddings(run: RunFolder, places: list[Place], keys: list[tuple[str, str, int]]):
    """The image embeddings of ``places`` (in shard order), as one float32 matrix of unit rows:
    the ``image_embedding`` column read one shard at a time, only the rows asked for kept."""
    import numpy as np

    matrix, start = None, 0
    for shard, group in itertools.groupby(places, key=lambda place: place.shard):
        rows = [place.row for place in group]
        stop = start + len(rows)
        column = read_parquet(run.parquet(shard), columns=[IMAGE_EMBEDDING]).column(0).combine_chunks()
        vectors = column.take(rows)
        lengths = vectors.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
        if matrix is None:
            matrix = np.empty((len(places), int(lengths.max())), dtype=np.float32)
        wrong = np.flatnonzero(lengths != matrix.shape[1])
        if len(wrong):
            raise SelectError(f"{redact_text(run.parquet(shard))}: key {keys[start + wrong[0]][0]!r} has "
                              f"{lengths[wrong[0]]} image embedding values where the run's others have "
                              f"{matrix.shape[1]}")
        block = matrix[start:stop]
        block[:] = vectors.flatten().to_numpy(zero_copy_only=False).reshape(len(rows), -1)
        norms = np.linalg.norm(block, axis=1, keepdims=True)  # unit again after float16 rounding
        np.divide(block, norms, out=block, where=norms > 0)
        start = stop
    return matrix if matrix is not None else np.empty((0, 0), dtype=np.float32)


# --- one shard --------------------------------------------------------------------------------------

@dataclass
class SelectStats(ShardStats):
    """A selected shard's done marker: ``ShardStats``, and why its samples left (``reasons``,
    every sample once, ``kept`` included) and the texts each policy took (``texts_removed``)."""

    reasons: dict[str, int] = field(default_factory=dict)
    texts_removed: dict[str, int] = field(default_factory=dict)


class SelectWriter(ShardWriter):
    """``ShardWriter`` whose parquet rows carry the reason each sample left (``select_reason``,
    after the run's columns: a reader of the run's columns reads a selection's as they are)."""

    def __init__(self, *args, schema: pa.Schema = SELECT_SCHEMA, **kwargs):
        super().__init__(*args, schema=schema, **kwargs)

    def write(self, sample: Sample, reason: str | None = None) -> None:
        super().write(sample)
        reason = ERROR_REASON if sample.status == ERROR else reason  # the writer may fail it too
        self.rows[-1][REASON] = reason
        counted = DUPLICATE if reason and reason.startswith(DUPLICATE + " ") else reason or KEPT_REASON
        self.stats.reasons[counted] = self.stats.reasons.get(counted, 0) + 1


def restore(sample: Sample, row: dict[str, Any]) -> Sample:
    """``sample`` as read from the input tar, as the run judged it: its image size, captions,
    scores, ITC similarities and embedding (when the run has them), and its error, from the
    run's row."""
    sample.width, sample.height = row["width"], row["height"]
    sample.web_score = row["web_score"]
    sample.captions = list(row["captions"] or [])
    sample.caption_scores = list(row["caption_scores"] or [])
    sample.web_itc = row.get("web_itc")
    sample.caption_itc = list(row.get("caption_itc") or [])
    sample.embedding = row.get(IMAGE_EMBEDDING)
    sample.scores = {name: {"web": row.get(web), "captions": row.get(captions)}  # as the run wrote them
                     for name, (web, captions) in _recorded_scores(row).items()}
    if row["status"] == ERROR:
        sample.fail(row["error"])
    return sample


def _recorded_scores(row: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The recorded scores' columns of a row read by ``run_rows``, by score name."""
    return {column[len(SCORE_PREFIX):-len("_web")]: (column, column[:-len("_web")] + "_captions")
            for column in row if column.startswith(SCORE_PREFIX) and column.endswith("_web")}


# run_rows reads a recorded score's columns under this prefix, apart from the run's own columns.
SCORE_PREFIX = "score:"


def run_rows(url: str, score_names: list[str] = ()) -> list[dict[str, Any]]:
    """The rows of a run's parquet that select reads, the columns the run lacks left out, the
    recorded scores' under ``SCORE_PREFIX``; each image embedding a float16 numpy vector (a view
    of the column), or None."""
    present = read_parquet_schema(url).names
    scored = [column for name in score_names for column in writer.score_columns(name)]
    table = read_parquet(url, columns=ROW_COLUMNS + [name for name in CARRIED_COLUMNS if name in present] + scored)
    table = table.rename_columns([SCORE_PREFIX + n if n in scored else n for n in table.column_names])
    if IMAGE_EMBEDDING not in table.column_names:
        return table.to_pylist()
    column = table.column(IMAGE_EMBEDDING).combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    offsets = column.offsets.to_numpy() - column.offsets[0].as_py()
    rows = table.drop_columns([IMAGE_EMBEDDING]).to_pylist()
    for index, (row, valid) in enumerate(zip(rows, column.is_valid().to_pylist())):
        row[IMAGE_EMBEDDING] = values[offsets[index]:offsets[index + 1]] if valid else None
    return rows


def _paired(rows: list[dict[str, Any]], samples: Iterable[Sample], url: str) -> Iterator[tuple[dict, Sample]]:
    """Each row of the run's parquet with its sample of the input tar; a tar that is not the one
    the run read (another key, image size or count) is an error naming the shard."""
    samples = iter(samples)
    for index, row in enumerate(rows):
        sample = next(samples, None)
        if sample is None or sample.key != row["key"] or (sample.error is not None and row["status"] != ERROR) \
                or (row["image_bytes"] is not None and row["image_bytes"] != len(sample.image or b"")):
            found = "nothing" if sample is None else f"key {sample.key!r}"
            raise SelectError(f"{redact_text(url)}: sample {index} is {found} where the run read key "
                              f"{row['key']!r}: the input changed since the run")
        yield row, sample
    extra = next(samples, None)
    if extra is not None:
        raise SelectError(f"{redact_text(url)}: holds key {extra.key!r} after the {len(rows)} samples the run "
                          "read: the input changed since the run")


def select_shard(task: ShardTask, run: RunFolder, redecide: Redecision, reader: ReaderConfig,
                 out: OutputDir, fp: str, on_sample: Callable[[], None] = lambda: None) -> SelectStats:
    """One output shard: the run's rows and the input tar's samples, decided again, written."""
    rows = run_rows(run.parquet(task.name), run.score_names)
    stats = SelectStats(shard=task.name, input=redact_text(task.url), fingerprint=fp)
    stats.start({"worker_pid": os.getpid()})
    policy = redecide.policy
    with contextlib.closing(read_shard(task.url, reader)) as samples, \
            SelectWriter(out, task.name, policy.threshold, policy.layout, stats, schema=run.schema()) as writer:
        for index, (row, sample) in enumerate(_paired(rows, samples, task.url)):
            reason = redecide(restore(sample, row), Place(task.name, index), stats.texts_removed)
            writer.write(sample, reason)
            on_sample()
    return stats


# --- the whole selection ----------------------------------------------------------------------------

@dataclass
class SelectOutcome:
    """What a selection leaves: ``stats.json``'s totals and ``select.json``'s record."""

    stats: dict[str, Any]
    record: dict[str, Any]


def select(run_url: str, config: Config, mode: str = "incremental",
           progress: Progress | None = None) -> SelectOutcome:
    """Select from the finished run at ``run_url`` into ``config.output`` by ``config.select``.

    Raises ``SelectError`` (a ValueError) for a run or input that cannot be selected from, and
    ``RunRefused`` for an output of another policy unless ``mode`` is ``overwrite``.
    """
    if not config.output:
        raise SelectError("no output: give NEW")
    configure_storage(config.storage_options)
    run = RunFolder.read(run_url)
    policy = resolve_policy(config.select, run.config)
    urls = run.input_urls(config.input)
    # Never into the run's folder (select reads it) or an input folder.
    check_outside_input([*urls, posixpath.join(run.url, RUN_FILE)], config.output)
    tasks = plan_shards(urls, config.output)
    run_done = _finished(run, tasks)
    check_recorded(run, policy, tasks[0].name)
    # The writer's output revision too: a selection is written by this capfilt's ShardWriter.
    identity = {"run_fingerprint": run.fingerprint, "select": policy.to_dict(),
                "select_revision": SELECT_REVISION, "output_revision": OUTPUT_REVISION}
    out = OutputDir(config.output)
    with hold(out, "capfilt select"):
        return _select_held(run, policy, tasks, run_done, identity, out, mode, progress)


def _finished(run: RunFolder, tasks: list[ShardTask]) -> dict[str, ShardStats]:
    """The run's shards, every one done: a quantile over part of a run would change later."""
    done = done_markers(OutputDir(run.url), tasks, run.fingerprint)
    missing = [t.name for t in tasks if t.name not in done]
    if missing:
        raise SelectError(f"{run.url}: the run is not finished: {len(missing)} of {len(tasks)} input shards "
                          f"are not done ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); "
                          "finish it (the same capfilt run command) first")
    return done


def _select_held(run: RunFolder, policy: Policy, tasks: list[ShardTask], run_done: dict[str, ShardStats],
                 identity: dict[str, Any], out: OutputDir, mode: str, progress: Progress | None) -> SelectOutcome:
    fp = fingerprint(identity)
    if out.remove_temporaries():
        log.info("%s: removed the temporary files of an interrupted selection", out.url)
    if out.exists(RUN_FILE):
        raise SelectError(f"{out.url} holds a capfilt run's output ({RUN_FILE}); select writes a folder "
                          "of its own: give another NEW")
    previous = None
    if mode != "overwrite" and out.exists(SELECT_FILE):
        previous = json.loads(out.read_text(SELECT_FILE))
        refuse_if_changed(out.url, previous, identity, fp, "a selection")
    pending = split_done(tasks, out, fp)[0] if mode == "incremental" else tasks
    redecide = _over_the_run(run, policy, [t.name for t in tasks])
    if redecide.duplicates and previous and len(pending) < len(tasks):
        _refuse_other_duplicates(out.url, previous.get("dedup"), redecide.duplicates.to_dict())
    record = {"run": redact_text(run.url), "run_fingerprint": run.fingerprint, "identity": identity,
              "fingerprint": fp, "policy": policy.to_dict(), "shards": len(tasks),
              **{name: found.to_dict() if found else None for name, found in (
                  ("top_fraction", redecide.cutoff), ("dedup", redecide.duplicates), ("mix", redecide.mix))}}
    out.write_bytes(SELECT_FILE, _json(record))  # before any shard: what a rerun is checked against

    start = time.time()
    try:
        _write_shards(pending, run, redecide, out, fp, run_done, progress)
    except KeyboardInterrupt:
        out.remove_temporaries()
        done = done_markers(out, tasks, fp)
        raise KeyboardInterrupt(f"{len(done)} of {len(tasks)} shards done in {out.url}; "
                                "rerun the same command to resume") from None
    done = {name: SelectStats.from_json(out.read_text(stats_name(name))) for name in done_markers(out, tasks, fp)}
    stats = _totals(done, tasks, len(pending), round(time.time() - start, 3))
    record.update(reasons=stats["reasons"], texts_removed=stats["texts_removed"])
    out.write_bytes(SELECT_FILE, _json(record))
    out.write_bytes(STATS_FILE, _json(stats))
    out.write_bytes(SIZES_FILE, _json({tar_name(n): s.tar_samples for n, s in done.items()}))
    return SelectOutcome(stats, record)


def _over_the_run(run: RunFolder, policy: Policy, names: list[str]) -> Redecision:
    """The policy with what it needs of the whole run, found before any shard, each over the
    images (or pairs) the policies before it keep: the top fraction's cut, the near-duplicates,
    the mix's counts."""
    cutoff = top_cutoff(run, names, policy.top_fraction, policy.top_of, policy.top_score) \
        if policy.top_fraction else None
    duplicates = Duplicates.find(run, names, Redecision(policy, cutoff)) if policy.dedup else None
    mix = Mix.count(run, names, Redecision(policy, cutoff, duplicates)) if policy.synthetic_share is not None else None
    return Redecision(policy, cutoff, duplicates, mix)


def _refuse_other_duplicates(url: str, before: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """A resumed selection whose dedup finds other near-duplicates than its done shards were
    written with (the same policy: float rounding of another machine's BLAS at the threshold)
    would mix two answers: refused."""
    if before is not None and before.get("digest") != now["digest"]:
        raise SelectError(f"{url}: the dedup found {now['duplicates']} near-duplicates now, {before.get('duplicates')} "
                          "when the done shards were written (float rounding on another machine?): "
                          "rerun with --mode overwrite")


def _write_shards(pending: list[ShardTask], run: RunFolder, redecide: Redecision, out: OutputDir, fp: str,
                  run_done: dict[str, ShardStats], progress: Progress | None) -> None:
    reader, total, done = run.reader_options(), sum(run_done[t.name].samples for t in pending), 0

    def on_sample() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    for task in pending:
        stats = select_shard(task, run, redecide, reader, out, fp, on_sample)
        log.info("%s: %d samples, %d kept", task.name, stats.samples, stats.kept)


def _totals(done: dict[str, SelectStats], tasks: list[ShardTask], written: int, seconds: float) -> dict[str, Any]:
    """``stats.json``: the counts over every done shard, and the count of each reason."""
    return {
        "shards": len(tasks),
        "shards_done": len(done),
        **Counts.total(done.values()).as_dict(),
        "tar_samples": sum(s.tar_samples for s in done.values()),
        "reasons": _summed(s.reasons for s in done.values()),
        "texts_removed": _summed(s.texts_removed for s in done.values()),
        TIMING: {"seconds": seconds, "shards_written": written},
    }


def _summed(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for each in counts:
        for key, value in each.items():
            total[key] = total.get(key, 0) + value
    return dict(sorted(total.items()))


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8")
