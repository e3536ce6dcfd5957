"""Decode untrusted image bytes into RGB, bounded against decompression bombs."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageFile

from capfilt.config import IMAGE_FORMATS

ImageFile.LOAD_TRUNCATED_IMAGES = False

# The key of ``Image.info`` where ``decode_rgb`` puts the (width, height) the file declares.
SOURCE_SIZE = "source_size"


class ImageError(ValueError):
    pass


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
        raise ImageError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc


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
