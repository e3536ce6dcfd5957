"""capfilt report: the HTML page, opened in a real headless Chromium."""

import json
import os

import pyarrow.parquet as pq
import pytest
from browser import Chromium
from conftest import COLOURS, image_bytes, make_web_shards, write_shard
from PIL import Image

from capfilt.config import load_config
from capfilt.decision import decide
from capfilt.io.fs import OutputDir
from capfilt.io.writer import ShardWriter, run_schema
from capfilt.stats import ShardStats
from capfilt.report import build_report, error_reason
from capfilt.sample import Sample
from pipelines.cli import main

THRESHOLD = 0.5
# key -> (colour, web score, caption scores): one or more of every grid of the report.
CASES = {
    "kept": ("red", 0.91, [0.30, 0.62]),  # web text kept
    "rescued": ("green", 0.12, [0.81, 0.33]),  # web text dropped, a caption keeps the image
    "dropped": ("blue", 0.05, [0.20, 0.10]),  # image dropped
    "border": ("yellow", 0.53, [0.47, 0.20]),  # web 0.53 and a caption 0.47: within 0.05
}


def hand_made_output(tmp_path, shards=2):
    """An output written by capfilt's own writer, with chosen scores (a CLIP score recorded
    beside the filter's: clip_web, clip_captions), and its input shards."""
    out = OutputDir(str(tmp_path / "out"))
    for s in range(shards):
        records, samples = [], []
        for key, (colour, web, scores) in CASES.items():
            key = f"{s}{key}"
            image = image_bytes(colour, size=(120, 90), seed=s)
            records.append({"key": key, "jpg": image, "txt": f"web <b>{key}</b>"})
            sample = Sample(key=key, image=image, image_ext="jpg", web_text=f"web <b>{key}</b>")
            sample.web_score, sample.caption_scores = web, scores
            sample.web_itc, sample.caption_itc = web - 0.45, [score - 0.45 for score in scores]
            sample.scores = {"clip": {"web": web - 0.6, "captions": [score - 0.6 for score in scores]}}
            sample.captions = [f"caption {i} of {key}" for i in range(len(scores))]
            samples.append(decide(sample, THRESHOLD, "best_score"))
        records.append({"key": f"{s}bad", "jpg": b"not an image", "txt": "broken"})
        input_tar = write_shard(tmp_path / f"{s:05d}.tar", records)
        samples.append(Sample(key=f"{s}bad", image=b"x", image_ext="jpg")
                       .fail(f"{input_tar}: {s}bad.jpg: cannot decode image: UnidentifiedImageError: 'x'"))
        with ShardWriter(out, f"{s:05d}", THRESHOLD, stats=ShardStats(input=input_tar),
                         schema=run_schema(["clip"])) as writer:
            for sample in samples:
                writer.write(sample)
    out.write_bytes("run.json", json.dumps({"config": {"filter": {"threshold": THRESHOLD, "model": "tiny-filter"},
                                                       "captioner": {"model": "tiny-captioner"},
                                                       "scores": [{"name": "clip", "model": "tiny-clip",
                                                                   "kind": "clip"}]}}).encode())
    return tmp_path / "out"


def test_report_data_totals_grids_and_error_reasons(tmp_path):
    data = build_report(str(hand_made_output(tmp_path)))
    assert data.totals["samples"] == 10 and data.totals["error"] == 2 and data.totals["shards"] == 2
    keys = {name: sorted(r["key"][1:] for r in rows) for name, rows in data.examples.items()}
    assert keys["web-kept"] == ["border", "border", "kept", "kept"]
    assert set(keys["rescued"]) == {"rescued"} and set(keys["dropped"]) == {"dropped"}
    assert set(keys["borderline"]) == {"border"}
    assert all(r["_thumb"].startswith("data:image/jpeg;base64,") for rows in data.examples.values() for r in rows)
    # One reason for both shards' decode errors: shard path and key taken out.
    assert list(data.errors) == ["cannot decode image: UnidentifiedImageError: …"]
    assert data.errors.most_common(1)[0][1] == 2
    assert sorted(data.web_scores) == sorted([c[1] for c in CASES.values()] * 2)


def test_report_bounds_what_it_reads(tmp_path):
    data = build_report(str(hand_made_output(tmp_path, shards=5)), max_shards=2, examples=1, image_shards=1)
    assert data.totals["shards"] == 5 and len(data.sampled_shards) == 2
    assert data.sampled_rows == 10  # two shards' parquet, not five
    assert all(len(rows) <= 1 for rows in data.examples.values())
    # Every example comes from one shard: one tar streamed for thumbnails.
    assert len({r["_shard"] for rows in data.examples.values() for r in rows}) == 1


