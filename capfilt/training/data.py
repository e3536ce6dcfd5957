"""Clean image-text pairs from webdataset shards, shuffled reproducibly, augmented as BLIP does."""

from __future__ import annotations

import random
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from capfilt.config import MAX_IMAGE_PIXELS
from capfilt.io.fs import open_read, read_json, shard_name
from capfilt.io.images import ImageError, decode_rgb
from capfilt.io.layout import stats_beside
from capfilt.io.reader import read_shard

_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Pair:
    image: bytes
    text: str


def iter_pairs(urls: list[str]) -> Iterator[Pair]:
    """Every readable (image, text) pair of the shards, in order; bad samples are skipped."""
    for url in urls:
        for sample in read_shard(url):
            if sample.error is None and sample.web_text and sample.web_text.strip():
                yield Pair(sample.image, sample.web_text.strip())


def shuffled_pairs(urls: list[str], seed: int, epoch: int, buffer: int) -> Iterator[Pair]:
    """The epoch's order: shards shuffled, then a shuffle buffer; the same for the same seed."""
    rng = random.Random(f"{seed}/{epoch}")
    order = list(urls)
    rng.shuffle(order)
    pool: list[Pair] = []
    for pair in iter_pairs(order):
        pool.append(pair)
        if len(pool) >= buffer:
            yield pool.pop(rng.randrange(len(pool)))
    rng.shuffle(pool)
    yield from pool


def count_pairs(urls: list[str]) -> int:
    """How many samples the shards hold: from their stats files when present, else a pass over headers."""
    total = 0
    for url in urls:
        stats_url = stats_beside(url, shard_name(url))
        try:
            stats = read_json(stats_url)
            # capfilt's samples in the tar (pairs count), else its kept images, else img2dataset's
            total += int(next(stats[k] for k in ("tar_samples", "kept", "successes") if k in stats))
            continue
        except Exception:  # no usable stats: count the images in the tar
            pass
        with open_read(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            total += sum(1 for m in tar if m.isreg() and m.name.rsplit(".", 1)[-1].lower()
                         in ("jpg", "jpeg", "png", "webp"))
    return total


def swap_left_right(text: str) -> str:
    """The caption of a horizontally flipped image."""
    def swap(match: re.Match) -> str:
        word = match.group(0)
        new = "right" if word.lower() == "left" else "left"
        return new.capitalize() if word[0].isupper() else new
    return _LEFT_RIGHT.sub(swap, text)


class ImageTransform:
    """RGB PIL image -> normalised CHW float array, with BLIP's training augmentation."""

    def __init__(self, size: int, mean, std, crop_scale=(0.5, 1.0), hflip: bool = True):
        self.size = size
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self.crop_scale, self.hflip = tuple(crop_scale), hflip

    def __call__(self, data: bytes, text: str, rng: random.Random | None) -> tuple[np.ndarray, str]:
        """``rng`` None: no augmentation (evaluation)."""
        from PIL import Image

        image = decode_rgb(data, MAX_IMAGE_PIXELS)
        if rng is not None:
            image = image.crop(self._crop_box(image.size, rng))
            if self.hflip and rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                text = swap_left_right(text)
        image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return (array - self.mean) / self.std, text

    def _crop_box(self, size: tuple[int, int], rng: random.Random) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop box: area in crop_scale, aspect ratio in [3/4, 4/3]."""
        import math

        width, height = size
        for _ in range(10):
            area = width * height * rng.uniform(*self.crop_scale)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if 0 < w <= width and 0 < h <= height:
                x, y = rng.randint(0, width - w), rng.randint(0, height - h)
                return x, y, x + w, y + h
        return 0, 0, width, height


def batches(pairs: Iterator[Pair], transform: ImageTransform, batch_size: int,
            augment_seed: str | None, skip: int = 0) -> Iterator[tuple[np.ndarray, list[str]]]:
    """(pixels, texts) batches. Each batch's augmentation draws from its own seeded stream
    (``augment_seed`` None: no augmentation), so the first ``skip`` batches can be passed
    over undecoded on resume and the rest come out exactly as in an uninterrupted run."""
    chunk: list[Pair] = []
    index = 0
    for pair in pairs:
        chunk.append(pair)
        if len(chunk) < batch_size:
            continue
        if index >= skip:
            rng = random.Random(f"{augment_seed}/{index}") if augment_seed is not None else None
            yield _stack(chunk, transform, rng)
        index += 1
        chunk = []
    if chunk and augment_seed is None:  # evaluation sees every pair
        yield _stack(chunk, transform, None)


def _stack(chunk: list[Pair], transform: ImageTransform, rng) -> tuple[np.ndarray, list[str]]:
    arrays, texts = [], []
    for pair in chunk:
        try:
            array, text = transform(pair.image, pair.text, rng)
        except ImageError:
            continue
        arrays.append(array)
        texts.append(text)
    return np.stack(arrays), texts
