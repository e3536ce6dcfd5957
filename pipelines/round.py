"""``make round``: BLIP's Table 1 in miniature, in the demo's world.

BLIP (Table 1, 14M images, ViT-B, COCO fine-tuned) pretrains the same model on the web data as
crawled, on the filtered web texts (F), on the web texts plus synthetic captions (C), and on
both (C+F), and compares retrieval. Here, with the demo's recipes:

1. The world: a clean human-annotated split (to train the captioner and filter, as the demo
   does), a noisy web split with the demo's corruption rates, and a clean **test** split of
   scenes no training image shows. The world has a few hundred distinct scenes and renders a
   scene to the same bytes every time, so "new images" means held-out scenes: the test scenes
   are chosen with a seed of their own, every other split is drawn without them, and the
   image bytes of every training set are checked against the test split's.
2. The demo's captioner and filter are trained on the clean split (``demo.train_models``),
   the threshold calibrated on clean validation pairs (``demo.calibrate``), and ``capfilt
   run`` cleans the web split in the ``pairs`` layout: the C+F data.
3. Four training sets: raw web, F, C and C+F, each with the same few clean human pairs (at
   most 10% of the smallest set). The same filter model (the demo's shape, ITC + ITM, the
   filter's recipe, from scratch) is trained on each, same steps, batch and seed, for each seed.
4. Each is evaluated with ``capfilt.evaluate.evaluate`` on the test split; the table and
   ``round.json`` are written.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import io
import json
import logging
import os
import random
import resource
import statistics
import sys
import time

from capfilt.io.layout import stats_name
from pipelines import demo, world

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "demo.yaml")
SETS = ("web", "filtered", "captioned", "capfilt")
TITLES = {"web": "web as crawled", "filtered": "F: filtered web", "captioned": "C: web + captions",
          "capfilt": "C+F: capfilt output"}
# BLIP Table 1, 14M images, ViT-B/16, COCO (5k test) after COCO fine-tuning: TR@1, IR@1.
BLIP = {"web": (78.4, 60.7), "filtered": (79.1, 61.5), "captioned": (79.7, 62.0), "capfilt": (80.6, 63.1)}
MAX_CLEAN_SHARE = 0.10


# --- The world -------------------------------------------------------------------------------


def all_scenes() -> list[world.Scene]:
    """Every scene ``world.random_scene`` can draw, in a fixed order."""
    shapes = [(c, k) for c in world.COLOURS for k in world.SHAPES]
    single = [world.Scene((world.Shape(c, k, p),)) for c, k in shapes for p in world.POSITIONS]
    double = [world.Scene((world.Shape(c1, k1, "left"), world.Shape(c2, k2, "right")))
              for c1, k1 in shapes for c2, k2 in shapes]
    return single + double


def test_scenes(count: int, seed: int) -> list[world.Scene]:
    """The held-out scenes, drawn with a seed no other split uses."""
    return random.Random(f"round/test/{seed}").sample(all_scenes(), count)


def draw(rng: random.Random, held_out: set) -> world.Scene:
    while True:
        scene = world.random_scene(rng)
        if scene not in held_out:
            return scene


def web_texts(scenes: list, rng: random.Random, held_out: set) -> tuple[list[str], list[str]]:
    """The demo's corruption (``demo.CORRUPTION``) of the scenes' captions: (texts, kinds)."""
    kinds, texts = [], []
    for i, scene in enumerate(scenes):
        roll, kind = rng.random(), "clean"
        for name, share in demo.CORRUPTION.items():
            if roll < share:
                kind = name
                break
            roll -= share
        other = scenes[(i + 1 + rng.randrange(len(scenes) - 1)) % len(scenes)]
        while kind == "swap" and world.is_true_of(other.caption(), scene):
            other = draw(rng, held_out)
        kinds.append(kind)
        texts.append(world.web_text(scene, other, kind, rng))
    return texts, kinds


def make_world(root: str, train: int, val: int, web: int, test: int, seed: int) -> None:
    """clean/train, clean/val, web/ as the demo writes them, without the test scenes, and test/."""
    held = test_scenes(test, seed)
    held_out = set(held)
    rng = random.Random(seed)
    for split, n in (("train", train), ("val", val)):
        scenes = [draw(rng, held_out) for _ in range(n)]
        demo.write_split(os.path.join(root, "clean", split), scenes, [s.caption() for s in scenes],
                         ["clean"] * n, per_shard=1000)
    scenes = [draw(rng, held_out) for _ in range(web)]
    texts, kinds = web_texts(scenes, rng, held_out)
    demo.write_split(os.path.join(root, "web"), scenes, texts, kinds, per_shard=500)
    demo.write_split(os.path.join(root, "test"), held, [s.caption() for s in held], ["clean"] * test,
                     per_shard=1000)


# --- The four training sets ------------------------------------------------------------------


def write_pairs(folder: str, pairs: list[tuple[str, bytes, str]], per_shard: int = 2000) -> list[str]:
    """(key, jpeg, text) samples as shards with their stats; the shard paths."""
    import webdataset as wds

    os.makedirs(folder, exist_ok=True)
    shards = []
    for start in range(0, len(pairs), per_shard):
        shard = f"{start // per_shard:05d}"
        path = os.path.join(folder, f"{shard}.tar")
        chunk = pairs[start:start + per_shard]
        with wds.TarWriter(path, encoder=False) as tar:
            for key, image, text in chunk:
                tar.write({"__key__": key, "jpg": image, "txt": text.encode()})
        with open(os.path.join(folder, stats_name(shard)), "w") as f:
            json.dump({"count": len(chunk), "successes": len(chunk)}, f)
        shards.append(path)
    return shards


def web_samples(web_dir: str) -> dict[str, tuple[bytes, str]]:
    from capfilt.io.reader import read_shard

    return {s.key: (s.image, s.web_text or "") for url in sorted(glob.glob(f"{web_dir}/*.tar"))
            for s in read_shard(url)}


def derived_pairs(web: dict, capfilt_dir: str) -> dict[str, list[tuple[str, bytes, str]]]:
    """F: the web texts the filter kept; C: every web text and every distinct caption, unfiltered
    (a caption equal to its image's web text counted once, as ``decision.decide`` counts it)."""
    import pyarrow.parquet as pq

    filtered, captioned = [], []
    for path in sorted(glob.glob(f"{capfilt_dir}/*.parquet")):
        for row in pq.read_table(path, columns=["key", "web_text", "web_kept", "captions"]).to_pylist():
            image, text = web[row["key"]]
            if row["web_kept"]:
                filtered.append((f"{row['key']}_w", image, text))
            seen = {text}
            captioned.append((f"{row['key']}_w", image, text))
            for i, caption in enumerate(row["captions"] or []):
                if caption not in seen:
                    seen.add(caption)
                    captioned.append((f"{row['key']}_c{i}", image, caption))
    return {"filtered": filtered, "captioned": captioned}


def count_texts(urls: list[str]) -> int:
    """Pairs training reads (``iter_pairs``: blank texts are not pairs)."""
    from capfilt.training.data import iter_pairs

    return sum(1 for _ in iter_pairs(urls))


def build_sets(root: str, max_clean: int) -> dict[str, dict]:
    """Each set's shards, its web-derived and clean pair counts; the clean pairs are the first of
    the clean training split, as many as keep them at most 10% of the smallest set."""
    from capfilt.training.data import iter_pairs

    sets = {"web": sorted(glob.glob(f"{root}/web/*.tar")), "capfilt": sorted(glob.glob(f"{root}/capfilt/*.tar"))}
    for name, pairs in derived_pairs(web_samples(f"{root}/web"), f"{root}/capfilt").items():
        sets[name] = write_pairs(f"{root}/sets/{name}", pairs)
    sizes = {name: count_texts(urls) for name, urls in sets.items()}
    clean = min(max_clean, int(min(sizes.values()) * MAX_CLEAN_SHARE / (1 - MAX_CLEAN_SHARE)))
    human = []
    for i, pair in enumerate(iter_pairs(sorted(glob.glob(f"{root}/clean/train/*.tar")))):
        if i >= clean:
            break
        human.append((f"human{i:06d}", pair.image, pair.text))
    human_shards = write_pairs(f"{root}/sets/human", human)
    return {name: {"shards": sets[name] + human_shards, "web_pairs": sizes[name], "clean_pairs": len(human),
                   "pairs": sizes[name] + len(human), "clean_share": len(human) / (sizes[name] + len(human))}
            for name in SETS}


def truth(root: str, sets: dict[str, dict]) -> dict[str, float]:
    """Each set's share of pairs whose text is true of its image (``world.is_true_of``: every
    colour-shape pair it names is in the scene; positions are not checked): what the world's
    ground truth says of the data, which no model here is told."""
    from capfilt.io.reader import read_shard
    from capfilt.training.data import iter_pairs

    scenes = {}
    for url in sorted(glob.glob(f"{root}/web/*.tar") + glob.glob(f"{root}/clean/train/*.tar")):
        for s in read_shard(url):
            shapes = tuple(world.Shape(*shape) for shape in s.meta["demo_shapes"])
            scenes[hashlib.sha256(s.image).hexdigest()] = world.Scene(shapes)
    found = {}
    for name, info in sets.items():
        true = [world.is_true_of(p.text, scenes[hashlib.sha256(p.image).hexdigest()]) for p in iter_pairs(info["shards"])]
        found[name] = sum(true) / len(true)
    return found


def image_hashes(urls: list[str]) -> set[str]:
    from capfilt.io.reader import read_shard

    return {hashlib.sha256(s.image).hexdigest() for url in urls for s in read_shard(url) if s.image}


def check_disjoint(root: str, sets: dict[str, dict]) -> int:
    """No image of the test split is in any training set, nor in what trained the demo's models."""
    test = image_hashes(sorted(glob.glob(f"{root}/test/*.tar")))
    seen = [f"{root}/clean/train", f"{root}/clean/val"]
    urls = sorted({u for s in sets.values() for u in s["shards"]} |
                  {u for folder in seen for u in glob.glob(f"{folder}/*.tar")})
    shared = test & image_hashes(urls)
    if shared:
        raise AssertionError(f"{len(shared)} test images are also training images")
    return len(test)


# --- Training and evaluation -----------------------------------------------------------------


def train(root: str, name: str, shards: list[str], args, seed: int) -> str:
    """The filter's recipe (the demo's, from scratch) on one set; the saved model's folder."""
    from capfilt.config import load_config
    from pipelines import finetune

    out = f"{root}/train/{name}/seed{seed}"
    overrides = demo.train_overrides("filter", root, args.steps, ["finetune.filter.itm_positive_weight=2",
                                                           f"finetune.filter.seed={seed}",
                                                           f"finetune.filter.output={out}",
                                                           "finetune.filter.checkpoint_every=100000",
                                                           f"finetune.filter.threads={args.threads}",
                                                           f"finetune.filter.batch_size={args.batch}"])
    config = load_config(CONFIG, overrides)
    cfg = dataclasses.replace(config.finetune.filter, train=shards, val=None)
    config = dataclasses.replace(config, finetune=dataclasses.replace(config.finetune, filter=cfg))
    if not os.path.exists(f"{out}/training.json"):
        finetune.run(config, "filter", progress=not args.no_progress)
    return out


def evaluate_model(model: str, test_dir: str) -> dict:
    """``capfilt evaluate``'s report of ``model`` on the test split, also written beside it."""
    from capfilt.config import load_config
    from capfilt.evaluate import EVALUATE_FILE, evaluate

    config = load_config(CONFIG, [f"filter.model={model}"])
    report = evaluate(sorted(glob.glob(f"{test_dir}/*.tar")), config)
    with open(os.path.join(model, EVALUATE_FILE), "w") as f:
        json.dump(report, f, indent=2)
    return report


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.pstdev(values) if len(values) > 1 else 0.0, "values": values}


