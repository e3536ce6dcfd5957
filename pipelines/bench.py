"""``make bench``: capfilt against the naive transformers loop, on the same models and shards.

    python -m pipelines.bench --shape base --images 16      # BLIP-base: ViT-B/16 at 384, BERT-base
    python -m pipelines.bench --shape small --images 32     # a few minutes on 2 CPU cores
    python -m pipelines.bench --device cuda --images 2048 --batch-size 256   # on a GPU
    python -m pipelines.bench --only decode                  # decode and preprocess only, a minute
    python -m pipelines.bench --only select                  # select vs a tarfile loop only, a minute
    python -m pipelines.bench --models blip2-opt-2.7b --dtypes bfloat16 --naive-dtype bfloat16 \
        --skip decode --skip select --skip end-to-end --images 4 --batch-size 4   # BLIP-2 OPT-2.7b
    python -m pipelines.bench --models clip-l14 --skip decode --skip select --images 8   # CLIP L/14 decides

Models have random weights (no hub offline), saved with save_pretrained and loaded as users' are.
``--models`` picks them: ``blip`` (default), BLIP of ``--shape`` in both slots; ``blip2-opt-2.7b``,
Blip2ForConditionalGeneration at Salesforce/blip2-opt-2.7b's widths (ViT-g, Q-Former, OPT-2.7b)
captions and Blip2ForImageTextRetrieval at blip2-itm-vit-g's decides; ``clip-l14``, BLIP of
``--shape`` captions and CLIPModel at openai/clip-vit-large-patch14's widths decides
(``filter.kind: clip``). ``--size tiny`` gives those two tiny widths (tests), ``--depth-fraction``
fewer layers at the real widths. In one run it measures:
0. decode: capfilt's prepare on one thread, before issue 15 and now, on 1024x768 and 384x384 JPEGs;
1. naive: ``BlipForConditionalGeneration.generate(do_sample=True, num_return_sequences=N)`` per
   batch, then ``BlipForImageTextRetrieval(...)`` on every (image, text) pair, as a user would write
   (BLIP-2: ``Blip2ForConditionalGeneration.generate``, then
   ``Blip2ForImageTextRetrieval(..., use_image_text_matching_head=True)`` per pair; CLIP: ``CLIPModel``
   per pair);
2. model-only: capfilt's own model calls (``CapFiltStep.process_batch``) on pre-decoded tensors;
3. end to end: ``capfilt run`` from tar to tar through Ray;
4. select: ``capfilt select`` against a plain tarfile loop, in samples/s (pipelines/select_bench.py).
It prints images/s and the ratios, for each dtype, and writes them to OUTPUT/bench.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import sys
import time
from typing import Any

from pipelines import select_bench

SHAPES = {
    # image, patch, hidden, layers, heads, intermediate
    "base": dict(image_size=384, patch_size=16, hidden=768, layers=12, heads=12, intermediate=3072),
    "small": dict(image_size=224, patch_size=16, hidden=256, layers=4, heads=4, intermediate=1024),
}
SHAPES["tiny"] = dict(image_size=32, patch_size=16, hidden=32, layers=1, heads=2, intermediate=64)  # smoke tests
VOCAB = 30524  # BERT's, as BLIP's

# --models: what fills the two slots. blip: BLIP of --shape in both. blip2-opt-2.7b: BLIP-2's
# captioner and ITM filter. clip-l14: BLIP of --shape captions, CLIP ViT-L/14 decides.
MODELS = ("blip", "blip2-opt-2.7b", "clip-l14")
# Real widths of the hub checkpoints (--size real), or tiny ones for smoke tests (--size tiny):
# Salesforce/blip2-opt-2.7b (ViT-g, Q-Former, OPT-2.7b), Salesforce/blip2-itm-vit-g, and
# openai/clip-vit-large-patch14. --depth-fraction scales every stack's depth, never a width.
WIDTHS = {
    "real": {
        "vit_g": dict(hidden_size=1408, num_hidden_layers=39, num_attention_heads=16, intermediate_size=6144,
                      image_size=224, patch_size=14),
        "qformer": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        cross_attention_frequency=2),
        "opt": dict(hidden_size=2560, word_embed_proj_dim=2560, num_hidden_layers=32, num_attention_heads=32,
                    ffn_dim=10240, vocab_size=50272, max_position_embeddings=2048),
        "queries": 32, "itm_hidden": 256,
        "clip_vision": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                            image_size=224, patch_size=14),
        "clip_text": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                          max_position_embeddings=77, vocab_size=49408),
        "clip_projection": 768,
    },
    "tiny": {
        "vit_g": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      image_size=28, patch_size=14),
        "qformer": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        cross_attention_frequency=2),
        "opt": dict(hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=2, num_attention_heads=2,
                    ffn_dim=64, vocab_size=1000, max_position_embeddings=128),
        "queries": 4, "itm_hidden": 32,
        "clip_vision": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            image_size=28, patch_size=14),
        "clip_text": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          max_position_embeddings=77, vocab_size=1000),
        "clip_projection": 32,
    },
}
# BLIP-2's captions here are 20 new tokens, at least 5, where configs/blip2_opt.yaml (LAVIS) says 30
# and 8: a run on 2 cores then stays under 10 minutes.
BLIP2_LENGTHS = dict(max_length=20, min_length=5)


def blip2_captioning() -> dict[str, Any]:
    """BLIP-2's captioning as configs/blip2_opt.yaml sets it (LAVIS's blip2_opt.py), at
    ``BLIP2_LENGTHS``: the same in capfilt and the naive loop."""
    from capfilt.config import load_config

    cap = load_config("configs/blip2_opt.yaml").captioner
    return dict(prompt=cap.prompt, top_p=cap.top_p, top_k=cap.top_k, repetition_penalty=cap.repetition_penalty,
                **BLIP2_LENGTHS)


def build_models(folder: str, shape: str, slots: tuple[str, ...] = ("captioner", "filter")) -> tuple[str, str]:
    """BLIP of ``shape`` in ``folder/captioner`` and ``folder/filter`` (only those of ``slots``)."""
    import torch
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    from capfilt.models.tiny import save_checkpoint, tiny_config

    paths = (os.path.join(folder, "captioner"), os.path.join(folder, "filter"))
    classes = {"captioner": BlipForConditionalGeneration, "filter": BlipForImageTextRetrieval}
    tokenizer, size = None, SHAPES[shape]["image_size"]
    for slot, path in zip(classes, paths):
        if slot not in slots or os.path.exists(os.path.join(path, "model.safetensors")):
            continue
        tokenizer = tokenizer or bert_tokenizer(VOCAB)
        torch.manual_seed(0)
        save_checkpoint(classes[slot](tiny_config(tokenizer, **SHAPES[shape])), tokenizer, size, path)
    return paths


def bert_tokenizer(size: int):
    """BLIP's kind of tokenizer (WordPiece, [DEC], [ENC]) over the bench's words, filled to ``size``."""
    from capfilt.models.tiny import DEFAULT_WORDS, build_tokenizer

    base = build_tokenizer(DEFAULT_WORDS)
    return build_tokenizer(list(DEFAULT_WORDS) + [f"w{i}" for i in range(size - len(base))])


def opt_tokenizer(size: int):
    """OPT's kind of tokenizer (byte-level BPE; ``</s>`` is BOS and EOS and starts every text;
    ``<pad>``; the ``<image>`` token of the converted BLIP-2 checkpoints), trained on the bench's
    words and filled to ``size`` tokens that decode to `` w<i>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from capfilt.models.tiny import DEFAULT_WORDS

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<image>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(DEFAULT_WORDS), *(" " + w for w in DEFAULT_WORDS)], trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for i in range(size - len(vocab)):
        vocab[f"\u0120w{i}"] = len(vocab)  # Ġ: the byte-level space
    tok = Tokenizer.from_str(json.dumps(data))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<image>"], model_max_length=2048)


