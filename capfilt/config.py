"""Typed configuration: YAML values, dotted overrides, validation at start-up.

YAML files hold values only; the dataclasses below give them their shape, and each
field's bounds sit on its own type (pydantic validates them). Unknown keys and bad
values raise ``ConfigError`` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import field
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

from capfilt.io.fs import read_bytes


class ConfigError(ValueError):
    """A configuration key is unknown or has a bad value."""


# Strict: a bool is not an int, a number is not a str, nothing is parsed out of a str
# (but see Float). Unknown keys are errors.
STRICT = ConfigDict(extra="forbid", strict=True)


def _widen_float(value: Any) -> Any:
    """An int is a float; so is a str YAML 1.1 leaves unparsed, such as ``1e-5`` (no dot)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value  # refused below as not a number
    return value


Float = Annotated[float, BeforeValidator(_widen_float)]
UnitInterval = Annotated[Float, Field(ge=0.0, le=1.0)]
NonNegativeFloat = Annotated[Float, Field(ge=0.0)]
PositiveFloat = Annotated[Float, Field(gt=0.0)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
# A text is at least its [CLS]-like first token and [SEP].
TextTokens = Annotated[int, Field(ge=2)]
# Ray's retry counts: -1 is "without limit".
RayRetries = Annotated[int, Field(ge=-1)]
# A value capfilt works out when it starts (runtime placement).
Auto = Literal["auto"]

# reader.max_image_pixels' default, also the limit where no config is at hand.
MAX_IMAGE_PIXELS = 50_000_000
# reader.image_formats' default: the formats a webdataset image can be. PIL's other plugins
# never parse untrusted bytes (EPS, for one, starts Ghostscript).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


@dataclass(config=STRICT)
class CaptionerConfig:
    model: str = "Salesforce/blip-image-captioning-large"
    revision: str = "main"
    # auto: the checkpoint config.json's model_type (blip, blip-2); blip / blip2 force it.
    kind: Literal["auto", "blip", "blip2"] = "auto"
    prompt: str = "a picture of "
    num_captions: Annotated[int, Field(ge=0, le=1_000)] = 5
    top_p: UnitInterval = 0.9
    # BLIP inherits transformers' default top_k of 50 in its nucleus branch.
    top_k: NonNegativeInt = 50
    temperature: PositiveFloat = 1.0  # sampling: the logits are divided by it
    # Counted in tokens with the prompt included, as BLIP counts them; a BLIP-2 captioner counts
    # the caption's new tokens only, as LAVIS does (capfilt/models/blip2.py).
    max_length: PositiveInt = 20
    min_length: NonNegativeInt = 5
    repetition_penalty: PositiveFloat = 1.1

    @field_validator("min_length")
    @classmethod
    def _min_length_within_max_length(cls, value: int, info: ValidationInfo) -> int:
        longest = info.data.get("max_length")  # absent when max_length itself is bad
        if longest is not None and value > longest:
            raise PydanticCustomError("min_over_max", "exceeds max_length ({max_length})",
                                      {"max_length": longest})
        return value


@dataclass(config=STRICT)
class FilterConfig:
    model: str = "Salesforce/blip-itm-large-coco"
    revision: str = "main"
    # The model that decides. auto: the checkpoint config.json's model_type; the threshold
    # means what that kind's score means (capfilt/models/slots.py): blip, blip2: the ITM
    # head's match probability; clip: the cosine; siglip: sigmoid(logits_per_image).
    kind: Literal["auto", "blip", "blip2", "clip", "siglip"] = "auto"
    threshold: UnitInterval = 0.5
    # BLIP's ITM pads or truncates text to 35 tokens.
    max_text_tokens: TextTokens = 35
    # How the output .txt is chosen among the kept texts.
    selection: Literal["best_score", "prefer_web"] = "best_score"
    # The text's first token as the ITM head reads it. enc: [ENC] in place of [CLS], as BLIP
    # trained and scores its ITM head (blip_retrieval.py); cls: [CLS], as transformers'
    # BlipForImageTextRetrieval feeds it. auto: the token `capfilt finetune` recorded in the
    # checkpoint's config.json, else enc (every BLIP retrieval checkpoint was trained with [ENC]).
    first_token: Literal["auto", "enc", "cls"] = "auto"
    # Also record each text's ITC similarity (web_itc, caption_itc): the checkpoint's unimodal
    # image and text encoders and projections, as BlipForImageTextRetrieval(use_itm_head=False)
    # scores a pair, with [CLS] first. Recorded only: the ITM score decides.
    itc: bool = True


# A recorded score's name: its parquet columns are NAME_web and NAME_captions.
ScoreName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]


