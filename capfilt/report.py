"""``capfilt report``: one self-contained HTML page that shows what a run kept and dropped.

Bounded on any output size: totals come from the per-shard stats files (small JSON, all of
them), scores and examples from the parquet of at most ``max_shards`` shards spread evenly
over the run, and the grids' thumbnails from at most ``image_shards`` tars (a selection's
near-duplicate groups', at most 6 x 6 images, from theirs), each streamed only until its wanted
keys are found. Everything is read through ``capfilt.io.fs``. The page embeds its images
and plots as data URIs, loads nothing and runs no script; every text from the data is
escaped (it is untrusted web text).

A run's parquet may hold each text's ITC similarity (``web_itc``, ``caption_itc``: a run with
``filter.itc``), shown as a second pair of histograms, and the scores of the models a run recorded
beside the filter's (``scores:``: NAME_web, NAME_captions), a pair of histograms each. A ``capfilt select`` output (a folder
with ``select.json`` and no ``run.json``) is reported at its policy's thresholds, with why its
samples left (``select.json``'s counts) and, from its sampled parquet, a few groups of
near-duplicates: the image kept and those dropped as its duplicates (``select_reason``
``duplicate_of KEY``), thumbnails from the run's input tars, which hold the dropped images.
"""

from __future__ import annotations

import base64
import html
import io
import math
import posixpath
import random
import re
import string
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from capfilt.config import MAX_IMAGE_PIXELS
from capfilt.io.fs import exists, isdir, read_json, read_matching, read_parquet, read_parquet_schema, write_file
from capfilt.io.images import ImageError, decode_rgb
from capfilt.io.reader import read_shard
from capfilt.io.writer import recorded_score_names
from capfilt.io.layout import RUN_FILE, SELECT_FILE, STATS_FILE, parquet_name, shard_of_stats, stats_name, tar_name
from capfilt.stats import Counts, ShardStats

BORDERLINE = 0.05
COLUMNS = ["key", "status", "error", "web_text", "web_score", "web_kept", "captions", "caption_scores",
           "text", "text_origin"]
ITC_COLUMNS = ["web_itc", "caption_itc"]  # a run with filter.itc; absent from an older run's parquet
SELECT_REASON = "select_reason"  # a selection's (capfilt.select.REASON; not imported: it loads torch)
DUPLICATE_GROUPS, DUPLICATES_SHOWN = 6, 5  # near-duplicate groups shown, dropped images shown per group
SECTIONS = {  # id -> (title, what it shows)
    "web-kept": ("Web text kept", "the web text matched its image"),
    "rescued": ("Rescued by a synthetic caption", "the web text was dropped, a caption kept the image"),
    "dropped": ("Image dropped", "no text matched the image"),
    "borderline": ("Borderline", f"a score within ±{BORDERLINE} of the threshold"),
}


@dataclass
class ReportData:
    output: str
    threshold: float
    config: dict[str, Any]
    totals: dict[str, Any]
    shards: list[ShardStats]
    failed: list[Any]
    sampled_shards: list[str]
    sampled_rows: int
    errors: Counter
    web_scores: list[float]
    caption_scores: list[float]
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    web_itc: list[float] = field(default_factory=list)
    caption_itc: list[float] = field(default_factory=list)
    selection: dict[str, Any] | None = None  # select.json, for a capfilt select output
    duplicate_groups: list[dict[str, Any]] = field(default_factory=list)
    # Each recorded score's values in the sampled parquet, by name: {"web": [...], "captions": [...]}.
    recorded: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    @property
    def itc_threshold(self) -> float | None:
        return ((self.selection or {}).get("policy") or {}).get("itc_threshold")

    @property
    def score_thresholds(self) -> dict[str, float]:
        """A selection's thresholds on recorded scores (select.score_thresholds)."""
        return ((self.selection or {}).get("policy") or {}).get("score_thresholds") or {}


