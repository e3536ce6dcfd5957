"""``capfilt run`` end to end: real tars, real Ray actors, tiny real BLIP models."""

import io
import json
import os
import statistics
import tarfile

import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from conftest import image_bytes, make_web_shards, write_shard
from PIL import Image

from pipelines.cli import main

NUM_CAPTIONS = 3


def direct_score(model, processor, tokenizer, image: bytes, text: str) -> float:
    """BLIP's ITM score of one pair: transformers' BlipForImageTextRetrieval forward with the
    text's first token [ENC], as BLIP trained its ITM head (capfilt's filter.first_token default)."""
    pv = processor(images=Image.open(io.BytesIO(image)).convert("RGB"), return_tensors="pt")["pixel_values"]
    tokens = tokenizer(text, truncation=True, max_length=35, return_tensors="pt")
    tokens.input_ids[:, 0] = tokenizer.convert_tokens_to_ids("[ENC]")
    with torch.no_grad():
        logits = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                       pixel_values=pv).itm_score
    return torch.softmax(logits, dim=-1)[0, 1].item()


@pytest.fixture(scope="module")
def reference(tiny_models):
    from transformers import AutoTokenizer, BlipForImageTextRetrieval
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    path = tiny_models[1]
    model = BlipForImageTextRetrieval.from_pretrained(path).eval()
    processor, tokenizer = BlipImageProcessorPil.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    return lambda image, text: direct_score(model, processor, tokenizer, image, text)


def read_inputs(paths):
    """{key: {ext: bytes}} of the input tars."""
    samples = {}
    for path in paths:
        for s in wds.WebDataset(path, shardshuffle=False, empty_check=False):
            samples[s["__key__"]] = {k: v for k, v in s.items() if not k.startswith("__")}
    return samples


def run_args(tiny_models, inputs, output, threshold, *extra):
    cap, itm = tiny_models
    return ["run", "--config", "configs/tiny.yaml", "--input", *inputs, "--output", str(output),
            "--no-progress", f"captioner.model={cap}", f"filter.model={itm}",
            f"filter.threshold={threshold}", f"captioner.num_captions={NUM_CAPTIONS}",
            "runtime.batch_size=4", *extra]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_models, reference):
    root = tmp_path_factory.mktemp("e2e")
    paths = make_web_shards(root / "in", shards=2, per_shard=7)
    bad = [
        {"key": "bad_html", "jpg": b"<html><body>not an image</body></html>", "txt": "a red square",
         "json": {"url": "http://127.0.0.1/x.jpg"}},
        {"key": "no_image", "txt": "a caption without its image"},
        {"key": "ok", "png": image_bytes("yellow", "PNG"), "txt": "a yellow square"},
    ]
    paths.append(write_shard(root / "in" / "00002.tar", bad))
    inputs = read_inputs(paths)
    # The random tiny filter scores everything near 0.46. A first run at a threshold
    # above every score drops every image; its scores then give a threshold that
    # splits the images, so that the second run both keeps and drops.
    rc0 = main(run_args(tiny_models, [str(root / "in" / "{00000..00002}.tar")], root / "none", 0.9))
    best = [max([r["web_score"], *r["caption_scores"]]) for r in rows_of(root / "none")
            if r["status"] != "error"]
    threshold = statistics.median(best)
    out = root / "out"
    rc = main(run_args(tiny_models, [str(root / "in" / "{00000..00002}.tar")], out, threshold))
    return dict(rc=rc, rc0=rc0, root=root, out=out, paths=paths, inputs=inputs, threshold=threshold)


def rows_of(out):
    rows = []
    for name in sorted(os.listdir(out)):
        if name.endswith(".parquet"):
            rows += pq.read_table(out / name).to_pylist()
    return rows


def test_run_succeeds_and_writes_every_output_file(first_run):
    assert first_run["rc"] == first_run["rc0"] == 0
    names = set(os.listdir(first_run["out"]))
    for shard in ("00000", "00001", "00002"):
        assert {f"{shard}.tar", f"{shard}.parquet", f"{shard}_stats.json"} <= names
    assert {"run.json", "stats.json"} <= names
    assert not [n for n in names if ".tmp-" in n]
    sizes = json.loads((first_run["out"] / "sizes.json").read_text())
    for shard in ("00000", "00001", "00002"):
        with tarfile.open(first_run["out"] / f"{shard}.tar") as tar:
            assert sizes[f"{shard}.tar"] == len({m.name.split(".")[0] for m in tar.getmembers()})
    run = json.loads((first_run["out"] / "run.json").read_text())
    assert run["config"]["filter"]["threshold"] == first_run["threshold"]
    assert run["versions"]["transformers"] and run["models_resolved"]["filter"]["resolved"].startswith("sha256:")