@dataclass(config=STRICT)
class ScoreConfig:
    """One more model whose scores are recorded beside the filter's, never deciding
    (capfilt/models/scorers.py): one column per text kind, for ``capfilt select`` later."""

    name: ScoreName
    model: str
    revision: str = "main"
    # auto: the checkpoint config.json's model_type (clip, siglip); another is refused at start.
    kind: Literal["auto", "blip2", "clip", "siglip"] = "auto"


@dataclass(config=STRICT)
class ReaderConfig:
    # Images with more pixels than this are errors, not decoded (decompression bombs).
    # The bound is PIL's: it refuses outright above twice its own MAX_IMAGE_PIXELS default.
    max_image_pixels: Annotated[int, Field(ge=1, le=178_956_970)] = MAX_IMAGE_PIXELS
    # A tar member larger than this is not read into memory; its sample becomes an error.
    max_member_bytes: PositiveInt = 64 * 1024 * 1024
    image_extensions: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    # PIL format names an image may be decoded as, whatever its extension says.
    image_formats: list[str] = field(default_factory=lambda: list(IMAGE_FORMATS))


@dataclass(config=STRICT)
class WriterConfig:
    # per_image: one sample per kept image, all kept texts in its json (the default).
    # pairs: one sample per kept (image, text) pair, keyed KEY_0, KEY_1, ...: BLIP's next
    # round trains on web and synthetic texts as separate pairs.
    layout: Literal["per_image", "pairs"] = "per_image"
    # Each image's normalized ITC image embedding in the parquet (image_embedding, float16):
    # what `capfilt select`'s dedup reads, so that no model runs again for it.
    embeddings: bool = True


# top_fraction's bound: a share of the whole run, more than none of it.
Share = Annotated[Float, Field(gt=0.0, le=1.0)]


@dataclass(config=STRICT)
class SelectConfig:
    """``capfilt select``: decide again from a finished run's scores, loading no model.

    null in threshold, selection and layout: as the run decided (its filter.threshold,
    filter.selection, writer.layout). Each policy narrows the texts the threshold keeps.
    """

    threshold: Union[UnitInterval, None] = None  # on the ITM scores (web_score, caption_scores)
    # On the ITC similarities (web_itc, caption_itc): a text must pass both thresholds.
    # null: no ITC cut. Needs a run with filter.itc on.
    itc_threshold: Union[Annotated[Float, Field(ge=-1.0, le=1.0)], None] = None
    selection: Union[Literal["best_score", "prefer_web"], None] = None
    # Keep only this share of the run's images (or texts), by top_score, over the whole run;
    # ties broken by key. null: no such cut.
    top_fraction: Union[Share, None] = None
    top_of: Literal["images", "texts"] = "images"
    # The score it ranks by, an image's being its best text's: itm (the filter's ITM), itc (its
    # ITC similarity: filter.itc runs), or the name of a score the run recorded (scores:), e.g.
    # clip; itm and itc are always the filter's.
    top_score: Union[Literal["itm", "itc"], ScoreName] = "itm"
    # {recorded score name: threshold}: a text is kept only if each named score the run
    # recorded of it (NAME_web, NAME_captions) is >= its threshold; a text with none, never.
    score_thresholds: dict[ScoreName, Annotated[Float, Field(allow_inf_nan=False)]] = \
        field(default_factory=dict)
    max_captions: Union[NonNegativeInt, None] = None  # the k best synthetic captions per image
    # pairs layout: the expected share of synthetic texts among the pairs, drawn with `seed`.
    synthetic_share: Union[UnitInterval, None] = None
    seed: int = 0
    layout: Union[Literal["per_image", "pairs"], None] = None
    # Drop near-duplicate images: those whose image embeddings (writer.embeddings) have cosine
    # similarity >= dedup_threshold, over the whole run. One image of each group is kept.
    dedup: bool = False
    dedup_threshold: Annotated[Float, Field(gt=0.0, le=1.0)] = 0.95


@dataclass(config=STRICT)
class EvaluateConfig:
    """``capfilt evaluate``: image-text retrieval as BLIP evaluates it (train_retrieval.py).

    The checkpoint, its first token and text length are the filter's (``filter.model``,
    ``filter.first_token``, ``filter.max_text_tokens``); device and dtype are ``runtime``'s.
    """

    # Candidates per query re-ranked by ITM: BLIP's k_test (256 for COCO, 128 for Flickr30k),
    # capped at the number of candidates.
    k_test: PositiveInt = 256
    batch_size: PositiveInt = 64  # images per vision pass
    text_batch_size: PositiveInt = 256  # texts per text-encoder pass (BLIP's text_bs)
    itm_batch_size: PositiveInt = 256  # (image, text) pairs per ITM forward
    # ITM accuracy: a pair is predicted to match when softmax(itm_logits)[1] >= threshold.
    threshold: UnitInterval = 0.5
    # The .json field whose samples are one image (several samples, one text each), and the
    # .json field holding a sample's list of texts (else its .txt, one text per line).
    image_id_field: str = "image_id"
    captions_field: str = "captions"