def build_report(output: str, max_shards: int = 16, examples: int = 12, image_shards: int = 4,
                 max_pixels: int = MAX_IMAGE_PIXELS, seed: int = 0) -> ReportData:
    """Read ``output`` (a capfilt output folder, local or fsspec URL) into a ``ReportData``."""
    if not isdir(output):
        raise FileNotFoundError(f"{output}: no such output folder")
    root = output.rstrip("/") or "/"
    config, threshold, selection = _header(root)
    stats_files = read_matching(posixpath.join(root, stats_name("*")))
    summary = read_json(posixpath.join(root, STATS_FILE)) or {}
    failed = summary.get("failed", [])
    if not stats_files and not failed:
        raise FileNotFoundError(f"{output}: no finished shard (no {stats_name('*')}): is it a capfilt output?")
    shards = [_shard_stats(path, data) for path, data in sorted(stats_files.items())]
    totals = dict(Counts.total(shards).as_dict(), shards=len(shards), shards_failed=len(failed))

    # Parquet of a bounded, evenly spread set of shards: scores, errors and example candidates.
    step = max(1, len(shards) / max(1, max_shards))
    picked = [shards[int(i * step)] for i in range(min(max_shards, len(shards)))]
    rows: list[dict[str, Any]] = []
    score_names: list[str] = []
    for shard in picked:
        path = posixpath.join(root, parquet_name(shard.shard))
        names = recorded_scores(path)
        score_names += [name for name in names if name not in score_names]
        for row in _parquet_rows(path, names):
            row["_shard"] = shard.shard
            rows.append(row)
    errors = Counter(error_reason(r["error"], r["key"]) for r in rows if r["status"] == "error")
    errors.update(f"shard failed: {error_reason(f.get('error'), f.get('shard', ''))}" for f in failed)
    web_scores = [r["web_score"] for r in rows if r["web_score"] is not None]
    caption_scores = [s for r in rows for s in (r["caption_scores"] or [])]

    data = ReportData(output, threshold, config, totals, shards, failed,
                      [s.shard for s in picked], len(rows), errors, web_scores, caption_scores)
    data.web_itc = [r["web_itc"] for r in rows if r.get("web_itc") is not None]
    data.caption_itc = [s for r in rows for s in (r.get("caption_itc") or []) if s is not None]
    data.recorded = {name: {"web": [r[f"{name}_web"] for r in rows if r.get(f"{name}_web") is not None],
                            "captions": [s for r in rows for s in (r.get(f"{name}_captions") or []) if s is not None]}
                     for name in score_names}
    data.selection = selection
    data.examples = _pick_examples(rows, threshold, examples, image_shards, seed)
    data.duplicate_groups = duplicate_groups(rows)
    shown = [r for g in data.duplicate_groups for r in ([g["kept"]] if g["kept"] else []) + g["removed"]]
    inputs = {s.shard: s.input or None for s in shards}
    _attach_thumbnails(root, {**data.examples, "duplicates": shown}, inputs, max_pixels)
    return data


def _header(root: str) -> tuple[dict[str, Any], float, dict[str, Any] | None]:
    """(the run's config, the threshold, select.json or None) of an output folder. A selection
    has no run.json: its threshold is its policy's, its config the run's it was selected from
    (when that run is still readable)."""
    run = read_json(posixpath.join(root, RUN_FILE))
    selection = read_json(posixpath.join(root, SELECT_FILE)) if run is None else None
    if selection is None:
        config = (run or {}).get("config", {})
        return config, float(config.get("filter", {}).get("threshold", 0.5)), None
    try:
        config = (read_json(posixpath.join(selection["run"], RUN_FILE)) or {}).get("config", {})
    except (OSError, ValueError, KeyError):  # moved, or its URL recorded with credentials masked
        config = {}
    return config, float(selection["policy"]["threshold"]), selection


def _shard_stats(path: str, data: bytes) -> ShardStats:
    """A shard's stats, named by its file (the name the parquet and tar share)."""
    stats = ShardStats.from_json(data)
    stats.shard = shard_of_stats(posixpath.basename(path))
    return stats


