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


def per_image_bytes(captioner: dict[str, Any], itm: dict[str, Any], num_captions: int,
                    max_length: int, max_text_tokens: int, dtype: str) -> int:
    """An estimate of the device memory one image of a batch takes in both models, from the
    checkpoints' ``config.json``: the vision pass's layer in flight and its output, the
    cross-attention keys and values projected once per image (shared_kv), the captions'
    key-value cache and logits, and the filter's text pass over every text with its
    cross-attention scores. ``make gpu-check`` records the peak memory it measures beside it."""
    size = DTYPE_BYTES[dtype if dtype in DTYPE_BYTES else "float32"]
    texts = num_captions + 1  # the captions and the web text
    total = 0
    for cfg, slot in ((captioner, "captioner"), (itm, "filter")):
        vision, text = cfg.get("vision_config", {}), cfg.get("text_config", {})
        tokens = (vision.get("image_size", 384) // vision.get("patch_size", 16)) ** 2 + 1
        v_hidden = vision.get("hidden_size", 768)
        t_hidden, t_layers = text.get("hidden_size", 768), text.get("num_hidden_layers", 12)
        heads = text.get("num_attention_heads", 12)
        total += tokens * v_hidden * (LAYER_WIDTH + 1) * size  # a vision layer in flight, the output
        total += 2 * t_layers * tokens * t_hidden * size  # cross-attention keys and values
        if slot == "captioner":
            total += num_captions * (2 * t_layers * max_length * t_hidden * size  # the kv cache
                                     + 3 * text.get("vocab_size", 30524) * 4)  # float32 logits
        else:
            total += texts * max_text_tokens * (t_hidden * LAYER_WIDTH + heads * tokens) * size
    return total


def weight_bytes(captioner: dict[str, Any], itm: dict[str, Any], dtype: str) -> int:
    """Both models' weights on the device: 12 hidden² per transformer layer (16 for a text layer,
    with its cross-attention), and the embeddings."""
    size = DTYPE_BYTES[dtype if dtype in DTYPE_BYTES else "float32"]
    params = 0
    for cfg in (captioner, itm):
        for part in (cfg.get("vision_config", {}), cfg.get("text_config", {})):
            hidden, layers = part.get("hidden_size", 768), part.get("num_hidden_layers", 12)
            params += layers * hidden * hidden * (16 if part is cfg.get("text_config") else 12)
            params += part.get("vocab_size", 0) * hidden
    return params * size


def sized(runtime, facts: DeviceFacts, captioner: dict[str, Any], itm: dict[str, Any], captioner_cfg,
          filter_cfg):
    """``resolve_runtime`` with the batch sized from the checkpoints' ``config.json`` (``captioner``,
    ``itm``) and their sections' lengths: the one way a GPU's auto batch is worked out."""
    dtype = resolve_runtime(runtime, facts).dtype
    return resolve_runtime(runtime, facts, per_image_bytes(
        captioner, itm, captioner_cfg.num_captions, captioner_cfg.max_length, filter_cfg.max_text_tokens,
        dtype), weight_bytes(captioner, itm, dtype))


def resolved_config(config):
    """``config`` with its runtime resolved for a run started here: on a GPU the batch is sized
    from the checkpoints' ``config.json`` (read before any worker starts)."""
    from capfilt.models.loading import check_checkpoint

    rt = config.runtime
    facts = run_facts(rt)
    runtime = resolve_runtime(rt, facts)
    if runtime.batch_size == AUTO and runtime.device == "cuda" and facts.memory_bytes:
        cap = check_checkpoint("captioner.model", config.captioner.model, config.captioner.revision)
        itm = check_checkpoint("filter.model", config.filter.model, config.filter.revision)
        runtime = sized(rt, facts, cap, itm, config.captioner, config.filter)
    return dataclasses.replace(config, runtime=runtime)


def worker_runtime(runtime, captioner: dict[str, Any] | None = None, itm: dict[str, Any] | None = None,
                   captioner_cfg=None, filter_cfg=None):
    """On a worker, what is still ``auto`` (a cluster's), resolved on the worker's own device;
    the batch size once the models' configs are at hand."""
    facts = local_facts(runtime.device)
    if captioner is None or runtime.batch_size != AUTO:
        return resolve_runtime(runtime, facts)
    return sized(runtime, facts, captioner, itm, captioner_cfg, filter_cfg)


def apply_precision(runtime) -> None:
    """This process's float32 matmuls on CUDA in TF32 when ``runtime.tf32`` takes effect."""
    import torch

    if runtime.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(runtime.tf32)
        torch.backends.cudnn.allow_tf32 = bool(runtime.tf32)
