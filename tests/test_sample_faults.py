"""One sample can only cost itself (issue 13): a fault while one sample is decoded, judged or
written becomes its error row and the shard completes; a fault of every sample is the shard's."""

import random
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import image_bytes, write_shard

from capfilt.config import ReaderConfig, load_config
from capfilt.io.fs import OutputDir
from capfilt.io.reader import MAX_HEADER_BYTES, ShardReadError, read_shard, split_key
from capfilt.io.writer import ShardWriter
from capfilt.runtime.shards import plan_shards
from capfilt.sample import ERROR, KEPT, Sample
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

    def launch(self, pixels, texts, **options):
        if self.always or any("POISON" in t for image_texts in texts for t in image_texts):
            raise RuntimeError("index out of range in self")
        return self.real.launch(pixels, texts, **options)

    def __getattr__(self, name):  # the rest (its vision pass) is the real filter's
        return getattr(self.real, name)


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


# --- The headers before a member ---------------------------------------------------------------


def header(name: str, kind: bytes, payload: bytes) -> bytes:
    """One tar header block and its payload, padded to whole blocks; ``kind`` as tarfile names types."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(payload)
    return info.tobuf(tarfile.USTAR_FORMAT) + payload + bytes(-len(payload) % tarfile.BLOCKSIZE)


def pax(**records: bytes) -> bytes:
    """PAX records, each ``"LENGTH KEYWORD=VALUE\\n"`` with LENGTH counting itself."""
    out = b""
    for keyword, value in records.items():
        body = b" " + keyword.replace("_", ".").encode() + b"=" + value + b"\n"
        length = len(body) + len(str(len(body)))
        length += len(str(length)) - len(str(len(body)))
        out += str(length).encode() + body
    return out


def sample_members(key: str) -> bytes:
    return header(f"{key}.jpg", tarfile.REGTYPE, image_bytes("red")) + \
        header(f"{key}.txt", tarfile.REGTYPE, key.encode())


def read_tar(tmp_path, *parts: bytes, end: bytes = bytes(2 * tarfile.BLOCKSIZE), **options):
    path = tmp_path / "00000.tar"
    path.write_bytes(b"".join(parts) + end)
    return {s.key: s.error for s in read_shard(str(path), ReaderConfig(**options))}


def huge_global_headers() -> bytes:
    half = b"x" * (MAX_HEADER_BYTES // 2 + 1)  # each fits; together they pass the limit
    return header("g1", tarfile.XGLTYPE, pax(comment_a=half)) + \
        header("g2", tarfile.XGLTYPE, pax(comment_b=half))


def sparse_member() -> bytes:
    info = tarfile.TarInfo("b.jpg")
    info.type = tarfile.GNUTYPE_SPARSE
    return info.tobuf(tarfile.GNU_FORMAT)


HOSTILE_HEADERS = {  # before b's image: (headers, what b's error says)
    "huge_pax": (header("pax", tarfile.XHDTYPE, pax(comment=b"x" * MAX_HEADER_BYTES)), "PAX header of"),
    "huge_long_name": (header("././@LongLink", tarfile.GNUTYPE_LONGNAME, b"n" * MAX_HEADER_BYTES + b".jpg"),
                       "GNU long name of"),
    # tarfile recurses once per header: a thousand raise RecursionError, which no except clause expects
    "pax_chain": (header("pax", tarfile.XHDTYPE, pax(comment=b"")) * 2000, "more than 8 extension headers"),
    "malformed_pax": (header("pax", tarfile.XHDTYPE, b"99 path=x\n"), "malformed PAX header"),
    "global_headers_adding_up": (huge_global_headers(), "PAX header of"),
    "pax_sparse": (header("pax", tarfile.XHDTYPE, pax(GNU_sparse_major=b"1", GNU_sparse_minor=b"0")),
                   "sparse member"),
}


@pytest.mark.parametrize("kind", list(HOSTILE_HEADERS))
def test_a_hostile_header_costs_only_the_sample_of_its_member(tmp_path, kind):
    headers, reason = HOSTILE_HEADERS[kind]
    errors = read_tar(tmp_path, sample_members("a"), headers, sample_members("b"), sample_members("c"))
    assert errors["a"] is None and errors["c"] is None
    assert f"00000.tar: sample 'b': member 'b.jpg': {reason}" in errors["b"]


def test_a_gnu_sparse_member_costs_only_its_sample(tmp_path):
    # tarfile keeps a sparse member's whole map; a webdataset sample is never sparse
    errors = read_tar(tmp_path, sample_members("a"), sparse_member(), sample_members("c"))
    assert errors == {"a": None, "b": errors["b"], "c": None} and "sparse member" in errors["b"]


def test_the_header_limit_is_no_more_than_a_member_may_hold(tmp_path):
    name = header("pax", tarfile.XHDTYPE, pax(path=b"b" * 3000 + b".jpg"))
    errors = read_tar(tmp_path, sample_members("a"), name, sample_members("b"), max_member_bytes=2000)
    assert errors["a"] is None and "PAX header of 3015 bytes, over the limit of 2000" in errors["b"]
    # A long name within the limit is the member's name, as tarfile reads it.
    assert read_tar(tmp_path, name, sample_members("b"))["b" * 3000] is None


def test_a_pax_header_is_parsed_in_linear_time(tmp_path):
    # Python < 3.11.10's regexes take ~50 s on 200,000 digits (CVE-2024-6232); one pass takes ms.
    digits = header("pax", tarfile.XHDTYPE, pax(comment=b"7" * 200_000))
    start = time.monotonic()
    errors = read_tar(tmp_path, sample_members("a"), digits, sample_members("b"))
    assert errors == {"a": None, "b": None} and time.monotonic() - start < 5


@pytest.mark.parametrize("cut", [100_000, None], ids=["inside", "after"])
def test_a_tar_cut_in_or_after_a_skipped_header_is_truncated(tmp_path, cut):
    # Cut after the payload, the member the header describes is missing: not the end of the tar.
    skipped = header("pax", tarfile.XHDTYPE, pax(comment=b"x" * 2 * MAX_HEADER_BYTES))[:cut]
    errors = read_tar(tmp_path, sample_members("a"), sample_members("b"), skipped, end=b"")
    assert errors["a"] is None and "tar truncated or corrupt" in errors["b"]


# --- A damaged stretch of the tar ---------------------------------------------------------------
# tarfile ends the archive at the first invalid header: every sample after it was lost, unreported.


def eight_samples(tmp_path) -> tuple[Path, list[dict], list[tarfile.TarInfo]]:
    """A shard as webdataset writes it (a PAX header before each member), what it holds, its members."""
    written = [{"key": f"k{i}", "jpg": image_bytes("red", seed=i), "txt": f"text {i}", "json": {"i": i}}
               for i in range(8)]
    path = Path(write_shard(tmp_path / "00000.tar", written))
    with tarfile.open(path) as tar:
        return path, written, tar.getmembers()


BLOCK_DAMAGE = {
    "checksum": lambda block: block[:150] + bytes([block[150] ^ 1]) + block[151:],  # a digit of it
    "name": lambda block: bytes([block[0] ^ 0x20]) + block[1:],  # so the checksum fails
    "zeroed": lambda block: bytes(tarfile.BLOCKSIZE),
}


def damage(path: Path, members: list[tarfile.TarInfo], name: str, how: str, where: str = "header"):
    """Damage ``name``'s ``header`` (or the PAX header before it) in place, or insert garbage
    before it. Returns the stretch the reader must read past, (start, end), and the member lost."""
    data, i = path.read_bytes(), next(i for i, m in enumerate(members) if m.name == name)
    member = members[i]
    if how == "garbage":
        junk = random.Random(13).randbytes(3 * tarfile.BLOCKSIZE)
        path.write_bytes(data[:member.offset] + junk + data[member.offset:])
        return (member.offset, member.offset + len(junk)), None
    block = tarfile.BLOCKSIZE
    at = member.offset if where == "pax_header" else member.offset_data - block
    path.write_bytes(data[:at] + BLOCK_DAMAGE[how](data[at:at + block]) + data[at + block:])
    if where == "pax_header":  # read past with its payload; the member's own header follows, intact
        return (member.offset, at + 2 * block), None
    last = member.offset_data + -(-member.size // block) * block  # the end of its data blocks
    return (member.offset, members[i + 1].offset if i + 1 < len(members) else last), name


def stretch_of(start: int, end: int) -> tuple[str, str]:
    """The key of a stretch's error row, and how its error and the notes beside it name it."""
    return f"(damaged tar: bytes {start}-{end})", f"{end - start} bytes at byte {start}"


