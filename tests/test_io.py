"""capfilt.io: input expansion, the shard reader, image decoding, atomic output and the shard writer."""

import gzip
import io
import json
import os
import tarfile
import time

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from capfilt.config import ReaderConfig
from capfilt.decision import decide
from capfilt.io.fs import OutputDir, expand_input, shard_name
from capfilt.io.images import ImageError, decode_rgb
from capfilt.io.reader import read_shard
from capfilt.io.writer import PARQUET_SCHEMA, ShardWriter
from capfilt.sample import DROPPED, ERROR, KEPT, Sample
from conftest import image_bytes, make_web_shards, write_shard
from corpus import animated_gif, encode, link, png_claiming, sixteen_bit_png, truncated_jpeg, write_raw_tar


def touch(folder, *names):
    for name in names:
        (folder / name).write_bytes(b"")


# --- expand_input and shard_name -------------------------------------------------------------

def test_expand_brace_pattern(tmp_path):
    touch(tmp_path, "00000.tar", "00001.tar", "00002.tar", "00003.tar")
    urls = expand_input(str(tmp_path / "{00000..00002}.tar"))
    assert urls == [str(tmp_path / f"0000{i}.tar") for i in range(3)]


def test_expand_glob_is_sorted_and_filtered_by_the_pattern(tmp_path):
    touch(tmp_path, "00002.tar", "00000.tar", "notes.txt", "00001.tar")
    urls = expand_input(str(tmp_path / "*.tar"))
    assert urls == [str(tmp_path / f"0000{i}.tar") for i in range(3)]


def test_expand_folder_takes_only_its_own_shards_sorted(tmp_path):
    touch(tmp_path, "b.tar", "a.tar", "notes.txt", "a.parquet", "c.tar.gz", ".a.tar.tmp-0123")
    (tmp_path / "clean").mkdir()
    touch(tmp_path / "clean", "a.tar")  # an output folder inside the input folder
    assert expand_input(str(tmp_path)) == [str(tmp_path / n) for n in ("a.tar", "b.tar", "c.tar.gz")]


def test_expand_list_concatenates_and_drops_repeats(tmp_path):
    touch(tmp_path, "00000.tar", "00001.tar", "00002.tar")
    urls = expand_input([str(tmp_path / "{00000..00001}.tar"), str(tmp_path / "*.tar")])
    assert urls == [str(tmp_path / f"0000{i}.tar") for i in range(3)]


def test_expand_keeps_an_explicit_missing_path(tmp_path):
    # Documented: the shard then fails with its own error rather than vanishing from the run.
    missing = str(tmp_path / "missing.tar")
    assert expand_input(missing) == [missing]


def test_glob_matching_nothing_raises_naming_the_pattern(tmp_path):
    touch(tmp_path, "00000.tar")
    pattern = str(tmp_path / "shard-*.tar")
    with pytest.raises(FileNotFoundError) as info:
        expand_input(pattern)
    assert pattern in str(info.value)


def test_folder_without_tars_raises_naming_the_folder(tmp_path):
    touch(tmp_path, "notes.txt")
    with pytest.raises(FileNotFoundError) as info:
        expand_input(str(tmp_path))
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("url, name", [
    ("data/00012.tar", "00012"),
    ("/abs/data/00012.tar.gz", "00012"),
    ("s3://bucket/prefix/00012.tar", "00012"),
    ("gs://bucket/x/shard-7.tgz", "shard-7"),
])
def test_shard_name(url, name):
    assert shard_name(url) == name


# --- read_shard --------------------------------------------------------------------------------

def web_samples(n=3):
    return [{"key": f"{i:09d}", "jpg": image_bytes("red", seed=i), "txt": f"text {i}",
             "json": {"url": f"http://127.0.0.1/{i}.jpg", "key": f"{i:09d}", "status": "success"}}
            for i in range(n)]


