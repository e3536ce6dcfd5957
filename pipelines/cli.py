"""The capfilt command line: one table of subcommands and one wrapper that maps errors to exit codes.

Each subcommand is a module of ``pipelines`` with ``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from types import ModuleType

from pipelines.arguments import HelpFormatter, split_overrides

DESCRIPTION = ("Clean image-text pairs with BLIP's CapFilt: caption each image, keep the texts the filter "
               "matches to it. Exit status: 0 done, 1 a shard failed, 2 a bad config or input, 130 Ctrl-C.")

# name: (module, one-line help)
COMMANDS = {
    "run": ("pipelines.run", "caption and filter webdataset shards"),
    "download": ("pipelines.download", "URL list -> webdataset shards, with img2dataset"),
    "web2clean": ("pipelines.web_to_clean", "download with img2dataset, then run CapFilt, in one go"),
    "finetune": ("pipelines.finetune", "fine-tune a BLIP captioner or filter on clean pairs"),
    "calibrate": ("pipelines.calibrate", "suggest filter.threshold (or select.itc_threshold) from labelled pairs"),
    "inspect": ("pipelines.inspect_rows", "print samples of an input or output shard as a table"),
    "report": ("pipelines.report", "write a self-contained HTML report of an output folder"),
    "reshard": ("pipelines.reshard", "repack cleaned shards to a target size"),
    "select": ("pipelines.select", "decide again from a finished run's scores, with no model"),
    "evaluate": ("pipelines.evaluate", "image-text retrieval of a filter checkpoint, as BLIP evaluates it"),
    "evaluate-convert": ("pipelines.karpathy_to_wds", "Karpathy-split JSON + images -> shards for evaluate"),
    "tiny-models": ("pipelines.tiny_models", "build tiny random BLIP checkpoints for offline tests"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capfilt", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help) in COMMANDS.items():
        module: ModuleType = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help, description=help,
                                 formatter_class=HelpFormatter)
        module.add_arguments(command)
        command.set_defaults(main=module.main)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    words, overrides = split_overrides(argv)
    args = parser.parse_args(words)
    if overrides and not hasattr(args, "overrides"):
        parser.error(f"{args.command} takes no KEY=VALUE overrides: {' '.join(overrides)}")
    if overrides:
        args.overrides = overrides
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return guarded(args.main, args)


def guarded(command, args: argparse.Namespace) -> int:
    """``command(args)``, with a bad config or input as exit 2 and Ctrl-C as exit 130, each
    with one line on stderr and no traceback. Any other error is a bug: its traceback stays."""
    try:
        return command(args)
    except KeyboardInterrupt as exc:
        said = one_line(exc) or "run the same command again to resume where it stopped"
        print(f"capfilt: interrupted; {said}", file=sys.stderr)
        return 130
    except user_errors() as exc:
        kind = "config error: " if type(exc).__name__ == "ConfigError" else ""
        print(f"capfilt: {kind}{one_line(exc)}", file=sys.stderr)
        return 2


def user_errors() -> tuple[type[BaseException], ...]:
    """What a bad config or input raises (a failing filesystem is an input too)."""
    from capfilt.config import ConfigError
    from capfilt.io.lock import OutputLocked
    from capfilt.identity import RunRefused
    from capfilt.runtime.executor import WorkerStartError

    return ConfigError, ValueError, OSError, ImportError, RunRefused, OutputLocked, WorkerStartError


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line, credentials masked: ``PATH: REASON`` for an OS error
    on a path."""
    from capfilt.redaction import redact_text

    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return redact_text(f"{exc.filename}: {exc.strerror}")
    text = redact_text(" ".join(str(exc).split()))
    if isinstance(exc, KeyboardInterrupt):
        return text
    return text or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