def summarise(runs: list[dict]) -> dict[str, dict]:
    table = {}
    for name in SETS:
        mine = [r for r in runs if r["set"] == name]
        table[name] = {"txt_r1": spread([r["txt_r1"] for r in mine]), "img_r1": spread([r["img_r1"] for r in mine]),
                       "r_mean": spread([r["r_mean"] for r in mine]), "blip": dict(zip(("txt_r1", "img_r1"), BLIP[name]))}
    return table


def verdict(table: dict) -> dict:
    """C+F against the raw web: a win on a metric when its worst seed beats the web's best."""
    out = {}
    for metric in ("txt_r1", "img_r1"):
        cf, web = table["capfilt"][metric], table["web"][metric]
        out[metric] = {"gain": cf["mean"] - web["mean"], "wins": cf["min"] > web["max"],
                       "seed_spread": max(cf["max"] - cf["min"], web["max"] - web["min"])}
    out["wins"] = all(v["wins"] for v in out.values())
    return out


def print_table(table: dict, sets: dict, seeds: list[int]) -> None:
    print(f"\nround: BLIP Table 1 in miniature (test split; mean over seeds {seeds}, min-max)")
    print(f"  {'training set':<22}{'pairs':>7}{'clean':>7}   {'TR@1':<19}{'IR@1':<19}{'BLIP TR@1':>10}{'IR@1':>6}")
    for name in SETS:
        row, info = table[name], sets[name]
        cells = [f"{row[m]['mean']:5.1f} ({row[m]['min']:.1f}-{row[m]['max']:.1f})" for m in ("txt_r1", "img_r1")]
        print(f"  {TITLES[name]:<22}{info['pairs']:>7}{info['clean_share']:>7.1%}   {cells[0]:<19}{cells[1]:<19}"
              f"{row['blip']['txt_r1']:>10.1f}{row['blip']['img_r1']:>6.1f}")


