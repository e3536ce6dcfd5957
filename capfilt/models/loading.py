"""Load BLIP checkpoints (hub ids or local folders) the one way users and tests share.

Weights load as safetensors only, and never with ``trust_remote_code``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but torch sees no CUDA device")
    return device


def poisons_device(exc: BaseException) -> bool:
    """Whether ``exc`` is a CUDA error (a device-side assert, an illegal address): it leaves the
    process's CUDA context unusable, so every later call in it fails the same way."""
    import torch

    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and "CUDA error" in str(exc)


def torch_dtype(name: str, device: str):
    import torch

    if name == "auto":  # as a run resolves it (capfilt/runtime/defaults.py)
        from capfilt.runtime.defaults import local_facts, auto_dtype

        name = auto_dtype(device, local_facts(device).bf16)
    if name == "float16" and device == "cpu":
        raise ValueError("runtime.dtype float16 is for GPUs; use bfloat16 or float32 on CPU")
    return getattr(torch, DTYPES[name])


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    image_processor: Any
    revision: str | None


class Holds:
    """A slot's model holder (captioner, filter): its section ``cfg``, its device, and the checkpoint
    it loaded, with the model, tokenizer and image processor at hand."""

    def __init__(self, cfg: Any, device: str, loaded: Loaded):
        self.cfg, self.device, self.loaded = cfg, device, loaded
        self.model, self.tokenizer, self.image_processor = loaded.model, loaded.tokenizer, loaded.image_processor


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
TINY_HINT = "make tiny local models with: capfilt tiny-models DIR"


def check_checkpoint(key: str, name: str, revision: str | None = None) -> dict[str, Any]:
    """The checkpoint's ``config.json``, read before workers start. Raises ValueError naming
    ``key`` unless ``name`` is a folder with a safetensors checkpoint or a hub id whose config
    can be had (cached, or fetched)."""
    local = os.path.expanduser(name)
    if os.path.isdir(local):
        if not os.path.exists(os.path.join(local, "config.json")) or \
                not any(os.path.exists(os.path.join(local, w)) for w in WEIGHT_FILES):
            raise ValueError(f"{key}: {name} holds no checkpoint (config.json and model.safetensors, "
                             f"as save_pretrained writes them); {TINY_HINT}")
        return _read_config(os.path.join(local, "config.json"))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ValueError(f"{key}: {name!r} is not a folder, nor a hub id like "
                         f"'Salesforce/blip-itm-large-coco' ({TINY_HINT})")
    from huggingface_hub import constants, hf_hub_download

    try:
        return _read_config(hf_hub_download(name, "config.json", revision=revision))
    except Exception as exc:  # offline, unreachable, no such repo or revision: one line for all
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        why = ("HF_HUB_OFFLINE is set and it is not in the local cache" if constants.HF_HUB_OFFLINE
               else f"{type(exc).__name__}: {first}")
        raise ValueError(f"{key}: cannot get {name!r} (revision {revision}) from the Hugging Face hub "
                         f"({why}); give a local folder, or {TINY_HINT}") from exc


def check_loads_whole(key: str, name: str, revision: str | None, model_cls: Any,
                      config: dict[str, Any]) -> None:
    """Refuse, before any worker loads it, a checkpoint that is not of the slot's class or whose
    weights do not all load (transformers would initialise the missing ones at random, and the
    run would caption or score with noise). ``config`` is its ``config.json``.

    The weight names and shapes in the safetensors header are compared with those of the class
    built on the meta device (no memory, no weights read); only when they disagree is the
    checkpoint loaded for transformers' own report, which knows renamed and tied weights."""
    kinds = config.get("architectures") or []
    if kinds and model_cls.__name__ not in kinds:
        raise ValueError(f"{key}: {name} is a {' / '.join(kinds)} checkpoint, not the "
                         f"{model_cls.__name__} this slot needs")
    if _header_matches(model_cls, name, revision):
        return
    problems = _loading_report(model_cls, name, revision)
    if problems:
        kind = " / ".join(kinds) or "checkpoint of no recorded class"
        raise ValueError(f"{key}: {name} ({kind}) does not load whole as {model_cls.__name__}: "
                         f"{problems}; transformers would start them at random")


