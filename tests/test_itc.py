"""ITC similarities and image embeddings: what the filter computes beside its ITM scores, and what
a run records of them (web_itc, caption_itc, image_embedding; the kept json's "itc").

The reference is transformers' own ``BlipForImageTextRetrieval(..., use_itm_head=False)``, loaded
fresh from the checkpoint (capfilt's filter patches its copy's attention). The filter is the
"sharper" tiny one of test_models.py, whose scores depend on the image.
"""

import json
import tarfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import Recorder, image_bytes, write_shard
from test_models import pixels

from capfilt.config import FilterConfig, load_config
from capfilt.models.itm_filter import ITMFilter
from capfilt.runtime.shards import plan_shards

TOLERANCE = 1e-4
# Per image: a web text first, then captions of different lengths (one cut at 35 tokens, one empty).
TEXTS = [["a red square on a plain background", "red", "a very long text " * 20],
         ["blue circle", "a blue circle in the middle of a large picture of the sky", "sky"],
         ["a green triangle", "green", ""]]


@pytest.fixture(scope="module")
def reference(sharp_filter):
    from transformers import BlipForImageTextRetrieval

    return BlipForImageTextRetrieval.from_pretrained(sharp_filter).eval()


@pytest.fixture(scope="module")
def itc_filter(sharp_filter):
    return ITMFilter(FilterConfig(model=sharp_filter), "cpu", "float32")


def reference_itc(reference, tokenizer, pv, text: str) -> torch.Tensor:
    """transformers' ITC of ``text`` against each image of ``pv`` (its tokens alone, as the ITM's)."""
    tokens = tokenizer(text, truncation=True, max_length=35, return_tensors="pt")
    assert tokens.input_ids[0, 0] == tokenizer.cls_token_id
    with torch.no_grad():
        return reference(input_ids=tokens.input_ids, pixel_values=pv, attention_mask=tokens.attention_mask,
                         use_itm_head=False).itm_score[:, 0]


def reference_embeddings(reference, pv) -> np.ndarray:
    from torch.nn.functional import normalize

    with torch.no_grad():
        states = reference.vision_model(pixel_values=pv).last_hidden_state
        return normalize(reference.vision_proj(states[:, 0, :]), dim=-1).numpy()


def test_itc_equals_the_retrieval_forward_without_its_itm_head(itc_filter, reference):
    pv = pixels(itc_filter.image_processor)
    got = itc_filter(pv, TEXTS).itc
    assert [len(s) for s in got] == [len(t) for t in TEXTS]
    gaps = []
    for i, image_texts in enumerate(TEXTS):
        for text, score in zip(image_texts, got[i]):
            want = reference_itc(reference, itc_filter.tokenizer, pv, text)
            assert score == pytest.approx(want[i].item(), abs=TOLERANCE), (i, text)
            gaps.append(min(abs(want[i] - want[j]).item() for j in range(len(pv)) if j != i))
    # The test's power: a text against the wrong image is off by far more than the tolerance.
    assert min(gaps) > 20 * TOLERANCE, gaps


def test_embedding_is_the_normalised_projected_image_state(itc_filter, reference):
    pv = pixels(itc_filter.image_processor)
    got = itc_filter(pv, TEXTS, embeddings=True).embeddings
    want = reference_embeddings(reference, pv)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got.astype(np.float16), want, atol=1e-3)  # as stored
    # The test's power: each image's embedding is far from every other image's.
    assert min(np.abs(want[i] - want[j]).max() for i in range(3) for j in range(i)) > 100 * 1e-3


def test_itm_scores_are_the_same_with_itc_on_or_off(sharp_filter, itc_filter):
    without = ITMFilter(FilterConfig(model=sharp_filter, itc=False), "cpu", "float32")
    pv = pixels(itc_filter.image_processor)
    off = without(pv, TEXTS)
    assert off.itc is None and off.embeddings is None
    on = itc_filter(pv, TEXTS, embeddings=True)
    assert on.itm == off.itm  # exactly
    assert without(pv, TEXTS, embeddings=True).itm == off.itm


