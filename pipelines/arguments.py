"""Arguments that several subcommands share, and the one way ``KEY=VALUE`` overrides are read.

An override is any word of the command line shaped ``dotted.key=value``, wherever it stands:
``capfilt run --input a.tar b.tar filter.threshold=0.6`` would otherwise give the override to
``--input``. ``split_overrides`` takes them out before argparse sees the line.
"""

from __future__ import annotations

import argparse
import re

from capfilt.config import Config, load_config

OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=")
MODES = ["incremental", "overwrite"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, unless it has none or the help says it already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == [] \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the words argparse parses, the ``KEY=VALUE`` overrides), each in its order."""
    return [a for a in argv if not OVERRIDE.match(a)], [a for a in argv if OVERRIDE.match(a)]


def add_config(parser: argparse.ArgumentParser, help: str = "YAML config") -> None:
    parser.add_argument("--config", help=f"{help}; without it, the built-in defaults (BLIP large from the hub)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. filter.threshold=0.6, anywhere on the line")


def add_mode(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--mode", choices=MODES, default="incremental", help=help)


def add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def load(args: argparse.Namespace, **top_level) -> Config:
    """The config that ``--config`` and the overrides say, with ``top_level`` values set."""
    return load_config(args.config, args.overrides, **top_level)
