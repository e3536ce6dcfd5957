"""``capfilt finetune captioner|filter``: fine-tune BLIP on clean pairs, save for ``capfilt run``."""

from __future__ import annotations

import argparse

from capfilt.config import Config
from pipelines.arguments import add_config, add_progress, load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=["captioner", "filter"], help="which model to train")
    add_config(parser, "YAML config (its finetune.<kind> section)")
    add_progress(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log the loss")


def main(args: argparse.Namespace) -> int:
    run(load(args), args.kind, progress=not args.no_progress)
    return 0


def run(config: Config, kind: str, progress: bool = True) -> str:
    from capfilt.io.fs import configure_storage
    from capfilt.training.trainer import finetune

    configure_storage(config.storage_options)  # the output (and its checkpoints) may be on s3://
    cfg = getattr(config.finetune, kind)
    try:
        path = finetune(kind, cfg, prompt=config.captioner.prompt, progress=progress,
                        first_token=config.filter.first_token)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"the last checkpoint is in {cfg.output}; rerun the same command to "
                                "resume from it") from None
    print(f"capfilt: fine-tuned {kind} saved to {path} (use it as {kind}.model)")
    return path
