"""``capfilt evaluate``: image-text retrieval of a filter checkpoint, as BLIP evaluates it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import posixpath
from typing import Any

from capfilt.evaluate import EVALUATE_FILE, RECALL_AT, evaluate
from capfilt.io.fs import configure_storage, expand_input, write_file
from capfilt.models.loading import check_checkpoint, check_loads_whole
from capfilt.runtime.progress import DoneBar
from pipelines.arguments import add_config, add_progress, load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="CKPT",
                        help="a BlipForImageTextRetrieval checkpoint, hub id or folder (default: filter.model)")
    parser.add_argument("--data", required=True, nargs="+", metavar="SHARDS",
                        help="webdataset shards of clean pairs: a brace pattern, glob, folder or list")
    parser.add_argument("--output", metavar="FOLDER",
                        help=f"write FOLDER/{EVALUATE_FILE} (default: print the table only)")
    add_config(parser, "YAML config: its evaluate:, filter: (first_token, max_text_tokens) and runtime: "
                       "(device, dtype) sections")
    add_progress(parser)


def main(args: argparse.Namespace) -> int:
    config = load(args)
    if args.model:
        config = dataclasses.replace(config, filter=dataclasses.replace(config.filter, model=args.model))
    configure_storage(config.storage_options)
    check_model("--model" if args.model else "filter.model", config.filter.model, config.filter.revision)
    urls = expand_input(args.data)
    bar = DoneBar("evaluate: ITM", disable=args.no_progress)
    try:
        report = evaluate(urls, config, progress=bar)
    finally:
        bar.close()
    if args.output:
        write_file(posixpath.join(args.output, EVALUATE_FILE),
                   (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    print(format_report(report, args.output))
    return 0


def check_model(key: str, name: str, revision: str) -> None:
    """Refuse, in one line and before anything is read, a checkpoint that is missing or is not a
    whole BlipForImageTextRetrieval."""
    from transformers import BlipForImageTextRetrieval

    check_loads_whole(key, name, revision, BlipForImageTextRetrieval, check_checkpoint(key, name, revision))


def format_report(report: dict[str, Any], output: str | None) -> str:
    model = report["model"]
    lines = [f"\ncapfilt evaluate: {model['name']} ([{model['first_token'].upper()}] first for ITM) on "
             f"{report['images']} images, {report['texts']} texts, k_test {_k_test(report['k_test'])}"
             + (f" -> {posixpath.join(output, EVALUATE_FILE)}" if output else "")]
    header = "".join(f"{'R@' + str(k):>8}" for k in RECALL_AT) + f"{'mean':>8}"
    for title, key in (("ITC + ITM (BLIP)", "retrieval"), ("ITC alone", "itc_retrieval")):
        found = report[key]
        lines.append(f"  {title:<22}{header}")
        for side, name in (("txt", "image -> text (TR)"), ("img", "text -> image (IR)")):
            values = [found[f"{side}_r{k}"] for k in RECALL_AT] + [found[f"{side}_r_mean"]]
            lines.append(f"    {name:<20}" + "".join(f"{v:>8.2f}" for v in values))
        lines.append(f"    {'mean of both':<20}{found['r_mean']:>8.2f}")
    itm = report["itm"]
    lines.append(f"  ITM balanced accuracy {itm['balanced_accuracy']:.2f} at threshold {itm['threshold']}: "
                 f"own texts matched {itm['positives_matched']:.2f} (of {itm['positives']}), hardest "
                 f"negatives rejected {itm['negatives_rejected']:.2f} (of {itm['negatives']}); mean match "
                 f"score {itm['positives_mean_score']:.4f} and {itm['negatives_mean_score']:.4f}")
    return "\n".join(lines)


def _k_test(k: dict[str, int]) -> str:
    same = k["i2t"] == k["t2i"]
    return str(k["i2t"]) if same else f"{k['i2t']} (image -> text), {k['t2i']} (text -> image)"
