"""Builders of hostile and unusual input, shared by the reader and end-to-end tests."""

import io
import struct
import tarfile
import zlib

from conftest import image_bytes
from PIL import Image


def write_raw_tar(path, members):
    """Write a tar with ``tarfile``: ``members`` is a list of (name, bytes) or TarInfo."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def link(name, target, kind):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def sixteen_bit_png() -> bytes:
    img = Image.new("I;16", (16, 16))
    img.putdata([i * 256 for i in range(256)])
    return encode(img, "PNG")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def truncated_jpeg() -> bytes:
    data = image_bytes("red", size=(64, 64))
    return data[: len(data) // 2]


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR is patched (CRC included) to claim ``width`` x ``height``."""
    png = encode(Image.new("L", (4, 4), 0), "PNG")
    assert png[12:16] == b"IHDR"
    chunk = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + chunk + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF) + png[33:]
