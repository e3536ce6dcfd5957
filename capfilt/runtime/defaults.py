"""What ``auto`` means for the runtime settings that change the output: device, dtype, batch size.

A GPU run gets bfloat16 (or, where the GPU has none, float32 with TF32 matmuls) and a batch
sized from the GPU's memory; a CPU run keeps float32 and ``CPU_BATCH``. The choice is made once,
where the run starts, so that the fingerprint (``capfilt/identity.py``) records concrete values
and every worker computes with the same ones: the random stream is drawn per batch, and CPU
and CUDA, float32 and bfloat16 draw different captions from one seed.

On a Ray cluster (``runtime.ray_address``) the driver cannot see the workers' devices: an
``auto`` it cannot resolve stays ``auto`` in the fingerprint and each worker resolves it on its
own device. Pin ``runtime.device``, ``dtype`` and ``batch_size`` on a cluster of mixed machines.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

AUTO = "auto"
# runtime.batch_size on a CPU: the decode loop's matmuls are already large enough there.
CPU_BATCH = 16
# The most images an auto batch holds: past it a GPU is busy anyway, and a shard's first
# batch (and its one-by-one retry after a failure) only grows.
MAX_AUTO_BATCH = 256
# The share of a GPU's memory, beyond the weights, that the batch's activations may use (the
# rest: the caching allocator's fragmentation, the decode loop's transient tensors).
MEMORY_SHARE = 0.5
# Activations of one transformer layer in flight, in units of (tokens x hidden): q, k, v,
# the attention output and the 4x MLP.
LAYER_WIDTH = 12
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class DeviceFacts:
    """What the device the models will run on can do, as far as the run's start can tell."""

    kind: str  # cpu, cuda, or auto: a cluster's workers decide
    memory_bytes: int | None = None  # the GPU's total memory
    bf16: bool = False  # the GPU computes in bfloat16


def local_facts(device: str) -> DeviceFacts:
    """The facts of this machine's device for ``runtime.device``."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return DeviceFacts("cpu" if device != "cuda" else "cuda")
    props = torch.cuda.get_device_properties(0)
    return DeviceFacts("cuda", int(props.total_memory), bool(torch.cuda.is_bf16_supported()))


def run_facts(runtime) -> DeviceFacts:
    """This machine's facts for a local run; on a cluster only what the config pins."""
    if runtime.ray_address is not None and runtime.device == AUTO:
        return DeviceFacts(AUTO)
    if runtime.ray_address is not None:
        return DeviceFacts(runtime.device)
    return local_facts(runtime.device)


def resolve_runtime(runtime, facts: DeviceFacts, per_image_bytes: int | None = None,
                    weight_bytes: int = 0):
    """``runtime`` with each ``auto`` of device, dtype and batch size replaced by what ``facts``
    give, and ``tf32`` as it takes effect (only float32 on CUDA). What the facts cannot decide
    (a cluster's ``auto`` device) stays ``auto``."""
    device = runtime.device if runtime.device != AUTO else facts.kind
    dtype = runtime.dtype
    if dtype == AUTO and device != AUTO:
        dtype = auto_dtype(device, facts.bf16)
    batch = runtime.batch_size
    if batch == AUTO and device == "cpu":
        batch = CPU_BATCH
    elif batch == AUTO and device == "cuda" and facts.memory_bytes and per_image_bytes:
        batch = gpu_batch(facts.memory_bytes, weight_bytes, per_image_bytes)
    tf32 = runtime.tf32 and device in ("cuda", AUTO) and dtype in ("float32", AUTO)
    return dataclasses.replace(runtime, device=device, dtype=dtype, batch_size=batch, tf32=tf32)


def auto_dtype(device: str, bf16: bool) -> str:
    """``runtime.dtype: auto``: bfloat16 on a GPU that has it, else float32."""
    return "bfloat16" if device == "cuda" and bf16 else "float32"