def test_read_img2dataset_shard(tmp_path):
    written = web_samples(4)
    samples = list(read_shard(write_shard(tmp_path / "00000.tar", written)))
    assert [s.key for s in samples] == [w["key"] for w in written]
    for sample, w in zip(samples, written):
        assert sample.error is None and sample.status is None
        assert sample.image == w["jpg"]
        assert sample.image_ext == "jpg"
        assert sample.web_text == w["txt"]
        assert sample.meta == w["json"]


def test_read_shards_made_like_img2dataset_mix_jpg_and_png(tmp_path):
    paths = make_web_shards(tmp_path / "in", shards=1, per_shard=3)
    samples = list(read_shard(paths[0]))
    assert [s.image_ext for s in samples] == ["jpg", "jpg", "png"]
    png = samples[2]
    assert png.error is None
    assert Image.open(io.BytesIO(png.image)).format == "PNG"
    assert png.web_text == png.meta["caption"]


def test_read_png_sample(tmp_path):
    data = image_bytes("blue", "PNG")
    (sample,) = read_shard(write_shard(tmp_path / "s.tar", [{"key": "k", "png": data, "txt": "t"}]))
    assert (sample.image, sample.image_ext, sample.error) == (data, "png", None)
    assert sample.meta == {}


def test_sample_without_image_is_an_error_naming_the_key(tmp_path):
    written = web_samples(3)
    del written[1]["jpg"]
    samples = list(read_shard(write_shard(tmp_path / "s.tar", written)))
    assert [s.key for s in samples] == [w["key"] for w in written]
    bad = samples[1]
    assert bad.status == ERROR
    assert written[1]["key"] in bad.error and "no image" in bad.error
    assert samples[0].error is None and samples[2].error is None


def test_sample_with_an_unlisted_image_extension_is_an_error(tmp_path):
    path = write_shard(tmp_path / "s.tar", [{"key": "k", "gif": encode(Image.new("RGB", (4, 4)), "GIF")}])
    (sample,) = read_shard(path, ReaderConfig(image_extensions=["jpg", "png"]))
    assert sample.status == ERROR and "'k'" in sample.error


def test_malformed_json_costs_only_the_metadata(tmp_path):
    path = write_raw_tar(tmp_path / "s.tar", [
        ("a.jpg", image_bytes("red")), ("a.json", b"{not json"),
        ("b.jpg", image_bytes("green")), ("b.json", b'{"url": "u"}'),
    ])
    a, b = read_shard(path)
    assert a.error is None and a.meta == {} and a.raw_json == "{not json" and "a.json" in a.notes[0]
    assert b.error is None and b.meta == {"url": "u"}


def test_non_adjacent_repeated_key_is_a_duplicate_error(tmp_path):
    written = web_samples(2)
    again = dict(written[0], txt="again")
    samples = list(read_shard(write_shard(tmp_path / "s.tar", written + [again])))
    assert [s.key for s in samples] == [written[0]["key"], written[1]["key"], written[0]["key"]]
    assert samples[0].error is None and samples[0].web_text == written[0]["txt"]
    assert samples[1].error is None
    assert samples[2].status == ERROR and "duplicate" in samples[2].error


def test_hostile_member_names_are_errors_and_nothing_is_written(tmp_path, monkeypatch):
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    path = write_raw_tar(work / "s.tar", [
        ("../../x.jpg", image_bytes("red")), ("../../x.txt", b"escape"),
        ("/abs/y.jpg", image_bytes("green")),
        ("ok.jpg", image_bytes("blue")),
    ])
    with tarfile.open(path) as tar:  # the hostile names really are in the tar
        assert tar.getnames()[:3] == ["../../x.jpg", "../../x.txt", "/abs/y.jpg"]
    before = sorted(p for p in tmp_path.rglob("*"))
    samples = list(read_shard(path))
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert [s.key for s in samples] == ["../../x", "/abs/y", "ok"]
    assert samples[0].status == ERROR and "'..'" in samples[0].error
    assert samples[1].status == ERROR and "absolute" in samples[1].error
    assert samples[0].image is None and samples[1].image is None
    assert samples[2].error is None


