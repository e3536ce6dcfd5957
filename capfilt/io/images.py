"""Decode untrusted image bytes into RGB, bounded against decompression bombs, and turn RGB
images into a model's input as its image processor does.

The processor's work is split where the data is smallest, uint8 at the model's size: the
resize runs on a decode thread (``ModelInput.resize``), the rescale and normalise on the
model's device over a whole batch (``ModelInput.normalise``).
"""

from __future__ import annotations

import io
import re
import warnings
import weakref
from typing import Any

import numpy as np
from PIL import Image, ImageFile

from capfilt.config import IMAGE_FORMATS

ImageFile.LOAD_TRUNCATED_IMAGES = False

# The key of ``Image.info`` where ``decode_rgb`` puts the (width, height) the file declares.
SOURCE_SIZE = "source_size"


class ImageError(ValueError):
    pass


class UnsupportedProcessor(ValueError):
    """An image processor whose preprocessing capfilt cannot split into resize and normalise."""


def decode_rgb(data: bytes, max_pixels: int, formats=IMAGE_FORMATS,
               at_least: tuple[int, int] | None = None) -> Image.Image:
    """Return the first frame of ``data`` as RGB; raise ``ImageError`` with a reason.

    Only PIL's plugins for ``formats`` look at the bytes: data of any other format is
    "cannot identify image file", never parsed.

    The size is checked from the header before any pixel is decoded, so a tiny
    file that claims a giant size costs nothing. PIL's own bomb check (a warning
    above ``Image.MAX_IMAGE_PIXELS``, an error above twice that) stays as a backstop.

    ``at_least`` (width, height): a JPEG twice that size or more on both sides is decoded
    at 1/2, 1/4 or 1/8 scale, the smallest that keeps both sides at or above it (libjpeg
    scales in the DCT: PIL's draft mode). Resized to that size, it is within about a level
    (of 255) of a whole decode on average, for a fraction of the cost. The size the file
    declares is in ``image.info[SOURCE_SIZE]`` either way.
    """
    if not data:
        raise ImageError("empty image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels rules
            img = Image.open(io.BytesIO(data), formats=list(formats))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(f"image claims {width}x{height} pixels, over the limit of {max_pixels}")
            img.seek(0)
            if at_least and min(width // at_least[0], height // at_least[1]) >= 2:
                img.draft("RGB", at_least)  # a no-op but for JPEG
            img.load()
            rgb = _to_rgb(img)
            rgb.info[SOURCE_SIZE] = (width, height)
            return rgb
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"decompression bomb: {exc}") from exc
    except Exception as exc:  # PIL raises many types for bad bytes
        # Not the repr of PIL's buffer (`<_io.BytesIO object at 0x7f...>`): another address each
        # run, and the error row would differ between a run and its resume.
        said = _ADDRESS.sub(" object", str(exc))
        raise ImageError(f"cannot decode image: {type(exc).__name__}: {said}") from exc


_ADDRESS = re.compile(r" object at 0x[0-9a-fA-F]+")


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with any transparency put on white, and none left in ``info``: an image processor
    that saw a transparent colour would composite it again, by other arithmetic."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits rather than clipping.
        rgb = img.convert("I").point(lambda v: v * (1 / 256)).convert("L").convert("RGB")
        rgb.info.pop("transparency", None)
        return rgb
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode == "RGB":
        return img
    return img.convert("RGB")


class ModelInput:
    """One image processor's preprocessing, split at uint8 pixels of the model's size.

    ``resize`` (a decode thread) is the processor's own resize: PIL's, with its filter, from
    the RGB image to uint8 H×W×3 (for CLIP's processor, its shortest side resized and the centre
    cropped, with transformers' arithmetic). ``normalise`` (the model's device) looks each uint8 value
    up in a table of the processor's own float32 output for it, channel by channel: the
    rescale and normalise are pointwise, so the lookup equals the processor bit for bit,
    whatever the order of its float operations.
    """

    def __init__(self, processor: Any):
        # CLIP's: the shortest side resized to this, then the centre cropped to ``size``; else None.
        self.shortest_edge = _shortest_edge_then_crop(processor)
        self.size = _fixed_size(processor) if self.shortest_edge is None else _crop_size(processor)  # (h, w)
        self.resample = processor.resample
        self.table = _value_table(processor, self.size)  # (3, 256) float32
        self._tables: dict[tuple, Any] = {}  # (device, dtype) -> the table there

    @property
    def at_least(self) -> tuple[int, int]:
        """(height, width) an image is best decoded at or above: what the processor resizes to."""
        return self.size if self.shortest_edge is None else (self.shortest_edge, self.shortest_edge)

    def resize(self, image: Image.Image) -> np.ndarray:
        """``image`` (RGB) at the model's size, uint8 H×W×3."""
        height, width = self.size
        if self.shortest_edge is None:
            return np.asarray(image.resize((width, height), resample=self.resample))
        # transformers' get_resize_output_image_size (default_to_square=False), then its
        # center_crop's offsets; the crop is never larger than the resized image.
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.shortest_edge * long / short)
        new_w, new_h = (self.shortest_edge, new_long) if w <= h else (new_long, self.shortest_edge)
        resized = image.resize((new_w, new_h), resample=self.resample)
        top, left = (new_h - height) // 2, (new_w - width) // 2
        return np.asarray(resized.crop((left, top, left + width, top + height)))

    def normalise(self, pixels, dtype):
        """A uint8 batch (B, H, W, 3) on any device, as the processor's (B, 3, H, W) of ``dtype``."""
        import torch

        key = (pixels.device, dtype)
        if key not in self._tables:
            self._tables[key] = torch.from_numpy(self.table).to(pixels.device, dtype)
        table = self._tables[key]
        batch, height, width, _ = pixels.shape
        out = torch.empty((batch, 3, height, width), dtype=dtype, device=pixels.device)
        for channel in range(3):  # per channel, the fastest lookup on a CPU
            index = pixels[..., channel].to(torch.int32).flatten()
            out[:, channel] = table[channel].index_select(0, index).view(batch, height, width)
        return out


