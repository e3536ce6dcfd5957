"""The reader's memory is bounded whatever a shard holds (issue 13): peak RSS per hostile case.

Each case writes a shard whose hostile part would cost 256 MB or more if it were read whole,
then reads it through ``read_shard`` in a fresh process, so that the peak is the case's own.
The peak is the child's VmHWM: ``ru_maxrss`` is carried across exec on Linux, so in a child of
pytest it would report pytest's own peak. ``pytest -s`` prints the figures (BENCHMARKS.md).
"""

import json
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import image_bytes

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")

MB = 1024 * 1024
HOSTILE = 256 * MB  # what each hostile part would cost read whole, at least
ALLOWANCE = 100 * MB  # over a plain shard's peak

CHILD = """
import json, sys
from capfilt.io.reader import read_shard

samples = [{"key": s.key[:40], "error": (s.error or "")[:300], "meta": sorted(s.meta),
            "notes": " ".join(s.notes)[:300]} for s in read_shard(sys.argv[1])]
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
print(json.dumps({"peak": peak, "samples": samples}))
"""


def read_in_child(path) -> tuple[int, dict[str, dict]]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]  # a crash, or pyarrow aborting at exit
    result = json.loads(out.stdout)
    return result["peak"], {s["key"]: s for s in result["samples"]}


# --- Shards, written as streams --------------------------------------------------------------


def header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(tarfile.USTAR_FORMAT)