def random_model(model_cls, config, seed: int = 0):
    """``model_cls(config)`` in bfloat16 with random weights: normal (std 0.02), norms at one, biases
    at zero, CLIP's logit scale at log(1 / 0.07). transformers' own init of a 3.9B-parameter model
    takes minutes on 2 cores in float32; this takes seconds and never holds float32 weights."""
    import torch
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = model_cls._from_config(config, dtype=torch.bfloat16)
    model.tie_weights()  # OPT's output layer is its input embedding, as transformers' init ties them
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 0:
                param.fill_(2.6592)
            elif param.dim() == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return model


def scaled(stack: dict[str, Any], depth: float) -> dict[str, Any]:
    """``stack`` with ``depth`` of its layers (at least one), its widths unchanged."""
    return dict(stack, num_hidden_layers=max(1, round(stack["num_hidden_layers"] * depth)))


def build_blip2(folder: str, size: str, depth: float) -> tuple[str, str]:
    """Blip2ForConditionalGeneration (ViT-g, Q-Former, OPT-2.7b widths) in ``folder/captioner`` and
    Blip2ForImageTextRetrieval (ViT-g, Q-Former: blip2-itm-vit-g's) in ``folder/filter``."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, OPTConfig

    from capfilt.models.tiny import save_checkpoint

    w = WIDTHS[size]
    paths = (os.path.join(folder, "captioner"), os.path.join(folder, "filter"))
    if all(os.path.exists(os.path.join(p, "model.safetensors")) for p in paths):
        return paths
    vision, qformer, image_size = scaled(w["vit_g"], depth), scaled(w["qformer"], depth), w["vit_g"]["image_size"]
    opt_tok, bert_tok = opt_tokenizer(w["opt"]["vocab_size"]), bert_tokenizer(VOCAB if size == "real" else 1000)
    opt = OPTConfig(**scaled(w["opt"], depth), bos_token_id=opt_tok.bos_token_id, eos_token_id=opt_tok.eos_token_id,
                    pad_token_id=opt_tok.pad_token_id)
    captioner = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=opt,
                            num_query_tokens=w["queries"], image_token_index=opt_tok.convert_tokens_to_ids("<image>"))
    captioner = random_model(Blip2ForConditionalGeneration, captioner)
    save_checkpoint(captioner, opt_tok, image_size, paths[0])
    itm_qformer = dict(qformer, vocab_size=len(bert_tok), use_qformer_text_input=True)  # it reads texts
    itm = random_model(Blip2ForImageTextRetrieval, Blip2Config(
        vision_config=vision, qformer_config=itm_qformer, text_config=None, num_query_tokens=w["queries"],
        image_text_hidden_size=w["itm_hidden"]), seed=1)
    # BLIP-2 freezes its ViT-g: the hub's captioners and ITM checkpoint hold the same vision weights,
    # and capfilt then runs one vision pass per image for both (as it does with real checkpoints)
    itm.vision_model.load_state_dict(captioner.vision_model.state_dict())
    save_checkpoint(itm, bert_tok, image_size, paths[1])
    return paths


def build_clip(path: str, size: str, depth: float) -> str:
    """CLIPModel of openai/clip-vit-large-patch14's widths, with its preprocessing (shortest edge to
    224, centre crop). Its tokenizer is WordPiece, not CLIP's BPE, at CLIP's vocabulary size."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    w = WIDTHS[size]
    tok = bert_tokenizer(w["clip_text"]["vocab_size"])
    text = dict(scaled(w["clip_text"], depth), bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                pad_token_id=tok.pad_token_id, projection_dim=w["clip_projection"])
    config = CLIPConfig(text_config=text, vision_config=scaled(w["clip_vision"], depth),
                        projection_dim=w["clip_projection"])
    random_model(CLIPModel, config).save_pretrained(path)
    tok.save_pretrained(path)
    image_size = w["clip_vision"]["image_size"]
    CLIPImageProcessorPil(size={"shortest_edge": image_size},
                          crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def build_family(folder: str, models: str, shape: str, size: str, depth: float) -> tuple[str, str]:
    """The captioner's and the filter's checkpoint folders for ``--models``, built once."""
    if models == "blip":
        return build_models(os.path.join(folder, f"models_{shape}"), shape)
    tag = f"{size}" if depth == 1 else f"{size}_depth{depth:g}"
    if models == "blip2-opt-2.7b":
        return build_blip2(os.path.join(folder, f"models_blip2-opt-2.7b_{tag}"), size, depth)
    cap, _ = build_models(os.path.join(folder, f"models_{shape}"), shape, slots=("captioner",))
    return cap, build_clip(os.path.join(folder, f"models_clip-l14_{tag}", "filter"), size, depth)


def capfilt_overrides(models: str, cap: str, itm: str, num_captions: int, dtype: str, device: str) -> list[str]:
    """configs/blip_base.yaml's overrides that make capfilt run ``models`` as the naive loop runs them."""
    overrides = [f"captioner.model={cap}", f"filter.model={itm}", f"captioner.num_captions={num_captions}",
                 f"runtime.dtype={dtype}", f"runtime.device={device}"]
    if models == "blip2-opt-2.7b":
        overrides += [f"captioner.{key}={value}" for key, value in blip2_captioning().items()]
    if models == "clip-l14":
        overrides += ["filter.kind=clip", "filter.threshold=0.25"]
    return overrides


def write_shards(folder: str, images: int, shards: int) -> list[str]:
    import webdataset as wds
    from PIL import Image, ImageDraw

    from capfilt.models.tiny import DEFAULT_WORDS

    os.makedirs(folder, exist_ok=True)
    rng = random.Random(0)
    per = -(-images // shards)
    paths = []
    for s in range(shards):
        path = os.path.join(folder, f"{s:05d}.tar")
        with wds.TarWriter(path, encoder=False) as tar:
            for i in range(s * per, min(images, (s + 1) * per)):
                img = Image.new("RGB", (480, 360), tuple(rng.randrange(256) for _ in range(3)))
                draw = ImageDraw.Draw(img)
                for _ in range(5):
                    x, y = rng.randrange(400), rng.randrange(300)
                    draw.ellipse((x, y, x + 80, y + 60), fill=tuple(rng.randrange(256) for _ in range(3)))
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                text = " ".join(rng.choice(DEFAULT_WORDS) for _ in range(rng.randint(4, 12)))
                tar.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": text.encode(),
                           "json": json.dumps({"url": f"http://127.0.0.1/{i}.jpg"}).encode()})
        paths.append(path)
    return paths


