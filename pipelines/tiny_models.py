"""``capfilt tiny-models DIR``: tiny random BLIP and BLIP-2 checkpoints, for offline tests and the demo."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="folder to write DIR/captioner and DIR/filter (BLIP) and "
                        "DIR/blip2_opt, DIR/blip2_t5 and DIR/blip2_itm (BLIP-2) to")
    parser.add_argument("--image-size", type=int, default=64, help="the models' input image size, in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")


def main(args: argparse.Namespace) -> int:
    from capfilt.models.tiny import build_tiny_blip2_models, build_tiny_models

    for path in build_tiny_models(args.dir, image_size=args.image_size, seed=args.seed):
        print(path)
    for path in build_tiny_blip2_models(args.dir, image_size=args.image_size, seed=args.seed):
        print(path)
    return 0
