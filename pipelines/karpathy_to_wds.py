"""``capfilt evaluate-convert``: Karpathy-split annotations + an image folder -> shards for ``capfilt evaluate``."""

from __future__ import annotations

import argparse

from capfilt.karpathy import BLIP_MAX_WORDS, convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--karpathy", required=True, metavar="JSON",
                        help="dataset_coco.json or dataset_flickr30k.json (images[].filename, filepath, split, "
                             "sentences[].raw)")
    parser.add_argument("--images", required=True, metavar="FOLDER",
                        help="the image folder: FOLDER/filepath/filename (COCO's val2014/...) or FOLDER/filename")
    parser.add_argument("--output", required=True, metavar="FOLDER", help="an empty folder for the shards")
    parser.add_argument("--split", default="test", help="the split to convert")
    parser.add_argument("--per-shard", type=int, default=1000, help="images per shard")
    parser.add_argument("--raw-captions", action="store_true",
                        help="keep sentences[].raw as written; by default captions are cleaned as BLIP's "
                             f"retrieval evaluation cleans them (lower case, punctuation out, {BLIP_MAX_WORDS} words)")


def main(args: argparse.Namespace) -> int:
    if args.per_shard < 1:
        raise ValueError(f"--per-shard must be at least 1, not {args.per_shard}")
    done = convert(args.karpathy, args.images, args.output, args.split, args.per_shard, args.raw_captions)
    print(f"capfilt evaluate-convert -> {args.output}: {done.images} {args.split} images, "
          f"{done.captions} captions, {len(done.shards)} shards")
    return 0