# --- what a run records ----------------------------------------------------------------------------

class Run(NamedTuple):
    table: pa.Table
    rows: dict  # by key
    records: dict  # the kept jsons' "capfilt" records, by key
    recorder: Recorder
    out: Path


def run_shard(tiny_models, filter_path, folder, itc: bool, embeddings: bool):
    """A shard of three images with web texts, one without, and one that cannot be decoded,
    through CapFiltStep."""
    from capfilt.step import CapFiltStep

    folder.mkdir(parents=True)
    url = write_shard(folder / "in.tar", [
        {"key": "red", "jpg": image_bytes("red", seed=1), "txt": "a red square"},
        {"key": "bad", "jpg": b"<html>not an image</html>", "txt": "a broken image"},
        {"key": "blue", "png": image_bytes("blue", "PNG", seed=2), "txt": "a blue square on the left"},
        {"key": "notext", "jpg": image_bytes("green", seed=3)},
        {"key": "yellow", "jpg": image_bytes("yellow", seed=4), "txt": "yellow"},
    ])
    config = load_config("configs/tiny.yaml", [
        f"captioner.model={tiny_models[0]}", f"filter.model={filter_path}", "captioner.num_captions=2",
        "runtime.batch_size=5", "filter.threshold=0.0", f"filter.itc={str(itc).lower()}",
        f"writer.embeddings={str(embeddings).lower()}"])
    step = CapFiltStep(config)
    step.filter = recorder = Recorder(step.filter)
    task = plan_shards([url], str(folder / "out"))[0]
    step.run(task)
    table = pq.read_table(folder / "out" / "in.parquet")
    with tarfile.open(folder / "out" / "in.tar") as tar:
        records = {m.name[:-len(".json")]: json.loads(tar.extractfile(m).read())["capfilt"]
                   for m in tar.getmembers() if m.name.endswith(".json")}
    return Run(table, {r["key"]: r for r in table.to_pylist()}, records, recorder, folder / "out")


@pytest.fixture(scope="module")
def runs(tiny_models, sharp_filter, tmp_path_factory):
    root = tmp_path_factory.mktemp("itc_runs")
    return {(itc, emb): run_shard(tiny_models, sharp_filter, root / f"{itc}_{emb}", itc, emb)
            for itc, emb in ((True, True), (True, False), (False, True))}


def test_a_run_records_itc_and_embeddings_of_the_image_they_belong_to(runs, reference, itc_filter):
    table, rows, records, recorder, _ = runs[True, True]
    assert table.schema.field("web_itc").type == pa.float64()
    assert table.schema.field("caption_itc").type == pa.list_(pa.float64())
    assert table.schema.field("image_embedding").type == pa.list_(pa.float16())
    (pv, texts), = recorder.calls  # one batch
    want_embeddings = reference_embeddings(reference, pv)
    for i, key in enumerate(("red", "blue", "notext", "yellow")):  # the good samples, as the filter got them
        row = rows[key]
        assert texts[i] == list(dict.fromkeys(([row["web_text"]] if row["web_text"] else []) + row["captions"]))
        scored = [(row["web_text"], row["web_itc"])] if row["web_text"] else []
        assert len(row["caption_itc"]) == len(row["captions"]) == 2
        for text, itc in scored + list(zip(row["captions"], row["caption_itc"])):
            assert itc == pytest.approx(reference_itc(reference, itc_filter.tokenizer, pv, text)[i].item(),
                                        abs=TOLERANCE), (key, text)
        stored = np.array(row["image_embedding"], dtype=np.float32)
        np.testing.assert_allclose(stored, want_embeddings[i], atol=1e-3)
        # what the kept json records beside each score (threshold 0: every sample kept)
        record = records[key]
        assert [c["itc"] for c in record["captions"]] == row["caption_itc"]
        assert record.get("web_itc") == row["web_itc"]
    assert rows["notext"]["web_itc"] is None and rows["notext"]["web_text"] is None
    bad = rows["bad"]
    assert bad["status"] == "error"
    assert (bad["web_itc"], bad["caption_itc"], bad["image_embedding"]) == (None, [], None)


