"""A corpus of hostile and malformed shards through ``capfilt run``: it completes, and
every readable sample is a row with a status and a reason naming shard and key."""

import gzip
import io
import json
import os
import tarfile

import pyarrow.parquet as pq
import pytest
from conftest import image_bytes, write_shard
from corpus import animated_gif, encode, link, png_claiming, sixteen_bit_png, truncated_jpeg, write_raw_tar
from PIL import Image

from pipelines.cli import main

RED = image_bytes("red")


def image_shard(path):
    """Image content: (key, ext, bytes, expected status)."""
    cases = [
        ("corrupt_jpeg", "jpg", b"\xff\xd8\xff\xe0" + os.urandom(200), "error"),
        ("truncated_jpeg", "jpg", truncated_jpeg(), "error"),
        ("zero_bytes", "jpg", b"", "error"),
        ("html_as_jpg", "jpg", b"<!DOCTYPE html><html>404</html>", "error"),
        ("png_as_jpg", "jpg", encode(Image.new("RGB", (9, 7), (0, 0, 255)), "PNG"), "ok"),
        ("cmyk", "jpg", encode(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), "JPEG"), "ok"),
        ("png16", "png", sixteen_bit_png(), "ok"),
        ("grey", "png", encode(Image.new("L", (8, 6), 77), "PNG"), "ok"),
        ("palette", "png", encode(Image.new("RGB", (8, 6), (255, 0, 0)).convert("P"), "PNG"), "ok"),
        ("rgba", "png", encode(Image.new("RGBA", (8, 6), (0, 0, 255, 128)), "PNG"), "ok"),
        ("gif_as_jpg", "jpg", animated_gif(), "ok"),
        ("animated_webp", "webp", encode(Image.new("RGB", (8, 8), (9, 9, 9)), "WEBP", save_all=True,
                                         append_images=[Image.new("RGB", (8, 8), (200, 0, 0))]), "ok"),
        ("one_pixel", "png", encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), "ok"),
        ("bomb", "png", png_claiming(100_000, 100_000), "error"),
    ]
    write_shard(path, [{"key": k, ext: data, "txt": f"text of {k}"} for k, ext, data, _ in cases])
    return {k: status for k, _, _, status in cases}


