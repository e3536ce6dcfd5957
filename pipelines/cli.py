"""The ``capfilt`` command line: run, download, web2clean, finetune, calibrate, inspect, report, reshard."""

from __future__ import annotations

import argparse
import logging
import re
import sys

from capfilt.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capfilt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from pipelines import run as run_pipeline

    run_pipeline.add_arguments(sub.add_parser("run", help="caption and filter webdataset shards"))

    download = sub.add_parser("download", help="URL list -> webdataset shards, with img2dataset")
    _common(download)
    download.add_argument("--url-list", help="parquet, csv, tsv, txt or json file (or folder) of URLs")
    download.add_argument("--output", required=True, help="folder for the shards")

    web = sub.add_parser("web2clean", help="download with img2dataset, then run CapFilt, in one go")
    _common(web)
    web.add_argument("--url-list", help="parquet, csv, tsv, txt or json file (or folder) of URLs")
    web.add_argument("--output", required=True, help="root folder: ROOT/shards and ROOT/clean")
    web.add_argument("--no-progress", action="store_true", help="no progress bar")
    web.add_argument("-v", "--verbose", action="store_true", help="a line per finished shard")

    finetune = sub.add_parser("finetune", help="fine-tune a BLIP captioner or filter on clean pairs")
    finetune.add_argument("kind", choices=["captioner", "filter"])
    finetune.add_argument("--config", help="YAML config (its finetune.<kind> section)")
    finetune.add_argument("--no-progress", action="store_true", help="no progress bar")
    finetune.add_argument("-v", "--verbose", action="store_true", help="log the loss")
    finetune.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")

    calibrate = sub.add_parser("calibrate", help="suggest filter.threshold from labelled pairs")
    calibrate.add_argument("--config", help="YAML config (its filter and runtime sections)")
    calibrate.add_argument("--labelled", required=True,
                           help="webdataset shards with a json 'label', or parquet with image, text, label")
    calibrate.add_argument("--target", default="balanced_accuracy",
                           choices=["balanced_accuracy", "f1", "precision", "recall"])
    calibrate.add_argument("--value", type=float, help="the precision or recall to reach")
    calibrate.add_argument("--output", help="folder for calibration.json and precision_recall.png")
    calibrate.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")

    inspect = sub.add_parser("inspect", help="print samples of an input or output shard as a table")
    inspect.add_argument("path", help="an output folder, a .parquet, an output .tar or an input .tar")
    inspect.add_argument("--status", choices=["kept", "dropped", "error", "input"])
    inspect.add_argument("--key")
    inspect.add_argument("--limit", type=int, default=20)

    from pipelines import reshard

    report = sub.add_parser("report", help="write a self-contained HTML report of an output folder")
    report.add_argument("path", help="a capfilt output folder, local or fsspec URL")
    report.add_argument("--html", default="report.html", help="the HTML file to write (default: report.html)")
    report.add_argument("--max-shards", type=int, default=16,
                        help="shards whose parquet feeds the histograms and examples, spread over the run")
    report.add_argument("--examples", type=int, default=12, help="examples per grid")
    report.add_argument("--image-shards", type=int, default=4,
                        help="tars to stream for thumbnails (more only if a grid would be empty)")
    report.add_argument("--config", help="YAML config, for its storage_options and reader.max_image_pixels")
    report.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. storage_options={s3: {...}}")
    reshard.add_arguments(sub.add_parser("reshard", help="repack cleaned shards to a target size"))

    tiny = sub.add_parser("tiny-models", help="build tiny random BLIP checkpoints for offline tests")
    tiny.add_argument("dir")
    tiny.add_argument("--image-size", type=int, default=64)
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config")
    parser.add_argument("--mode", choices=["incremental", "overwrite"], default="incremental",
                        help="incremental skips finished shards; overwrite redoes them")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # KEY=VALUE overrides may come anywhere (argparse stops taking positionals after an
    # option that follows the first positional): collect the ones it leaves over.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if not (hasattr(args, "overrides") and OVERRIDE.match(a))]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "tiny-models":
        from capfilt.models.tiny import build_tiny_models

        for path in build_tiny_models(args.dir, image_size=args.image_size, seed=args.seed):
            print(path)
        return 0
    if args.command == "run":
        return _run(args)
    if args.command == "finetune":
        return _finetune(args)
    if args.command == "calibrate":
        return _calibrate(args)
    if args.command == "inspect":
        return _inspect(args)
    if args.command == "report":
        return _report(args)
    if args.command == "reshard":
        from pipelines import reshard

        return reshard.run_from_args(args)
    return _download(args)