# --- The round -------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU of this process and of its finished children (Ray's workers count once they exit)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def prepare(args, root: str) -> tuple[float, dict]:
    """The world and the demo's models (when missing): not part of the round's own time."""
    import torch

    from pipelines.demo import calibrate, train_models

    torch.set_num_threads(args.threads)  # demo.train_models leaves finetune's threads unset

    if not os.path.exists(f"{root}/test"):
        make_world(root, args.train, args.val, args.web, args.test, args.seed)
        print(f"round: world written to {root}/ ({args.train} clean, {args.web} web, {args.test} test images)")
    if not os.path.exists(f"{root}/models/filter/training.json"):
        train_models(CONFIG, root, {"captioner": args.captioner_steps, "filter": args.filter_steps})
    if args.threshold is not None:
        return args.threshold, {"threshold": args.threshold, "source": "--threshold"}
    point = calibrate(f"{root}/models/filter", f"{root}/clean/val")
    return point.threshold, {"threshold": point.threshold, "balanced_accuracy": point.balanced_accuracy,
                             "source": "clean validation split (demo.calibrate)"}


def clean_web(root: str, threshold: float, args) -> None:
    from capfilt.config import load_config
    from pipelines.run import run_and_summarise

    config = load_config(CONFIG, [f"captioner.model={root}/models/captioner", f"filter.model={root}/models/filter",
                                  f"filter.threshold={threshold}", "writer.layout=pairs",
                                  f"captioner.num_captions={args.captions}", f"runtime.cpus_per_worker={args.threads}"],
                         input=f"{root}/web", output=f"{root}/capfilt")
    if run_and_summarise(config, mode="incremental", verbose=False, progress=not args.no_progress):
        raise RuntimeError(f"capfilt run failed on {root}/web")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="round_output")
    parser.add_argument("--web", type=int, default=4000, help="web samples")
    parser.add_argument("--test", type=int, default=100, help="test images (held-out scenes)")
    parser.add_argument("--train", type=int, default=4000, help="clean pairs the demo's models train on")
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--clean", type=int, default=400, help="at most this many clean pairs in each set")
    parser.add_argument("--steps", type=int, default=300, help="training steps per set and seed")
    parser.add_argument("--seeds", default="0,1", help="training seeds, comma-separated")
    parser.add_argument("--batch", type=int, default=64, help="training batch (the demo's 64)")
    parser.add_argument("--threshold", type=float, help="the filter's threshold (default: calibrated as the demo's)")
    parser.add_argument("--captioner-steps", type=int, default=1400)
    parser.add_argument("--filter-steps", type=int, default=1800)
    parser.add_argument("--seed", type=int, default=0, help="the world's seed")
    parser.add_argument("--captions", type=int, default=5,
                        help="synthetic captions per web image (the demo's 5; BLIP sampled 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads: on a shared 2-core machine 2 threads cost 6x the CPU per step")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = args.output.rstrip("/")
    seeds = [int(s) for s in args.seeds.split(",")]
    threshold, calibration = prepare(args, root)
    start, cpu_start = time.time(), cpu_seconds()
    clean_web(root, threshold, args)
    sets = build_sets(root, args.clean)
    small = [name for name, info in sets.items() if info["pairs"] < args.batch]
    if small:  # training drops the last partial batch: such a set would never take a step
        raise ValueError(f"training sets {small} hold fewer pairs than one batch of {args.batch}")
    test_images = check_disjoint(root, sets)
    for name, share in truth(root, sets).items():
        sets[name]["true_share"] = share
    runs: list[dict] = []
    for seed in seeds:
        for name in SETS:
            model = train(root, name, sets[name]["shards"], args, seed)
            found = evaluate_model(model, f"{root}/test")["retrieval"]
            runs.append({"set": name, "seed": seed, "model": model, **{k: found[k] for k in ("txt_r1", "img_r1", "r_mean")}})
            print(f"round: {TITLES[name]}, seed {seed}: TR@1 {found['txt_r1']:.1f}, IR@1 {found['img_r1']:.1f}")
        table = summarise(runs)  # written after each seed, so a cut-short round leaves its numbers
        record = {"args": vars(args), "calibration": calibration, "test_images": test_images,
                  "seeds": sorted({r["seed"] for r in runs}), "sets": sets, "runs": runs, "table": table,
                  "verdict": verdict(table), "seconds": round(time.time() - start, 1),
                  "cpu_seconds": round(cpu_seconds() - cpu_start, 1)}
        with open(os.path.join(root, "round.json"), "w") as f:
            json.dump(record, f, indent=2)
    print_table(table, sets, seeds)
    print(f"round: C+F beats the raw web beyond the seeds' spread: {record['verdict']['wins']}; "
          f"{record['seconds']:.0f} s wall, {record['cpu_seconds']:.0f} s CPU after the demo's models -> {root}/round.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