DECODE_SIZES = ((1024, 768), (384, 384))


def photo_like_jpeg(size: tuple[int, int], seed: int) -> bytes:
    """A JPEG (quality 90) with a photo's mix of smooth gradients, edges and noise: flat
    synthetic images decode faster than real ones."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = random.Random(seed)
    width, height = size
    img = Image.merge("RGB", [Image.linear_gradient("L").rotate(rng.randrange(360)).resize(size),
                              Image.radial_gradient("L").resize(size), Image.effect_noise(size, 40)])
    draw = ImageDraw.Draw(img)
    for _ in range(30):
        x, y = rng.randrange(width), rng.randrange(height)
        draw.ellipse((x, y, x + rng.randrange(20, width // 3), y + rng.randrange(20, height // 3)),
                     fill=tuple(rng.randrange(256) for _ in range(3)))
    noise = Image.merge("RGB", [Image.effect_noise(size, 25)] * 3)
    img = Image.blend(img, noise, 0.25).filter(ImageFilter.GaussianBlur(0.7))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def prepare_before(step, sample) -> dict[str, Any]:
    """``CapFiltStep.prepare`` before issue 15: the whole JPEG decoded, then the processor's
    float32 output (resize, rescale and normalise on the decode thread)."""
    from capfilt.io.images import decode_rgb

    reader = step.config.reader
    image = decode_rgb(sample.image, reader.max_image_pixels, reader.image_formats)
    return {name: proc(images=image, return_tensors="np")["pixel_values"][0]
            for name, proc in step.processors.items()}


def decode(folder: str, image_size: int, images: int, repeats: int, batch: int) -> dict[str, Any]:
    """Decode-and-preprocess images/s on one thread (one core): before and now, alternating,
    the fastest of ``repeats`` kept. Now is what a decode thread does (``prepare``, then the
    batch stacked into uint8); the normalise it no longer does runs on the model's device,
    and is timed apart for a CPU device."""
    import numpy as np
    import torch

    from capfilt.config import load_config
    from capfilt.io.images import decode_rgb, model_input
    from capfilt.models.tiny import build_tiny_models
    from capfilt.prefetch import pixel_batch, stack_pixels
    from capfilt.sample import Sample
    from capfilt.step import CapFiltStep

    torch.set_num_threads(1)
    cap, itm = build_tiny_models(folder, image_size=image_size)  # prepare uses only their processors
    step = CapFiltStep(load_config("configs/tiny.yaml", [f"captioner.model={cap}", f"filter.model={itm}"]))

    def now(datas: list[bytes]) -> list[Sample]:
        samples = [step.prepare(Sample(key=str(i), image=d, image_ext="jpg")) for i, d in enumerate(datas)]
        for start in range(0, len(samples), batch):
            stack_pixels(samples[start:start + batch])
        return samples

    result: dict[str, Any] = {"model_image_size": image_size, "images": images, "threads": 1, "sizes": {}}
    for width, height in DECODE_SIZES:
        datas = [photo_like_jpeg((width, height), seed) for seed in range(images)]
        runs: dict[str, list[float]] = {"before": [], "now": []}
        for _ in range(repeats):
            for name, fn in (("before", lambda: [prepare_before(step, Sample(key="", image=d)) for d in datas]),
                             ("now", lambda: now(datas))):
                start = time.perf_counter()
                fn()
                runs[name].append(images / (time.perf_counter() - start))
        proc = step.processors["captioner"]
        full = [model_input(proc).resize(decode_rgb(d, 10**9)) for d in datas]  # the resize of a whole decode
        drafted = [s.pixels["captioner"].batch[s.pixels["captioner"].index].numpy() for s in now(datas)]
        levels = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(full, drafted)]
        result["sizes"][f"{width}x{height}"] = {
            "jpeg_kb": round(sum(map(len, datas)) / images / 1024, 1),
            "before_images_per_s": max(runs["before"]), "now_images_per_s": max(runs["now"]),
            "all_before": runs["before"], "all_now": runs["now"],
            "now/before": max(runs["now"]) / max(runs["before"]),
            # each repeat's now against the before just ahead of it: less at the mercy of one fast spell
            "now/before_per_repeat": [n / b for n, b in zip(runs["now"], runs["before"])],
            # what reduced-scale decoding changes at the model's input, in uint8 levels
            "mean_abs_diff_vs_whole_decode": float(np.mean(levels))}
    rows = [s.pixels["captioner"] for s in now(datas)]
    start = time.perf_counter()
    model_input(proc).normalise(pixel_batch(rows), torch.float32)
    result["normalise_on_cpu_images_per_s"] = len(rows) / (time.perf_counter() - start)
    return result


def report_decode(result: dict[str, Any]) -> None:
    print(f"\ndecode and preprocess, one thread, model input {result['model_image_size']}, "
          f"{result['images']} JPEGs of each size:")
    for size, r in result["sizes"].items():
        print(f"  {size:<9} before {r['before_images_per_s']:7.1f} images/s, now {r['now_images_per_s']:7.1f} "
              f"images/s: {r['now/before']:.2f}x (per repeat: "
              f"{', '.join(f'{x:.2f}' for x in r['now/before_per_repeat'])}; {r['jpeg_kb']} kB each; "
              f"now differs from a whole decode "
              f"by {r['mean_abs_diff_vs_whole_decode']:.2f} levels on average)")
    print(f"  normalise on a CPU device: {result['normalise_on_cpu_images_per_s']:.0f} images/s")


def load_samples(paths: list[str]):
    from capfilt.io.reader import read_shard

    return [s for p in paths for s in read_shard(p)]


def naive(cap_path: str, itm_path: str, paths: list[str], batch: int, n: int, device: str = "cpu",
          models: str = "blip", dtype: str = "float32") -> dict[str, Any]:
    """What a user writes with plain transformers: ``generate(do_sample=True,
    num_return_sequences=n)`` per batch of images, then one forward of the filter model per
    (image, text) pair, which encodes the image again for every text."""
    import torch
    from PIL import Image

    torch_dtype = getattr(torch, dtype)
    caption = NAIVE_CAPTIONERS[models](cap_path, device, torch_dtype, n)
    prepare, score = NAIVE_FILTERS[models](itm_path, device, torch_dtype)
    samples = load_samples(paths)

    @torch.no_grad()
    def loop():
        for i in range(0, len(samples), batch):
            chunk = samples[i:i + batch]
            images = [Image.open(io.BytesIO(s.image)).convert("RGB") for s in chunk]
            pixels, captions = caption(images)
            pixels = prepare(images, pixels)
            for j, sample in enumerate(chunk):
                for text in [sample.web_text] + captions[j]:
                    score(pixels[j:j + 1], text)

    return timed(device, len(samples), loop)


def naive_blip_captioner(path: str, device: str, dtype, n: int):
    """images -> (pixels, n captions per image): ``BlipForConditionalGeneration.generate``."""
    from transformers import AutoTokenizer, BlipForConditionalGeneration
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    captioner = BlipForConditionalGeneration.from_pretrained(path, dtype=dtype).eval().to(device)
    processor = BlipImageProcessorPil.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)

    def caption(images):
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device, dtype)
        prompt = tokenizer(["a picture of "] * len(images), return_tensors="pt").to(device)
        out = captioner.generate(pixel_values=pixels, input_ids=prompt.input_ids,
                                 attention_mask=prompt.attention_mask, do_sample=True, top_p=0.9,
                                 max_length=20, min_length=5, repetition_penalty=1.1, num_return_sequences=n)
        captions = tokenizer.batch_decode(out, skip_special_tokens=True)
        return pixels, [captions[j * n:(j + 1) * n] for j in range(len(images))]

    return caption


def naive_blip2_captioner(path: str, device: str, dtype, n: int):
    """images -> (pixels, n captions per image): ``Blip2ForConditionalGeneration.generate`` with
    the input ids Blip2Processor writes (one image token per query, then the prompt)."""
    import torch
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    captioner = Blip2ForConditionalGeneration.from_pretrained(path, dtype=dtype).eval().to(device)
    processor = BlipImageProcessorPil.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    c, config = blip2_captioning(), captioner.config
    prompt = [config.image_token_index] * config.num_query_tokens + tokenizer(c["prompt"]).input_ids

    def caption(images):
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device, dtype)
        ids = torch.tensor([prompt] * len(images), device=device)
        out = captioner.generate(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids),
                                 do_sample=True, top_p=c["top_p"], top_k=c["top_k"], max_new_tokens=c["max_length"],
                                 min_new_tokens=c["min_length"], repetition_penalty=c["repetition_penalty"],
                                 num_return_sequences=n)
        captions = [t.strip() for t in tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]
        return pixels, [captions[j * n:(j + 1) * n] for j in range(len(images))]

    return caption


def naive_blip_filter(path: str, device: str, dtype):
    """(prepare, score): ``BlipForImageTextRetrieval`` on one pair, on the captioner's pixels."""
    import torch
    from transformers import AutoTokenizer, BlipForImageTextRetrieval

    itm = BlipForImageTextRetrieval.from_pretrained(path, dtype=dtype).eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)

    def score(pixels, text: str) -> float:
        tokens = tokenizer(text, truncation=True, max_length=35, return_tensors="pt").to(device)
        logits = itm(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels).itm_score
        return torch.softmax(logits.float(), dim=-1)[0, 1].item()

    return (lambda images, pixels: pixels), score


