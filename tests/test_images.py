"""Images into model input (issue 15): JPEGs decoded at reduced scale but never below the
model's size; uint8 resized on the decode threads, stacked there (pinned for CUDA), and
normalised on the device to exactly the processor's float32 output.

``decode_rgb``'s bounds (formats, pixel limit, bombs) are tested in test_io.py."""

import threading

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import image_bytes
from PIL import Image, ImageDraw, ImageFilter
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from capfilt import prefetch
from capfilt.config import load_config
from capfilt.io.images import SOURCE_SIZE, ImageError, UnsupportedProcessor, decode_rgb, model_input
from capfilt.models.itm_filter import FilterScores
from capfilt.prefetch import Row, pixel_batch, prefetch_batches
from capfilt.sample import Sample
from capfilt.step import CapFiltStep
from corpus import encode

LIMIT = 10**8


def textured(size, mode="RGB", seed=0) -> Image.Image:
    """Edges, gradients and noise, so that resizing and reduced-scale decoding show."""
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    pixels = ramp + rng.normal(0, 30, (height, width, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = int(rng.integers(width)), int(rng.integers(height))
        draw.ellipse((x, y, x + width // 4, y + height // 4), fill=tuple(int(v) for v in rng.integers(256, size=3)))
    return img.convert(mode)


def palette_with_transparency() -> bytes:
    img = textured((50, 30)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(img, "PNG", transparency=3)


def rgb_with_colour_key() -> bytes:
    img = textured((30, 50))
    colour = img.getpixel((0, 0))
    return encode(img, "PNG", transparency=colour)  # a tRNS chunk: that colour is transparent


IMAGES = {
    "non_square_jpeg": lambda: encode(textured((300, 200)), "JPEG", quality=90),
    "golden_sized_jpeg": lambda: image_bytes("red"),  # 48x40, as the golden output's
    "grayscale_png": lambda: encode(textured((60, 45), "L"), "PNG"),
    "rgba_png": lambda: encode(Image.merge("RGBA", (*textured((45, 60)).split(), textured((45, 60), "L", 1))), "PNG"),
    "palette_png_with_transparency": palette_with_transparency,
    "rgb_png_with_a_transparent_colour": rgb_with_colour_key,
}
SIZES = {"square": {"height": 64, "width": 64}, "non_square": {"height": 40, "width": 56}}


def processor_output(processor, image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(processor(images=image, return_tensors="np")["pixel_values"][0])


# --- uint8 on the decode thread, normalised on the device ------------------------------------------


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("kind", list(IMAGES))
def test_uint8_then_normalise_equals_the_processor(kind, size):
    processor = BlipImageProcessorPil(size=SIZES[size])
    image = decode_rgb(IMAGES[kind](), LIMIT, at_least=(SIZES[size]["width"], SIZES[size]["height"]))
    model_in = model_input(processor)
    resized = model_in.resize(image)
    assert resized.dtype == np.uint8 and resized.shape == (SIZES[size]["height"], SIZES[size]["width"], 3)
    got = model_in.normalise(torch.from_numpy(np.stack([resized, resized])), torch.float32)
    want = processor_output(processor, image)
    assert got.shape == (2, *want.shape) and got.dtype == torch.float32 and got.is_contiguous()
    diff = (got - want).abs().max().item()
    assert diff <= 1e-6, diff
    assert torch.equal(got[0], want) and torch.equal(got[1], want)  # bit for bit: the golden output needs it
    bf16 = model_in.normalise(torch.from_numpy(resized[None].copy()), torch.bfloat16)
    assert torch.equal(bf16[0], want.to(torch.bfloat16))  # as the old path: float32, then cast


def test_the_table_follows_the_processors_own_mean_std_and_factor():
    image = decode_rgb(IMAGES["non_square_jpeg"](), LIMIT)
    odd = BlipImageProcessorPil(size=SIZES["square"], image_mean=[0.1, 0.5, 0.9], image_std=[0.2, 0.3, 0.4],
                                rescale_factor=1 / 127)
    got = model_input(odd).normalise(torch.from_numpy(model_input(odd).resize(image)[None].copy()), torch.float32)
    assert torch.equal(got[0], processor_output(odd, image))


@pytest.mark.parametrize("settings", [{"do_resize": False}, {"do_center_crop": True, "crop_size": 32},
                                      {"size": {"shortest_edge": 64}}])
def test_a_processor_that_does_not_resize_to_one_size_is_refused(settings):
    processor = BlipImageProcessorPil(**{"size": SIZES["square"], **settings})
    with pytest.raises(UnsupportedProcessor, match="capfilt resizes every image to one height and width"):
        model_input(processor)


# --- reduced-scale JPEG decoding -----------------------------------------------------------------


@pytest.mark.parametrize("size, at_least, decoded", [
    ((1024, 768), (384, 384), (512, 384)),  # 1/2: both sides still at or above 384
    ((1600, 800), (384, 384), (800, 400)),  # 1/2: 1/4 would take the height under 384
    ((3200, 3100), (384, 384), (400, 388)),  # 1/8
    ((767, 1000), (384, 384), (767, 1000)),  # under twice the size on one side: decoded whole
    ((1200, 400), (300, 100), (300, 100)),  # a non-square target
    ((48, 40), (64, 64), (48, 40)),  # the golden output's images: never touched
])
def test_big_jpegs_decode_at_reduced_scale_never_below_the_target(size, at_least, decoded):
    data = encode(textured(size), "JPEG", quality=90)
    image = decode_rgb(data, LIMIT, at_least=at_least)
    assert image.size == decoded and image.mode == "RGB"
    assert image.info[SOURCE_SIZE] == size  # the parquet records the file's size, not the decode's
    if decoded == size:
        assert image.tobytes() == decode_rgb(data, LIMIT).tobytes()


def test_reduced_scale_keeps_what_the_model_sees():
    """At the model's input, a 1/2-scale decode differs from a whole one by under 2.2 levels on
    average on a noisy photo-like image (1.65 measured; a 1/4-scale decode, below the target,
    differs by 2.9; on the bench's photo-like JPEGs it is 0.9)."""
    processor = BlipImageProcessorPil(size={"height": 384, "width": 384})
    data = encode(textured((1024, 768)).filter(ImageFilter.GaussianBlur(0.7)), "JPEG", quality=90)
    drafted = model_input(processor).resize(decode_rgb(data, LIMIT, at_least=(384, 384))).astype(int)
    whole = model_input(processor).resize(decode_rgb(data, LIMIT)).astype(int)
    assert 0 < np.abs(drafted - whole).mean() < 2.2


def test_a_transparent_colour_goes_on_white_and_no_transparency_is_left():
    image = decode_rgb(rgb_with_colour_key(), LIMIT)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)
    assert "transparency" not in image.info  # else a processor would composite it again


def test_only_jpegs_are_decoded_at_reduced_scale():
    image = decode_rgb(encode(textured((1024, 768)), "PNG"), LIMIT, at_least=(384, 384))
    assert image.size == (1024, 768)


def test_the_pixel_limit_is_checked_before_a_reduced_decode():
    data = encode(textured((1024, 768)), "JPEG")
    with pytest.raises(ImageError, match=r"1024x768.*limit of 786431"):
        decode_rgb(data, 1024 * 768 - 1, at_least=(384, 384))


# --- batches stacked off the model thread --------------------------------------------------------


def fake_prepare(sample: Sample) -> Sample:
    if sample.key == "bad":
        return sample.fail("bad image")
    value = int(sample.key)
    sample.pixels = {"captioner": np.full((4, 5, 3), value, np.uint8), "filter": np.full((2, 2, 3), value, np.uint8)}
    return sample


def test_each_batch_is_stacked_on_a_decode_thread_into_one_uint8_tensor(monkeypatch):
    threads = []
    real = prefetch.stack_pixels

    def stack(batch, pin_memory=False):
        threads.append((threading.current_thread().name, pin_memory))
        real(batch, pin_memory)

    monkeypatch.setattr(prefetch, "stack_pixels", stack)
    samples = [Sample(key=k) for k in ["1", "bad", "2", "3", "4"]]
    batches = list(prefetch_batches(iter(samples), fake_prepare, batch_size=3, threads=2, prefetch=1))
    assert [[s.key for s in b] for b in batches] == [["1", "bad", "2"], ["3", "4"]]
    assert len(threads) == 2 and all(name.startswith("capfilt-decode") and not pin for name, pin in threads)
    first = [s for s in batches[0] if s.error is None]
    for name, shape in (("captioner", (2, 4, 5, 3)), ("filter", (2, 2, 2, 3))):
        rows = [s.pixels[name] for s in first]
        assert all(isinstance(r, Row) for r in rows) and rows[0].batch is rows[1].batch
        stacked = pixel_batch(rows)
        assert stacked is rows[0].batch  # the whole batch: taken as it is, no copy on the model thread
        assert stacked.dtype == torch.uint8 and stacked.shape == shape and not stacked.is_pinned()
        assert stacked[:, 0, 0, 0].tolist() == [1, 2]
    assert batches[0][1].pixels is None


def test_part_of_a_batch_or_unprefetched_pixels_are_stacked_anew():
    batch = [fake_prepare(Sample(key=k)) for k in ["1", "2", "3"]]
    loose = [s.pixels["captioner"] for s in batch]
    prefetch.stack_pixels(batch)
    rows = [s.pixels["captioner"] for s in batch]
    for part in ([rows[1]], rows[:2], rows[::-1], loose):
        stacked = pixel_batch(part)
        assert stacked is not rows[0].batch
        assert stacked[:, 0, 0, 0].tolist() == [int(r.batch[r.index][0, 0, 0]) if isinstance(r, Row) else int(r[0, 0, 0])
                                               for r in part]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_batches_for_cuda_are_pinned():
    batches = list(prefetch_batches(iter([Sample(key="1")]), fake_prepare, 1, 1, 1, pin_memory=True))
    assert batches[0][0].pixels["captioner"].batch.is_pinned()


# --- the whole path: the models get the processor's output ---------------------------------------


@pytest.fixture(scope="module")
def step(tiny_models):
    cap, itm = tiny_models
    return CapFiltStep(load_config("configs/tiny.yaml", [f"captioner.model={cap}", f"filter.model={itm}"]))


def test_the_models_receive_exactly_the_processors_output(step, monkeypatch):
    """prepare on the decode threads, stacked there, normalised in _judge: what each model gets
    equals the processor's float32 output for the decoded image (the reduced-scale one for a
    big JPEG), and the parquet's size is the file's."""
    datas = [IMAGES[kind]() for kind in IMAGES] + [encode(textured((200, 150)), "JPEG")]
    received = {}

    def captioner(pixels, seed, image_embeds=None):
        received["captioner"] = pixels
        return [["a caption"] for _ in range(len(pixels))]

    def launch(pixels, texts, **options):
        received["filter"] = pixels
        return SimpleNamespace(result=lambda: FilterScores([[0.5] * len(t) for t in texts], None))

    monkeypatch.setattr(step, "captioner", captioner)
    monkeypatch.setattr(step, "filter", SimpleNamespace(launch=launch))
    samples = [Sample(key=str(i), image=d, image_ext="jpg") for i, d in enumerate(datas)]
    [batch] = prefetch_batches(iter(samples), step.prepare, len(samples), 2, 1)
    step.process_batch(batch, seed=0)
    processor = step.processors["captioner"]  # the filter's preprocesses alike, so it gets the same
    size = model_input(processor).size
    want = torch.stack([processor_output(processor, decode_rgb(d, LIMIT, at_least=size[::-1])) for d in datas])
    assert (received["captioner"] - want).abs().max().item() <= 1e-6
    assert torch.equal(received["captioner"], want) and torch.equal(received["filter"], want)
    assert [(s.width, s.height) for s in batch][-1] == (200, 150)
    assert all(s.error is None and s.pixels is None for s in batch)


def test_an_unsupported_processor_fails_the_shard_not_each_image(step, monkeypatch):
    monkeypatch.setattr(step, "processors", {"captioner": BlipImageProcessorPil(do_resize=False)})
    with pytest.raises(UnsupportedProcessor):
        step.prepare(Sample(key="k", image=image_bytes("red"), image_ext="jpg"))


def test_bench_decode_section_runs_alone(tmp_path):
    import json

    from pipelines import bench

    assert bench.main(["--only", "decode", "--shape", "small", "--decode-images", "2", "--repeats", "1",
                       "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())["decode"]
    assert set(result["sizes"]) == {"1024x768", "384x384"} and result["model_image_size"] == 224
    for r in result["sizes"].values():
        assert r["before_images_per_s"] > 0 and r["now_images_per_s"] > 0
        assert r["now/before"] == r["now_images_per_s"] / r["before_images_per_s"]
        assert len(r["now/before_per_repeat"]) == 1 and 0 <= r["mean_abs_diff_vs_whole_decode"] < 5


def test_an_undecodable_image_is_told_the_same_way_every_time():
    """PIL names its buffer by address (`<_io.BytesIO object at 0x...>`): an error row holding
    it would differ between a run and its resume, and between run and select."""
    said = []
    for _ in range(2):
        with pytest.raises(ImageError) as failure:
            decode_rgb(b"<html>a page saved as an image</html>", 10**8, ("JPEG", "PNG"))
        said.append(str(failure.value))
    assert said[0] == said[1] and " at 0x" not in said[0], said
