"""What `auto` resolves to for device, dtype, batch size and TF32 (issue 15: GPU defaults), and
that the fingerprint records the resolved values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BlipConfig

from capfilt.config import load_config
from pipelines import bench
from capfilt.identity import fingerprint, output_identity
from capfilt.runtime.defaults import (CPU_BATCH, MAX_AUTO_BATCH, DeviceFacts, Held, apply_precision, gpu_batch,
                                      per_image_bytes, resolve_runtime, weight_bytes)

LARGE = str(Path(__file__).resolve().parent.parent / "configs" / "blip_large.yaml")
GiB = 2 ** 30
H100 = DeviceFacts("cuda", 80 * GiB, bf16=True)
BASE = BlipConfig().to_dict()  # transformers' defaults are BLIP-base's shape


def blip(cfg=BASE):
    return [Held("captioner", "blip", cfg), Held("filter", "blip", cfg)]


def runtime(*overrides):
    return load_config(LARGE, list(overrides)).runtime


def test_a_cpu_keeps_float32_and_the_cpu_batch():
    rt = resolve_runtime(runtime(), DeviceFacts("cpu"))
    assert (rt.device, rt.dtype, rt.batch_size, rt.tf32) == ("cpu", "float32", CPU_BATCH, False)


def test_a_gpu_gets_bfloat16_and_a_batch_from_its_memory():
    per_image = per_image_bytes(blip(), 5, 20, 35, "bfloat16")
    weights = weight_bytes(blip(), "bfloat16")
    rt = resolve_runtime(runtime(), H100, per_image, weights)
    assert (rt.device, rt.dtype, rt.batch_size, rt.tf32) == ("cuda", "bfloat16", MAX_AUTO_BATCH, False)
    small = resolve_runtime(runtime(), DeviceFacts("cuda", 16 * GiB, bf16=True), per_image, weights)
    assert small.batch_size == 64  # half of (16 GiB - 0.9 GB) over ~77 MB an image: 106, down to 64
    # A GPU without bfloat16 computes in float32 with TF32 matmuls.
    old = resolve_runtime(runtime(), DeviceFacts("cuda", 16 * GiB, bf16=False), per_image, weights)
    assert (old.dtype, old.tf32) == ("float32", True)
    assert resolve_runtime(runtime("runtime.tf32=false", "runtime.dtype=float32"), H100).tf32 is False


def test_what_the_config_pins_wins():
    rt = resolve_runtime(runtime("runtime.dtype=float16", "runtime.batch_size=12"), H100, 1, 0)
    assert (rt.dtype, rt.batch_size) == ("float16", 12)


def test_the_batch_is_a_power_of_two_within_the_memory_share():
    assert gpu_batch(10 * GiB, 2 * GiB, 100 * 2 ** 20) == 32  # 4 GiB / 100 MiB = 40.9
    assert gpu_batch(10 * GiB, 11 * GiB, 100) == 1  # weights beyond the memory: still one image
    assert gpu_batch(1000 * GiB, 0, 1) == MAX_AUTO_BATCH


def test_the_fingerprint_records_the_resolved_runtime():
    identity = output_identity(load_config(LARGE), {"captioner": None, "filter": None})
    # This machine has no GPU: auto resolves to the CPU's settings, the same as pinning them.
    assert identity["runtime"] == {"seed": 0, "dtype": "float32", "batch_size": CPU_BATCH, "tf32": False,
                                   "device": "cpu"}
    pinned = ["runtime.device=cpu", "runtime.dtype=float32", f"runtime.batch_size={CPU_BATCH}"]
    assert fingerprint(identity) == fingerprint(output_identity(load_config(LARGE, pinned),
                                                                {"captioner": None, "filter": None}))
    # On a cluster the workers decide what auto is: it stays auto.
    cluster = output_identity(load_config(LARGE, ["runtime.ray_address=10.0.0.1:6379"]), {})
    assert cluster["runtime"]["dtype"] == "auto" and cluster["runtime"]["batch_size"] == "auto"


def test_tf32_is_set_for_a_cuda_worker_only():
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        apply_precision(resolve_runtime(runtime("runtime.device=cpu"), DeviceFacts("cpu")))
        assert torch.backends.cuda.matmul.allow_tf32 is False
        apply_precision(resolve_runtime(runtime("runtime.device=cuda", "runtime.dtype=float32"),
                                        DeviceFacts("cuda", 80 * GiB)))
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("shape", ["base", "large"])
def test_the_estimate_grows_with_the_shape_and_the_captions(shape):
    cfg = BASE if shape == "base" else BlipConfig(vision_config={"hidden_size": 1024, "num_hidden_layers": 24}).to_dict()
    five = per_image_bytes(blip(cfg), 5, 20, 35, "bfloat16")
    assert 40e6 < five < 150e6  # tens of MB an image: the cross-attention keys and values lead
    assert per_image_bytes(blip(cfg), 20, 20, 35, "bfloat16") > five
    assert per_image_bytes(blip(cfg), 5, 20, 35, "float32") == pytest.approx(2 * five, rel=0.2)


def test_sized_takes_the_lengths_from_the_config_sections():
    from capfilt.runtime.defaults import sized

    config = load_config(LARGE, ["captioner.num_captions=40"])
    small = DeviceFacts("cuda", 16 * GiB, bf16=True)
    rt = sized(config.runtime, small, blip(), config.captioner, config.filter)
    per_image = per_image_bytes(blip(), 40, 20, 35, "bfloat16")
    assert rt.batch_size == gpu_batch(16 * GiB, weight_bytes(blip(), "bfloat16"), per_image) == 32


# Real checkpoints' widths (their hub config.json), as make bench builds them, on the meta device here:
# no memory, no weights read.
REAL = bench.WIDTHS["real"]
VIT_G, OPT_2_7B = REAL["vit_g"], {**REAL["opt"], "model_type": "opt"}
FLAN_T5_XL = dict(model_type="t5", d_model=2048, num_layers=24, num_decoder_layers=24, num_heads=32, d_ff=5120,
                  d_kv=64, vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
CLIP_L14 = dict(vision_config=REAL["clip_vision"], text_config=REAL["clip_text"],
                projection_dim=REAL["clip_projection"])


def shapes():
    import transformers as T

    return {
        "blip-base captioner": ("captioner", "blip", T.BlipForConditionalGeneration, T.BlipConfig()),
        "blip-base filter": ("filter", "blip", T.BlipForImageTextRetrieval, T.BlipConfig()),
        "blip2-opt-2.7b": ("captioner", "blip2", T.Blip2ForConditionalGeneration,
                           T.Blip2Config(vision_config=VIT_G, text_config=OPT_2_7B)),
        "blip2-flan-t5-xl": ("captioner", "blip2", T.Blip2ForConditionalGeneration,
                             T.Blip2Config(vision_config=VIT_G, text_config=FLAN_T5_XL)),
        "blip2-itm-vit-g": ("filter", "blip2", T.Blip2ForImageTextRetrieval, T.Blip2Config(vision_config=VIT_G)),
        "clip-vit-large-patch14": ("score", "clip", T.CLIPModel, T.CLIPConfig(**CLIP_L14)),
    }


@pytest.mark.parametrize("name", list(shapes()))
def test_the_weights_estimate_is_each_kinds_parameter_count(name):
    slot, kind, cls, cfg = shapes()[name]
    with torch.device("meta"):
        params = sum(p.numel() for p in cls(cfg).parameters())
    assert weight_bytes([Held(slot, kind, cfg.to_dict())], "bfloat16") == pytest.approx(2 * params, rel=0.02)


def test_a_blip2_worker_and_recorded_scores_are_sized_with_what_they_hold():
    from capfilt.runtime.defaults import sized

    models = {name: Held(slot, kind, cfg.to_dict()) for name, (slot, kind, _, cfg) in shapes().items()}
    config = load_config(LARGE)
    blip2 = [models["blip2-opt-2.7b"], models["blip2-itm-vit-g"]]
    rt = sized(config.runtime, H100, blip2, config.captioner, config.filter)
    per_image = per_image_bytes(blip2, 5, 20, 35, "bfloat16")
    assert rt.batch_size == gpu_batch(H100.memory_bytes, weight_bytes(blip2, "bfloat16"), per_image)
    # The OPT decoder's cache over the 32 query tokens and 20 new ones, 5 captions: more an image than BLIP-base.
    assert per_image > per_image_bytes(blip(), 5, 20, 35, "bfloat16")
    # A recorded score's model takes its share of the memory and of each image.
    scored = blip2 + [models["clip-vit-large-patch14"]]
    assert weight_bytes(scored, "bfloat16") - weight_bytes(blip2, "bfloat16") == pytest.approx(2 * 428e6, rel=0.02)
    assert per_image_bytes(scored, 5, 20, 35, "bfloat16") > per_image
    small = DeviceFacts("cuda", 24 * GiB, bf16=True)
    assert sized(config.runtime, small, scored, config.captioner, config.filter).batch_size < \
        sized(config.runtime, small, blip2, config.captioner, config.filter).batch_size