def stream_member(f, head: bytes, *runs: tuple[bytes, int]) -> None:
    """``head`` (a header block), then each run of ``count`` times ``byte``, then the padding."""
    f.write(head)
    size = 0
    for byte, count in runs:
        chunk = byte * MB
        for _ in range(count // MB):
            f.write(chunk)
        f.write(byte * (count % MB))
        size += len(byte) * count
    f.write(bytes(-size % tarfile.BLOCKSIZE))


def member(f, name: str, data: bytes) -> None:
    f.write(header(name, len(data)) + data + bytes(-len(data) % tarfile.BLOCKSIZE))


def good_sample(f, key: str) -> None:
    member(f, f"{key}.jpg", image_bytes("red"))
    member(f, f"{key}.txt", f"a red square {key}".encode())


def shard(tmp_path, write_hostile, keys=("a", "z")):
    """A tar: a good sample, the hostile part, a good sample."""
    path = tmp_path / "00000.tar"
    with open(path, "wb") as f:
        good_sample(f, keys[0])
        write_hostile(f)
        good_sample(f, keys[-1])
        f.write(bytes(2 * tarfile.BLOCKSIZE))
    return path


def many_members(f) -> None:  # 26,000 members of 10 KiB under one key
    member(f, "many.jpg", image_bytes("red"))
    data = b"x" * 10 * 1024
    for i in range(HOSTILE // len(data)):
        member(f, f"many.{i}.txt", data)


def huge_member(f) -> None:
    stream_member(f, header("huge.jpg", HOSTILE), (b"x", HOSTILE))


def huge_pax_header(f) -> None:
    """One record, ``"LENGTH comment=xxx...\\n"``, LENGTH counting its own digits."""
    body = len(" comment=\n") + HOSTILE
    length = body + len(str(body))
    length = body + len(str(length))
    stream_member(f, header("pax", length, tarfile.XHDTYPE),
                  (f"{length} comment=".encode(), 1), (b"x", HOSTILE), (b"\n", 1))
    good_sample(f, "pax")


def huge_long_name(f) -> None:
    stream_member(f, header("././@LongLink", HOSTILE + 5, tarfile.GNUTYPE_LONGNAME),
                  (b"n", HOSTILE), (b".jpg\0", 1))
    member(f, "long.jpg", image_bytes("red"))


def deep_json(f) -> None:
    """json.loads gives up at a depth of ~1,000; a parser without a limit would hold 8 M lists."""
    depth = 8 * MB
    member(f, "deep.jpg", image_bytes("red"))
    stream_member(f, header("deep.json", 2 * depth), (b"[", depth), (b"]", depth))


def write_sidecar(tmp_path, tables) -> None:
    """``NAME.parquet`` beside the tar, one row group per table: written a row group at a time."""
    first = next(tables)
    with pq.ParquetWriter(tmp_path / "00000.parquet", first.schema, compression="none",
                          use_dictionary=False) as writer:
        writer.write_table(first)
        for table in tables:
            writer.write_table(table)


def keys(start: int, stop: int):
    return pa.array(np.char.add("k", np.arange(start, stop).astype(str)))


def sidecar_of_junk(tmp_path):
    """256 row groups of 1,000 rows, each with 1 KiB of junk, and the tar's keys spread among them."""
    rows = 1000
    write_sidecar(tmp_path, (pa.table({"key": keys(i * rows, (i + 1) * rows), "url": keys(0, rows),
                                       "junk": pa.array([b"j" * 1024] * rows)})
                             for i in range(HOSTILE // MB)))
    return shard(tmp_path, lambda f: good_sample(f, "k128000"), keys=("k0", "k255999"))


def sidecar_of_millions_of_rows(tmp_path):
    rows = 2_000_000  # 600 MB as Python dicts
    write_sidecar(tmp_path, (pa.table({"key": keys(i, i + 500_000), "url": keys(i, i + 500_000)})
                             for i in range(0, rows, 500_000)))
    return shard(tmp_path, lambda f: good_sample(f, "k1000000"), keys=("k0", f"k{rows - 1}"))


def expect_error(key: str, reason: str):
    def check(samples):
        assert reason in samples[key]["error"], samples[key]
    return check


def expect_url(*keys):
    def check(samples):
        assert all(samples[k]["meta"] == ["url"] and not samples[k]["error"] for k in keys), samples
    return check


def expect_fine(key: str, note: str = ""):
    def check(samples):
        assert not samples[key]["error"] and note in samples[key]["notes"], samples[key]
    return check


CASES = {
    "many_members_under_one_key": (lambda p: shard(p, many_members),
                                   expect_fine("many", "more members skipped")),
    "one_huge_member": (lambda p: shard(p, huge_member), expect_error("huge", "over the limit")),
    "huge_pax_header": (lambda p: shard(p, huge_pax_header), expect_error("pax", "PAX header of")),
    "huge_gnu_long_name": (lambda p: shard(p, huge_long_name), expect_error("long", "GNU long name of")),
    "deeply_nested_json": (lambda p: shard(p, deep_json), expect_fine("deep", "RecursionError")),
    "sidecar_of_junk": (sidecar_of_junk, expect_url("k0", "k128000", "k255999")),
    "sidecar_of_2m_rows": (sidecar_of_millions_of_rows, expect_url("k0", "k1000000", "k1999999")),
}


@pytest.fixture(scope="module")
def plain_peak(tmp_path_factory):
    """A plain shard's peak, its sidecar read too (so pyarrow is loaded, as in the sidecar cases)."""
    folder = tmp_path_factory.mktemp("plain")
    pq.write_table(pa.table({"key": ["a", "z"], "url": ["u", "v"]}), folder / "00000.parquet")
    peak, samples = read_in_child(shard(folder, lambda f: None))
    assert samples["a"]["meta"] == ["url"] and not samples["z"]["error"]
    print(f"\nreader peak RSS, plain shard: {peak / MB:.0f} MB")
    return peak


@pytest.mark.parametrize("case", list(CASES))
def test_peak_memory_of_a_hostile_shard_is_bounded(tmp_path, plain_peak, case):
    build, check = CASES[case]
    peak, samples = read_in_child(build(tmp_path))
    for written in tmp_path.iterdir():  # 256 MB each: not kept for pytest's last three runs
        written.unlink()
    print(f"\nreader peak RSS, {case}: {peak / MB:.0f} MB ({(peak - plain_peak) / MB:+.0f} MB)")
    check(samples)
    around = list(samples.values())
    assert not around[0]["error"] and not around[-1]["error"]  # the good samples around it are read
    assert peak < plain_peak + ALLOWANCE, f"{case}: peak {peak / MB:.0f} MB"