def test_symlink_and_hardlink_members_are_not_read(tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"SECRET" * 100)
    real = image_bytes("red")
    path = write_raw_tar(tmp_path / "s.tar", [
        ("a.jpg", real), ("a.txt", b"web a"),
        link("b.jpg", str(secret), tarfile.SYMTYPE), ("b.txt", b"web b"),
        link("c.jpg", "a.jpg", tarfile.LNKTYPE), ("c.txt", b"web c"),
        link("d.png", "a.jpg", tarfile.SYMTYPE), ("d.jpg", image_bytes("green")),
    ])
    a, b, c, d = read_shard(path)
    assert a.error is None and a.image == real
    for bad in (b, c):
        assert bad.status == ERROR and bad.image is None
        assert "non-regular" in bad.error and bad.key in bad.error
    assert b.web_text == "web b"  # the regular members of the key are still read
    assert all(b"SECRET" not in (s.image or b"") for s in (a, b, c, d))
    # A link beside a real image is skipped; the real image is used.
    assert d.error is None and d.image_ext == "jpg" and d.image == image_bytes("green")


def test_gzipped_shard_reads_the_same(tmp_path):
    plain = write_shard(tmp_path / "00000.tar", web_samples(3))
    gz = tmp_path / "00000.tar.gz"
    gz.write_bytes(gzip.compress((tmp_path / "00000.tar").read_bytes()))
    fields = lambda s: (s.key, s.image, s.image_ext, s.web_text, s.meta, s.error)  # noqa: E731
    assert [fields(s) for s in read_shard(str(gz))] == [fields(s) for s in read_shard(plain)]


def test_tar_cut_inside_a_member_keeps_the_complete_samples(tmp_path):
    written = web_samples(3)
    path = write_shard(tmp_path / "full.tar", written)
    with tarfile.open(path) as tar:
        member = tar.getmember(f"{written[2]['key']}.jpg")
    cut = tmp_path / "cut.tar"
    cut.write_bytes((tmp_path / "full.tar").read_bytes()[: member.offset_data + member.size // 2])
    samples = list(read_shard(str(cut)))
    assert [s.key for s in samples] == [w["key"] for w in written]
    for sample, w in zip(samples[:2], written):
        assert sample.error is None and sample.image == w["jpg"] and sample.meta == w["json"]
    assert samples[2].status == ERROR and "truncated" in samples[2].error


def test_gzipped_shard_cut_short_ends_with_an_error_sample(tmp_path):
    write_shard(tmp_path / "full.tar", web_samples(3))
    data = gzip.compress((tmp_path / "full.tar").read_bytes())
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) * 3 // 4])
    samples = list(read_shard(str(cut)))
    assert samples and samples[-1].status == ERROR
    assert all(s.error is None for s in samples[:-1])
    assert len(samples) <= 3


def test_member_over_the_size_limit_is_not_read(tmp_path):
    big = image_bytes("red", size=(200, 200))
    path = write_raw_tar(tmp_path / "s.tar", [("a.jpg", big), ("b.jpg", image_bytes("blue", size=(4, 4)))])
    a, b = read_shard(path, ReaderConfig(max_member_bytes=len(big) - 1))
    assert a.status == ERROR and "over the limit" in a.error
    assert b.error is None


def test_directory_entries_are_not_samples(tmp_path):
    folder = tarfile.TarInfo("dir")
    folder.type = tarfile.DIRTYPE
    path = write_raw_tar(tmp_path / "s.tar", [folder, ("dir/a.jpg", image_bytes("red"))])
    samples = list(read_shard(path))
    assert [(s.key, s.error) for s in samples] == [("dir/a", None)]


# --- decode_rgb ----------------------------------------------------------------------------------


IMAGES = {
    "rgb_jpeg": lambda: image_bytes("red"),
    "rgba_png": lambda: encode(Image.new("RGBA", (8, 6), (0, 0, 255, 128)), "PNG"),
    "palette_png": lambda: encode(Image.new("RGB", (8, 6), (255, 0, 0)).convert("P"), "PNG"),
    "grayscale_png": lambda: encode(Image.new("L", (8, 6), 77), "PNG"),
    "16bit_png": sixteen_bit_png,
    "cmyk_jpeg": lambda: encode(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), "JPEG"),
    "1x1_png": lambda: encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"),
    "animated_gif": animated_gif,
    "webp": lambda: encode(Image.new("RGB", (8, 6), (0, 200, 0)), "WEBP", lossless=True),
}