def _calibrate(args) -> int:
    from pipelines import calibrate

    if args.target in ("precision", "recall") and args.value is None:
        print(f"capfilt: --target {args.target} needs --value", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, args.overrides)
        calibrate.run(config, args.labelled, args.target, args.value, args.output)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"capfilt: {exc}", file=sys.stderr)
        return 2
    return 0


def _inspect(args) -> int:
    from itertools import islice

    from capfilt.inspection import format_table, iter_rows

    try:
        rows = list(islice(iter_rows(args.path, args.status, args.key), args.limit))
    except (ValueError, OSError) as exc:
        print(f"capfilt: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    return 0


def _report(args) -> int:
    from capfilt.io.fs import configure_storage
    from capfilt.report import build_report, write_report

    try:
        config = load_config(args.config, args.overrides)
        configure_storage(config.storage_options)
        data = build_report(args.path, max_shards=args.max_shards, examples=args.examples,
                            image_shards=args.image_shards, max_pixels=config.reader.max_image_pixels)
        write_report(data, args.html)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"capfilt: {exc}", file=sys.stderr)
        return 2
    t = data.totals
    print(f"capfilt report: {t['shards']:,} shards, {t['samples']:,} samples, {t['kept']:,} kept, "
          f"{t['dropped']:,} dropped, {t['error']:,} errors; examples from "
          f"{len(data.sampled_shards)} shards -> {args.html}")
    return 0


def _finetune(args) -> int:
    from pipelines import finetune

    try:
        config = load_config(args.config, args.overrides)
    except (ConfigError, OSError) as exc:
        print(f"capfilt: config error: {exc}", file=sys.stderr)
        return 2
    try:
        finetune.run(config, args.kind, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as exc:
        print(f"capfilt: {exc}", file=sys.stderr)
        return 2
    return 0


def _download(args) -> int:
    from capfilt.run import RunRefused
    from capfilt.runtime.executor import WorkerStartError
    from pipelines import download, web_to_clean

    try:
        config = load_config(args.config, args.overrides)
        if args.url_list:
            config.download.url_list = args.url_list
    except (ConfigError, OSError) as exc:
        print(f"capfilt: config error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "download":
            totals = download.run(config, args.output, mode=args.mode)
            return 0 if totals["successes"] else 1
        return web_to_clean.run(config, args.output, mode=args.mode, verbose=args.verbose,
                                progress=not args.no_progress)
    except (RunRefused, WorkerStartError, ValueError, FileNotFoundError, ImportError) as exc:
        print(f"capfilt: {exc}", file=sys.stderr)
        return 2


OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=")


def _split_overrides(inputs: list[str] | None, overrides: list[str]) -> tuple[list[str] | None, list[str]]:
    """``--input a.tar b.tar key=value``: argparse gives the override to --input; take it back."""
    if not inputs:
        return inputs, overrides
    taken = [i for i in inputs if OVERRIDE.match(i)]
    return [i for i in inputs if not OVERRIDE.match(i)], taken + overrides


def _run(args) -> int:
    from capfilt.run import RunRefused
    from capfilt.runtime.executor import WorkerStartError
    from pipelines import run as run_pipeline

    inputs, overrides = _split_overrides(args.input, args.overrides)
    try:
        input_ = None if not inputs else (inputs[0] if len(inputs) == 1 else inputs)
        config = load_config(args.config, overrides, input=input_, output=args.output)
    except (ConfigError, OSError) as exc:
        print(f"capfilt: config error: {exc}", file=sys.stderr)
        return 2
    try:
        return run_pipeline.run_and_summarise(config, mode=args.mode, verbose=args.verbose,
                                              progress=not args.no_progress)
    except (RunRefused, WorkerStartError, ValueError, FileNotFoundError) as exc:
        print(f"capfilt: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