@dataclass(config=STRICT)
class DownloadConfig:
    """img2dataset's options for ``capfilt download``; names and meanings are img2dataset's."""

    url_list: Union[str, None] = None
    # auto: from the url_list's extension.
    input_format: Literal["auto", "txt", "txt.gz", "csv", "csv.gz", "tsv", "tsv.gz",
                          "json", "json.gz", "jsonl", "jsonl.gz", "parquet"] = "auto"
    url_col: str = "url"
    caption_col: Union[str, None] = "caption"
    save_additional_columns: list[str] = field(default_factory=list)
    image_size: PositiveInt = 384
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: Annotated[int, Field(ge=0, le=100)] = 95
    processes_count: PositiveInt = 1
    thread_count: PositiveInt = 32
    number_sample_per_shard: PositiveInt = 10000
    timeout: PositiveInt = 10
    retries: NonNegativeInt = 0
    min_image_size: int = 0


@dataclass(config=STRICT)
class ScratchConfig:
    """The shape of a BLIP trained from scratch (``init: null``): tiny by default."""

    patch_size: PositiveInt = 16
    hidden: Annotated[int, Field(ge=8)] = 128
    layers: PositiveInt = 2
    heads: PositiveInt = 2


@dataclass(config=STRICT)
class TrainConfig:
    """One fine-tuning run. Defaults are BLIP's COCO recipes (caption_coco, retrieval_coco)."""

    train: Union[str, list[str], None] = None  # webdataset shards of clean image-text pairs
    val: Union[str, list[str], None] = None
    # filter: evaluation shards that `capfilt evaluate` scores at each epoch's end (TR/IR@1 and
    # the mean recall as BLIP reports them) in place of the in-batch R@1 on `val`.
    eval: Union[str, list[str], None] = None
    output: Union[str, None] = None  # save_pretrained folder; checkpoints in OUTPUT/checkpoints
    # A hub id or local checkpoint to start from; null trains from scratch with `scratch`.
    # A filter may start from a captioner checkpoint: its vision encoder is reused.
    init: Union[str, None] = None
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    lr: UnitInterval = 1e-5
    epochs: PositiveInt = 5
    max_steps: Union[PositiveInt, None] = None  # stop early after this many optimiser steps
    batch_size: PositiveInt = 32
    # With `init`, the size that checkpoint was trained at: fine-tuning refuses another
    # size rather than interpolate its position embeddings.
    image_size: PositiveInt = 384
    weight_decay: UnitInterval = 0.05
    warmup_steps: NonNegativeInt = 0
    min_lr_ratio: UnitInterval = 0.0  # the cosine schedule ends at lr * min_lr_ratio
    label_smoothing: UnitInterval = 0.1  # captioner
    max_text_tokens: TextTokens = 40
    crop_scale: list[Float] = field(default_factory=lambda: [0.5, 1.0])
    hflip: bool = True  # captions' left/right are swapped with the image
    # filter: ITC's initial learnable temperature, within the range training clamps it to.
    temperature: Annotated[Float, Field(ge=0.001, le=0.5)] = 0.07
    itm_weight: NonNegativeFloat = 1.0  # filter: weight of the ITM loss against ITC
    # filter: weight of ITM's positive class. BLIP uses 1 (one positive to two negatives);
    # 2 balances the classes, which gets a small model off the "no match" prior sooner.
    itm_positive_weight: NonNegativeFloat = 1.0
    shuffle_buffer: PositiveInt = 1000
    checkpoint_every: PositiveInt = 200  # steps
    log_every: PositiveInt = 20
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Union[int, None] = None  # torch threads on CPU; null: torch's default


@dataclass(config=STRICT)
class FinetuneConfig:
    captioner: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5))
    filter: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=6, max_text_tokens=35))


