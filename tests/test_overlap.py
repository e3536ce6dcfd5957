"""The next batch's copy to the device and vision passes are queued before the previous batch's
post-processing (issue 15, "Overlap"), and the output is the same bytes as judging each batch
whole, in turn, whatever fails on the way."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import image_bytes, write_shard

from capfilt.config import load_config
from capfilt.io.writer import ShardWriter
from capfilt.runtime.shards import plan_shards
from capfilt.step import CapFiltStep

COLOURS = ["red", "green", "blue", "yellow", "red", "green", "blue"]


@pytest.fixture(scope="module")
def step(tiny_models, sharp_filter):
    # The sharp filter scores each image apart: a vision pass of the wrong image shows.
    config = load_config("configs/tiny.yaml", [f"captioner.model={tiny_models[0]}", f"filter.model={sharp_filter}",
                                               "captioner.num_captions=2", "runtime.batch_size=2"])
    return CapFiltStep(config)


def shard(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    samples = [{"key": f"k{i}", "jpg": image_bytes(c, seed=i), "txt": f"a {c} square"}
               for i, c in enumerate(COLOURS)]
    samples.insert(3, {"key": "bad", "jpg": b"not an image", "txt": "x"})  # an error row in batch 1
    return plan_shards([write_shard(folder / "00000.tar", samples)], str(folder / "out"))[0]


def output(folder: Path) -> tuple[bytes, list[dict]]:
    """The tar's bytes and the parquet's rows, the error rows' shard path made folder-free."""
    rows = pq.read_table(folder / "out" / "00000.parquet").to_pylist()
    for row in rows:
        row["error"] = row["error"] and row["error"].replace(str(folder), "FOLDER")
    return (folder / "out" / "00000.tar").read_bytes(), rows


def test_the_next_batch_is_staged_before_this_one_is_written(step, tmp_path, monkeypatch):
    events = []
    real_stage, real_decide, real_write = CapFiltStep.stage, CapFiltStep._decide, ShardWriter.write

    def stage(self, batch):
        events.append(("stage", batch[0].key))
        return real_stage(self, batch)

    def decide(self, samples, *args):  # after the batch's scores reach the host
        events.append(("decide", samples[0].key))
        return real_decide(self, samples, *args)

    def write(self, sample, *args):
        events.append(("write", sample.key))
        return real_write(self, sample, *args)

    monkeypatch.setattr(CapFiltStep, "stage", stage)
    monkeypatch.setattr(CapFiltStep, "_decide", decide)
    monkeypatch.setattr(ShardWriter, "write", write)
    step.run(shard(tmp_path))
    # batches of two: k0 k1 | k2 bad | k3 k4 | k5 k6
    assert events == [("stage", "k2"), ("decide", "k0"), ("write", "k0"), ("write", "k1"),
                      ("stage", "k3"), ("decide", "k2"), ("write", "k2"), ("write", "bad"),
                      ("stage", "k5"), ("decide", "k3"), ("write", "k3"), ("write", "k4"),
                      ("decide", "k5"), ("write", "k5"), ("write", "k6")]


def test_staging_changes_no_byte_and_a_failed_stage_costs_nothing(step, tmp_path, monkeypatch):
    step.run(shard(tmp_path / "staged"))
    with monkeypatch.context() as m:  # each batch judged whole, in turn: no staging
        m.setattr(CapFiltStep, "stage", lambda self, batch: None)
        step.run(shard(tmp_path / "unstaged"))
    assert output(tmp_path / "staged") == output(tmp_path / "unstaged")

    real_encode, calls = step.captioner.encode, []

    def encode(pixels, vision_states=None):
        calls.append(1)
        if len(calls) == 2:  # the second stage's vision pass
            raise RuntimeError("out of memory")
        return real_encode(pixels, vision_states)

    monkeypatch.setattr(step.captioner, "encode", encode)
    step.run(shard(tmp_path / "failed"))
    assert len(calls) >= 2 and output(tmp_path / "failed") == output(tmp_path / "staged")