def test_error_reason_drops_shard_key_and_numbers():
    reason = error_reason("s3://b/x/00012.tar: 000120007.jpg: image claims 90000x90000 pixels, over the "
                          "limit of 50000000", "000120007")
    assert reason == "image claims NxN pixels, over the limit of N"


def test_error_reason_is_linear_on_long_runs_of_spaces():
    import time

    start = time.perf_counter()
    assert error_reason("x.tar: k.jpg: bad" + " " * 200_000 + "name", "k").startswith("bad   ")
    assert time.perf_counter() - start < 1.0  # the quadratic regex took minutes here


FAILED = [{"shard": "00007", "input": "in/00007.tar", "attempts": 2, "error": "ShardReadError: not a tar"}]


def test_failed_shards_are_a_table_with_their_reasons_and_counted(tmp_path):
    from capfilt.report import render_html

    out = hand_made_output(tmp_path)
    (out / "stats.json").write_text(json.dumps({"failed": FAILED}))
    data = build_report(str(out))
    assert data.totals["shards_failed"] == 1
    assert data.errors["shard failed: not a tar"] == 1
    page = render_html(data)
    assert "<td>00007</td><td>in/00007.tar</td><td>2</td><td>ShardReadError: not a tar</td>" in page
    assert "{'shard'" not in page  # no raw Python dicts


def test_a_run_whose_every_shard_failed_still_gets_a_report(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stats.json").write_text(json.dumps({"failed": FAILED}))
    data = build_report(str(out))
    assert data.totals["shards"] == 0 and data.totals["shards_failed"] == 1 and data.failed == FAILED


def test_report_of_a_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope"), "--html", str(tmp_path / "r.html")]) == 2
    assert "no such output folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--html", str(tmp_path / "r.html")]) == 2
    assert "no finished shard" in capsys.readouterr().err