def test_image_fixtures_are_what_they_claim():
    opened = {kind: Image.open(io.BytesIO(make())) for kind, make in IMAGES.items()}
    assert {kind: img.mode for kind, img in opened.items() if kind != "webp"} == {
        "rgb_jpeg": "RGB", "rgba_png": "RGBA", "palette_png": "P", "grayscale_png": "L",
        "16bit_png": "I;16", "cmyk_jpeg": "CMYK", "1x1_png": "RGB", "animated_gif": "P"}
    assert opened["animated_gif"].n_frames == 3


@pytest.mark.parametrize("kind", list(IMAGES))
def test_decode_rgb_returns_rgb_of_the_same_size(kind):
    data = IMAGES[kind]()
    source = Image.open(io.BytesIO(data))
    img = decode_rgb(data, max_pixels=10_000)
    assert img.mode == "RGB"
    assert img.size == source.size
    img.tobytes()  # pixels are really there


def test_decode_rgb_keeps_colours():
    assert decode_rgb(IMAGES["palette_png"](), 10_000).getpixel((0, 0)) == (255, 0, 0)
    assert decode_rgb(IMAGES["grayscale_png"](), 10_000).getpixel((0, 0)) == (77, 77, 77)
    assert decode_rgb(IMAGES["1x1_png"](), 10_000).getpixel((0, 0)) == (1, 2, 3)
    red, green, blue = decode_rgb(IMAGES["cmyk_jpeg"](), 10_000).getpixel((4, 3))
    assert red > 200 and green < 60 and blue < 60
    # The first frame of an animation.
    red, green, blue = decode_rgb(animated_gif(), 10_000).getpixel((0, 0))
    assert red > 200 and green < 60 and blue < 60


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"


def test_only_the_allowed_formats_parse_the_bytes():
    """An EPS saved as .jpg is not identified at all: PIL's EPS plugin would run Ghostscript."""
    with pytest.raises(ImageError, match="UnidentifiedImageError"):
        decode_rgb(EPS, 10_000)
    png = IMAGES["1x1_png"]()
    assert decode_rgb(png, 10_000).size == (1, 1)
    with pytest.raises(ImageError, match="UnidentifiedImageError"):  # the formats are configurable
        decode_rgb(png, 10_000, formats=["JPEG"])


def test_decode_rgb_puts_transparency_on_white():
    clear = encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "PNG")
    assert decode_rgb(clear, 100).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    img = decode_rgb(sixteen_bit_png(), 10_000)
    values = sorted({img.getpixel((x, y))[0] for x in range(16) for y in range(16)})
    # 0..65280 in 256 steps maps onto (nearly) the whole 8-bit range, not onto {0, 255}.
    assert len(values) > 200 and values[0] == 0 and values[-1] >= 254