def recorded_scores(path: str) -> list[str]:
    """The names of the scores a parquet recorded (``scores:``): each NAME whose NAME_web and
    NAME_captions it holds, in its order. A run's, a selection's or a reshard's alike."""
    if not exists(path):
        return []
    return recorded_score_names(read_parquet_schema(path))


def _parquet_rows(path: str, score_names: list[str] = ()) -> list[dict[str, Any]]:
    """The columns the report reads; the ITC similarities, select's reason and the recorded
    scores of ``score_names`` where present."""
    if not exists(path):
        return []
    present = read_parquet_schema(path).names
    scored = [f"{name}_{part}" for name in score_names for part in ("web", "captions")]
    return read_parquet(path, columns=COLUMNS + [c for c in (*ITC_COLUMNS, SELECT_REASON, *scored)
                                                 if c in present]).to_pylist()


def duplicate_groups(rows: list[dict[str, Any]], groups: int = DUPLICATE_GROUPS,
                     shown: int = DUPLICATES_SHOWN) -> list[dict[str, Any]]:
    """Up to ``groups`` groups of near-duplicates among ``rows`` (a selection's: ``select_reason``
    ``duplicate_of KEY``), the largest first, then by key: each the kept image's ``key``, its row
    (``kept``; None when it lies in a shard not sampled), up to ``shown`` of the rows it removed
    (``removed``) and how many it removed among ``rows`` (``count``)."""
    prefix = "duplicate_of "
    removed: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        reason = row.get(SELECT_REASON) or ""
        if reason.startswith(prefix):
            removed.setdefault(reason[len(prefix):], []).append(row)
    kept: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["status"] == "kept" and row.get(SELECT_REASON) is None:
            kept.setdefault(row["key"], row)
    order = sorted(removed, key=lambda key: (-len(removed[key]), key))[:groups]
    return [{"key": key, "kept": kept.get(key), "removed": removed[key][:shown], "count": len(removed[key])}
            for key in order]


def error_reason(error: str | None, key: str) -> str:
    """An error message with its shard, key and numbers taken out, to count errors by kind."""
    text = error or "unknown"
    if key:
        text = re.sub(re.escape(key) + r"(\.[\w.]+)?", "", text)  # the key, with its member extension
    text = re.sub(r"^\S+?: ", "", text)  # the shard URL that starts every message
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "…", text)
    text = re.sub(r"<[^>]*>", "…", text)
    text = re.sub(r"\d+", "N", text)
    text = text.lstrip(string.whitespace + ".:").rstrip()  # a regex here was quadratic on long spaces
    return text[:120] or "unknown"


def _category_rows(rows: list[dict[str, Any]], threshold: float) -> dict[str, list[dict[str, Any]]]:
    def near(score):
        return score is not None and abs(score - threshold) <= BORDERLINE

    return {
        "web-kept": [r for r in rows if r["status"] == "kept" and r["web_kept"]],
        "rescued": [r for r in rows if r["status"] == "kept" and r["web_score"] is not None and not r["web_kept"]],
        "dropped": [r for r in rows if r["status"] == "dropped"],
        "borderline": [r for r in rows if r["status"] != "error"
                       and (near(r["web_score"]) or any(near(s) for s in r["caption_scores"] or []))],
    }


def _pick_examples(rows, threshold: float, count: int, image_shards: int, seed: int):
    """Up to ``count`` random rows per category, from as few shards as can supply them."""
    rng = random.Random(seed)
    order = list(dict.fromkeys(r["_shard"] for r in rows))
    preferred = set(order[:image_shards])
    picked = {}
    for name, candidates in _category_rows(rows, threshold).items():
        near = [r for r in candidates if r["_shard"] in preferred]
        far = [r for r in candidates if r["_shard"] not in preferred]
        chosen = rng.sample(near, min(count, len(near)))
        chosen += rng.sample(far, min(count - len(chosen), len(far)))
        picked[name] = sorted(chosen, key=lambda r: (r["_shard"], r["key"]))
    return picked


