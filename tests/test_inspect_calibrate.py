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
