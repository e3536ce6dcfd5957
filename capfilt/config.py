"""Typed configuration: YAML values, dotted overrides, validation at start-up.

YAML files hold values only; the dataclasses below give them their shape.
Unknown keys and bad values raise ``ConfigError`` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration key is unknown or has a bad value."""


@dataclass
class CaptionerConfig:
    model: str = "Salesforce/blip-image-captioning-large"
    revision: str = "main"
    prompt: str = "a picture of "
    num_captions: int = 5
    top_p: float = 0.9
    # BLIP inherits transformers' default top_k of 50 in its nucleus branch.
    top_k: int = 50
    temperature: float = 1.0
    # Counted in tokens with the prompt included, as BLIP counts them.
    max_length: int = 20
    min_length: int = 5
    repetition_penalty: float = 1.1


@dataclass
class FilterConfig:
    model: str = "Salesforce/blip-itm-large-coco"
    revision: str = "main"
    threshold: float = 0.5
    # BLIP's ITM pads or truncates text to 35 tokens.
    max_text_tokens: int = 35
    # How the output .txt is chosen among the kept texts.
    selection: Literal["best_score", "prefer_web"] = "best_score"


@dataclass
class ReaderConfig:
    # Images with more pixels than this are errors, not decoded (decompression bombs).
    max_image_pixels: int = 50_000_000
    # A tar member larger than this is not read into memory; its sample becomes an error.
    max_member_bytes: int = 64 * 1024 * 1024
    image_extensions: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])


@dataclass
class WriterConfig:
    # per_image: one sample per kept image, all kept texts in its json (the default).
    # pairs: one sample per kept (image, text) pair, keyed KEY_0, KEY_1, ...: BLIP's next
    # round trains on web and synthetic texts as separate pairs.
    layout: Literal["per_image", "pairs"] = "per_image"


@dataclass
class DownloadConfig:
    """img2dataset's options for ``capfilt download``; names and meanings are img2dataset's."""

    url_list: Union[str, None] = None
    # auto: from the url_list's extension.
    input_format: Literal["auto", "txt", "txt.gz", "csv", "csv.gz", "tsv", "tsv.gz",
                          "json", "json.gz", "jsonl", "jsonl.gz", "parquet"] = "auto"
    url_col: str = "url"
    caption_col: Union[str, None] = "caption"
    save_additional_columns: list[str] = field(default_factory=list)
    image_size: int = 384
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = 95
    processes_count: int = 1
    thread_count: int = 32
    number_sample_per_shard: int = 10000
    timeout: int = 10
    retries: int = 0
    min_image_size: int = 0


@dataclass
class ScratchConfig:
    """The shape of a BLIP trained from scratch (``init: null``): tiny by default."""

    patch_size: int = 16
    hidden: int = 128
    layers: int = 2
    heads: int = 2


@dataclass
class TrainConfig:
    """One fine-tuning run. Defaults are BLIP's COCO recipes (caption_coco, retrieval_coco)."""

    train: Union[str, list[str], None] = None  # webdataset shards of clean image-text pairs
    val: Union[str, list[str], None] = None
    output: Union[str, None] = None  # save_pretrained folder; checkpoints in OUTPUT/checkpoints
    # A hub id or local checkpoint to start from; null trains from scratch with `scratch`.
    # A filter may start from a captioner checkpoint: its vision encoder is reused.
    init: Union[str, None] = None
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    lr: float = 1e-5
    epochs: int = 5
    max_steps: Union[int, None] = None  # stop early after this many optimiser steps
    batch_size: int = 32
    image_size: int = 384  # a checkpoint trained at another size is interpolated, as BLIP does
    weight_decay: float = 0.05
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the cosine schedule ends at lr * min_lr_ratio
    label_smoothing: float = 0.1  # captioner
    max_text_tokens: int = 40
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    hflip: bool = True  # captions' left/right are swapped with the image
    temperature: float = 0.07  # filter: ITC's initial learnable temperature
    itm_weight: float = 1.0  # filter: weight of the ITM loss against ITC
    # filter: weight of ITM's positive class. BLIP uses 1 (one positive to two negatives);
    # 2 balances the classes, which gets a small model off the "no match" prior sooner.
    itm_positive_weight: float = 1.0
    shuffle_buffer: int = 1000
    checkpoint_every: int = 200  # steps
    log_every: int = 20
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Union[int, None] = None  # torch threads on CPU; null: torch's default


@dataclass
class FinetuneConfig:
    captioner: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5))
    filter: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=6, max_text_tokens=35))


@dataclass
class RuntimeConfig:
    ray_address: Union[str, None] = None
    num_workers: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0
    batch_size: int = 16
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0
    # Threads that decode and preprocess images ahead of the models.
    decode_threads: int = 2
    # Batches prepared ahead of the models.
    prefetch_batches: int = 2
    max_restarts: int = 3
    max_task_retries: int = 3
    # Attempts per shard when processing it raises (a bad tar, a missing file).
    shard_attempts: int = 2
    # Workers keep freed memory for the next batch instead of returning it to the OS
    # (glibc; capfilt/runtime/memory.py): no page faults on every layer's activations.
    retain_freed_memory: bool = True