def _attach_thumbnails(root: str, examples, inputs: dict[str, str | None], max_pixels: int) -> None:
    """Give each example a ``_thumb`` data URI (or ``_thumb_error``): streamed from the shard's
    input tar, or, for kept samples, from the output tar when the input is gone."""
    wanted: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rows in examples.values():
        for row in rows:
            wanted.setdefault(row["_shard"], {}).setdefault(row["key"], []).append(row)
    for shard, by_key in wanted.items():
        found: dict[str, bytes] = {}
        sources = [inputs.get(shard), posixpath.join(root, tar_name(shard))]
        reasons = []
        for source in (s for s in sources if s):
            missing = set(by_key) - set(found)
            if not missing:
                break
            try:
                for sample in read_shard(source):
                    image_key = sample.meta.get("capfilt_pair", {}).get("image_key", sample.key)
                    if image_key in missing and sample.image and image_key not in found:
                        found[image_key] = sample.image
                        if len(found) == len(by_key):
                            break
            except OSError as exc:
                reasons.append(f"{source}: {exc}")
        for key, rows in by_key.items():
            thumb, error = None, None
            if key in found:
                try:
                    thumb = thumbnail(found[key], max_pixels)
                except ImageError as exc:
                    error = str(exc)
            else:
                error = "image not found in " + (" or ".join(s for s in sources if s) if not reasons else "; ".join(reasons))
            for row in rows:
                row["_thumb"], row["_thumb_error"] = thumb, error


def thumbnail(data: bytes, max_pixels: int, size: int = 192) -> str:
    """A JPEG data URI at most ``size`` pixels on its longer side (decoding bounded)."""
    image = decode_rgb(data, max_pixels)
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def histogram_png(web: list[float], captions: list[float], threshold: float) -> str | None:
    """ITM score histograms with the threshold marked, as a PNG data URI (None without matplotlib)."""
    return _histograms(web, captions, [i / 40 for i in range(41)], "ITM match score",
                       {f"threshold {threshold:g}": threshold})


def itc_histogram_png(web: list[float], captions: list[float], threshold: float | None = None) -> str | None:
    """ITC similarity histograms (cosines in [-1, 1], binned over the range they span), with
    ``threshold`` (a selection's ``itc_threshold``) marked; None without matplotlib."""
    marks = {f"itc_threshold {threshold:g}": threshold} if threshold is not None else {}
    return _spanned_histograms(web, captions, "ITC similarity (cosine)", marks)


def recorded_histogram_png(name: str, web: list[float], captions: list[float],
                           threshold: float | None = None) -> str | None:
    """A recorded score's histograms (``scores:``; a cosine, a probability: binned over the range
    they span), with ``threshold`` (a selection's ``score_thresholds``) marked; None without
    matplotlib."""
    marks = {f"score_thresholds.{name} {threshold:g}": threshold} if threshold is not None else {}
    return _spanned_histograms(web, captions, f"{name} score", marks)


def _spanned_histograms(web: list[float], captions: list[float], xlabel: str, marks: dict[str, float]) -> str | None:
    """``_histograms`` in 40 bins over the range the values and marks span, in steps of 0.05."""
    values = [*web, *captions, *marks.values()]
    low, high = math.floor(min(values, default=0) * 20) / 20, math.ceil(max(values, default=0) * 20) / 20
    high = max(high, low + 0.05)
    bins = [low + (high - low) * i / 40 for i in range(41)]
    return _histograms(web, captions, bins, xlabel, marks)


