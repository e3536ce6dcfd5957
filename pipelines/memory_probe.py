"""Peak RSS per worker on a shard of large images (1-4 megapixels), with tiny models.

    python -m pipelines.memory_probe --images 1000 --output /tmp/capfilt_rss

Memory should stay bounded by the batch and prefetch sizes, not grow with the shard:
the reader holds one sample, the prefetch queue a few batches, and the writer streams
the tar. The models here are tiny, so the number measures capfilt's own footprint.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys

from PIL import Image, ImageDraw

SIZES = [(1024, 1024), (1280, 960), (1600, 1200), (2048, 1536), (2000, 2000)]  # 1.0-4.0 MP


def large_image(rng: random.Random) -> bytes:
    width, height = rng.choice(SIZES)
    img = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = rng.randrange(width), rng.randrange(height)
        draw.ellipse((x, y, x + width // 5, y + height // 5), fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_shard(path: str, images: int, seed: int = 0) -> None:
    import webdataset as wds

    rng = random.Random(seed)
    pool = [large_image(rng) for _ in range(16)]  # encoding is slow; reuse a pool of images
    with wds.TarWriter(path, encoder=False) as tar:
        for i in range(images):
            tar.write({"__key__": f"{i:09d}", "jpg": pool[i % len(pool)], "txt": b"a picture",
                       "json": json.dumps({"key": f"{i:09d}"}).encode()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--output", default="rss_probe_output")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    from capfilt.config import load_config
    from capfilt.io.layout import STATS_FILE
    from capfilt.models.tiny import build_tiny_models
    from pipelines.run import run_and_summarise

    os.makedirs(os.path.join(args.output, "in"), exist_ok=True)
    shard = os.path.join(args.output, "in", "00000.tar")
    if not os.path.exists(shard):
        write_shard(shard, args.images)
    captioner, filter_ = build_tiny_models(os.path.join(args.output, "models"))
    config = load_config("configs/tiny.yaml", [
        f"captioner.model={captioner}", f"filter.model={filter_}", f"runtime.batch_size={args.batch_size}",
        "captioner.num_captions=1"], input=shard, output=os.path.join(args.output, "out"))
    rc = run_and_summarise(config, mode="overwrite", verbose=False, progress=True)
    stats = json.load(open(os.path.join(args.output, "out", STATS_FILE)))
    result = {"images": args.images, "shard_mb": round(os.path.getsize(shard) / 2**20, 1),
              "batch_size": args.batch_size, "worker_peak_rss_mb": stats["timing"]["worker_peak_rss_mb"]}
    print(json.dumps(result))
    return rc


if __name__ == "__main__":
    sys.exit(main())
