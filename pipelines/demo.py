"""``make demo``: CapFilt on generated web shards with tiny local models, fully offline.

It renders small scenes of coloured shapes, writes them as img2dataset-style shards
whose web texts are partly wrong, builds tiny random BLIP checkpoints, and runs
``capfilt run`` through Ray on them. The models are untrained, so the decisions are
not meaningful yet; this shows the whole path working on a machine with no network.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220),
           "yellow": (235, 210, 40), "purple": (140, 60, 170), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": 0.25, "center": 0.5, "right": 0.75}
BOILERPLATE = ("IMG_0423.jpg", "click here to buy", "")


def render(shape: str, colour: str, position: str, size: int = 64) -> bytes:
    img = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    cx, cy, r = int(POSITIONS[position] * size), size // 2, size // 6
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(folder: str, shards: int, per_shard: int, seed: int = 0) -> list[str]:
    """img2dataset-style shards; a third of the web texts are wrong or boilerplate."""
    import webdataset as wds

    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for s in range(shards):
        path = os.path.join(folder, f"{s:05d}.tar")
        with wds.TarWriter(path, encoder=False) as tar:
            for i in range(per_shard):
                shape, colour, pos = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(POSITIONS))
                truth = f"a {colour} {shape} on the {pos}"
                text, kind = truth, "clean"
                if rng.random() < 0.33:
                    kind = rng.choice(["attribute", "boilerplate"])
                    text = (f"a {rng.choice([c for c in COLOURS if c != colour])} {shape} on the {pos}"
                            if kind == "attribute" else rng.choice(BOILERPLATE))
                key = f"{s:05d}{i:04d}"
                meta = {"key": key, "url": f"http://127.0.0.1/demo/{key}.jpg", "caption": text,
                        "status": "success", "demo_truth": truth, "demo_corruption": kind}
                tar.write({"__key__": key, "jpg": render(shape, colour, pos), "txt": text.encode(),
                           "json": json.dumps(meta).encode()})
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="demo_output")
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--per-shard", type=int, default=16)
    args = parser.parse_args(argv)

    from capfilt.models.tiny import DEFAULT_WORDS, build_tiny_models
    from pipelines.cli import main as capfilt_main

    words = sorted(set(DEFAULT_WORDS) | set(COLOURS) | set(SHAPES) | set(POSITIONS))
    captioner, filter_ = build_tiny_models(os.path.join(args.output, "models"), words=words)
    shards = write_shards(os.path.join(args.output, "web"), args.shards, args.per_shard)
    print(f"demo: {len(shards)} web shards and tiny models in {args.output}/")
    return capfilt_main([
        "run", "--config", os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml"),
        "--input", os.path.join(args.output, "web"), "--output", os.path.join(args.output, "clean"),
        f"captioner.model={captioner}", f"filter.model={filter_}",
        # The untrained filter scores everything near 0.46; this threshold lets some through.
        "filter.threshold=0.46", "-v",
    ])


if __name__ == "__main__":
    sys.exit(main())
