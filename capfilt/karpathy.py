"""Karpathy-split annotations and an image folder -> webdataset shards for ``capfilt evaluate``.

The annotations are the common ``dataset_coco.json`` / ``dataset_flickr30k.json`` (Karpathy and
Fei-Fei's splits): ``images[]`` with ``filename``, ``filepath`` (COCO's ``train2014`` /
``val2014``; absent for Flickr30k), ``split`` and ``sentences[].raw``. Each image of the split
becomes one sample: ``KEY.<ext>``, the image file byte for byte, and ``KEY.json`` with
``image_id`` and the list ``captions`` (evaluate's second data form), plus the annotation's
``filename``, ``filepath``, ``imgid`` and ``cocoid`` where it has them. Keys are the image's
place in the split, ``000000`` on.

Captions are cleaned as BLIP's retrieval evaluation cleans them (``pre_caption`` in
salesforce/BLIP ``data/utils.py``, 30 words for COCO and Flickr30k), unless ``raw``.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass
from typing import Any

from capfilt.io.fs import OutputDir, exists, read_bytes

# BLIP's caption cleaning for retrieval (data/utils.py pre_caption; max_words=30 in
# coco_karpathy_retrieval_eval and flickr30k_retrieval_eval).
BLIP_MAX_WORDS = 30
_BLIP_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
_RUNS_OF_SPACE = re.compile(r"\s{2,}")
TAR_MTIME = 0  # fixed, so a conversion is byte-identical when run again


def blip_caption(text: str, max_words: int = BLIP_MAX_WORDS) -> str:
    """``text`` as BLIP's retrieval evaluation reads it: lower case, ``.!"()*#:;~`` made spaces,
    runs of white space made one, stripped, cut to ``max_words`` words."""
    text = _RUNS_OF_SPACE.sub(" ", _BLIP_PUNCTUATION.sub(" ", text.lower())).rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


@dataclass(frozen=True)
class Converted:
    images: int
    captions: int
    shards: list[str]


def split_entries(annotations: Any, split: str, where: str) -> list[dict[str, Any]]:
    """The ``images[]`` entries of ``split``, checked for what a sample needs."""
    if not isinstance(annotations, dict) or not isinstance(annotations.get("images"), list):
        raise ValueError(f"{where}: not Karpathy-split annotations (a json object with an 'images' list)")
    entries = [e for e in annotations["images"] if isinstance(e, dict) and e.get("split") == split]
    if not entries:
        splits = sorted({str(e.get("split")) for e in annotations["images"] if isinstance(e, dict)})
        raise ValueError(f"{where}: no image of split {split!r} (splits there: {', '.join(splits)})")
    for n, entry in enumerate(entries):
        sentences = entry.get("sentences")
        if not isinstance(entry.get("filename"), str) or not isinstance(sentences, list) or not all(
                isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences):
            raise ValueError(f"{where}: image {n} of split {split!r} lacks a filename or sentences[].raw")
    return entries


def image_url(root: str, entry: dict[str, Any]) -> str:
    """``root/filepath/filename`` (COCO), else ``root/filename`` (Flickr30k; or COCO's images
    all in one folder)."""
    filepath = entry.get("filepath")
    if isinstance(filepath, str) and filepath:
        nested = posixpath.join(root, filepath, entry["filename"])
        if exists(nested):
            return nested
    return posixpath.join(root, entry["filename"])


def sample_of(n: int, entry: dict[str, Any], raw: bool) -> dict[str, Any]:
    captions = [s["raw"] if raw else blip_caption(s["raw"]) for s in entry["sentences"]]
    meta = {"image_id": entry.get("imgid", n), "captions": captions}
    meta.update({k: entry[k] for k in ("filename", "filepath", "imgid", "cocoid") if k in entry})
    return meta


def convert(karpathy: str, images: str, output: str, split: str = "test", per_shard: int = 1000,
            raw: bool = False, image_extensions: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")) -> Converted:
    """Write the images of ``split`` as shards ``output/00000.tar`` ... of ``per_shard`` images.
    Every image must be found: a missing one is an error naming how many and the first."""
    import webdataset as wds

    entries = split_entries(json.loads(read_bytes(karpathy)), split, karpathy)
    bad = [e["filename"] for e in entries if posixpath.splitext(e["filename"])[1][1:].lower() not in image_extensions]
    if bad:
        raise ValueError(f"{len(bad)} images are not {'/'.join(image_extensions)} files, the first {bad[0]!r}")
    urls = [image_url(images, e) for e in entries]
    missing = [u for u in urls if not exists(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(urls)} {split} images are missing, the first "
                                f"{missing[0]} (give the folder holding {entries[0].get('filepath') or ''} "
                                "as --images)")
    out = OutputDir(output)
    if any(name.endswith(".tar") for name in out.listdir()):
        raise ValueError(f"{output} already holds shards; convert into an empty folder")
    shards, captions = [], 0
    for first in range(0, len(entries), per_shard):
        name = f"{first // per_shard:05d}.tar"
        with out.atomic_open(name) as stream:
            tar = wds.TarWriter(stream, encoder=False, mtime=TAR_MTIME, format="PAX_FORMAT")
            for n in range(first, min(first + per_shard, len(entries))):
                meta = sample_of(n, entries[n], raw)
                captions += len(meta["captions"])
                ext = posixpath.splitext(entries[n]["filename"])[1][1:].lower()
                tar.write({"__key__": f"{n:06d}", ext: read_bytes(urls[n]),
                           "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
            tar.close()
        shards.append(posixpath.join(output, name))
    return Converted(len(entries), captions, shards)