def test_report_opens_in_headless_chromium_with_every_image_rendered(tmp_path):
    out = hand_made_output(tmp_path)
    os.remove(tmp_path / "00001.tar")  # an input gone: kept images come from the output tar
    page = tmp_path / "report.html"
    assert main(["report", str(out), "--html", str(page)]) == 0
    text = page.read_text()
    assert "<script" not in text and "web <b>" not in text and "web &lt;b&gt;" in text  # escaped

    with Chromium(tmp_path / "profile") as browser:
        browser.open(page.as_uri())
        found = browser.evaluate("""JSON.stringify({
            sections: Array.from(document.querySelectorAll('section')).map(s => [s.id, s.querySelector('h2').textContent]),
            images: Array.from(document.images).map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0,
                                                           w: i.naturalWidth})),
            missing: Array.from(document.querySelectorAll('.noimg')).map(d => d.textContent),
            cards: Object.fromEntries(Array.from(document.querySelectorAll('section')).map(
                s => [s.id, s.querySelectorAll('.card').length])),
            summary: document.querySelector('#summary table').innerText,
            csp: (document.querySelector("meta[http-equiv='Content-Security-Policy']") || {}).content || null,
        })""")
        browser.screenshot(str(tmp_path / "report.png"))
    found = json.loads(found)
    assert [s[0] for s in found["sections"]] == ["summary", "shards", "errors", "scores", "itc", "recorded",
                                                 "web-kept", "rescued", "dropped", "borderline"]
    # Nothing may load from anywhere and no script may run: the page is untrusted data.
    assert found["csp"] == "default-src 'none'; img-src data:; style-src 'unsafe-inline'", found["csp"]
    assert found["images"] and all(i["ok"] for i in found["images"]), found["images"]
    assert found["images"][0]["alt"] == "score histograms" and found["images"][0]["w"] > 500
    assert found["images"][1]["alt"] == "ITC histograms" and found["images"][1]["w"] > 500
    assert found["images"][2]["alt"] == "clip histograms" and found["images"][2]["w"] > 500  # recorded
    # Shard 1's dropped image was only in its (removed) input tar: shown as missing, not broken.
    assert len(found["missing"]) == 1 and "not found" in found["missing"][0]
    assert found["cards"]["web-kept"] == 4 and found["cards"]["rescued"] == 2
    assert found["cards"]["dropped"] == 2 and found["cards"]["borderline"] == 2
    assert "10" in found["summary"] and "2 (20.0%)" in found["summary"]

    # The pixels are there: each test colour fills a good patch of the screenshot.
    shot = Image.open(tmp_path / "report.png").convert("RGB")
    assert shot.height > 900  # the whole page, beyond the window
    colours = shot.resize((shot.width // 4, shot.height // 4)).getcolors(1 << 20)
    for name, rgb in COLOURS.items():
        near = sum(n for n, c in colours if max(abs(a - b) for a, b in zip(c, rgb)) < 40)
        assert near > 100, f"{name} thumbnails not visible in the screenshot"


@pytest.mark.timeout(300)
def test_report_of_a_real_run(tiny_models, tmp_path):
    """capfilt run with tiny models, then capfilt report: totals as stats.json says, thumbnails."""
    make_web_shards(tmp_path / "web", shards=2, per_shard=4)
    out = tmp_path / "clean"
    assert main(["run", "--config", "configs/tiny.yaml", "--input", str(tmp_path / "web"), "--output", str(out),
                 "--no-progress", f"captioner.model={tiny_models[0]}", f"filter.model={tiny_models[1]}",
                 "runtime.num_workers=1"]) == 0
    assert main(["report", str(out), "--html", str(tmp_path / "r.html")]) == 0
    data = build_report(str(out))
    stats = json.load(open(out / "stats.json"))
    assert {k: data.totals[k] for k in ("samples", "kept", "dropped", "error")} == \
        {k: stats[k] for k in ("samples", "kept", "dropped", "error")}
    shown = [r for rows in data.examples.values() for r in rows]
    assert shown and all(r["_thumb"] for r in shown)
    assert len(data.web_scores) == 8 and len(data.caption_scores) > 0
    assert len(data.web_itc) == 8 and len(data.caption_itc) == len(data.caption_scores)  # filter.itc is on


def test_itc_similarities_are_plotted_and_an_older_output_without_them_still_reports(tmp_path):
    import pyarrow.parquet as pq

    from capfilt.report import render_html

    out = hand_made_output(tmp_path)
    data = build_report(str(out))
    assert sorted(data.web_itc) == pytest.approx(sorted([web - 0.45 for _, web, _ in CASES.values()] * 2))
    assert len(data.caption_itc) == len(data.caption_scores) == 16
    page = render_html(data)
    assert "alt='ITC histograms'" in page and "did not record" not in page
    assert "0.910 itc 0.46</span> web" in page  # each text's ITC beside its ITM score
    for path in out.glob("*.parquet"):  # a capfilt older than the ITC columns wrote none
        pq.write_table(pq.read_table(path).drop_columns(["web_itc", "caption_itc", "image_embedding"]), path)
    data = build_report(str(out))
    assert (data.web_itc, data.caption_itc, data.totals["samples"]) == ([], [], 10)
    page = render_html(data)
    assert "ITC histograms" not in page and "itc 0." not in page
    assert "the run did not record them (filter.itc off, or a capfilt older than them)" in page


def unit(*values):
    import numpy as np

    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


# key -> (colour, web ITM score, embedding): a ~ c ~ e (cosines >= 0.99), b ~ f, g alone and below
# the threshold. dedup keeps the best scored of each group: c (a and e its duplicates), b (f).
NEAR = {"00000": {"a": ("red", 0.9, unit(1, 0, 0)), "b": ("blue", 0.6, unit(0, 1, 0)),
                  "g": ("green", 0.2, unit(0, 0, 1))},
        "00001": {"c": ("yellow", 0.95, unit(1, 0.1, 0)), "e": ("red", 0.8, unit(1, 0, 0.1)),
                  "f": ("green", 0.55, unit(0.1, 1, 0))}}


def run_with_near_duplicates(root):
    """A finished run made by hand (ITM, ITC, embeddings) over input tars of real images."""
    from capfilt.config import Config
    from capfilt.io.layout import RUN_FILE
    from capfilt.io.reader import read_shard

    (root / "in").mkdir()
    run = OutputDir(str(root / "run"))
    for shard, samples in NEAR.items():
        url = write_shard(root / "in" / f"{shard}.tar", [
            {"key": key, "jpg": image_bytes(colour, seed=n), "txt": f"web <i>{key}</i>"}
            for n, (key, (colour, _, _)) in enumerate(samples.items())])
        with ShardWriter(run, shard, 0.5, "per_image", ShardStats(shard=shard, fingerprint="runfp")) as writer:
            for sample, (web, vector) in zip(read_shard(url), [(w, v) for _, w, v in samples.values()]):
                sample.width, sample.height = 48, 40
                sample.web_score, sample.web_itc, sample.embedding = web, web - 0.5, vector.astype("float16")
                writer.write(decide(sample, 0.5, "best_score"))
    config = Config(input=str(root / "in")).to_dict()
    config["filter"].update(itc=True, model="tiny-filter")
    config["writer"]["embeddings"] = True
    run.write_bytes(RUN_FILE, json.dumps({"config": config, "fingerprint": "runfp"}).encode())
    return root / "run"


def mean_colour(data_uri: str):
    import base64
    import io

    data = base64.b64decode(data_uri.split(",", 1)[1])
    return Image.open(io.BytesIO(data)).convert("RGB").resize((1, 1)).getpixel((0, 0))


def near(rgb, colour: str) -> bool:
    return max(abs(a - b) for a, b in zip(rgb, COLOURS[colour])) < 40


def test_a_selection_s_report_shows_its_reasons_and_duplicate_groups_with_their_images(tmp_path, capsys):
    import tarfile

    run = run_with_near_duplicates(tmp_path)
    new, page = tmp_path / "unique", tmp_path / "unique.html"
    assert main(["select", str(run), str(new), "--no-progress", "select.dedup=true"]) == 0
    assert main(["report", str(new), "--html", str(page)]) == 0
    data = build_report(str(new), examples=0)  # no grid: the groups' thumbnails are their own
    assert not any(data.examples.values())
    assert data.threshold == 0.5 and data.config["filter"]["model"] == "tiny-filter"  # the run's
    assert data.selection["reasons"] == {"below_threshold": 1, "duplicate_of": 3, "kept": 2}
    groups = [(g["key"], g["kept"]["key"], [r["key"] for r in g["removed"]], g["count"])
              for g in data.duplicate_groups]
    assert groups == [("c", "c", ["a", "e"], 2), ("b", "b", ["f"], 1)]  # the largest group first
    with tarfile.open(new / "00000.tar") as tar:
        assert {m.name.split(".")[0] for m in tar.getmembers()} == {"b"}  # a is in the input tar only
    colours = {r["key"]: mean_colour(r["_thumb"]) for g in data.duplicate_groups
               for r in [g["kept"], *g["removed"]]}
    assert all(near(colours[key], NEAR[shard][key][0]) for shard in NEAR for key in NEAR[shard] if key != "g")

    text = page.read_text()
    assert "id='selection'" in text and "web <i>" not in text and "web &lt;i&gt;a&lt;/i&gt;" in text
    assert "<tr><td>duplicate_of</td><td>3 (50.0%)</td><td>3</td></tr>" in text
    assert text.count("class='grid group'") == 2 and text.count("card keeper") == 2
    assert "00000/a · duplicate_of c" in text


def test_every_recorded_score_gets_its_histograms_and_a_selection_marks_its_thresholds(tmp_path, monkeypatch):
    from test_select import recorded_run

    from capfilt import report
    from capfilt.select import select

    out = hand_made_output(tmp_path / "hand")
    data = build_report(str(out))
    assert sorted(data.recorded["clip"]["web"]) == pytest.approx(sorted([w - 0.6 for _, w, _ in CASES.values()] * 2))
    assert sorted(data.recorded["clip"]["captions"]) == pytest.approx(
        sorted([s - 0.6 for _, _, scores in CASES.values() for s in scores] * 2))
    section = "".join(report._recorded_section(data))  # the page's (the browser test opens it)
    assert "<h3 id='recorded-clip'>clip (tiny-clip, clip)</h3>" in section and "alt='clip histograms'" in section
    # A selection of a run that recorded two scores: a pair of histograms each, its thresholds marked.
    plotted = []
    real = report.recorded_histogram_png
    monkeypatch.setattr(report, "recorded_histogram_png",
                        lambda name, web, captions, threshold=None: plotted.append(
                            (name, len(web), len(captions), threshold)) or real(name, web, captions, threshold))
    run = recorded_run(tmp_path / "scored")
    select(str(run), load_config(None, ["select.score_thresholds={clip: 0.3}"], output=str(tmp_path / "new")))
    data = build_report(str(tmp_path / "new"))
    assert list(data.recorded) == ["clip", "sig"] and data.score_thresholds == {"clip": 0.3}
    section = "".join(report._recorded_section(data))
    assert plotted == [("clip", 3, 4, 0.3), ("sig", 4, 4, None)]  # d's web text has no clip score
    assert "<h3 id='recorded-sig'>sig (tiny-sig, auto)</h3>" in section
    assert section.count("histograms' src='data:image/png") == 2
    # An output that recorded none: no such section.
    for path in out.glob("*.parquet"):
        pq.write_table(pq.read_table(path).drop_columns(["clip_web", "clip_captions"]), path)
    data = build_report(str(out))
    assert data.recorded == {} and report._recorded_section(data) == []