def gpu_batch(memory_bytes: int, weight_bytes: int, per_image_bytes: int) -> int:
    """The largest power of two of images whose activations fit ``MEMORY_SHARE`` of the GPU's
    memory beyond the weights, at most ``MAX_AUTO_BATCH``."""
    room = MEMORY_SHARE * max(memory_bytes - weight_bytes, 0)
    fits = max(int(room // max(per_image_bytes, 1)), 1)
    return min(2 ** int(math.log2(fits)), MAX_AUTO_BATCH)


@dataclass(frozen=True)
class Held:
    """One model a worker holds, as the memory estimate sees it: its slot (captioner, filter,
    score), its kind (``slots.py``: blip, blip2, clip, siglip) and its ``config.json``."""

    slot: str
    kind: str
    config: dict[str, Any]


def held(slot: str, setting: str, config: dict[str, Any], name: str) -> Held:
    """``Held`` of a checkpoint's ``config.json``, its kind as its slot reads it."""
    from capfilt.models.slots import slot_kind

    return Held(slot, slot_kind("filter" if slot == "score" else slot, setting, config, name), config)


def _tower(part: dict[str, Any]) -> tuple[int, int, int, int, int]:
    """(hidden, layers, feed-forward width, heads, vocabulary) of one tower's config, under the
    names BERT, ViT, OPT and T5 configs give them."""
    hidden = part.get("hidden_size") or part.get("d_model") or 768
    layers = part.get("num_hidden_layers") or part.get("num_layers") or 12
    ffn = part.get("intermediate_size") or part.get("ffn_dim") or part.get("d_ff") or 4 * hidden
    heads = part.get("num_attention_heads") or part.get("num_heads") or 12
    return hidden, layers, ffn, heads, part.get("vocab_size") or 0


def _vision_tokens(vision: dict[str, Any]) -> int:
    return (vision.get("image_size", 384) // vision.get("patch_size", 16)) ** 2 + 1


def _towers(model: Held) -> list[tuple[dict[str, Any], int]]:
    """Each tower the model runs, with the layers of it that cross-attend: BLIP's text model in every
    layer, the Q-Former every ``cross_attention_frequency``-th, a T5 decoder in each of its own. A
    BLIP-2 retrieval checkpoint's config carries a ``text_config`` it has no model for."""
    cfg = model.config
    vision, text, qformer = cfg.get("vision_config", {}), cfg.get("text_config", {}), cfg.get("qformer_config")
    if model.kind == "blip":
        return [(vision, 0), (text, _tower(text)[1])]
    if model.kind == "blip2":
        q_layers = _tower(qformer or {})[1]
        towers = [(vision, 0), (qformer or {}, -(-q_layers // (qformer or {}).get("cross_attention_frequency", 2)))]
        if model.slot == "captioner":
            decoder_layers = text.get("num_decoder_layers") or 0  # T5: an encoder and a decoder
            towers.append((text, 0))  # OPT: no cross-attention; T5: its encoder
            if decoder_layers:
                towers.append(({**text, "num_layers": decoder_layers, "vocab_size": 0}, decoder_layers))
        return towers
    return [(vision, 0), (text, 0)]  # clip, siglip: two towers side by side


def weight_bytes(models: list[Held], dtype: str) -> int:
    """The models' weights on the device: per layer 4 hidden² of attention, 4 more where it
    cross-attends, and 2 hidden x feed-forward (3 gated); and the embeddings (and an untied head).
    Within 2% of the parameters of BLIP, BLIP-2 (OPT, Flan-T5, ITM) and CLIP checkpoints, 5% of SigLIP's
    (tests/test_defaults.py)."""
    size = DTYPE_BYTES[dtype if dtype in DTYPE_BYTES else "float32"]
    params = 0
    for model in models:
        for part, cross in _towers(model):
            hidden, layers, ffn, _, vocab = _tower(part)
            gated = str(part.get("feed_forward_proj", "")).startswith("gated")  # T5 v1.1: two inputs
            params += layers * (4 * hidden * hidden + (3 if gated else 2) * hidden * ffn) + cross * 4 * hidden * hidden
            params += vocab * hidden * (1 if part.get("tie_word_embeddings", True) else 2)  # an untied head
    return params * size


def per_image_bytes(models: list[Held], num_captions: int, max_length: int, max_text_tokens: int,
                    dtype: str) -> int:
    """An estimate of the device memory one image of a batch takes in the models a worker holds,
    from their ``config.json``: each vision pass's layer in flight and its output; a captioner's
    cross-attention keys and values once per image (shared_kv), its captions' key-value cache
    (BLIP-2's over the query tokens too) and float32 logits; a filter's or scorer's text pass over
    every text (a BLIP-2 filter's with the queries, against the image's states repeated per text).
    ``make gpu-check`` records the peak memory it measures beside it."""
    size = DTYPE_BYTES[dtype if dtype in DTYPE_BYTES else "float32"]
    texts = num_captions + 1  # the captions and the web text
    total = 0
    for model in models:
        vision = model.config.get("vision_config", {})
        tokens = _vision_tokens(vision)
        v_hidden = _tower(vision)[0]
        total += tokens * v_hidden * (LAYER_WIDTH + 1) * size  # a vision layer in flight, the output
        text = model.config.get("text_config", {})
        t_hidden, t_layers, _, heads, vocab = _tower(text)
        queries = model.config.get("num_query_tokens", 32)
        if model.kind == "blip":
            total += 2 * t_layers * tokens * t_hidden * size  # cross-attention keys and values, once
        if model.slot == "captioner":
            prefix = queries if model.kind == "blip2" else 0
            total += num_captions * (2 * t_layers * (prefix + max_length) * t_hidden * size  # the kv cache
                                     + 3 * (vocab or 30524) * 4)  # float32 logits
        elif model.kind == "blip":
            total += texts * max_text_tokens * (t_hidden * LAYER_WIDTH + heads * tokens) * size
        elif model.kind == "blip2":
            q_hidden, _, _, q_heads, _ = _tower(model.config.get("qformer_config") or {})
            total += texts * ((queries + max_text_tokens) * q_hidden * LAYER_WIDTH  # the Q-Former's pass
                              + q_heads * queries * tokens + tokens * v_hidden) * size  # cross-attention
        else:  # clip, siglip: the text tower alone
            positions = text.get("max_position_embeddings") or max_text_tokens
            total += texts * min(positions, max_text_tokens if model.slot == "filter" else positions) \
                * t_hidden * LAYER_WIDTH * size
    return total


def sized(runtime, facts: DeviceFacts, models: list[Held], captioner_cfg, filter_cfg):
    """``resolve_runtime`` with the batch sized from the held models' ``config.json`` and the
    sections' lengths: the one way a GPU's auto batch is worked out."""
    dtype = resolve_runtime(runtime, facts).dtype
    return resolve_runtime(runtime, facts, per_image_bytes(
        models, captioner_cfg.num_captions, captioner_cfg.max_length, filter_cfg.max_text_tokens, dtype),
        weight_bytes(models, dtype))


def config_models(config) -> list[Held]:
    """The models a run's workers will hold, from each checkpoint's ``config.json`` (read before
    any worker starts): the captioner, the filter and each recorded score's."""
    from capfilt.models.loading import check_checkpoint

    sections = [("captioner", "captioner.model", config.captioner), ("filter", "filter.model", config.filter)]
    sections += [("score", f"scores[{i}].model", s) for i, s in enumerate(config.scores)]
    return [held(slot, section.kind, check_checkpoint(key, section.model, section.revision), section.model)
            for slot, key, section in sections]


def resolved_config(config):
    """``config`` with its runtime resolved for a run started here: on a GPU the batch is sized
    from the checkpoints' ``config.json`` (read before any worker starts)."""
    rt = config.runtime
    facts = run_facts(rt)
    runtime = resolve_runtime(rt, facts)
    if runtime.batch_size == AUTO and runtime.device == "cuda" and facts.memory_bytes:
        runtime = sized(rt, facts, config_models(config), config.captioner, config.filter)
    return dataclasses.replace(config, runtime=runtime)


def worker_runtime(runtime, models: list[Held] | None = None, captioner_cfg=None, filter_cfg=None):
    """On a worker, what is still ``auto`` (a cluster's), resolved on the worker's own device;
    the batch size once the held models' configs are at hand."""
    facts = local_facts(runtime.device)
    if models is None or runtime.batch_size != AUTO:
        return resolve_runtime(runtime, facts)
    return sized(runtime, facts, models, captioner_cfg, filter_cfg)


def apply_precision(runtime) -> None:
    """This process's float32 matmuls on CUDA in TF32 when ``runtime.tf32`` takes effect."""
    import torch

    if runtime.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(runtime.tf32)
        torch.backends.cudnn.allow_tf32 = bool(runtime.tf32)