DAMAGES = [(how, where, name) for how in BLOCK_DAMAGE for where in ("header", "pax_header")
           for name in ("k4.jpg", "k4.txt")] + [("garbage", "before", name) for name in ("k4.jpg", "k4.txt")]


@pytest.mark.parametrize("how, where, name", DAMAGES, ids=["-".join(d) for d in DAMAGES])
def test_a_damaged_header_costs_only_its_member(tmp_path, how, where, name):
    path, written, members = eight_samples(tmp_path)
    (start, end), lost = damage(path, members, name, how, where)
    samples = {s.key: s for s in read_shard(str(path))}
    key, where = stretch_of(start, end)
    assert set(samples) == {w["key"] for w in written} | {key}
    assert samples[key].status == ERROR and f"00000.tar: damaged tar: {where} hold" in samples[key].error
    for w in written:
        sample = samples[w["key"]]
        if lost == f"{w['key']}.jpg":  # the sample that lost its image, and says why
            assert sample.status == ERROR and f"follows a damaged stretch of the tar ({where})" in \
                sample.error
            continue
        assert sample.error is None and sample.image == w["jpg"] and sample.meta == w["json"], w["key"]
        assert sample.web_text == (None if lost == f"{w['key']}.txt" else w["txt"])
    # The sample after the stretch says it may have lost a member to it.
    after = samples[split_key(next(m for m in members if m.offset >= end).name if lost else name)[0]]
    assert f"follows a damaged stretch of the tar ({where})" in "; ".join(after.notes) + (after.error or "")