def text_shard(path):
    long_text = "a red square " * 8000  # ~100 KB
    samples = [
        {"key": "no_txt", "jpg": RED},
        {"key": "empty_txt", "jpg": RED, "txt": ""},
        {"key": "not_utf8", "jpg": RED, "txt": b"caf\xe9 \xff\xfe red"},
        {"key": "long_txt", "jpg": RED, "txt": long_text},
        {"key": "bad_json", "jpg": RED, "txt": "a red square", "json": None},
    ]
    write_shard(path, [s for s in samples if s["key"] != "bad_json"])
    # malformed json needs raw bytes
    with tarfile.open(path, "a") as tar:
        for name, data in (("bad_json.jpg", RED), ("bad_json.txt", b"a red square"),
                           ("bad_json.json", b"{not json")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return {"no_txt": "ok", "empty_txt": "ok", "not_utf8": "ok", "long_txt": "ok", "bad_json": "ok"}, long_text


NOT_UTF8_KEY = "name\\xff"  # how the output names a key whose tar name holds the byte 0xff


def metadata_shard(path):
    """Issue 13's shard: 5 samples, 4 good, metadata the output cannot hold as it is.

    Before, each of these lost the whole shard: a json with a lone surrogate, a json nested past
    the recursion limit, a member name that is not UTF-8, and a sidecar parquet with bytes and
    datetimes. Only the sample with the bad name is an error now; bad metadata costs itself."""
    import datetime

    import pyarrow as pa

    members = [("good_a.jpg", RED), ("good_a.txt", b"a red square"),
               ("lone_surrogate.jpg", RED), ("lone_surrogate.json", b'{"c": "\\ud83d"}'),
               ("deep_json.jpg", RED), ("deep_json.json", b"[" * 100_000 + b"]" * 100_000),
               ("name\xff.jpg".encode("latin-1").decode("utf-8", "surrogateescape"), RED),
               ("good_b.jpg", RED), ("good_b.json", b'{"url": "http://127.0.0.1/b.jpg"}')]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    keys = ["good_a", "lone_surrogate", "deep_json", "good_b"]
    pq.write_table(pa.table({"key": keys, "raw": [b"\x00\xff"] * 4, "status": ["success"] * 4,
                             "when": [datetime.datetime(2026, 1, 1)] * 4}),
                   str(path).replace(".tar", ".parquet"))
    return {"good_a": "ok", "lone_surrogate": "ok", "deep_json": "ok", NOT_UTF8_KEY: "error", "good_b": "ok"}


def structure_shards(folder):
    expected = {}
    write_raw_tar(folder / "00002.tar", [
        ("no_image.txt", b"only a text"),
        ("dup.jpg", RED), ("dup.txt", b"first"),
        ("other.jpg", RED), ("other.txt", b"other"),
        ("dup.txt", b"again, not adjacent"),
    ])
    expected.update(no_image="error", dup="ok", other="ok")
    # A tar cut in the middle of its second sample's image.
    full = write_raw_tar(folder / "full.tar", [("whole.jpg", RED), ("whole.txt", b"x"),
                                               ("cut.jpg", image_bytes("blue", size=(64, 64)))])
    data = open(full, "rb").read()
    with tarfile.open(full) as tar:
        cut_at = tar.getmember("cut.jpg").offset_data + 100
    os.remove(full)
    (folder / "00003.tar").write_bytes(data[:cut_at])
    expected.update(whole="ok", cut="error")
    gz = write_raw_tar(folder / "plain.tar", [("zipped.jpg", RED), ("zipped.txt", b"a red square")])
    (folder / "00004.tar.gz").write_bytes(gzip.compress(open(gz, "rb").read()))
    os.remove(gz)
    expected.update(zipped="ok")
    write_raw_tar(folder / "00005.tar", [])  # an empty tar
    return expected


def hostile_names_shard(path):
    dev = tarfile.TarInfo("device.jpg")
    dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
    write_raw_tar(path, [
        ("../../x.jpg", RED), ("../../x.txt", b"escape"),
        ("/abs/y.jpg", RED), ("/abs/y.txt", b"absolute"),
        link("sym.jpg", "/etc/passwd", tarfile.SYMTYPE), ("sym.txt", b"symlink"),
        link("hard.jpg", "fine.jpg", tarfile.LNKTYPE), ("hard.txt", b"hardlink"),
        dev, ("device.txt", b"device"),
        ("fine.jpg", RED), ("fine.txt", b"a red square"),
    ])
    return {"../../x": "error", "/abs/y": "error", "sym": "error", "hard": "error",
            "device": "error", "fine": "ok"}


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("hostile")
    inputs = root / "in"
    inputs.mkdir()
    expected = image_shard(inputs / "00000.tar")
    text_expected, long_text = text_shard(inputs / "00001.tar")
    expected.update(text_expected)
    expected.update(structure_shards(inputs))
    expected.update(hostile_names_shard(inputs / "00006.tar"))
    expected.update(metadata_shard(inputs / "00007.tar"))
    before = set(root.rglob("*"))
    cap, itm = tiny_models
    out = root / "out"
    rc = main(["run", "--config", "configs/tiny.yaml", "--output", str(out), "--no-progress",
               "--input", str(inputs), str(inputs / "00099.tar"),  # the last one is missing
               f"captioner.model={cap}", f"filter.model={itm}", "captioner.num_captions=2",
               "filter.threshold=0.4633", "runtime.batch_size=4", "runtime.shard_attempts=1"])
    created = set(root.rglob("*")) - before
    rows = []
    for name in sorted(os.listdir(out)):
        if name.endswith(".parquet"):
            rows += [dict(r, shard=name[:-8]) for r in pq.read_table(out / name).to_pylist()]
    return dict(rc=rc, out=out, root=root, expected=expected, rows=rows, created=created,
                long_text=long_text)


def test_run_completes_and_names_only_the_missing_shard(hostile_run):
    assert hostile_run["rc"] == 1
    stats = json.loads((hostile_run["out"] / "stats.json").read_text())
    assert [f["shard"] for f in stats["failed"]] == ["00099"]
    assert stats["shards_done"] == 8  # every other shard, empty and gzipped ones included


def test_every_readable_sample_is_a_row_with_status_and_reason(hostile_run):
    by_key = {}
    for row in hostile_run["rows"]:
        by_key.setdefault(row["key"], []).append(row)
    for key, status in hostile_run["expected"].items():
        assert key in by_key, key
        row = by_key[key][0]
        if status == "error":
            assert row["status"] == "error", (key, row)
            assert row["error"] and key.lstrip("/") in row["error"].replace("\\\\", "\\"), row["error"]
            assert f"{row['shard']}.tar" in row["error"], row["error"]  # names the shard
        else:
            assert row["status"] in ("kept", "dropped"), (key, row["error"])
            assert row["error"] is None
    # The later, non-adjacent 'dup' member is reported, not merged or lost.
    assert [r["status"] for r in by_key["dup"]] == [by_key["dup"][0]["status"], "error"]
    assert "duplicate" in by_key["dup"][1]["error"]


def test_counts_reconcile_in_every_stats_file(hostile_run):
    out = hostile_run["out"]
    for name in os.listdir(out):
        if name.endswith("stats.json"):
            s = json.loads((out / name).read_text())
            assert s["samples"] == s["kept"] + s["dropped"] + s["error"], name
    total = json.loads((out / "stats.json").read_text())
    assert total["samples"] == len(hostile_run["rows"])


def test_text_edge_cases(hostile_run):
    rows = {r["key"]: r for r in hostile_run["rows"]}
    assert rows["no_txt"]["web_text"] is None and rows["no_txt"]["web_score"] is None
    assert len(rows["no_txt"]["captions"]) == 2
    assert rows["empty_txt"]["web_text"] == "" and rows["empty_txt"]["web_score"] is None
    assert "\ufffd" in rows["not_utf8"]["web_text"] and rows["not_utf8"]["web_score"] is not None
    # Truncated for the model, kept whole in the metadata.
    assert rows["long_txt"]["web_text"] == hostile_run["long_text"]
    assert rows["long_txt"]["web_score"] is not None
    # Malformed metadata costs the metadata: the sample goes on, its json kept as read.
    assert rows["bad_json"]["input_json"] == "{not json" and "bad_json.json" in rows["bad_json"]["notes"]


def test_metadata_the_output_cannot_hold_costs_only_itself(hostile_run):
    rows = {r["key"]: r for r in hostile_run["rows"] if r["shard"] == "00007"}
    assert rows["lone_surrogate"]["input_json"] == '{"c": "\\ud83d"}'
    assert "RecursionError" in rows["deep_json"]["notes"]
    # The sidecar's serialisable fields fill in the json; its bytes and datetimes are left out.
    meta = json.loads(rows["good_b"]["input_json"])
    assert meta == {"url": "http://127.0.0.1/b.jpg", "status": "success"}
    assert "not UTF-8" in rows[NOT_UTF8_KEY]["error"]


def test_nothing_is_written_outside_the_output_folder(hostile_run):
    out = hostile_run["out"]
    outside = [p for p in hostile_run["created"] if out not in p.parents and p != out]
    assert outside == []
    for folder in (hostile_run["root"].parent, hostile_run["root"].parent.parent):
        assert not (folder / "x.jpg").exists()
    for name in os.listdir(out):
        assert "/" not in name and not name.startswith("..")


def test_output_tars_hold_only_safe_regular_members(hostile_run):
    out = hostile_run["out"]
    for name in os.listdir(out):
        if name.endswith(".tar"):
            with tarfile.open(out / name) as tar:
                for member in tar.getmembers():
                    assert member.isreg()
                    assert not member.name.startswith("/") and ".." not in member.name.split("/")