def test_run_that_keeps_nothing_writes_empty_tars_and_full_parquet(first_run):
    none = first_run["root"] / "none"
    for shard in ("00000", "00001", "00002"):
        with tarfile.open(none / f"{shard}.tar") as tar:
            assert tar.getmembers() == []
    rows = rows_of(none)
    assert len(rows) == len(first_run["inputs"])
    assert {r["status"] for r in rows} == {"dropped", "error"}
    schemas = {pq.read_schema(none / f"{s}.parquet") for s in ("00000", "00001", "00002")}
    assert len(schemas) == 1


def test_every_input_key_is_one_parquet_row(first_run):
    rows = rows_of(first_run["out"])
    keys = [r["key"] for r in rows]
    assert sorted(keys) == sorted(first_run["inputs"])
    assert len(keys) == len(set(keys))
    by_key = {r["key"]: r for r in rows}
    assert by_key["bad_html"]["status"] == "error" and "bad_html.jpg" in by_key["bad_html"]["error"]
    assert by_key["no_image"]["status"] == "error" and "no image" in by_key["no_image"]["error"]
    assert by_key["bad_html"]["url"] == "http://127.0.0.1/x.jpg"
    assert {r["status"] for r in rows} == {"kept", "dropped", "error"}
    stats = json.loads((first_run["out"] / "stats.json").read_text())
    assert (stats["samples"], stats["error"]) == (len(rows), 2)
    assert stats["kept"] + stats["dropped"] + stats["error"] == stats["samples"]


def test_scores_and_decisions_match_transformers(first_run, reference):
    threshold = first_run["threshold"]
    for row in rows_of(first_run["out"]):
        if row["status"] == "error":
            continue
        image = first_run["inputs"][row["key"]]
        image = image.get("jpg") or image.get("png")
        assert row["web_score"] == pytest.approx(reference(image, row["web_text"]), abs=1e-4)
        assert len(row["captions"]) == len(row["caption_scores"]) == NUM_CAPTIONS
        for caption, score in zip(row["captions"], row["caption_scores"]):
            assert not caption.startswith("a picture of")
            assert score == pytest.approx(reference(image, caption), abs=1e-4)
        passing = {t: s for t, s in zip(row["captions"], row["caption_scores"]) if s >= threshold}
        if row["web_score"] >= threshold:
            passing[row["web_text"]] = row["web_score"]
        assert row["status"] == ("kept" if passing else "dropped")
        assert set(row["kept_texts"]) == set(passing)
        assert row["web_kept"] == (row["web_score"] >= threshold)
        if passing:
            assert row["text"] == max(passing, key=passing.get)
        else:
            assert row["text"] is None


def test_tars_hold_kept_samples_with_original_image_bytes(first_run):
    rows = {r["key"]: r for r in rows_of(first_run["out"])}
    written = read_inputs([str(first_run["out"] / f"{s}.tar") for s in ("00000", "00001", "00002")])
    assert set(written) == {k for k, r in rows.items() if r["status"] == "kept"}
    for key, members in written.items():
        original = first_run["inputs"][key]
        ext = next(e for e in ("jpg", "png") if e in original)
        assert set(members) == {ext, "txt", "json"}
        assert members[ext] == original[ext]
        assert members["txt"].decode() == rows[key]["text"]
        meta = json.loads(members["json"])
        original_meta = json.loads(original.get("json", b"{}"))
        assert {k: meta[k] for k in original_meta} == original_meta
        record = meta["capfilt"]
        assert record["web_score"] == rows[key]["web_score"]
        assert [c["score"] for c in record["captions"]] == rows[key]["caption_scores"]
        assert {k["origin"] for k in record["kept_texts"]} <= {"web", "synthetic"}
        assert [k["text"] for k in record["kept_texts"]] == rows[key]["kept_texts"]


def test_output_reads_in_webdataset_training_pipeline(first_run):
    urls = [str(first_run["out"] / f"{s}.tar") for s in ("00000", "00001", "00002")]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg;png;jpeg;webp", "txt")
    pairs = list(ds)
    kept = [r for r in rows_of(first_run["out"]) if r["status"] == "kept"]
    assert len(pairs) == len(kept) > 0
    for image, text in pairs:
        assert isinstance(image, Image.Image) and image.size == (48, 40)
        assert isinstance(text, str) and text


def test_rerun_skips_completed_shards(first_run, tiny_models, capsys):
    out = first_run["out"]
    before = {n: (out / n).stat().st_mtime_ns for n in os.listdir(out) if n.startswith("0000")}
    rc = main(run_args(tiny_models, [str(first_run["root"] / "in")], out, first_run["threshold"]))
    assert rc == 0
    after = {n: (out / n).stat().st_mtime_ns for n in os.listdir(out) if n.startswith("0000")}
    assert after == before
    stats = json.loads((out / "stats.json").read_text())
    assert stats["timing"]["shards_skipped"] == 3 and stats["shards_done"] == 3
    assert stats["samples"] == len(first_run["inputs"])
    assert "shards skipped (already done)  3" in capsys.readouterr().out