@pytest.mark.parametrize("which", ["first", "last"])
def test_a_damaged_first_or_last_header_costs_only_its_member(tmp_path, which):
    path, written, members = eight_samples(tmp_path)
    name = {"first": "k0.jpg", "last": "k7.txt"}[which]
    (start, end), _ = damage(path, members, name, "checksum")
    samples = {s.key: s for s in read_shard(str(path))}
    errors = {key: s.error for key, s in samples.items() if s.error}
    key, where = stretch_of(start, end)
    assert set(errors) == ({key, "k0"} if which == "first" else {key})  # k0 lost its image
    read_to = "the next valid header" if which == "first" else "the end"
    assert f"{where} hold no valid header; read past them to {read_to}" in errors[key]
    assert len(samples) == 9 and samples["k7"].web_text == (None if which == "last" else "text 7")


@pytest.mark.parametrize("end", [b"", bytes(2 * tarfile.BLOCKSIZE), bytes(40 * tarfile.BLOCKSIZE)],
                         ids=["no_end_marker", "end_marker", "long_padding"])
def test_the_end_of_a_tar_is_no_damage(tmp_path, end):
    errors = read_tar(tmp_path, sample_members("a"), sample_members("b"), end=end)
    assert errors == {"a": None, "b": None}


def test_a_file_with_no_tar_header_is_no_tar(tmp_path):
    (tmp_path / "00000.tar").write_bytes(random.Random(13).randbytes(40 * tarfile.BLOCKSIZE))
    with pytest.raises(ShardReadError, match="not a readable tar: no tar header in its 20480 bytes"):
        list(read_shard(str(tmp_path / "00000.tar")))


def test_a_damaged_header_is_one_error_row_and_the_counts_add_up(step, tmp_path):
    path, written, members = eight_samples(tmp_path)
    (start, end), _ = damage(path, members, "k4.txt", "checksum")
    stats = step.run(plan_shards([str(path)], str(tmp_path / "out"))[0])
    got = rows(tmp_path)
    errors = {key: row["error"] for key, row in got.items() if row["status"] == "error"}
    key, where = stretch_of(start, end)
    assert list(errors) == [key] and f"00000.tar: damaged tar: {where} hold no valid header" in errors[key]
    assert set(got) - {key} == {w["key"] for w in written}
    assert f"precedes a damaged stretch of the tar ({where})" in got["k4"]["notes"]  # its .txt
    assert f"follows a damaged stretch of the tar ({where})" in got["k5"]["notes"]
    assert (stats.samples, stats.error) == (9, 1)
    assert stats.samples == stats.kept + stats.dropped + stats.error


# --- The sidecar parquet -----------------------------------------------------------------------


def sidecar_shard(tmp_path, sidecar: dict, keys=("k1", "k3"), row_group_size: int = 100) -> str:
    """A tar of ``keys`` and its img2dataset sidecar, ``NAME.parquet``, of ``sidecar``'s columns."""
    import pyarrow as pa

    pq.write_table(pa.table(sidecar), tmp_path / "00000.parquet", row_group_size=row_group_size)
    return write_shard(tmp_path / "00000.tar", [{"key": k, "jpg": image_bytes("red")} for k in keys])


def test_a_sidecar_larger_than_its_window_still_fills_in_the_tar_keys(tmp_path, monkeypatch):
    import capfilt.io.reader as reader

    monkeypatch.setattr(reader, "SIDECAR_BYTES", 64 * 1024)
    rows = 20_000  # in the tar's order, failed downloads between, as img2dataset writes them
    keys = [f"k{i}" for i in range(0, rows, 997)]
    path = sidecar_shard(tmp_path, {"key": [f"k{i}" for i in range(rows)],
                                    "url": [f"http://x/{i}" for i in range(rows)]}, keys)
    got = {s.key: s.meta.get("url") for s in read_shard(path)}
    assert got == {k: f"http://x/{k[1:]}" for k in keys}


def test_a_sidecar_column_too_large_to_hold_is_left_out(tmp_path, monkeypatch):
    import capfilt.io.reader as reader

    monkeypatch.setattr(reader, "SIDECAR_BYTES", 64 * 1024)
    path = sidecar_shard(tmp_path, {"key": ["k1", "k2", "k3"], "url": ["u1", "u2", "u3"],
                                    "junk": ["x" * 100_000] * 3})
    assert [s.meta for s in read_shard(path)] == [{"url": "u1"}, {"url": "u3"}]


def test_a_sidecar_value_python_cannot_hold_costs_only_itself(tmp_path):
    import pyarrow as pa

    path = sidecar_shard(tmp_path, {"key": ["k1", "k3"], "url": ["u1", "u3"],
                                    "when": pa.array([1, 2**62], pa.timestamp("us"))})  # year 146,000
    assert [s.meta for s in read_shard(path)] == [{"url": "u1"}, {"url": "u3"}]