# Raised when capfilt itself makes different output from the same config, so that a run is
# not resumed into a folder of the older output. 2: captions drawn by NucleusSampler
# (capfilt/models/sampling.py) instead of transformers' sampling.
OUTPUT_REVISION = 2


@dataclass
class Config:
    input: Union[str, list[str], None] = None
    output: Union[str, None] = None
    # fsspec options per protocol, e.g. {s3: {endpoint_url: ..., anon: false}}.
    storage_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    writer: WriterConfig = field(default_factory=WriterConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that changes the output (not input, output or runtime placement)."""
        d = self.to_dict()
        relevant = {k: d[k] for k in ("captioner", "filter", "reader", "writer")}
        relevant["output_revision"] = OUTPUT_REVISION
        relevant["seed"] = d["runtime"]["seed"]
        relevant["dtype"] = d["runtime"]["dtype"]
        blob = json.dumps(relevant, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def load_config(path: str | None = None, overrides: list[str] | None = None, **top_level: Any) -> Config:
    """Read YAML at ``path`` (or the defaults), apply ``KEY=VALUE`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key.strip()}: value {value!r} is not valid YAML ({exc})") from exc
        _set_dotted(raw, key.strip(), parsed)
    for key, value in top_level.items():
        if value is not None:
            raw[key] = value
    return build(Config, raw, "")


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[parts[-1]] = value


def build(cls: type, raw: Any, prefix: str, base: Any = None) -> Any:
    """Build dataclass ``cls`` from a mapping on top of ``base`` (its defaults), checking
    every key and value. A nested section keeps the defaults its parent gives it."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key {prefix + str(key)!r} (known here: {known})")
    base = cls() if base is None else base
    values = {}
    for key, value in raw.items():
        if dataclasses.is_dataclass(hints[key]):
            values[key] = build(hints[key], value, prefix + key + ".", getattr(base, key))
        else:
            values[key] = _check(hints[key], value, prefix + key)
    obj = dataclasses.replace(base, **values)
    _validate_ranges(obj, prefix)
    return obj


def _check(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} has the wrong type (expected {tp})")
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_check(key_tp, k, f"{key} key"): _check(value_tp, v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null")
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-5 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


_RANGES: dict[str, tuple[float, float]] = {
    "top_p": (0.0, 1.0),
    "threshold": (0.0, 1.0),
    "temperature": (1e-6, float("inf")),
    "repetition_penalty": (1e-6, float("inf")),
    "num_captions": (0, 1_000),
    "top_k": (0, float("inf")),
    "max_length": (1, float("inf")),
    "min_length": (0, float("inf")),
    "max_text_tokens": (2, float("inf")),
    # PIL refuses outright above twice its MAX_IMAGE_PIXELS default.
    "max_image_pixels": (1, 178_956_970),
    "max_member_bytes": (1, float("inf")),
    "num_workers": (1, float("inf")),
    "cpus_per_worker": (1, float("inf")),
    "gpus_per_worker": (0, float("inf")),
    "batch_size": (1, float("inf")),
    "decode_threads": (1, float("inf")),
    "prefetch_batches": (1, float("inf")),
    "max_restarts": (-1, float("inf")),
    "max_task_retries": (-1, float("inf")),
    "shard_attempts": (1, float("inf")),
    "image_size": (1, float("inf")),
    "encode_quality": (0, 100),
    "processes_count": (1, float("inf")),
    "thread_count": (1, float("inf")),
    "number_sample_per_shard": (1, float("inf")),
    "timeout": (1, float("inf")),
    "retries": (0, float("inf")),
    "lr": (0.0, 1.0),
    "epochs": (1, float("inf")),
    "max_steps": (1, float("inf")),
    "weight_decay": (0.0, 1.0),
    "warmup_steps": (0, float("inf")),
    "min_lr_ratio": (0.0, 1.0),
    "label_smoothing": (0.0, 1.0),
    "itm_weight": (0.0, float("inf")),
    "itm_positive_weight": (0.0, float("inf")),
    "shuffle_buffer": (1, float("inf")),
    "checkpoint_every": (1, float("inf")),
    "log_every": (1, float("inf")),
    "patch_size": (1, float("inf")),
    "hidden": (8, float("inf")),
    "layers": (1, float("inf")),
    "heads": (1, float("inf")),
}


def _validate_ranges(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        bounds = _RANGES.get(f.name)
        if bounds and isinstance(value, (int, float)) and not bounds[0] <= value <= bounds[1]:
            raise ConfigError(f"{prefix}{f.name}: {value!r} is outside [{bounds[0]}, {bounds[1]}]")
    if isinstance(obj, CaptionerConfig) and obj.min_length > obj.max_length:
        raise ConfigError(f"{prefix}min_length ({obj.min_length}) exceeds max_length ({obj.max_length})")