@pytest.mark.parametrize("data", [
    b"",
    b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
    b"\xff\xd8\xff\xe0" + b"\x00" * 10,
    truncated_jpeg(),
], ids=["empty", "html", "jpeg_magic_only", "truncated_jpeg"])
def test_undecodable_bytes_raise_image_error(data):
    with pytest.raises(ImageError):
        decode_rgb(data, max_pixels=10**6)


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (8_000, 8_000)])
def test_decompression_bomb_is_refused_from_the_header(width, height):
    data = png_claiming(width, height)
    start = time.perf_counter()
    with pytest.raises(ImageError) as info:
        decode_rgb(data, max_pixels=50_000_000)
    assert time.perf_counter() - start < 1.0
    assert "limit" in str(info.value)
    if width * height < 89_000_000:  # under PIL's own limit: refused by max_pixels, not by PIL
        assert f"{width}x{height}" in str(info.value) and "50000000" in str(info.value)


def test_image_over_max_pixels_is_refused_naming_the_limit():
    data = image_bytes("green", size=(48, 40))
    decode_rgb(data, max_pixels=48 * 40)  # exactly at the limit is fine
    with pytest.raises(ImageError, match=r"48x40.*limit of 1919"):
        decode_rgb(data, max_pixels=48 * 40 - 1)


def test_max_pixels_above_pils_default_is_honoured():
    data = encode(Image.new("1", (9500, 9500), 1), "PNG")  # 90.25 Mpx, 30 kB
    img = decode_rgb(data, max_pixels=100_000_000)
    assert img.size == (9500, 9500)


# --- OutputDir -----------------------------------------------------------------------------------