_MODEL_INPUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_input(processor: Any) -> ModelInput:
    """The ``ModelInput`` of ``processor``, made once (its table costs one processor call)."""
    found = _MODEL_INPUTS.get(processor)
    if found is None:
        found = _MODEL_INPUTS[processor] = ModelInput(processor)
    return found


def _shortest_edge_then_crop(processor: Any) -> int | None:
    """CLIP's preprocessing: the shortest side resized to ``size.shortest_edge`` (the aspect
    kept), then the centre cropped to ``crop_size``, no larger. Its shortest edge, else None."""
    size, crop = getattr(processor, "size", None), getattr(processor, "crop_size", None)
    edge = getattr(size, "shortest_edge", None)
    if not (getattr(processor, "do_resize", False) and getattr(processor, "do_center_crop", False) and edge
            and getattr(size, "longest_edge", None) is None and not getattr(processor, "do_pad", False)):
        return None
    height, width = getattr(crop, "height", None), getattr(crop, "width", None)
    if not (height and width) or max(height, width) > edge:
        return None  # a crop that pads: refused by _fixed_size
    return edge


def _crop_size(processor: Any) -> tuple[int, int]:
    return processor.crop_size.height, processor.crop_size.width


def _fixed_size(processor: Any) -> tuple[int, int]:
    size = getattr(processor, "size", None)
    height, width = getattr(size, "height", None), getattr(size, "width", None)
    unsupported = [name for name in ("do_center_crop", "do_pad") if getattr(processor, name, False)]
    if not getattr(processor, "do_resize", False) or not (height and width) or unsupported:
        raise UnsupportedProcessor(
            f"{type(processor).__name__} (do_resize={getattr(processor, 'do_resize', None)}, size={size}"
            f"{''.join(f', {name}=True' for name in unsupported)}): capfilt resizes every image to one "
            f"height and width on its decode threads (or its shortest side to one length, then its centre "
            f"cropped, as CLIP's), and pads nothing")
    return height, width


def _value_table(processor: Any, size: tuple[int, int]) -> np.ndarray:
    """The processor's float32 output for every uint8 value of each channel: read off its
    output for grey images of the model's size holding each value (PIL leaves an image
    already at the size as it is), and checked to be pointwise."""
    height, width = size
    values = np.arange(256, dtype=np.uint8)
    chunks = [values[start:start + height * width] for start in range(0, 256, height * width)]
    greys = [np.resize(chunk, (height, width)) for chunk in chunks]
    images = [Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB") for grey in greys]
    # Already at the model's size: the resize (and crop) would leave them as they are.
    skip = {"do_resize": False, "do_center_crop": False} if getattr(processor, "do_center_crop", False) else {}
    out = np.asarray(processor(images=images, return_tensors="np", **skip)["pixel_values"], dtype=np.float32)
    table = np.concatenate([o.reshape(3, -1)[:, :len(c)] for o, c in zip(out, chunks)], axis=1)
    if out.shape[1:] != (3, height, width) or not all(
            np.array_equal(o, table[:, grey]) for o, grey in zip(out, greys)):
        raise UnsupportedProcessor(f"{type(processor).__name__}: its output for an image of the model's "
                                   f"size is not a function of each pixel's value alone")
    return np.ascontiguousarray(table)
