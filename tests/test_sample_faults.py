"""One sample can only cost itself (issue 13): a fault while one sample is decoded, judged or
written becomes its error row and the shard completes; a fault of every sample is the shard's."""

import tarfile
import time

import pyarrow.parquet as pq
import pytest
from conftest import image_bytes, write_shard

from capfilt.config import ReaderConfig, load_config
from capfilt.io.fs import OutputDir
from capfilt.io.reader import MAX_HEADER_BYTES, read_shard
from capfilt.io.writer import ShardWriter
from capfilt.runtime.shards import plan_shards
from capfilt.sample import KEPT, Sample
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

    def __call__(self, pixels, texts):
        if self.always or any("POISON" in t for image_texts in texts for t in image_texts):
            raise RuntimeError("index out of range in self")
        return self.real(pixels, texts)


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