def test_atomic_open_shows_the_file_only_when_complete(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    with out.atomic_open("00000.tar") as f:
        f.write(b"part one ")
        assert not out.exists("00000.tar")
        assert len(out.listdir()) == 1 and out.listdir()[0].startswith(".00000.tar.tmp-")
        f.write(b"part two")
    assert out.listdir() == ["00000.tar"]
    assert (tmp_path / "out" / "00000.tar").read_bytes() == b"part one part two"


def test_atomic_open_leaves_nothing_when_the_body_raises(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    with pytest.raises(RuntimeError, match="boom"):
        with out.atomic_open("00000.tar") as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert out.listdir() == []


def test_failed_rewrite_keeps_the_previous_file(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    out.write_bytes("00000.parquet", b"old")
    with pytest.raises(KeyboardInterrupt):
        with out.atomic_open("00000.parquet") as f:
            f.write(b"new, half")
            raise KeyboardInterrupt
    assert out.listdir() == ["00000.parquet"]
    assert out.read_text("00000.parquet") == "old"


def test_remove_temporaries_deletes_only_leftover_temporaries(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    touch(tmp_path / "out", ".00000.tar.tmp-0123456789ab", ".00000.parquet.tmp-ba9876543210",
          "00000.tar", "00001_stats.json", ".hidden")
    assert sorted(out.remove_temporaries()) == [
        ".00000.parquet.tmp-ba9876543210", ".00000.tar.tmp-0123456789ab"]
    assert out.listdir() == [".hidden", "00000.tar", "00001_stats.json"]


@pytest.mark.parametrize("name", ["", ".", "..", "../x.tar", "a/b.tar"])
def test_output_names_must_be_plain(tmp_path, name):
    with pytest.raises(ValueError):
        OutputDir(str(tmp_path)).path(name)


# --- ShardWriter ---------------------------------------------------------------------------------

def judged(key, ext, data, web_score, caption_scores):
    sample = Sample(key=key, image=data, image_ext=ext, web_text=f"web {key}",
                    meta={"url": f"http://127.0.0.1/{key}.{ext}", "key": key})
    sample.width, sample.height = 48, 40
    sample.web_score = web_score
    sample.captions = [f"caption {i} of {key}" for i in range(len(caption_scores))]
    sample.caption_scores = caption_scores
    return decide(sample, 0.5, "best_score")


def shard_samples():
    return [
        judged("000", "jpg", image_bytes("red"), 0.9, [0.2, 0.7]),
        judged("001", "png", image_bytes("blue", "PNG"), 0.1, [0.8, 0.3]),
        judged("002", "jpg", image_bytes("green"), 0.1, [0.2, 0.3]),
        Sample(key="003", image=b"junk", image_ext="jpg").fail("003.jpg: cannot decode image"),
    ]


def write_output(folder, samples, shard="00000", layout="per_image"):
    out = OutputDir(str(folder))
    with ShardWriter(out, shard, threshold=0.5, layout=layout) as writer:
        for sample in samples:
            writer.write(sample)
    return out


def test_shard_writer_tar_reads_back_with_webdataset(tmp_path):
    samples = shard_samples()
    assert [s.status for s in samples] == [KEPT, KEPT, DROPPED, ERROR]
    write_output(tmp_path / "out", samples)
    dataset = wds.WebDataset(str(tmp_path / "out" / "00000.tar"), shardshuffle=False, empty_check=False)
    records = list(dataset)
    assert [r["__key__"] for r in records] == ["000", "001"]
    for record, sample in zip(records, samples):
        assert record[sample.image_ext] == sample.image
        assert record["txt"].decode() == sample.text
        meta = json.loads(record["json"])
        assert meta["url"] == sample.meta["url"]
        assert meta["capfilt"]["threshold"] == 0.5
        assert meta["capfilt"]["text"] == sample.text
    assert records[0]["txt"] == b"web 000"  # best score: the web text at 0.9
    assert records[1]["txt"] == b"caption 0 of 001"


def test_pairs_layout_writes_one_sample_per_kept_pair(tmp_path):
    samples = shard_samples()
    write_output(tmp_path / "out", samples, layout="pairs")
    records = list(wds.WebDataset(str(tmp_path / "out" / "00000.tar"), shardshuffle=False))
    # 000 keeps its web text and caption 1; 001 keeps caption 0; 002 and 003 keep nothing.
    assert [r["__key__"] for r in records] == ["000_0", "000_1", "001_0"]
    assert [r["txt"].decode() for r in records] == ["web 000", "caption 1 of 000", "caption 0 of 001"]
    assert records[0]["jpg"] == records[1]["jpg"] == samples[0].image
    pair = json.loads(records[1]["json"])["capfilt_pair"]
    assert pair == {"image_key": "000", "text": "caption 1 of 000", "origin": "synthetic", "score": 0.7}
    # The parquet still has one row per input image.
    assert pq.read_table(tmp_path / "out" / "00000.parquet").num_rows == 4


def test_shard_writer_parquet_has_a_row_per_sample(tmp_path):
    samples = shard_samples()
    out = write_output(tmp_path / "out", samples)
    assert out.listdir() == ["00000.parquet", "00000.tar", "00000_stats.json"]
    # The writer tallies each sample's decision and writes the stats when the shard closes.
    assert json.loads(out.read_text("00000_stats.json")) == {
        "shard": "00000", "input": "", "fingerprint": "", "samples": 4, "kept": 2, "dropped": 1, "error": 1,
        "web_texts": 3, "web_kept": 1, "captions": 6, "captions_kept": 2, "tar_samples": 2, "timing": {}}
    table = pq.read_table(str(tmp_path / "out" / "00000.parquet"))
    assert table.schema.equals(PARQUET_SCHEMA)
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == ["000", "001", "002", "003"]
    assert [r["status"] for r in rows] == [KEPT, KEPT, DROPPED, ERROR]
    assert [r["error"] is None for r in rows] == [True, True, True, False]
    assert "cannot decode" in rows[3]["error"]
    first = rows[0]
    assert first["url"] == "http://127.0.0.1/000.jpg"
    assert (first["width"], first["height"], first["image_ext"]) == (48, 40, "jpg")
    assert (first["text"], first["text_origin"], first["text_score"]) == ("web 000", "web", 0.9)
    assert first["web_kept"] is True
    assert first["kept_texts"] == ["web 000", "caption 1 of 000"]
    assert first["kept_scores"] == [0.9, 0.7]
    assert first["captions"] == ["caption 0 of 000", "caption 1 of 000"]
    assert first["caption_scores"] == [0.2, 0.7]
    assert rows[1]["text_origin"] == "synthetic" and rows[1]["web_kept"] is False
    assert rows[2]["text"] is None and rows[2]["kept_texts"] == []


@pytest.mark.parametrize("layout", ["per_image", "pairs"])
def test_shard_writer_records_each_kept_samples_bytes_in_the_tar(tmp_path, layout):
    write_output(tmp_path / "out", shard_samples(), layout=layout)
    rows = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()
    sizes = [r["tar_bytes"] for r in rows]
    assert sizes[2:] == [None, None]  # dropped, error: not in the tar
    members = {}
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        for info in tar:  # header block(s), then the data padded to whole blocks
            key = info.name.split(".")[0].split("_")[0]
            members[key] = members.get(key, 0) + (info.offset_data - info.offset) + -(-info.size // 512) * 512
    assert sizes[:2] == [members["000"], members["001"]]


def test_shard_writer_output_is_deterministic(tmp_path):
    write_output(tmp_path / "a", shard_samples())
    write_output(tmp_path / "b", shard_samples())
    assert (tmp_path / "a" / "00000.tar").read_bytes() == (tmp_path / "b" / "00000.tar").read_bytes()


def test_shard_writer_leaves_nothing_when_the_body_raises(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    samples = shard_samples()
    with pytest.raises(RuntimeError, match="model crashed"):
        with ShardWriter(out, "00000", threshold=0.5) as writer:
            writer.write(samples[0])
            raise RuntimeError("model crashed")
    assert out.listdir() == []


def test_a_shard_whose_parquet_cannot_be_written_leaves_no_file(tmp_path, monkeypatch):
    """Storage failing at the end of a shard fails the shard: no tar under its final name."""
    import capfilt.io.writer as writer_module

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_module.pq, "write_table", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_output(tmp_path / "out", shard_samples())
    assert OutputDir(str(tmp_path / "out")).listdir() == []


def test_configure_storage_replaces_what_an_earlier_run_set():
    from fsspec.config import conf

    from capfilt.io.fs import configure_storage

    saved = {k: dict(v) for k, v in conf.items()}
    try:
        configure_storage({"memory": {"skip_instance_cache": True}, "s3": {"key": "first-run-key"}})
        configure_storage({"s3": {"endpoint_url": "http://127.0.0.1:1"}})
        assert conf["s3"] == {"endpoint_url": "http://127.0.0.1:1"}  # no stale key
        assert "memory" not in conf
    finally:
        configure_storage({})
        conf.clear()
        conf.update(saved)


def test_object_store_output_creates_no_bucket_and_lists_empty():
    import fsspec

    out = OutputDir("memory://capfilt-nonexistent-bucket/out")
    assert out.listdir() == []
    assert not fsspec.filesystem("memory").exists("/capfilt-nonexistent-bucket")


def test_memory_per_key_is_bounded_whatever_the_tar_holds_under_it(tmp_path):
    """1,000 members of 64 KB under one key (64 MB): only the image, text and json are read."""
    import tracemalloc


    junk = os.urandom(64 * 1024)
    path = write_raw_tar(tmp_path / "s.tar", [("k.jpg", image_bytes("red")), ("k.txt", b"a red square")]
                         + [(f"k.x{i}", junk) for i in range(1000)])
    list(read_shard(write_raw_tar(tmp_path / "warm.tar", [("w.jpg", image_bytes("red"))])))  # imports done
    tracemalloc.start()
    (sample,) = read_shard(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sample.error is None and sample.web_text == "a red square"
    assert peak < 8 * 2**20, peak  # a few blocks of tar streaming, not the 64 MB
    assert len(sample.notes) == 11 and sample.notes[-1] == "more members skipped"