def naive_blip2_filter(path: str, device: str, dtype):
    """(prepare, score): ``Blip2ForImageTextRetrieval(use_image_text_matching_head=True)`` on one
    pair, on the captioner's pixels (both preprocess alike)."""
    import torch
    from transformers import AutoTokenizer, Blip2ForImageTextRetrieval

    itm = Blip2ForImageTextRetrieval.from_pretrained(path, dtype=dtype).eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)

    def score(pixels, text: str) -> float:
        tokens = tokenizer(text, truncation=True, max_length=35, return_tensors="pt").to(device)
        logits = itm(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels,
                     use_image_text_matching_head=True).logits_per_image
        return torch.softmax(logits.float(), dim=-1)[0, 1].item()

    return (lambda images, pixels: pixels), score


def naive_clip_filter(path: str, device: str, dtype):
    """(prepare, score): ``CLIPModel`` on one pair, its own preprocessing; the score is the cosine."""
    from transformers import AutoTokenizer, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    clip = CLIPModel.from_pretrained(path, dtype=dtype).eval().to(device)
    processor = CLIPImageProcessorPil.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)

    def prepare(images, _):
        return processor(images=images, return_tensors="pt")["pixel_values"].to(device, dtype)

    def score(pixels, text: str) -> float:
        tokens = tokenizer(text, truncation=True, max_length=77, return_tensors="pt").to(device)
        out = clip(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
        return (out.logits_per_image / clip.logit_scale.exp())[0, 0].item()

    return prepare, score


NAIVE_CAPTIONERS = {"blip": naive_blip_captioner, "blip2-opt-2.7b": naive_blip2_captioner,
                    "clip-l14": naive_blip_captioner}
NAIVE_FILTERS = {"blip": naive_blip_filter, "blip2-opt-2.7b": naive_blip2_filter, "clip-l14": naive_clip_filter}


def model_only(config, paths: list[str], batch: int, threads: int) -> dict[str, Any]:
    """capfilt's model calls on pre-decoded, preprocessed tensors: no I/O, no Ray."""
    from capfilt.models.captioner import batch_seed
    from capfilt.runtime.executor import configure_worker_process
    from capfilt.step import CapFiltStep

    configure_worker_process(threads, config.runtime.retain_freed_memory)  # as a Ray worker
    step = CapFiltStep(config)
    prepared = [step.prepare(s) for s in load_samples(paths)]

    def loop():
        for index in range(0, len(prepared), batch):
            chunk = prepared[index:index + batch]
            keep = [dict(s.pixels) for s in chunk]
            step.process_batch(chunk, batch_seed(0, "bench", index))
            for s, pixels in zip(chunk, keep):
                s.pixels = pixels

    return timed(config.runtime.device, len(prepared), loop)


def timed(device: str, images: int, loop) -> dict[str, Any]:
    """Images/s over ``loop()`` (each batch ends in a copy to the host, which waits for the
    GPU), and the GPU's mean utilisation during it."""
    with GpuUtilisation(device) as gpu:
        start = time.perf_counter()
        loop()
        seconds = time.perf_counter() - start
    result = {"images": images, "seconds": round(seconds, 2), "images_per_s": images / seconds}
    if gpu.mean is not None:
        result["gpu_utilisation_pct"] = round(gpu.mean, 1)
    return result


def end_to_end(args, cap: str, itm: str, inputs: str, dtype: str) -> dict[str, Any]:
    from capfilt.config import load_config
    from capfilt.io.layout import STATS_FILE, shard_of_stats
    from pipelines.run import run_and_summarise

    out = os.path.join(args.output, f"e2e_{dtype}")
    config = load_config("configs/blip_base.yaml", [
        *capfilt_overrides(args.models, cap, itm, args.num_captions, dtype, args.device),
        f"runtime.batch_size={args.batch_size}", "runtime.num_workers=1",
        f"runtime.gpus_per_worker={1 if args.device == 'cuda' else 0}",
        f"runtime.cpus_per_worker={args.threads}"], input=inputs, output=out)
    start = time.perf_counter()
    rc = run_and_summarise(config, mode="overwrite", verbose=False, progress=False)
    wall = time.perf_counter() - start
    stats = json.load(open(os.path.join(out, STATS_FILE)))
    shards = [json.load(open(os.path.join(out, n))) for n in sorted(os.listdir(out)) if shard_of_stats(n)]
    first = min(s["timing"]["started_at"] for s in shards)
    last = max(s["timing"]["finished_at"] for s in shards)
    images = stats["samples"]
    model_seconds = sum(s["timing"]["model_seconds"] for s in shards)
    return {"rc": rc, "images": images, "wall_seconds": round(wall, 2),
            # the share of the shards' time spent in the models; the rest is reading, decoding,
            # writing, or the models waiting for input
            "model_seconds": round(model_seconds, 2), "model_share": model_seconds / (last - first),
            "images_per_s_wall": images / wall,
            "steady_seconds": round(last - first, 2), "images_per_s": images / (last - first),
            "worker_peak_rss_mb": stats["timing"]["worker_peak_rss_mb"], "output": out}


class GpuUtilisation:
    """Mean GPU utilisation (%) over a ``with`` block, sampled by ``nvidia-smi`` every 200 ms."""

    def __init__(self, device: str):
        self.device, self.process, self.mean = device, None, None

    def __enter__(self) -> "GpuUtilisation":
        import shutil
        import subprocess

        if self.device == "cuda" and shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.process is None:
            return
        self.process.terminate()
        out, _ = self.process.communicate(timeout=10)
        samples = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]
        self.mean = sum(samples) / len(samples) if samples else None