def test_other_config_into_same_output_is_refused(first_run, tiny_models, capsys):
    rc = main(run_args(tiny_models, [str(first_run["root"] / "in")], first_run["out"], 0.1234))
    assert rc == 2
    err = capsys.readouterr().err
    assert f"holds output of another config (filter.threshold: {first_run['threshold']} -> 0.1234)" in err


def test_overwrite_mode_redoes_the_output_with_the_new_config(first_run, tiny_models, tmp_path):
    out = tmp_path / "out"
    inputs = [first_run["paths"][0]]
    assert main(run_args(tiny_models, inputs, out, first_run["threshold"])) == 0
    assert main(run_args(tiny_models, inputs, out, 0.0)) == 2  # refused: another threshold
    assert main(run_args(tiny_models, inputs, out, 0.0, "--mode", "overwrite")) == 0
    rows = pq.read_table(out / "00000.parquet").to_pylist()
    assert {r["status"] for r in rows} == {"kept"}  # every text passes a threshold of 0
    assert json.loads((out / "run.json").read_text())["config"]["filter"]["threshold"] == 0.0


def test_worker_runs_no_more_torch_threads_than_cores(first_run, tiny_models, tmp_path):
    # tiny.yaml asks for one CPU per worker; a config written for a bigger machine asks for
    # more than this one has: Ray's CPUs are logical, the worker's threads must not be.
    stats = json.loads((first_run["out"] / "00000_stats.json").read_text())
    assert stats["timing"]["worker_threads"] == 1
    out = tmp_path / "out"
    cores = len(os.sched_getaffinity(0))
    assert main(run_args(tiny_models, [first_run["paths"][0]], out, first_run["threshold"],
                         f"runtime.cpus_per_worker={cores + 1}")) == 0
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["timing"]["worker_threads"] == cores


def test_unknown_override_is_a_config_error(first_run, tiny_models, capsys):
    rc = main(run_args(tiny_models, [str(first_run["root"] / "in")], first_run["out"], 0.5,
                       "filter.treshold=0.3"))
    assert rc == 2
    assert "filter.treshold" in capsys.readouterr().err


def test_missing_shard_fails_alone_and_output_is_reproducible(first_run, tiny_models, tmp_path):
    out = tmp_path / "out"
    missing = str(first_run["root"] / "in" / "00009.tar")
    rc = main(run_args(tiny_models, [first_run["paths"][0], missing], out, first_run["threshold"],
                       "runtime.shard_attempts=2"))
    assert rc == 1
    stats = json.loads((out / "stats.json").read_text())
    assert stats["shards_failed"] == 1 and stats["shards_done"] == 1
    (failure,) = stats["failed"]
    assert failure["shard"] == "00009" and failure["attempts"] == 2 and "00009.tar" in failure["error"]
    assert not (out / "00009_stats.json").exists()
    # Same shard, same config, another run and worker: the same bytes.
    for name in ("00000.tar", "00000.parquet"):
        assert (out / name).read_bytes() == (first_run["out"] / name).read_bytes()


def test_run_record_redacts_credentials_at_any_depth():
    from capfilt.config import load_config
    from capfilt.run import run_record as _run_record

    config = load_config(None, ['storage_options={s3: {endpoint_url: "http://127.0.0.1:9000", key: AKIA, '
                                'client_kwargs: {aws_secret_access_key: sekrit, region_name: us-east-1}}}'])
    from capfilt.identity import fingerprint, output_identity

    identity = output_identity(config, {"captioner": None, "filter": None})
    record = json.dumps(_run_record(config, identity, fingerprint(identity), 1))
    assert "sekrit" not in record and "AKIA" not in record
    assert "http://127.0.0.1:9000" in record and "us-east-1" in record


def test_redaction_masks_credentials_in_text_but_not_ordinary_names():
    from capfilt.redaction import redact_options, redact_text

    text = ("s3 error for https://u:pw1@h/x.tar?X-Amz-Credential=AKIA1&X-Amz-Signature=s1g&width=3 and "
            "azure AccountName=a;AccountKey=k3y==;EndpointSuffix=core sv=1&sig=s2g filter.max_text_tokens=35")
    masked = redact_text(text)
    for secret in ("pw1", "AKIA1", "s1g", "k3y", "s2g"):
        assert secret not in masked, secret
    assert "width=3" in masked and "AccountName=a" in masked and "max_text_tokens=35" in masked
    options = redact_options({"s3": {"client_kwargs": {"headers": {"Authorization": "Bearer t0k"}},
                                     "connection_string": "x", "endpoint_url": "http://127.0.0.1:9000"}})
    assert "t0k" not in str(options) and options["s3"]["connection_string"] == "***"
    assert options["s3"]["endpoint_url"] == "http://127.0.0.1:9000"