def _histograms(web: list[float], captions: list[float], bins: list[float], xlabel: str,
                marks: dict[str, float]) -> str | None:
    """Web-text and caption histograms side by side, ``marks`` as dashed lines, as a PNG data URI."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharex=True)
    for ax, scores, title, colour in ((axes[0], web, "web texts", "#4c72b0"),
                                      (axes[1], captions, "synthetic captions", "#dd8452")):
        ax.hist(scores, bins=bins, color=colour)
        for label, x in marks.items():
            ax.axvline(x, color="#c44e52", linestyle="--", label=label)
        ax.set_title(f"{title} ({len(scores):,})")
        ax.set_xlabel(xlabel)
        ax.set_xlim(bins[0], bins[-1])
        if marks:
            ax.legend(loc="upper left")
    axes[0].set_ylabel("texts")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ---------------------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{margin-bottom:4px} .meta{color:#666;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right} th{background:#f4f4f4}
td.l,th.l{text-align:left}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;font-size:12px;background:#fafafa}
.card img{display:block;max-width:192px;max-height:192px;margin:0 auto 6px}
.noimg{height:96px;display:flex;align-items:center;justify-content:center;color:#a00;text-align:center}
.key{color:#666;font-family:monospace} .t{margin:2px 0}
.kept{color:#1a7f37} .dropped{color:#b42318} .score{font-family:monospace}
.group{margin:8px 0 16px} .keeper{border:2px solid #1a7f37}
"""
NO_MATPLOTLIB = "<p>matplotlib is not installed: no histogram (pip install 'capfilt[report]').</p>"


