"""``capfilt calibrate``: score a labelled set with the configured filter and suggest a threshold."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from capfilt.calibrate import curve, load_labelled, score_pairs, shortfall, suggest
from capfilt.config import Config
from pipelines.arguments import add_config, load

TARGETS = ["balanced_accuracy", "f1", "precision", "recall"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config(parser, "YAML config (its filter and runtime sections)")
    parser.add_argument("--labelled", required=True,
                        help="webdataset shards with a json 'label', or parquet with image, text, label")
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
    run(load(args), args.labelled, args.target, args.value, args.output)
    return 0


def run(config: Config, labelled: str, target: str, value: float | None, output: str | None) -> dict[str, Any]:
    from capfilt.models.itm_filter import ITMFilter
    from capfilt.models.loading import resolve_device
    from capfilt.runtime.defaults import resolved_config

    images, texts, labels = load_labelled(labelled)
    rt = resolved_config(config).runtime  # auto: as a run here resolves it
    itm = ITMFilter(config.filter, resolve_device(rt.device), rt.dtype)
    scores = score_pairs(itm, images, texts, batch_size=rt.batch_size)
    points = curve(scores, labels)
    best = suggest(points, target, value)
    print_table(points, best, config.filter.threshold, len(labels), sum(labels))
    unmet = shortfall(best, target, value)
    if unmet:
        print(f"warning: {unmet}", file=sys.stderr)
    result = {"model": config.filter.model, "pairs": len(labels), "matching": sum(labels),
              "target": target, "value": value, "suggested_threshold": best.threshold,
              "at_suggested": _point(best), "curve": [_point(p) for p in points]}
    if output:
        os.makedirs(output, exist_ok=True)
        with open(os.path.join(output, "calibration.json"), "w") as f:
            json.dump(result, f, indent=2)
        plot(points, best, os.path.join(output, "precision_recall.png"))
    return result


def _point(p) -> dict[str, float]:
    return {"threshold": p.threshold, "precision": p.precision, "recall": p.recall,
            "f1": p.f1, "specificity": p.specificity}


def print_table(points, best, current: float, pairs: int, matching: int) -> None:
    print(f"\n{pairs} labelled pairs ({matching} matching); keep when score >= threshold")
    print(f"  {'threshold':>9} {'precision':>9} {'recall':>7} {'f1':>6}")
    for p in points:
        if round(p.threshold * 100) % 5 == 0 or p is best:
            mark = "  <- suggested" if p is best else ("  <- configured" if abs(p.threshold - current) < 1e-9 else "")
            print(f"  {p.threshold:>9.2f} {p.precision:>9.3f} {p.recall:>7.3f} {p.f1:>6.3f}{mark}")
    print(f"suggested filter.threshold={best.threshold:.2f}")


def plot(points, best, path: str) -> None:
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
    ax.set_title("filter precision-recall")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
