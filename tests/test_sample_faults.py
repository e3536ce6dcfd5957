"""One sample can only cost itself (issue 13): a fault while one sample is decoded, judged or
written becomes its error row and the shard completes; a fault of every sample is the shard's."""

import pyarrow.parquet as pq
import pytest
from conftest import image_bytes, write_shard

from capfilt.config import load_config
from capfilt.io.fs import OutputDir
from capfilt.io.writer import ShardWriter
from capfilt.runtime.shards import plan_shards
from capfilt.sample import KEPT, Sample
from capfilt.step import CapFiltStep


@pytest.fixture(scope="module")
def step(tiny_models):
    cap, itm = tiny_models
    config = load_config("configs/tiny.yaml", [f"captioner.model={cap}", f"filter.model={itm}",
                                               "captioner.num_captions=2", "runtime.batch_size=4"])
    return CapFiltStep(config)


def shard(tmp_path, texts):
    samples = [{"key": f"k{i}", "jpg": image_bytes("red", seed=i), "txt": t} for i, t in enumerate(texts)]
    return plan_shards([write_shard(tmp_path / "00000.tar", samples)], str(tmp_path / "out"))[0]


def rows(tmp_path):
    return {r["key"]: r for r in pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()}


class PoisonedFilter:
    """The real filter, raising for any batch that holds a poisoned text (or for every batch)."""

    def __init__(self, real, always=False):
        self.real, self.always = real, always

    def __call__(self, pixels, texts):
        if self.always or any("POISON" in t for image_texts in texts for t in image_texts):
            raise RuntimeError("index out of range in self")
        return self.real(pixels, texts)


def test_a_sample_the_models_fail_on_is_its_own_error_row(step, tmp_path, monkeypatch):
    monkeypatch.setattr(step, "filter", PoisonedFilter(step.filter))
    stats = step.run(shard(tmp_path, ["a red square", "POISON", "a red square", "red"]))
    got = rows(tmp_path)
    assert got["k1"]["status"] == "error" and "k1: cannot be judged: RuntimeError" in got["k1"]["error"]
    assert all(got[k]["status"] in ("kept", "dropped") and got[k]["web_score"] is not None
               for k in ("k0", "k2", "k3"))
    assert (stats.samples, stats.error) == (4, 1)


def test_a_fault_of_every_sample_fails_the_shard_and_leaves_nothing(step, tmp_path, monkeypatch):
    monkeypatch.setattr(step, "filter", PoisonedFilter(step.filter, always=True))
    with pytest.raises(RuntimeError, match="index out of range"):
        step.run(shard(tmp_path, ["a", "b"]))
    assert OutputDir(str(tmp_path / "out")).listdir() == []


def test_any_fault_while_preparing_an_image_costs_only_it(step, tmp_path, monkeypatch):
    import capfilt.step as step_module

    real = step_module.decode_rgb

    def decode(data, *args):
        if data == image_bytes("red", seed=2):
            raise RecursionError("maximum recursion depth exceeded")
        return real(data, *args)

    monkeypatch.setattr(step_module, "decode_rgb", decode)
    step.run(shard(tmp_path, ["a", "b", "c"]))
    got = rows(tmp_path)
    assert got["k2"]["status"] == "error" and "RecursionError" in got["k2"]["error"]
    assert got["k0"]["status"] != "error" and got["k1"]["status"] != "error"


def test_a_sample_the_output_cannot_encode_is_its_own_error_row(tmp_path):
    def judged(key, meta):
        sample = Sample(key=key, source="in/00000.tar", image=b"x", image_ext="jpg", web_text=f"web {key}",
                        meta=meta)
        sample.web_score, sample.captions, sample.caption_scores = 0.9, [], []
        sample.kept_texts, sample.status, sample.text = [(f"web {key}", "web", 0.9)], KEPT, f"web {key}"
        return sample

    out = OutputDir(str(tmp_path / "out"))
    with ShardWriter(out, "00000", threshold=0.5) as writer:
        writer.write(judged("good", {"url": "u"}))
        writer.write(judged("bytes", {"raw": b"\x00"}))  # json cannot hold bytes
        writer.write(judged("surrogate", {"c": "\ud83d"}))  # nor can UTF-8 hold a lone surrogate
    got = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()}
    assert got["good"]["status"] == "kept" and got["good"]["tar_bytes"] > 0
    for key, reason in (("bytes", "TypeError"), ("surrogate", "UnicodeEncodeError")):
        assert got[key]["status"] == "error" and f"{key}: cannot be written: {reason}" in got[key]["error"]
        assert got[key]["tar_bytes"] is None
    assert writer.stats.tar_samples == 1 and writer.stats.error == 2
