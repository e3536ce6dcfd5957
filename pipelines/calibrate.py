"""``capfilt calibrate``: score a labelled set with the configured filter and suggest a threshold:
``filter.threshold`` for the ITM score, or ``select.itc_threshold`` for the ITC similarity (``--score itc``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from capfilt.calibrate import SCORES, Score, centre, curve, load_labelled, score_pairs, shortfall, suggest
from capfilt.config import Config
from pipelines.arguments import add_config, load

TARGETS = ["balanced_accuracy", "f1", "precision", "recall"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config(parser, "YAML config (its filter and runtime sections)")
    parser.add_argument("--labelled", required=True,
                        help="webdataset shards with a json 'label', or parquet with image, text, label")
    parser.add_argument("--score", default="itm", choices=list(SCORES),
                        help="the score to threshold: itm (filter.threshold, applied by capfilt run) or itc, "
                             "the ITC similarity a run records (select.itc_threshold, applied by capfilt "
                             "select)")
    parser.add_argument("--target", default="balanced_accuracy", choices=TARGETS,
                        help="what the suggested threshold is best at: balanced_accuracy or f1; precision: "
                             "the lowest threshold with precision >= --value; recall: the highest "
                             "with recall >= --value")
    parser.add_argument("--value", type=float, help="the precision or recall to reach (with --target "
                                                    "precision or recall)")
    parser.add_argument("--output", help="folder for calibration.json and precision_recall.png "
                                         "(default: none written)")


def main(args: argparse.Namespace) -> int:
    if args.target in ("precision", "recall") and (args.value is None or not 0 < args.value <= 1):
        raise ValueError(f"--target {args.target} needs --value in (0, 1], not {args.value}")
    run(load(args), args.labelled, args.target, args.value, args.output, args.score)
    return 0


def run(config: Config, labelled: str, target: str, value: float | None, output: str | None,
        score: str = "itm") -> dict[str, Any]:
    from capfilt.models.loading import resolve_device
    from capfilt.models.slots import load_filter
    from capfilt.runtime.defaults import resolved_config

    kind = SCORES[score]
    images, texts, labels = load_labelled(labelled)
    rt = resolved_config(config).runtime  # auto: as a run here resolves it
    # ITC as a run records it: the same filter with filter.itc on.
    filter_config = dataclasses.replace(config.filter, itc=True) if score == "itc" else config.filter
    itm = load_filter(filter_config, resolve_device(rt.device), rt.dtype)  # of the checkpoint's kind
    scores = score_pairs(itm, images, texts, batch_size=rt.batch_size, score=score)
    points = curve(scores, labels, kind.steps, kind.low, kind.high)
    best = suggest(points, target, value, centre(scores, labels) if score == "itc" else 0.5)
    current = config.filter.threshold if score == "itm" else config.select.itc_threshold
    print_table(points, best, current, len(labels), sum(labels), kind, (min(scores), max(scores)))
    unmet = shortfall(best, target, value)
    if unmet:
        print(f"warning: {unmet}", file=sys.stderr)
    result = {"model": config.filter.model, "score": score, "key": kind.key, "pairs": len(labels),
              "matching": sum(labels), "target": target, "value": value, "suggested_threshold": best.threshold,
              "at_suggested": _point(best), "curve": [_point(p) for p in points]}
    if output:
        os.makedirs(output, exist_ok=True)
        with open(os.path.join(output, "calibration.json"), "w") as f:
            json.dump(result, f, indent=2)
        plot(points, best, os.path.join(output, "precision_recall.png"), score)
    return result


def _point(p) -> dict[str, float]:
    return {"threshold": p.threshold, "precision": p.precision, "recall": p.recall,
            "f1": p.f1, "specificity": p.specificity}


def print_table(points, best, current: float | None, pairs: int, matching: int, kind: Score = SCORES["itm"],
                span: tuple[float, float] | None = None) -> None:
    """Every 0.05 of the curve (of a range wider than [0, 1], those within 0.05 of the scores'
    ``span``: the others keep all or nothing), the suggestion and the key to set."""
    what = "ITC similarity" if kind.name == "itc" else "score"
    print(f"\n{pairs} labelled pairs ({matching} matching); keep when {what} >= threshold")
    print(f"  {'threshold':>9} {'precision':>9} {'recall':>7} {'f1':>6}")
    for p in points:
        inside = span is None or (kind.low, kind.high) == (0.0, 1.0) or span[0] - 0.05 <= p.threshold <= span[1] + 0.05
        if (round(p.threshold * 100) % 5 == 0 and inside) or p is best:
            configured = current is not None and abs(p.threshold - current) < 1e-9
            mark = "  <- suggested" if p is best else ("  <- configured" if configured else "")
            print(f"  {p.threshold:>9.2f} {p.precision:>9.3f} {p.recall:>7.3f} {p.f1:>6.3f}{mark}")
    print(f"suggested {kind.key}={best.threshold:.2f}")
    if kind.name == "itc":
        print(f"  set it when selecting from a run made with filter.itc on: "
              f"capfilt select RUN NEW {kind.key}={best.threshold:.2f}")


def plot(points, best, path: str, score: str = "itm") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("capfilt: matplotlib is not installed; no plot written")
        return
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([p.recall for p in points], [p.precision for p in points], marker=".")
    ax.scatter([best.recall], [best.precision], color="red", zorder=3, label=f"threshold {best.threshold:.2f}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"filter {score.upper()} precision-recall")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
