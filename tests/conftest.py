"""Test set-up: loopback-only environment (before any ``import ray``), tiny models, shards."""

import os

# ARCHITECTURE.md, "Network": keep every process on 127.0.0.1 and off the network.
os.environ.update({
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "localhost,127.0.0.1,::1",
    "HF_HUB_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
})
os.environ.pop("RAY_ADDRESS", None)

import io  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def pytest_configure(config):
    """setup.cfg's per-test timeout needs pytest-timeout; without it the option is ignored and
    a hung test hangs CI. Fail instead (make test installs the test extra).

    The models run in this process on one torch thread, as a tiny.yaml worker runs them
    (cpus_per_worker: 1): the tiny models' ops are too small to share, and two threads waiting on
    each other beside Ray's workers ran the in-process tests 3-8x slower. It also makes their float
    results (test_golden's digests) independent of the machine's core count."""
    if not config.pluginmanager.hasplugin("timeout"):
        raise pytest.UsageError("pytest-timeout is missing: pip install -e '.[test]' (make test does)")
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Each test starts on one torch thread (pytest_configure), whatever an earlier one set
    (bench.main sets --threads in this process)."""
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session", autouse=True)
def ray_tmpdir(tmp_path_factory):
    """A Ray temp folder of this test run's own, so no stale cluster is ever joined."""
    path = tmp_path_factory.mktemp("ray")
    os.environ["RAY_TMPDIR"] = str(path)
    yield path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from capfilt.models.tiny import build_tiny_models

    return build_tiny_models(str(tmp_path_factory.mktemp("models")))


SHARP_INIT_STD = 0.1  # the tiny filter's is 0.02, and 1e-10 for the vision embeddings


@pytest.fixture(scope="session")
def sharp_filter(tiny_models, tmp_path_factory):
    """The tiny filter's checkpoint with its weights drawn again, wider, so its scores depend
    on the image. The tiny filter's move by ~3e-8 between images: a text scored against the
    wrong image would pass any parity test on it. Tokenizer, preprocessor and shapes are the
    tiny one's; ``tiny-models`` (the demo, the golden output) is untouched."""
    import shutil

    import torch
    from transformers import BlipConfig, BlipForImageTextRetrieval

    folder = tmp_path_factory.mktemp("sharp") / "filter"
    shutil.copytree(tiny_models[1], folder)
    config = BlipConfig.from_pretrained(folder)
    for c in (config, config.text_config, config.vision_config):
        c.initializer_range = SHARP_INIT_STD
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BlipForImageTextRetrieval(config).save_pretrained(folder, safe_serialization=True)
    return str(folder)


def image_bytes(colour: str, fmt: str = "JPEG", size=(48, 40), seed: int = 0) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", size, COLOURS[colour])
    for _ in range(20):  # some texture so JPEGs differ
        img.putpixel((rng.randrange(size[0]), rng.randrange(size[1])), (rng.randrange(256),) * 3)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_shard(path, samples):
    """Write an img2dataset-style tar: KEY.jpg|png, KEY.txt, KEY.json per sample.

    ``samples`` is a list of dicts with ``key`` and any of ``jpg``/``png``/... bytes,
    ``txt`` (str) and ``json`` (dict); members of a key are adjacent.
    """
    import webdataset as wds

    with wds.TarWriter(str(path), encoder=False) as tar:
        for s in samples:
            record = {"__key__": s["key"]}
            for ext, value in s.items():
                if ext == "key":
                    continue
                if ext == "json":
                    value = json.dumps(value).encode()
                elif isinstance(value, str):
                    value = value.encode()
                record[ext] = value
            tar.write(record)
    return str(path)


def make_web_shards(folder, shards: int = 2, per_shard: int = 6):
    """Shards of coloured images with web texts, as img2dataset writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    names = list(COLOURS)
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            n = s * per_shard + i
            colour = names[n % len(names)]
            fmt, ext = ("PNG", "png") if n % 3 == 2 else ("JPEG", "jpg")
            samples.append({
                "key": f"{s:05d}{i:04d}",
                ext: image_bytes(colour, fmt, seed=n),
                "txt": f"a {colour} square",
                "json": {"url": f"http://127.0.0.1/img/{n}.{ext}", "caption": f"a {colour} square",
                         "key": f"{s:05d}{i:04d}", "status": "success"},
            })
        paths.append(write_shard(folder / f"{s:05d}.tar", samples))
    return paths


class Recorder:
    """A model of the step (its filter, a scorer), recording the pixels and texts each batch
    gave it; the rest is the real model's."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def launch(self, pixel_values, texts, **options):
        self.calls.append((pixel_values.clone(), texts))
        return self.real.launch(pixel_values, texts, **options)

    def __getattr__(self, name):  # its vision pass, its processor
        return getattr(self.real, name)
