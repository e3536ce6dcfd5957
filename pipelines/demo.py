"""``make demo``: the whole bootstrapping loop offline, on a world whose ground truth is known.

1. Render a clean, human-annotated split of shape scenes and a noisy web split, written as
   img2dataset-style shards, where a known fraction of web texts is corrupted: the caption
   of another image (swap), one attribute changed, or boilerplate alt text.
2. Train a tiny captioner and a tiny filter with ``capfilt finetune`` on the clean split
   (from scratch: there is no pretrained model offline; the filter starts from the captioner).
3. Run ``capfilt run`` through Ray over the web split.
4. Compare the result with the ground truth; print a table and write ``metrics.json``.
5. Write the HTML report of the cleaned output (``capfilt report``) to ``report.html``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time

from capfilt.io.layout import stats_name
from pipelines import world

# Shares of the web split's texts; the rest are clean.
CORRUPTION = {"swap": 0.15, "attribute": 0.15, "boilerplate": 0.15}


def write_split(folder: str, scenes: list, texts: list[str], kinds: list[str], per_shard: int) -> None:
    import webdataset as wds

    os.makedirs(folder, exist_ok=True)
    for start in range(0, len(scenes), per_shard):
        shard = f"{start // per_shard:05d}"
        with wds.TarWriter(os.path.join(folder, f"{shard}.tar"), encoder=False) as tar:
            for i in range(start, min(start + per_shard, len(scenes))):
                key = f"{shard}{i:05d}"
                meta = {"key": key, "url": f"http://127.0.0.1/demo/{key}.jpg", "caption": texts[i],
                        "status": "success", "demo_truth": scenes[i].caption(), "demo_kind": kinds[i],
                        "demo_shapes": [[s.colour, s.kind, s.position] for s in scenes[i].shapes]}
                tar.write({"__key__": key, "jpg": scenes[i].jpeg(), "txt": texts[i].encode(),
                           "json": json.dumps(meta).encode()})
        count = min(per_shard, len(scenes) - start)
        with open(os.path.join(folder, stats_name(shard)), "w") as f:
            json.dump({"count": count, "successes": count}, f)


def make_world(root: str, train: int, val: int, web: int, seed: int) -> None:
    rng = random.Random(seed)
    for split, n in (("train", train), ("val", val)):
        scenes = [world.random_scene(rng) for _ in range(n)]
        write_split(os.path.join(root, "clean", split), scenes, [s.caption() for s in scenes],
                    ["clean"] * n, per_shard=1000)
    scenes = [world.random_scene(rng) for _ in range(web)]
    kinds, texts = [], []
    for i, scene in enumerate(scenes):
        draw, kind = rng.random(), "clean"
        for name, share in CORRUPTION.items():
            if draw < share:
                kind = name
                break
            draw -= share
        other = scenes[(i + 1 + rng.randrange(web - 1)) % web]
        while kind == "swap" and world.is_true_of(other.caption(), scene):
            other = world.random_scene(rng)  # a swapped caption must be wrong for this image
        kinds.append(kind)
        texts.append(world.web_text(scene, other, kind, rng))
    write_split(os.path.join(root, "web"), scenes, texts, kinds, per_shard=100)


def train_overrides(kind: str, root: str, steps: int, extra: list[str]) -> list[str]:
    base = f"finetune.{kind}"
    return [f"{base}.train={root}/clean/train", f"{base}.val={root}/clean/val",
            f"{base}.output={root}/models/{kind}", f"{base}.image_size=64", f"{base}.batch_size=64",
            f"{base}.lr=1e-3", f"{base}.warmup_steps=100", f"{base}.min_lr_ratio=0.1",
            f"{base}.max_steps={steps}", f"{base}.epochs=1000", f"{base}.checkpoint_every=500",
            f"{base}.scratch.hidden=128", f"{base}.scratch.layers=2", *extra]


def train_models(config_path: str, root: str, steps: dict[str, int]) -> None:
    """``capfilt finetune captioner``, then ``filter``, on the clean split."""
    from capfilt.config import load_config
    from pipelines import finetune

    # The filter starts from the captioner (BLIP starts both from one pretrained model), and
    # ITM's positive class is weighted 2 against its two hard negatives: not BLIP's recipe,
    # but it puts a small model's match/no-match boundary near 0.5 within the demo's budget.
    extra = {"captioner": [], "filter": [f"finetune.filter.init={root}/models/captioner",
                                         "finetune.filter.itm_positive_weight=2"]}
    for kind in ("captioner", "filter"):
        finetune.run(load_config(config_path, train_overrides(kind, root, steps[kind], extra[kind])), kind)


def calibrate(filter_path: str, val_dir: str):
    """The threshold with the best balanced accuracy on held-out clean pairs: each image with
    its own caption (a match) and with another image's caption (not a match). It uses no web
    data and no knowledge of how the web texts were corrupted."""
    import glob
    import io

    from PIL import Image

    from capfilt.calibrate import curve, score_pairs, suggest
    from capfilt.config import FilterConfig
    from capfilt.models.itm_filter import ITMFilter
    from capfilt.training.data import iter_pairs

    pairs = list(iter_pairs(sorted(glob.glob(os.path.join(val_dir, "*.tar")))))
    images = [Image.open(io.BytesIO(p.image)).convert("RGB") for p in pairs]
    others = [pairs[(i + 1) % len(pairs)].text for i in range(len(pairs))]
    keep = [i for i, p in enumerate(pairs) if others[i] != p.text]
    itm = ITMFilter(FilterConfig(model=filter_path, itc=False), "cpu", "float32")  # ITM alone decides
    scores = score_pairs(itm, images + [images[i] for i in keep], [p.text for p in pairs] + [others[i] for i in keep])
    labels = [True] * len(pairs) + [False] * len(keep)
    return suggest(curve(scores, labels), "balanced_accuracy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_output")
    parser.add_argument("--train", type=int, default=4000, help="clean training pairs")
    parser.add_argument("--web", type=int, default=400, help="web samples to clean")
    parser.add_argument("--captioner-steps", type=int, default=1400)
    parser.add_argument("--filter-steps", type=int, default=1800)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from capfilt.config import load_config
    from pipelines import report
    from pipelines.demo_metrics import evaluate, print_table
    from pipelines.run import run_and_summarise

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = args.output.rstrip("/")
    start = time.time()
    make_world(root, args.train, 200, args.web, args.seed)
    print(f"demo: world written to {root}/ ({args.train} clean pairs, {args.web} web samples)")
    config_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "demo.yaml")
    train_models(config_path, root, {"captioner": args.captioner_steps, "filter": args.filter_steps})
    point = calibrate(f"{root}/models/filter", f"{root}/clean/val")
    print(f"demo: threshold {point.threshold:.2f} from the clean validation split (best balanced "
          f"accuracy {point.balanced_accuracy:.3f}; BLIP's 0.5 is for its COCO filter)")
    config = load_config(config_path, [f"captioner.model={root}/models/captioner",
                                       f"filter.model={root}/models/filter",
                                       f"filter.threshold={point.threshold}"],
                         input=f"{root}/web", output=f"{root}/clean_web")
    rc = run_and_summarise(config, mode="incremental", verbose=False, progress=True)
    metrics = evaluate(f"{root}/web", f"{root}/clean_web", point.threshold)
    metrics["calibration"] = {"threshold": point.threshold, "precision": point.precision,
                              "recall": point.recall, "specificity": point.specificity,
                              "source": "clean validation split: true captions vs other images' captions"}
    metrics["seconds"] = round(time.time() - start, 1)
    with open(os.path.join(root, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print_table(metrics)
    report.write(load_config(), f"{root}/clean_web", f"{root}/report.html")
    print(f"demo: open {root}/report.html in a browser to look at what was kept and dropped")
    return rc


if __name__ == "__main__":
    sys.exit(main())
