"""Fuzzing capfilt's read -> prepare -> judge -> write path with 1,200 mutated shards.

Valid shards are mutated with a fixed seed: bytes flipped in tar headers, member names, json
and text; members duplicated, reordered, dropped and cut; the tar truncated. Every shard goes
through ``CapFiltStep.run`` (reader, decode threads, decision, writer), with the two models
stubbed for this test only. Each shard either completes, with samples in = kept + dropped +
error in its stats and a parquet row per sample, or fails as a shard for a reason of the
shard itself (not a readable tar), leaving no file under a final name. A member header
flipped costs no sample whose own blocks are intact, before or after it: the reader reads
on past the damage.
"""

import io
import json
import random
import tarfile
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import image_bytes
from PIL import Image

from capfilt.config import load_config
from capfilt.io.fs import OutputDir
from capfilt.io.reader import ShardReadError, read_shard, split_key
from capfilt.models.itm_filter import FilterScores
from capfilt.runtime.shards import ShardTask
from capfilt.step import CapFiltStep

SHARDS = 1200


class StubProcessor:
    """An image processor's resize to 4x4 and rescale (the models it feeds are stubs)."""

    do_resize, size, resample = True, SimpleNamespace(height=4, width=4), Image.BILINEAR

    def __call__(self, images, return_tensors):
        images = images if isinstance(images, list) else [images]
        pixels = np.stack([np.asarray(image.resize((4, 4), resample=self.resample)) for image in images])
        return {"pixel_values": pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255}


class StubStep(CapFiltStep):
    """The real step with the models replaced: two fixed captions, scores from the text length."""

    def __init__(self, config):
        import torch

        self.config, self.device, self.dtype, self.runtime = config, "cpu", torch.float32, config.runtime
        self.fingerprint = ""  # recorded in each shard's done marker
        self.processors = {"captioner": StubProcessor()}
        self.reader_options = config.reader
        self.scorers, self.shared_vision = {}, False
        self.captioner = lambda pixels, seed, image_embeds=None: [["a caption", "another"] for _ in range(len(pixels))]
        self.filter = StubFilter()

    def stage(self, batch):
        return None  # each batch judged from its pixels


class StubFilter:
    def launch(self, pixels, texts, **options):
        scores = FilterScores([[(len(t) % 10) / 10 for t in image_texts] for image_texts in texts], None)
        return SimpleNamespace(result=lambda: scores)


def members(rng: random.Random, shard: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(rng.randrange(1, 6)):
        key = f"{shard:05d}{i:03d}"
        colour = rng.choice(["red", "green", "blue", "yellow"])
        out += [(f"{key}.jpg", image_bytes(colour, seed=i)), (f"{key}.txt", f"a {colour} square".encode()),
                (f"{key}.json", json.dumps({"url": f"http://127.0.0.1/{key}.jpg", "key": key}).encode())]
    return out


def flip(rng: random.Random, data: bytes, count: int) -> bytes:
    data = bytearray(data)
    for _ in range(count if data else 0):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def mutate_members(rng: random.Random, items: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    items = list(items)
    for _ in range(rng.randrange(1, 4)):
        op = rng.choice(["duplicate", "reorder", "drop", "name", "json", "text", "cut"])
        i = rng.randrange(len(items)) if items else 0
        if not items:
            break
        name, data = items[i]
        if op == "duplicate":
            items.insert(rng.randrange(len(items) + 1), (name, data))
        elif op == "reorder":
            rng.shuffle(items)
        elif op == "drop":
            items.pop(i)
        elif op == "name":  # bytes flipped in the member name, non-UTF-8 included
            raw = flip(rng, name.encode(), rng.randrange(1, 3))
            items[i] = (raw.decode("latin-1"), data)  # written back as these bytes
        elif op in ("json", "text"):
            j = next((k for k, (n, _) in enumerate(items) if n.endswith("." + op[:4].replace("text", "txt"))), i)
            items[j] = (items[j][0], flip(rng, items[j][1], rng.randrange(1, 8)))
        elif op == "cut":
            items[i] = (name, data[: rng.randrange(len(data) + 1)])
    return items


def tar_bytes(items: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def mutated_shard(rng: random.Random, shard: int) -> tuple[bytes, tuple[bytes, int] | None]:
    """A mutated shard; for a member header flipped, also the tar before and the header's offset."""
    data = tar_bytes(mutate_members(rng, members(rng, shard)))
    op = rng.choice(["none", "header", "anywhere", "truncate"])
    if op == "header":  # bytes flipped in a member's header block
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            block = rng.choice([m.offset for m in tar] or [0])
        flipped = data[:block] + flip(rng, data[block:block + 512], rng.randrange(1, 6)) + data[block + 512:]
        return flipped, (data, block)
    elif op == "anywhere":
        data = flip(rng, data, rng.randrange(1, 20))
    elif op == "truncate":
        data = data[: rng.randrange(len(data))]
    return data, None


def intact_good_keys(tmp_path, clean: bytes, block: int) -> tuple[set[str], set[str]]:
    """The keys of ``clean`` read as good samples, each once, whose members all lie clear of the
    header block at ``block``: those before it, and those after it."""
    spans: dict[str, list[tuple[int, int]]] = {}
    with tarfile.open(fileobj=io.BytesIO(clean)) as tar:
        for m in tar:
            spans.setdefault(split_key(m.name)[0], []).append((m.offset, m.offset_data + m.size))
    path = tmp_path / "clean" / "00000.tar"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(clean)
    read = [(s.key, s.error) for s in read_shard(str(path))]
    times = Counter(key for key, _ in read)
    good = {key for key, error in read if error is None and times[key] == 1 and key in spans}
    before = {k for k in good if all(end <= block for _, end in spans[k])}
    return before, {k for k in good if all(start > block for start, _ in spans[k])}


def test_mutated_shards_complete_or_fail_as_shards(tmp_path):
    step = StubStep(load_config("configs/tiny.yaml", ["runtime.batch_size=3", "filter.threshold=0.5"]))
    rng = random.Random(20261202)
    completed = failed = after_damage = 0
    for shard in range(SHARDS):
        path = tmp_path / "in" / f"{shard:05d}.tar"
        path.parent.mkdir(exist_ok=True)
        data, flipped = mutated_shard(rng, shard)
        path.write_bytes(data)
        if flipped:  # a header flipped costs only what it describes, not the samples around it
            before, after = intact_good_keys(tmp_path, *flipped)
            read = {s.key: s.error for s in read_shard(str(path))} if before | after else {}
            lost = {key: read.get(key, "not read") for key in before | after if read.get(key, "") is not None}
            assert not lost, (shard, lost)
            after_damage += len(after)
        out = tmp_path / "out"
        task = ShardTask(url=str(path), name=f"{shard:05d}", output=str(out))
        try:
            stats = step.run(task)
        except ShardReadError:  # not a readable tar: the shard's own fault
            failed += 1
            assert not any(n.startswith(f"{shard:05d}") for n in OutputDir(str(out)).listdir()), shard
            continue
        completed += 1
        assert stats.samples == stats.kept + stats.dropped + stats.error, shard
        assert pq.read_metadata(out / f"{shard:05d}.parquet").num_rows == stats.samples, shard
    assert completed > SHARDS // 2 and failed > 0, (completed, failed)  # the mutations reached both
    assert after_damage > SHARDS // 10, after_damage  # and samples after a flipped header, many
