"""The output layout and the typed shard stats: the contracts every reader of an output uses."""

import json

import pytest

from capfilt.decision import decide
from capfilt.io import layout
from capfilt.io.fs import OutputDir
from capfilt.io.writer import ShardWriter
from capfilt.sample import Sample
from capfilt.stats import Counts, ShardStats


def test_shard_file_names():
    assert layout.shard_files("00012") == ("00012.tar", "00012.parquet", "00012_stats.json")
    assert layout.stats_name("a_b") == "a_b_stats.json"
    assert layout.shard_of_stats("a_b_stats.json") == "a_b"
    for other in ("stats.json", "_stats.json", "00012.tar", "run.json", layout.SIZES_FILE):
        assert layout.shard_of_stats(other) is None, other
    assert (layout.RUN_FILE, layout.STATS_FILE, layout.SIZES_FILE) == ("run.json", "stats.json", "sizes.json")


def test_img2dataset_stats_beside_an_input_tar():
    assert layout.stats_beside("s3://b/crawl/00012.tar", "00012") == "s3://b/crawl/00012_stats.json"


def test_temporaries_are_hidden_and_recognised():
    name = layout.temporary_name("00012.tar", "abc")
    assert name.startswith(".") and layout.is_temporary(name)
    assert not any(layout.is_temporary(n) for n in layout.shard_files("00012") + (".hidden", "x.tmp-y"))


def test_reshard_shard_files():
    assert all(layout.NUMBERED_SHARD_FILE.match(n) for n in layout.shard_files("00007"))
    assert not any(layout.NUMBERED_SHARD_FILE.match(n) for n in ("7.tar", "run.json", "00007.tar.gz"))


def test_an_output_folder_holds_only_layout_names(tmp_path):
    """What the writer and OutputDir leave is exactly the layout's files of the shard."""
    out = OutputDir(str(tmp_path))
    with ShardWriter(out, "00003", threshold=0.5) as writer:
        writer.write(judged("a", 0.9, [0.1]))
    assert tuple(sorted(out.listdir())) == tuple(sorted(layout.shard_files("00003")))


def judged(key, web_score, caption_scores, captions=None, web_text=None):
    sample = Sample(key=key, image=b"x", image_ext="jpg", web_text=web_text or f"web {key}")
    sample.captions = captions or [f"caption {i} of {key}" for i in range(len(caption_scores))]
    sample.web_score, sample.caption_scores = web_score, caption_scores
    return decide(sample, 0.5, "best_score")


def test_counts_come_from_each_decision():
    counts = Counts()
    # Two equal captions that pass, and a caption equal to the web text: as in the parquet's
    # kept_texts, the caption is kept once and the web text counts as web.
    counts.add(judged("a", 0.9, [0.8, 0.8, 0.9], captions=["same", "same", "web a"]))
    counts.add(judged("b", 0.1, [0.2, 0.7]))  # rescued by its second caption
    counts.add(judged("c", 0.1, [0.2]))  # dropped
    no_text = Sample(key="d", image=b"x", image_ext="jpg")
    no_text.captions, no_text.caption_scores = ["a caption"], [0.6]
    counts.add(decide(no_text, 0.5, "best_score"))
    counts.add(Sample(key="e").fail("00000.tar: e.jpg: cannot decode image"))
    assert counts.as_dict() == {"samples": 5, "kept": 3, "dropped": 1, "error": 1, "web_texts": 3,
                                "web_kept": 1, "captions": 7, "captions_kept": 3}
    assert counts.web_kept_pct == pytest.approx(33.33) and counts.captions_kept_pct == pytest.approx(42.86)


def test_counts_sum_over_shards_and_stats_round_trip():
    a, b = ShardStats(shard="a", samples=3, kept=2), ShardStats(shard="b", samples=4, error=1)
    total = Counts.total([a, b])
    assert (total.samples, total.kept, total.error) == (7, 2, 1)
    assert Counts().web_kept_pct is None
    stats = ShardStats(shard="x", input="in/x.tar", samples=2, tar_samples=3, timing={"seconds": 1.0})
    assert ShardStats.from_json(stats.to_json()) == stats
    # A stats file with fields this capfilt does not know still reads.
    raw = json.loads(stats.to_json()) | {"future_field": 1}
    assert ShardStats.from_json(json.dumps(raw)) == stats


def test_the_writer_times_a_started_shard():
    stats = ShardStats(shard="x")
    stats.start({"worker_pid": 1})
    stats.finish()
    assert {"started_at", "finished_at", "seconds", "worker_pid", "worker_peak_rss_mb"} <= set(stats.timing)