def test_writer_embeddings_false_leaves_the_embeddings_out(runs):
    rows = runs[True, False].rows
    assert all(r["image_embedding"] is None for r in rows.values())
    assert rows["red"]["web_itc"] is not None and len(rows["red"]["caption_itc"]) == 2  # ITC still there


def test_filter_itc_false_leaves_the_itc_out_and_the_itm_scores_as_they_are(runs):
    _, rows, records, _, _ = runs[False, True]
    with_itc = runs[True, True].rows
    assert all(r["web_itc"] is None and r["caption_itc"] == [] for r in rows.values())
    assert all("web_itc" not in r and all("itc" not in c for c in r["captions"]) for r in records.values())
    assert rows["red"]["image_embedding"] == with_itc["red"]["image_embedding"]  # embeddings still there
    for key, row in rows.items():  # the same captions and the same ITM scores, exactly
        other = with_itc[key]
        assert (row["captions"], row["web_score"], row["caption_scores"], row["status"]) == \
            (other["captions"], other["web_score"], other["caption_scores"], other["status"])


def test_a_sample_judged_then_failed_in_the_writer_has_no_embedding(tmp_path):
    """A sample the writer cannot write (its json cannot be UTF-8) becomes an error row after it
    was judged: its embedding is not stored."""
    from capfilt.io.fs import OutputDir
    from capfilt.io.writer import ShardWriter
    from capfilt.sample import KEPT, Sample

    def judged(key, meta):
        sample = Sample(key=key, image=b"x", image_ext="jpg", web_text="web", meta=meta)
        sample.web_score, sample.web_itc, sample.embedding = 0.9, 0.3, np.ones(4, np.float16) / 2
        sample.kept_texts, sample.status, sample.text = [("web", "web", 0.9)], KEPT, "web"
        return sample

    with ShardWriter(OutputDir(str(tmp_path)), "00000", threshold=0.5) as writer:
        writer.write(judged("good", {}))
        writer.write(judged("surrogate", {"c": "\ud83d"}))
    good, failed = pq.read_table(tmp_path / "00000.parquet").to_pylist()
    assert good["status"] == "kept" and good["image_embedding"] == [0.5] * 4
    assert failed["status"] == "error" and failed["image_embedding"] is None


def test_reshard_carries_the_columns_and_reads_a_run_written_before_them(runs, tmp_path):
    """A new run's columns pass through reshard unchanged; a run written before them (no such
    columns) still reshards, with them null, and inspects."""
    import shutil

    from capfilt.inspection import format_table, iter_rows
    from capfilt.reshard import reshard

    new = ("web_itc", "caption_itc", "image_embedding")
    table, rows, _, _, source = runs[True, True]
    kept = [{k: r[k] for k in ("key", *new)} for r in rows.values() if r["status"] == "kept"]
    reshard(str(source), str(tmp_path / "new"), samples_per_shard=2)
    got = [r for p in sorted((tmp_path / "new").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert [{k: r[k] for k in ("key", *new)} for r in got] == kept and len(kept) == 4
    assert pq.read_table(next((tmp_path / "new").glob("*.parquet"))).schema.field(new[2]).type == \
        pa.list_(pa.float16())

    old = tmp_path / "old"
    shutil.copytree(source, old)
    pq.write_table(table.drop_columns(list(new)), old / "in.parquet")
    reshard(str(old), str(tmp_path / "from_old"), samples_per_shard=2)
    got = [r for p in sorted((tmp_path / "from_old").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert [r["key"] for r in got] == [r["key"] for r in kept]
    assert all(r[k] is None for r in got for k in new)
    assert "red" in format_table(list(iter_rows(str(old))))