def _header_matches(model_cls: Any, name: str, revision: str | None) -> bool:
    """Whether the checkpoint's tensors, by name and shape, are every tensor ``model_cls`` has
    (tied copies aside). False also when that cannot be told cheaply: the full load decides."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig

    try:
        local = name if os.path.isdir(name) else os.path.dirname(
            _hub_file(name, "config.json", revision))
        path = os.path.join(local, "model.safetensors")
        if not os.path.exists(path):
            return False  # sharded, or not fetched yet
        with safe_open(path, framework="pt") as f:
            have = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        with torch.device("meta"):
            model = model_cls(AutoConfig.from_pretrained(local))
    except Exception:  # whatever the cheap way cannot read, the full load reports on
        return False
    tied = getattr(model, "_tied_weights_keys", None) or {}
    tied = tied if isinstance(tied, dict) else {}
    for param, tensor in model.state_dict().items():
        if param in have:
            if have[param] != list(tensor.shape):
                return False
        elif tied.get(param) not in have:
            return False
    return True


def _hub_file(name: str, filename: str, revision: str | None) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(name, filename, revision=revision)


def _loading_report(model_cls: Any, name: str, revision: str | None) -> str:
    """What transformers could not load of ``name`` as ``model_cls``: '' when all of it."""
    from transformers.utils import logging as hf_logging

    kwargs = {} if os.path.isdir(name) else {"revision": revision}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its table of missing keys: summarised below instead
    hf_logging.disable_progress_bar()
    try:
        model, info = model_cls.from_pretrained(name, use_safetensors=True, output_loading_info=True, **kwargs)
    except Exception as exc:  # shapes that do not fit, a file cut short
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    finally:
        hf_logging.set_verbosity(verbosity)
    del model
    missing, mismatched = sorted(info.get("missing_keys") or []), list(info.get("mismatched_keys") or [])
    parts = []
    if missing:
        parts.append(f"{len(missing)} weights missing ({by_module(missing)})")
    if mismatched:
        parts.append(f"{len(mismatched)} of another shape ({by_module([m[0] for m in mismatched])})")
    return "; ".join(parts)


def by_module(keys: list[str], shown: int = 4) -> str:
    """``text_encoder: 60, itm_head: 2``: weights counted by their top module."""
    counts: dict[str, int] = {}
    for k in keys:
        top = k.split(".")[0]
        counts[top] = counts.get(top, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{m}: {n}" for m, n in ranked[:shown])
    return text + (", ..." if len(ranked) > shown else "")


def _read_config(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def text_positions(config: dict[str, Any], slot: str = "captioner", kind: str = "blip") -> int | None:
    """How many tokens the text model a ``kind`` checkpoint reads texts with in ``slot`` can take
    (its position embeddings; None when it has none, as T5's relative positions): a BLIP-2 filter
    reads them with its Q-Former."""
    text = config.get("qformer_config" if (slot, kind) == ("filter", "blip2") else "text_config") or {}
    return text.get("max_position_embeddings")


def load_blip(model_cls: Any, name: str, revision: str, device: str, dtype: str) -> Loaded:
    """Load model, tokenizer and image processor of one BLIP checkpoint for inference."""
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    model, tokenizer, resolved = load_model(model_cls, name, revision, device, dtype)
    kwargs = {} if os.path.isdir(name) else {"revision": revision}
    image_processor = load_image_processor(BlipImageProcessorPil, name, model.config, kwargs)
    return Loaded(model, tokenizer, image_processor, resolved)


def load_model(model_cls: Any, name: str, revision: str, device: str, dtype: str) -> tuple[Any, Any, str | None]:
    """(model, tokenizer, what pins the weights) of one checkpoint, for inference: safetensors
    only, never remote code, refused unless every weight loads."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kwargs = {} if os.path.isdir(name) else {"revision": revision}
    model, info = model_cls.from_pretrained(
        name, use_safetensors=True, dtype=torch_dtype(dtype, device), output_loading_info=True, **kwargs
    )
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # the driver checked (check_loads_whole); the files may have changed since
        raise ValueError(f"{name} does not load whole as {model_cls.__name__}: {len(missing)} weights "
                         f"missing ({by_module(missing)})")
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    resolved = getattr(model.config, "_commit_hash", None) or checkpoint_digest(name)
    log.info("loaded %s (%s) on %s as %s", name, resolved, device, dtype)
    return model, tokenizer, resolved


def load_image_processor(processor_cls, name: str, config, kwargs: dict):
    """The checkpoint's image processor, PIL backend (no torchvision, same in tests and
    production); BLIP's defaults at the model's image size when the checkpoint has none."""
    try:
        return processor_cls.from_pretrained(name, **kwargs)
    except OSError:
        size = config.vision_config.image_size
        log.warning("%s has no preprocessor_config.json; using BLIP's preprocessing at %dx%d",
                    name, size, size)
        return processor_cls(size={"height": size, "width": size})


# The files of a checkpoint folder that decide what it computes: weights, configs, tokenizer.
IDENTITY_FILES = (".safetensors", "config.json", "tokenizer.json", "vocab.txt", "special_tokens_map.json")


def checkpoint_identity(name: str, revision: str | None = None) -> str:
    """What pins a checkpoint: a hash of a local folder's files, or the hub commit it resolves to
    (the snapshot folder of the local cache is named by it). Swapping the files behind a folder,
    or a branch moving on the hub, changes it."""
    local = os.path.expanduser(name)
    if os.path.isdir(local):
        return checkpoint_digest(local)
    from huggingface_hub import hf_hub_download

    return "commit:" + os.path.basename(os.path.dirname(hf_hub_download(name, "config.json", revision=revision)))


def checkpoint_digest(name: str) -> str | None:
    """sha256 of a local folder's weight, config and tokenizer files (``IDENTITY_FILES``),
    so a local checkpoint is traceable. It reads every byte of the weights: seconds for
    BLIP-large at disk speed, once per run."""
    if not os.path.isdir(name):
        return None
    digest = hashlib.sha256()
    for fname in sorted(os.listdir(name)):
        if fname.endswith(IDENTITY_FILES):
            digest.update(fname.encode() + b"\0")
            with open(os.path.join(name, fname), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return "sha256:" + digest.hexdigest()


# The ITM head's first token. BLIP trained (blip_retrieval.py, blip_pretrain.py) and scores
# (train_retrieval.py, LAVIS) its ITM head with the text's [CLS] replaced by [ENC];
# transformers' BlipForImageTextRetrieval feeds [CLS]. ITC keeps [CLS] in both.
ENC_TOKEN = "[ENC]"
# What `capfilt finetune filter` writes into the config.json of the checkpoints it saves: the
# first token (enc or cls) its ITM head was trained with. transformers keeps the attribute.
ITM_FIRST_TOKEN_KEY = "capfilt_itm_first_token"
FIRST_TOKENS = ("enc", "cls")


def itm_first_token(setting: str, tokenizer, config: dict[str, Any], key: str, name: str
                    ) -> tuple[str, int | None]:
    """(token, id): the first token ITM reads, ``enc`` or ``cls``, and the id that replaces
    the text's [CLS] (None for ``cls``: [CLS] stays). ``auto`` is the token recorded in the
    checkpoint's ``config`` (``ITM_FIRST_TOKEN_KEY``), else ``enc``. Raises ValueError naming
    ``key`` and checkpoint ``name`` when ``enc`` is wanted and the tokenizer has no [ENC], or
    its id is past the model's vocabulary."""
    recorded = config.get(ITM_FIRST_TOKEN_KEY)
    if recorded is not None and recorded not in FIRST_TOKENS:
        raise ValueError(f"{key}: {name}'s config.json records {ITM_FIRST_TOKEN_KEY}={recorded!r}, "
                         f"not one of {', '.join(FIRST_TOKENS)}")
    token = (recorded or "enc") if setting == "auto" else setting
    if token == "cls":
        return token, None
    token_id = tokenizer.convert_tokens_to_ids(ENC_TOKEN)
    vocab_size = (config.get("text_config") or {}).get("vocab_size")
    if ENC_TOKEN not in tokenizer.get_vocab() and vocab_size == len(tokenizer) + 2:
        # BLIP's layout: its init_tokenizer appends [DEC] and then [ENC] to BERT's vocabulary, and
        # the text model's embeddings hold both; a checkpoint converted with plain BERT's
        # tokenizer (as transformers' conversion script does) names neither, yet has their rows.
        return token, len(tokenizer) + 1
    if ENC_TOKEN not in tokenizer.get_vocab() or token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"{key}: {name}'s tokenizer has no {ENC_TOKEN} token, the first token BLIP "
                         f"trained its ITM head with; give a tokenizer with BLIP's {ENC_TOKEN} (salesforce/"
                         "BLIP's init_tokenizer adds it after [DEC]), or set filter.first_token: cls to "
                         "score with [CLS] as transformers' BlipForImageTextRetrieval does")
    if vocab_size is not None and token_id >= vocab_size:
        raise ValueError(f"{key}: {name}'s tokenizer gives {ENC_TOKEN} the id {token_id}, past the "
                         f"text model's {vocab_size} embeddings")
    return token, token_id


def check_itm_first_token(key: str, name: str, revision: str | None, setting: str,
                          config: dict[str, Any]) -> str:
    """``itm_first_token`` before workers start, from the checkpoint's tokenizer and its
    ``config`` (``check_checkpoint``'s answer): the token ITM will read."""
    from transformers import AutoTokenizer

    kwargs = {} if os.path.isdir(os.path.expanduser(name)) else {"revision": revision}
    tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(name), **kwargs)
    return itm_first_token(setting, tokenizer, config, key, name)[0]