def render_html(data: ReportData) -> str:
    esc = html.escape
    t = data.totals
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        # Nothing may load from anywhere and no script may run: the page is data.
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">",
        f"<title>capfilt report: {esc(data.output)}</title><style>{CSS}</style></head><body>",
        "<h1>capfilt report</h1>",
        f"<p class='meta'>{esc(data.output)} · threshold {data.threshold:g}{_itc_meta(data)} · captioner "
        f"{esc(str(data.config.get('captioner', {}).get('model', '?')))} · filter "
        f"{esc(str(data.config.get('filter', {}).get('model', '?')))} · written "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
        "<section id='summary'><h2>Summary</h2><table>",
        _row(["shards done", "shards failed", "samples", "kept", "dropped", "errors", "web texts kept",
              "captions kept"], "th"),
        _row([f"{t['shards']:,}", f"{t['shards_failed']:,}", f"{t['samples']:,}", _count_pct(t["kept"], t["samples"]),
              _count_pct(t["dropped"], t["samples"]), _count_pct(t["error"], t["samples"]),
              _count_pct(t["web_kept"], t["web_texts"]), _count_pct(t["captions_kept"], t["captions"])]),
        "</table>",
    ]
    parts += _failed_table(data)
    parts.append("</section>")
    parts += _shard_table(data)
    parts += _error_table(data)
    parts += _scores_section(data)
    parts += _itc_section(data)
    parts += _recorded_section(data)
    parts += _selection_section(data)
    for section, (title, what) in SECTIONS.items():
        rows = data.examples.get(section, [])
        parts.append(f"<section id='{section}'><h2>{esc(title)}</h2><p class='meta'>{esc(what)}; "
                     f"{len(rows)} example(s)</p><div class='grid'>")
        parts += [_card(r, data.threshold) for r in rows]
        parts.append("</div></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _itc_meta(data: ReportData) -> str:
    return "" if data.itc_threshold is None else f" · itc_threshold {data.itc_threshold:g}"


def _sampled(data: ReportData) -> str:
    return (f"<p class='meta'>From the parquet of {len(data.sampled_shards):,} of {data.totals['shards']:,} "
            f"shards ({data.sampled_rows:,} samples).</p>")


def _scores_section(data: ReportData) -> list[str]:
    parts = ["<section id='scores'><h2>Scores</h2>"]
    png = histogram_png(data.web_scores, data.caption_scores, data.threshold)
    if png:
        parts.append(f"<img class='plot' alt='score histograms' src='{png}'>")
    else:
        parts.append(NO_MATPLOTLIB)
    return parts + [_sampled(data), "</section>"]


def _itc_section(data: ReportData) -> list[str]:
    parts = ["<section id='itc'><h2>ITC similarities</h2>"]
    if not data.web_itc and not data.caption_itc:
        parts.append("<p>No ITC similarity in the sampled parquet: the run did not record them "
                     "(filter.itc off, or a capfilt older than them).</p>")
        return parts + ["</section>"]
    png = itc_histogram_png(data.web_itc, data.caption_itc, data.itc_threshold)
    parts.append(f"<img class='plot' alt='ITC histograms' src='{png}'>" if png else NO_MATPLOTLIB)
    parts.append("<p class='meta'>Each text's cosine similarity to its image, from the filter's unimodal "
                 "encoders (web_itc, caption_itc): what select.itc_threshold and select.top_score: itc "
                 "read.</p>")
    return parts + [_sampled(data), "</section>"]


def _recorded_section(data: ReportData) -> list[str]:
    """A pair of histograms per score the run recorded (``scores:``); nothing for a run without."""
    if not data.recorded:
        return []
    models = {item.get("name"): item for item in data.config.get("scores") or [] if isinstance(item, dict)}
    parts = ["<section id='recorded'><h2>Recorded scores</h2>",
             "<p class='meta'>The scores of the models the run recorded beside the filter's (scores:), "
             "deciding nothing: what select.score_thresholds and select.top_score: NAME read.</p>"]
    for name, values in data.recorded.items():
        model = models.get(name, {})
        about = f" ({model.get('model')}, {model.get('kind', 'auto')})" if model.get("model") else ""
        parts.append(f"<h3 id='recorded-{html.escape(name)}'>{html.escape(name)}{html.escape(about)}</h3>")
        png = recorded_histogram_png(name, values["web"], values["captions"], data.score_thresholds.get(name))
        parts.append(f"<img class='plot' alt='{html.escape(name)} histograms' src='{png}'>" if png else NO_MATPLOTLIB)
    return parts + [_sampled(data), "</section>"]


def _selection_section(data: ReportData) -> list[str]:
    """A selection's policy, why its samples left (over the whole run), and its near-duplicates."""
    if data.selection is None:
        return []
    record = data.selection
    policy = {k: v for k, v in (record.get("policy") or {}).items() if v is not None}
    parts = ["<section id='selection'><h2>Selection</h2>",
             f"<p class='meta'>capfilt select of {html.escape(str(record.get('run', '?')))}; policy: "
             f"{html.escape(', '.join(f'{k}={v}' for k, v in policy.items()))}</p>"]
    reasons = record.get("reasons") or {}
    if reasons:
        total = sum(reasons.values())
        parts.append("<table id='reasons'>" + _row(["select_reason", "samples", "texts removed"], "th"))
        removed = record.get("texts_removed") or {}
        for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
            parts.append(_row([reason, _count_pct(count, total), removed.get(reason, "")]))
        parts.append("</table>")
    dedup = record.get("dedup")
    if not dedup:
        return parts + ["<p>No near-duplicate removal in this selection (select.dedup off).</p></section>"]
    parts.append(f"<h3>Near-duplicates</h3><p class='meta'>{dedup.get('duplicates', 0):,} images dropped as "
                 f"near-duplicates of {dedup.get('images', 0):,} (cosine ≥ {dedup.get('threshold')}); the "
                 f"{len(data.duplicate_groups)} largest groups in the sampled shards, each its kept image "
                 "first.</p>")
    for group in data.duplicate_groups:
        kept = group["kept"]
        parts.append("<div class='grid group'>")
        parts.append(_card(kept, data.threshold, "keeper") if kept else
                     f"<div class='card keeper'><div class='noimg'>{html.escape(group['key'])}: kept, in a "
                     "shard not sampled</div></div>")
        parts += [_card(r, data.threshold) for r in group["removed"]]
        if group["count"] > len(group["removed"]):
            parts.append(f"<div class='card'>and {group['count'] - len(group['removed']):,} more</div>")
        parts.append("</div>")
    return parts + ["</section>"]


def _failed_table(data: ReportData, limit: int = 100) -> list[str]:
    if not data.failed:
        return []
    return (["<h3 class='dropped'>Failed shards</h3><table>", _row(["shard", "input", "attempts", "reason"], "th")]
            + [_row([f.get("shard", "?"), f.get("input", ""), f.get("attempts", ""), f.get("error", "")])
               for f in data.failed[:limit]]
            + ["</table>"])


def _row(cells, tag="td") -> str:
    return "<tr>" + "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in cells) + "</tr>"


def _count_pct(count: int, total: int) -> str:
    return f"{count:,} ({100 * count / total:.1f}%)" if total else f"{count:,}"


def _shard_table(data: ReportData, limit: int = 100) -> list[str]:
    shards = data.shards
    note = ""
    if len(shards) > limit:
        # The ones worth a look: most errors, then lowest keep rate.
        shards = sorted(shards, key=lambda s: (-s.error, s.kept / max(1, s.samples)))
        shards = sorted(shards[:limit], key=lambda s: s.shard)
        note = (f"<p class='meta'>The {limit} shards with the most errors and the lowest keep rates; "
                f"{len(data.shards) - limit:,} more not shown.</p>")
    parts = ["<section id='shards'><h2>Shards</h2>", note, "<table>",
             _row(["shard", "samples", "kept", "dropped", "errors", "web kept", "keep rate", "seconds"], "th")]
    for s in shards:
        parts.append(_row([s.shard, s.samples, s.kept, s.dropped, s.error, s.web_kept,
                           f"{100 * s.kept / max(1, s.samples):.1f}%", s.timing.get("seconds", "")]))
    parts.append("</table></section>")
    return parts


def _error_table(data: ReportData) -> list[str]:
    parts = ["<section id='errors'><h2>Errors by reason</h2>",
             f"<p class='meta'>{data.totals['error']:,} sample errors in all shards, reasons from the "
             f"{len(data.sampled_shards):,} sampled shards; {data.totals['shards_failed']:,} failed "
             "shards, each counted once.</p>"]
    if not data.errors:
        parts.append("<p>No errors in the sampled shards.</p></section>")
        return parts
    parts.append("<table>" + _row(["reason", "samples"], "th"))
    for reason, count in data.errors.most_common(50):
        parts.append(f"<tr><td class='l'>{html.escape(reason)}</td><td>{count:,}</td></tr>")
    parts.append("</table></section>")
    return parts


def _card(row: dict[str, Any], threshold: float, kind: str = "") -> str:
    esc = html.escape
    if row.get("_thumb"):
        image = f"<img alt='{esc(row['key'])}' src='{row['_thumb']}'>"
    else:
        image = f"<div class='noimg'>{esc(row.get('_thumb_error') or 'no image')}</div>"
    status = row.get(SELECT_REASON) or row["status"]  # a selection's: why the sample left
    lines = [f"<div class='card {kind}'>{image}<div class='key'>{esc(row['_shard'])}/{esc(row['key'])} · "
             f"{esc(status)}</div>"]
    captions = row["captions"] or []
    itcs = [row.get("web_itc"), *(row.get("caption_itc") or [None] * len(captions))]
    texts = [("web", row["web_text"], row["web_score"])]
    texts += [("caption", c, s) for c, s in zip(captions, row["caption_scores"] or [])]
    for (origin, text, score), itc in zip(texts, itcs):
        if text is None:
            continue
        kept = score is not None and score >= threshold
        mark = "kept" if kept else "dropped"
        shown = ("–" if score is None else f"{score:.3f}") + ("" if itc is None else f" itc {itc:.2f}")
        lines.append(f"<div class='t {mark}'><span class='score'>{shown}</span> {origin}: {esc(text[:300])}</div>")
    lines.append("</div>")
    return "".join(lines)


def write_report(data: ReportData, path: str) -> None:
    write_file(path, render_html(data).encode("utf-8"))
