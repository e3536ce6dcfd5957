"""capfilt inspect and capfilt calibrate on real shards and tiny real models."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import image_bytes, write_shard

from capfilt.decision import decide
from capfilt.io.fs import OutputDir
from capfilt.io.writer import ShardWriter
from capfilt.sample import Sample
from pipelines.cli import main


def cleaned_output(folder):
    out = OutputDir(str(folder))
    samples = []
    for key, web_score, scores in (("a", 0.9, [0.2, 0.7]), ("b", 0.1, [0.2, 0.3])):
        s = Sample(key=key, image=image_bytes("red"), image_ext="jpg", web_text=f"web {key}")
        s.web_score, s.captions, s.caption_scores = web_score, [f"cap {key} {i}" for i in range(2)], scores
        samples.append(decide(s, 0.5, "best_score"))
    samples.append(Sample(key="c", image=b"x", image_ext="jpg").fail("00000.tar: c.jpg: cannot decode image"))
    with ShardWriter(out, "00000", 0.5) as writer:
        for s in samples:
            writer.write(s)
    return folder


def test_inspect_output_filters_by_status_and_key(tmp_path, capsys):
    out = cleaned_output(tmp_path / "out")
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "web a" in table and "cap a 1" in table and "0.700" in table and "cannot decode" in table
    assert main(["inspect", str(out / "00000.tar"), "--status", "dropped"]) == 0
    table = capsys.readouterr().out
    assert "web b" in table and "web a" not in table
    assert main(["inspect", str(out), "--key", "a"]) == 0
    assert "web b" not in capsys.readouterr().out


def test_inspect_input_shard(tmp_path, capsys):
    path = write_shard(tmp_path / "00000.tar", [{"key": "k1", "jpg": image_bytes("blue"), "txt": "a blue square"}])
    assert main(["inspect", path]) == 0
    table = capsys.readouterr().out
    assert "k1" in table and "input" in table and "a blue square" in table


def test_inspect_escapes_terminal_sequences_in_web_text(tmp_path, capsys):
    hostile = "\x1b]0;owned\x07\x1b[2Jred\u202esquare\x9b"
    path = write_shard(tmp_path / "00000.tar", [{"key": "k1", "jpg": image_bytes("blue"), "txt": hostile}])
    assert main(["inspect", path]) == 0
    table = capsys.readouterr().out
    assert not any(c in table for c in "\x1b\x07\u202e\x9b")
    assert "\\x1b]0;owned\\x07\\x1b[2Jred\\u202esquare\\x9b" in table


def labelled_shard(path):
    samples = []
    for i, (colour, label) in enumerate([("red", 1), ("blue", 0), ("green", 1), ("yellow", 0)] * 3):
        samples.append({"key": f"{i:04d}", "jpg": image_bytes(colour, seed=i), "txt": f"a {colour} square",
                        "json": {"label": label}})
    return write_shard(path, samples)


def test_calibrate_scores_a_labelled_set_and_suggests_a_threshold(tiny_models, tmp_path, capsys):
    shard = labelled_shard(tmp_path / "labelled.tar")
    out = tmp_path / "calibration"
    rc = main(["calibrate", "--config", "configs/tiny.yaml", "--labelled", shard, "--output", str(out),
               f"filter.model={tiny_models[1]}", "--target", "recall", "--value", "1.0"])
    assert rc == 0
    result = json.loads((out / "calibration.json").read_text())
    assert result["pairs"] == 12 and result["matching"] == 6
    best = result["at_suggested"]
    assert best["recall"] == 1.0  # the highest threshold that keeps every match
    higher = [p for p in result["curve"] if p["threshold"] > best["threshold"]]
    assert all(p["recall"] < 1.0 for p in higher)
    assert "suggested filter.threshold=" in capsys.readouterr().out
    assert (out / "precision_recall.png").read_bytes()[:4] == b"\x89PNG"


def test_calibrate_reads_parquet_and_refuses_one_sided_sets(tiny_models, tmp_path, capsys):
    rows = {"image": [image_bytes("red"), image_bytes("blue")], "text": ["a red square", "a red square"],
            "label": [True, False]}
    pq.write_table(pa.table(rows), tmp_path / "pairs.parquet")
    assert main(["calibrate", "--labelled", str(tmp_path / "pairs.parquet"),
                 f"filter.model={tiny_models[1]}", "runtime.device=cpu"]) == 0
    pq.write_table(pa.table({k: v[:1] for k, v in rows.items()}), tmp_path / "one.parquet")
    assert main(["calibrate", "--labelled", str(tmp_path / "one.parquet"),
                 f"filter.model={tiny_models[1]}", "runtime.device=cpu"]) == 2
    assert "both matching and non-matching" in capsys.readouterr().err


def reference_itc(filter_path: str, images: list[bytes], texts: list[str]) -> list[float]:
    """Each pair's ITC as transformers' retrieval model scores it (use_itm_head=False)."""
    import io

    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoTokenizer, BlipForImageTextRetrieval
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    model = BlipForImageTextRetrieval.from_pretrained(filter_path).eval()
    processor = BlipImageProcessorPil.from_pretrained(filter_path)
    pixels = torch.from_numpy(np.stack([processor(images=Image.open(io.BytesIO(b)).convert("RGB"),
                                                  return_tensors="np")["pixel_values"][0] for b in images]))
    tokens = AutoTokenizer.from_pretrained(filter_path)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        similarity = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels,
                           use_itm_head=False).itm_score  # (images, texts)
    return similarity.diagonal().tolist()


def test_calibrate_itc_suggests_select_itc_threshold_from_the_filter_s_itc(tiny_models, tmp_path, capsys):
    """--score itc: the curve over ITC similarities in (-1, 1), scored as a run records them
    (filter.itc turned on for it), and the key to set when selecting."""
    from capfilt.io.reader import read_shard

    shard = labelled_shard(tmp_path / "labelled.tar")
    out = tmp_path / "calibration"
    assert main(["calibrate", "--config", "configs/tiny.yaml", "--labelled", shard, "--output", str(out),
                 f"filter.model={tiny_models[1]}", "filter.itc=false", "--score", "itc",
                 "--target", "recall", "--value", "1.0"]) == 0
    result = json.loads((out / "calibration.json").read_text())
    assert (result["score"], result["key"], len(result["curve"])) == ("itc", "select.itc_threshold", 199)
    assert (result["curve"][0]["threshold"], result["curve"][-1]["threshold"]) == (-0.99, 0.99)
    samples = list(read_shard(shard))
    itc = reference_itc(tiny_models[1], [s.image for s in samples], [s.web_text for s in samples])
    lowest_match = min(score for score, s in zip(itc, samples) if s.meta["label"])
    # Recall 1: the highest threshold at or under the lowest ITC of a matching pair.
    assert result["suggested_threshold"] <= lowest_match + 1e-4 < result["suggested_threshold"] + 0.01
    printed = capsys.readouterr().out
    assert "keep when ITC similarity >= threshold" in printed
    assert f"suggested select.itc_threshold={result['suggested_threshold']:.2f}" in printed
    assert f"capfilt select RUN NEW select.itc_threshold={result['suggested_threshold']:.2f}" in printed