def _child_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def isolated(threads: int, fn, *fn_args):
    """``fn(*fn_args)`` in a fresh Python process, as a user's script or a capfilt worker
    runs: nothing warmed up or set process-wide by another measurement carries over."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, multiprocessing.get_context("spawn"), _child_init, (threads,)) as pool:
        return pool.submit(fn, *fn_args).result()


def measure(device: str, threads: int, fn, *fn_args) -> dict[str, Any]:
    if fn is not end_to_end:  # each in a fresh process; they time their own loops
        return isolated(threads, fn, *fn_args)
    # end to end starts its own worker processes; its GPU utilisation is over the whole run,
    # Ray's start and the model loading included, so it is a lower bound
    with GpuUtilisation(device) as gpu:
        result = fn(*fn_args)
    if gpu.mean is not None:
        result["gpu_utilisation_pct"] = round(gpu.mean, 1)
    return result


def agreement(out_a: str, out_b: str, threshold: float) -> dict[str, Any]:
    """How far bf16 moves web-text scores and decisions from float32 (the same texts)."""
    import glob

    import pyarrow.parquet as pq

    def scores(folder):
        rows = [r for p in sorted(glob.glob(os.path.join(folder, "*.parquet"))) for r in pq.read_table(p).to_pylist()]
        return {r["key"]: r["web_score"] for r in rows if r["web_score"] is not None}

    a, b = scores(out_a), scores(out_b)
    diffs = [abs(a[k] - b[k]) for k in a]
    same = [(a[k] >= threshold) == (b[k] >= threshold) for k in a]
    return {"texts": len(diffs), "max_abs_score_diff": max(diffs), "mean_abs_score_diff": sum(diffs) / len(diffs),
            "decision_agreement": sum(same) / len(same)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", choices=MODELS, default="blip",
                        help="blip: BLIP of --shape in both slots; blip2-opt-2.7b: BLIP-2 captioner and ITM "
                             "filter; clip-l14: BLIP of --shape captions, CLIP ViT-L/14 decides")
    parser.add_argument("--shape", choices=list(SHAPES), default="base", help="the BLIP models' shape")
    parser.add_argument("--size", choices=list(WIDTHS), default="real",
                        help="the BLIP-2 and CLIP models' widths: the hub checkpoints' (real) or tiny ones")
    parser.add_argument("--depth-fraction", type=float, default=1.0,
                        help="build the BLIP-2 and CLIP models with this fraction of each stack's layers "
                             "(at least one), widths unchanged: full depth may not fit a small machine")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--num-captions", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--naive-batch-size", type=int, default=None,
                        help="images per naive generate (default: --batch-size); 1 is issue 18's naive "
                             "loop, generate per image")
    parser.add_argument("--naive-dtype", default="float32",
                        help="the naive loop's dtype (bfloat16 where float32 weights do not fit)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: all three on the GPU, and its utilisation sampled with nvidia-smi")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--skip", action="append", default=[], choices=["decode", "select", "end-to-end"],
                        help="leave out a measurement (repeatable)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="measure each of naive, model-only and end to end this many times, "
                             "model-only and end to end alternating, then naive, and keep the fastest "
                             "(this machine's speed wanders by ~10%%)")
    parser.add_argument("--decode-images", type=int, default=32,
                        help="JPEGs of each size for the decode measurement")
    parser.add_argument("--select-samples", type=int, default=10_000,
                        help="small JPEG samples of the run that select and the tarfile loop read")
    parser.add_argument("--select-shards", type=int, default=4)
    parser.add_argument("--select-repeats", type=int, default=3,
                        help="select and the tarfile loop alternate this many times; the fastest of each is kept")
    parser.add_argument("--only", choices=["decode", "select"],
                        help="decode: only the decode-and-preprocess measurement; select: only select "
                             "against the tarfile loop")
    parser.add_argument("--output", default="bench_output")
    args = parser.parse_args(argv)

    import torch

    sections: dict[str, Any] = {}
    if args.only in (None, "decode") and "decode" not in args.skip:
        size = SHAPES[args.shape]["image_size"]
        sections["decode"] = isolated(1, decode, os.path.join(args.output, f"decode_models_{size}"), size,
                                      args.decode_images, args.repeats, args.batch_size)
        report_decode(sections["decode"])
    if args.only in (None, "select") and "select" not in args.skip:
        per_shard = -(-args.select_samples // args.select_shards)
        sections["select"] = select_bench.select_vs_loop(args.output, args.select_shards, per_shard,
                                                         args.select_repeats)
        select_bench.report(sections["select"])
    if args.only:
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, "bench.json"), "w") as f:
            json.dump(sections, f, indent=2)
        return 0
    torch.set_num_threads(args.threads)
    family = (args.output, args.models, args.shape, args.size, args.depth_fraction)
    if args.models != "blip" and args.size == "real":  # the main process keeps no 3.9B model's pages
        cap, itm = isolated(args.threads, build_family, *family)
    else:
        cap, itm = build_family(*family)
    paths = write_shards(os.path.join(args.output, "shards"), args.images, args.shards)
    result: dict[str, Any] = {"models": args.models, "shape": args.shape, "images": args.images,
                              "num_captions": args.num_captions, "batch_size": args.batch_size,
                              "naive_batch_size": args.naive_batch_size or args.batch_size,
                              "threads": args.threads,
                              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                              **sections}
    if args.models != "blip":
        result.update(size=args.size, depth_fraction=args.depth_fraction)
    measure_all(args, cap, itm, paths, result)
    report(result, args)
    with open(os.path.join(args.output, "bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    return 0


def measure_all(args, cap: str, itm: str, paths: list[str], result: dict[str, Any]) -> None:
    """Model-only, end to end and naive into ``result``. Each runs in a fresh process, as cold as a
    Ray worker starts (oneDNN and the allocator warm up per process and shape). Each is repeated
    and the fastest kept, so that a slow spell of the machine does not decide a ratio."""
    from capfilt.config import load_config

    def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
        return dict(max(runs, key=lambda r: r["images_per_s"]), all_images_per_s=[r["images_per_s"] for r in runs])

    for dtype in args.dtypes.split(","):
        config = load_config("configs/blip_base.yaml",
                             capfilt_overrides(args.models, cap, itm, args.num_captions, dtype, args.device))
        runs: dict[str, list] = {"model_only": [], "end_to_end": []}
        for _ in range(args.repeats):
            runs["model_only"].append(measure(args.device, args.threads, model_only, config, paths,
                                              args.batch_size, args.threads))
            print(f"model-only {dtype}:", runs["model_only"][-1], flush=True)
            if "end-to-end" not in args.skip:
                runs["end_to_end"].append(measure(args.device, args.threads, end_to_end, args, cap, itm,
                                                  os.path.join(args.output, "shards"), dtype))
                print(f"end to end {dtype}:", runs["end_to_end"][-1], flush=True)
        result[f"model_only_{dtype}"] = best(runs["model_only"])
        if runs["end_to_end"]:
            result[f"end_to_end_{dtype}"] = best(runs["end_to_end"])
    if not args.skip_naive:
        runs_naive = []
        for _ in range(args.repeats):
            runs_naive.append(measure(args.device, args.threads, naive, cap, itm, paths,
                                      args.naive_batch_size or args.batch_size, args.num_captions, args.device,
                                      args.models, args.naive_dtype))
            print(f"naive {args.naive_dtype}:", runs_naive[-1], flush=True)
        result[f"naive_{args.naive_dtype}"] = best(runs_naive)


def report(result: dict[str, Any], args) -> None:
    naive_name = f"naive_{args.naive_dtype}"
    naive_rate = result.get(naive_name, {}).get("images_per_s")
    print(f"\ncapfilt bench: {result['models']} models ({result['shape']} BLIP shape), {result['images']} images, "
          f"N={result['num_captions']}, batch {result['batch_size']}, {result['machine']}")
    if naive_rate:
        print(f"  {'naive ' + args.naive_dtype:<24} {naive_rate:8.3f} images/s")
    ratios = {}
    for dtype in args.dtypes.split(","):
        mo, e2e = result[f"model_only_{dtype}"], result.get(f"end_to_end_{dtype}")
        print(f"  model-only {dtype:<13} {mo['images_per_s']:8.3f} images/s")
        if naive_rate:
            ratios[f"model_only_{dtype}/{naive_name}"] = mo["images_per_s"] / naive_rate
        if e2e is None:
            continue
        print(f"  end to end {dtype:<13} {e2e['images_per_s']:8.3f} images/s steady "
              f"({e2e['images_per_s_wall']:.3f} with Ray start and model loading; "
              f"{100 * e2e['model_share']:.1f}% of the shard's time in the models)")
        ratios[f"end_to_end_{dtype}/model_only_{dtype}"] = e2e["images_per_s"] / mo["images_per_s"]
        if naive_rate:
            ratios[f"end_to_end_{dtype}/{naive_name}"] = e2e["images_per_s"] / naive_rate
    if all(f"end_to_end_{d}" in result for d in ("float32", "bfloat16")):
        result["bfloat16_vs_float32"] = agreement(result["end_to_end_float32"]["output"],
                                                  result["end_to_end_bfloat16"]["output"], 0.5)
        print("  bfloat16 vs float32:", result["bfloat16_vs_float32"])
    result["ratios"] = ratios
    for name in [k for k in result if isinstance(result[k], dict) and "gpu_utilisation_pct" in result[k]]:
        print(f"  GPU utilisation, {name:<26} {result[name]['gpu_utilisation_pct']:5.1f}%")
    for name, value in ratios.items():
        print(f"  {name:<40} {value:6.2f}x")


if __name__ == "__main__":
    sys.exit(main())