@dataclass(config=STRICT)
class RuntimeConfig:
    ray_address: Union[str, None] = None
    # auto: worked out from the cluster at start (capfilt/runtime/executor.py, plan_workers):
    # one worker per GPU when it has GPUs, each with 1 GPU and its node's CPUs shared among
    # them; otherwise one worker per node with all its CPUs (torch threads). A number wins.
    num_workers: Union[PositiveInt, Auto] = "auto"
    cpus_per_worker: Union[PositiveInt, Auto] = "auto"
    gpus_per_worker: Union[NonNegativeFloat, Auto] = "auto"
    # auto: 16 on a CPU; on a GPU, as many images as half its memory beyond the weights holds, a
    # power of two up to 256 (capfilt/runtime/defaults.py). Part of the fingerprint, resolved.
    batch_size: Union[PositiveInt, Auto] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bfloat16 on a GPU that has it, float32 on a CPU (exact parity with transformers).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # float32 matmuls on a GPU in TF32 (10-bit mantissa, Ampere and later); false: exact float32.
    tf32: bool = True
    seed: int = 0
    # Threads that decode and preprocess images ahead of the models.
    decode_threads: PositiveInt = 2
    # Batches prepared ahead of the models.
    prefetch_batches: PositiveInt = 2
    max_restarts: RayRetries = 3
    max_task_retries: RayRetries = 3
    # Attempts per shard when processing it raises (a bad tar, a missing file).
    shard_attempts: PositiveInt = 2
    # Seconds a shard may take before it is abandoned (its worker replaced) and tried again;
    # null: no limit. One hung read (a stalled object store) then cannot hang the run.
    shard_timeout: Union[PositiveFloat, None] = None
    # Workers keep freed memory for the next batch instead of returning it to the OS
    # (glibc; capfilt/runtime/memory.py): no page faults on every layer's activations.
    retain_freed_memory: bool = True


@dataclass(config=STRICT)
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
    select: SelectConfig = field(default_factory=SelectConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    # Models whose scores are recorded only (the filter decides): [{name, model, revision, kind}].
    scores: list[ScoreConfig] = field(default_factory=list)

    @field_validator("scores")
    @classmethod
    def _score_names_unique(cls, value: list[ScoreConfig]) -> list[ScoreConfig]:
        names = [item.name for item in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise PydanticCustomError("duplicate_score", "two scores named {names}: each name is a column",
                                      {"names": ", ".join(twice)})
        return value

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)



def load_config(path: str | None = None, overrides: list[str] | None = None, **top_level: Any) -> Config:
    """Read YAML at ``path`` (or the defaults), apply ``KEY=VALUE`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(read_bytes(path)) or {}
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
    """Build section ``cls`` from a mapping on top of ``base`` (its defaults), validating
    every key and value. A nested section keeps the defaults its parent gives it."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    base = cls() if base is None else base
    values = {}
    for key, value in raw.items():
        key = str(key)
        current = getattr(base, key, None) if key in cls.__dataclass_fields__ else None
        item_cls = _list_item_section(cls, key)
        if dataclasses.is_dataclass(current):
            values[key] = build(type(current), value, prefix + key + ".", current)
        elif item_cls is not None and isinstance(value, list):  # each item named scores[0].model
            values[key] = [_build_item(item_cls, item, f"{prefix}{key}[{i}].") for i, item in enumerate(value)]
        else:
            values[key] = value
    try:
        return dataclasses.replace(base, **values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, cls, prefix)) from None


def _build_item(cls: type, raw: Any, prefix: str) -> Any:
    """One item of a list of sections: a mapping, with the keys its class requires."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a mapping, got {raw!r}")
    try:
        return cls(**{str(key): value for key, value in raw.items()})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, cls, prefix)) from None


def _list_item_section(cls: type, key: str) -> type | None:
    """The section class of field ``key`` when it is a list of sections (``scores``), else None."""
    info = getattr(cls, "__pydantic_fields__", {}).get(key)
    args = typing.get_args(info.annotation) if info is not None else ()
    if info is not None and typing.get_origin(info.annotation) is list and args and \
            dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


_NO_INPUT_SHOWN = ("missing", "duplicate_score")


def _describe(exc: ValidationError, cls: type, prefix: str) -> str:
    """One line per bad key, named in full (``captioner.top_p: 1.5: ...``)."""
    lines: dict[str, list[str]] = {}
    for error in exc.errors(include_url=False):
        name, *rest = error["loc"] or ("",)
        key = prefix + str(name) + "".join(f"[{part}]" for part in rest if isinstance(part, int))
        if error["type"] == "unexpected_keyword_argument":
            known = ", ".join(sorted(cls.__dataclass_fields__))
            lines[key] = [f"unknown config key {key!r} (known here: {known})"]
            continue
        message = error["msg"][:1].lower() + error["msg"][1:]
        if error["type"] in _NO_INPUT_SHOWN:  # the input is the whole section, or nothing
            lines[key] = [f"{key}: {message}"]
            continue
        entry = lines.setdefault(key, [f"{key}: {error['input']!r}: {message}"])
        if message not in entry[0]:  # each alternative of a union
            entry[0] += f" or {message}"
    return "\n".join(line for entry in lines.values() for line in entry)
