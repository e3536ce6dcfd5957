"""capfilt reshard: repack a cleaned output folder by samples or bytes, resumably.

The cleaned folders are written with the real ShardWriter and decision, without Ray or models.
"""

import argparse
import io
import itertools
import json
import posixpath
import random
import shutil
import tarfile

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from capfilt.decision import decide
from capfilt.io.fs import OutputDir
from capfilt.io.writer import ShardWriter
from capfilt.io.layout import RESHARD_PLAN_FILE as PLAN_FILE
from capfilt.io.layout import stats_name
from capfilt.reshard import (OUTPUT_SCHEMA, ReshardError, ReshardRefused, Target,
                             plan_reshard, reshard, tar_file_bytes)
from capfilt.sample import DROPPED, ERROR, KEPT, Sample
from capfilt.stats import ShardStats
from conftest import image_bytes
from pipelines import reshard as reshard_cli

COLOURS = ["red", "green", "blue", "yellow"]
KEEP, DROP, FAIL = KEPT, DROPPED, ERROR


def judged(key: str, n: int, outcome: str, ext: str = "jpg", data: bytes | None = None) -> Sample:
    fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
    data = data or image_bytes(COLOURS[n % 4], fmt, seed=n)
    sample = Sample(key=key, source=f"web/{key[:5]}.tar", image=data, image_ext=ext,
                    web_text=f"a {COLOURS[n % 4]} square, numéro {n}",
                    meta={"url": f"http://127.0.0.1/{key}.{ext}", "key": key, "status": "success",
                          "original_width": 48, "original_height": 40})
    if outcome == FAIL:
        return sample.fail(f"web/{key[:5]}.tar: {key}.{ext}: cannot decode image")
    sample.width, sample.height = 48, 40
    sample.captions = [f"caption {i} of {key} «{n}»" for i in range(2)]
    high, low = 0.5 + (n % 7) / 20, 0.1 + (n % 5) / 20
    sample.web_score, sample.caption_scores = (high, [low, high - 0.01]) if outcome == KEEP else (low, [low, low])
    return decide(sample, 0.5, "best_score")


def write_clean_shard(folder, name: str, samples: list[Sample], done: bool = True):
    out = OutputDir(str(folder))
    stats = ShardStats(shard=name, input=f"web/{name}.tar", timing={"seconds": 1.5, "worker_pid": 4242})
    with ShardWriter(out, name, threshold=0.5, stats=stats) as writer:
        for sample in samples:
            writer.write(sample)
    if not done:
        out.remove(stats_name(name))


def noise_png(seed: int, size: int = 90) -> bytes:
    rng = random.Random(seed)
    img = Image.frombytes("RGB", (size, size), bytes(rng.randrange(256) for _ in range(size * size * 3)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


SHARDS = {  # input shard -> outcomes (and image extensions) of its samples
    "00000": [(KEEP, "jpg"), (KEEP, "png"), (DROP, "jpg"), (FAIL, "jpg"), (KEEP, "webp")],
    "00001": [(DROP, "jpg"), (FAIL, "png"), (DROP, "jpg")],  # keeps nothing
    "00002": [(KEEP, "jpg"), (KEEP, "jpg"), (KEEP, "png"), (DROP, "jpg"), (KEEP, "jpg"), (KEEP, "big")],
    "00003": [(KEEP, "png"), (KEEP, "jpg"), (KEEP, "jpg")],
}


def shard_samples(name: str, outcomes) -> list[Sample]:
    samples = []
    for i, (outcome, ext) in enumerate(outcomes):
        n = int(name) * 10 + i
        data = noise_png(n) if ext == "big" else None
        samples.append(judged(f"{name}{i:04d}", n, outcome, "png" if ext == "big" else ext, data))
    return samples


@pytest.fixture
def clean(tmp_path):
    """A cleaned folder: 4 done shards (11 kept samples, one shard keeping nothing), one not done."""
    folder = tmp_path / "clean"
    for name, outcomes in SHARDS.items():
        write_clean_shard(folder, name, shard_samples(name, outcomes))
    write_clean_shard(folder, "00004", shard_samples("00004", [(KEEP, "jpg")] * 3), done=False)
    (folder / "run.json").write_text("{}")
    (folder / "stats.json").write_text("{}")
    return folder


KEPT_KEYS = [f"{name}{i:04d}" for name, outcomes in SHARDS.items()
             for i, (outcome, _) in enumerate(outcomes) if outcome == KEEP]


KEPT_BY_SHARD = {name: [k for k in KEPT_KEYS if k.startswith(name)] for name in SHARDS}


def tar_members(path) -> list[tuple[str, bytes, bytes]]:
    """(name, 512-byte header, data) of every member, read from the raw bytes."""
    raw = path.read_bytes()
    with tarfile.open(path) as tar:
        return [(m.name, raw[m.offset:m.offset_data], raw[m.offset_data:m.offset_data + m.size])
                for m in tar.getmembers()]


def source_members(folder) -> dict[str, list]:
    """Members of the kept samples of the input tars, by key."""
    by_key: dict[str, list] = {}
    for name in SHARDS:
        for member in tar_members(folder / f"{name}.tar"):
            by_key.setdefault(member[0].split(".")[0], []).append(member)
    return by_key


def source_rows(folder) -> dict[str, dict]:
    rows = {}
    for name in SHARDS:
        for row in pq.read_table(folder / f"{name}.parquet").to_pylist():
            rows[row["key"]] = dict(row, source_shard=name)
    return rows


def output_shards(folder) -> list[str]:
    return sorted(p.name[:-4] for p in folder.glob("*.tar"))


def snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def check_output(clean, out) -> list[list[str]]:
    """Everything a user relies on in a resharded folder; returns the keys per output shard."""
    members, rows = source_members(clean), source_rows(clean)
    keys_per_shard = []
    for shard in output_shards(out):
        written = tar_members(out / f"{shard}.tar")
        keys = list(dict.fromkeys(m[0].split(".")[0] for m in written))
        assert written == [m for k in keys for m in members[k]]  # headers and data, byte for byte
        table = pq.read_table(out / f"{shard}.parquet")
        assert table.schema.equals(OUTPUT_SCHEMA)
        assert table.to_pylist() == [rows[k] for k in keys]
        stats = json.loads((out / f"{shard}_stats.json").read_text())
        assert stats["samples"] == len(keys) and stats["bytes"] == (out / f"{shard}.tar").stat().st_size
        assert [k for s in stats["sources"] for k in KEPT_BY_SHARD[s["shard"]][s["first"]:s["end"]]] == keys
        keys_per_shard.append(keys)
    assert [k for keys in keys_per_shard for k in keys] == KEPT_KEYS  # every kept key once, in order
    return keys_per_shard


# --- by samples and by bytes ---------------------------------------------------------------------

def test_by_samples_repacks_every_kept_sample_once_in_order(clean, tmp_path):
    out = tmp_path / "out"
    summary = reshard(str(clean), str(out), samples_per_shard=4)
    assert summary == {"input_shards": 4, "samples": 11, "output_shards": 3, "written": 3, "skipped": 0,
                       "bytes": sum((out / f"0000{i}.tar").stat().st_size for i in range(3))}
    assert [len(k) for k in check_output(clean, out)] == [4, 4, 3]
    assert sorted(p.name for p in out.iterdir()) == [
        f"0000{i}{suffix}" for i in range(3) for suffix in (".parquet", ".tar", "_stats.json")] + [PLAN_FILE]
    stats = json.loads((out / "00001_stats.json").read_text())
    assert stats == {"shard": "00001", "samples": 4, "bytes": stats["bytes"], "sources": [
        {"shard": "00002", "first": 1, "end": 5}]}
    first = json.loads((out / "00000_stats.json").read_text())["sources"]
    assert first == [{"shard": "00000", "first": 0, "end": 3}, {"shard": "00002", "first": 0, "end": 1}]
    plan = json.loads((out / PLAN_FILE).read_text())
    assert plan["input"] == str(clean) and plan["target"] == {"samples_per_shard": 4}
    assert plan["input_shards"] == ["00000", "00001", "00002", "00003"]
    assert plan["shards"][2] == {"name": "00002", "ranges": [["00003", 0, 3]]}


def test_one_fully_kept_shard_repacked_whole_is_the_same_tar(tmp_path):
    write_clean_shard(tmp_path / "clean", "x", shard_samples("00003", SHARDS["00003"]))
    reshard(str(tmp_path / "clean"), str(tmp_path / "out"), samples_per_shard=100)
    assert (tmp_path / "out" / "00000.tar").read_bytes() == (tmp_path / "clean" / "x.tar").read_bytes()


def member_blocks(path) -> int:
    """The bytes a tar's members take: a header and padded data each (no end-of-archive blocks)."""
    return sum(512 + -(-len(data) // 512) * 512 for _, _, data in tar_members(path))


@pytest.mark.parametrize("record_aligned", [True, False])
def test_by_bytes_fills_shards_up_to_the_target_and_a_big_sample_goes_alone(clean, tmp_path, record_aligned):
    out = tmp_path / "out"
    rows = source_rows(clean)
    sizes = {k: rows[k]["tar_bytes"] for k in KEPT_KEYS}
    big = "000020005"
    small = sorted(v for k, v in sizes.items() if k != big)
    # Three samples' members and the end-of-archive blocks; aligned, it is a whole number of
    # tar records, so any three small samples fit. Not aligned, the record padding must count.
    target = small[-1] + small[-2] + small[-3] + 1024
    target = tar_file_bytes(target) if record_aligned else target
    assert tar_file_bytes(sizes[big]) > target
    reshard(str(clean), str(out), bytes_per_shard=target)
    keys_per_shard = check_output(clean, out)
    assert [big] in keys_per_shard
    for shard, keys in zip(output_shards(out), keys_per_shard):
        # The writer's record is what the members really take, and the target bounds the file.
        assert member_blocks(out / f"{shard}.tar") == sum(sizes[k] for k in keys)
        assert tar_file_bytes(sum(sizes[k] for k in keys)) == (out / f"{shard}.tar").stat().st_size
        assert keys and (len(keys) == 1 or (out / f"{shard}.tar").stat().st_size <= target)
    for keys, following in itertools.pairwise(keys_per_shard):  # no shard could take one more
        assert tar_file_bytes(sum(sizes[k] for k in keys) + sizes[following[0]]) > target
    assert len(keys_per_shard) < len(KEPT_KEYS) - 1


def test_result_reads_with_webdataset(clean, tmp_path):
    out = tmp_path / "out"
    reshard(str(clean), str(out), samples_per_shard=3)
    urls = [str(out / f"{s}.tar") for s in output_shards(out)]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil").to_tuple(
        "jpg;png;jpeg;webp", "txt")
    records = list(dataset)
    texts = {r["key"]: r["text"] for r in source_rows(clean).values()}
    assert [text for _, text in records] == [texts[k] for k in KEPT_KEYS]
    assert all(isinstance(image, Image.Image) and image.size in ((48, 40), (90, 90)) for image, _ in records)


def test_fsspec_urls_give_the_same_bytes(clean, tmp_path):
    import fsspec

    memory = fsspec.filesystem("memory")
    try:
        for path in clean.iterdir():
            memory.pipe(f"/reshard-test/clean/{path.name}", path.read_bytes())
        reshard("memory://reshard-test/clean", "memory://reshard-test/out", samples_per_shard=4)
        reshard(str(clean), str(tmp_path / "out"), samples_per_shard=4)
        local = {n: b for n, b in snapshot(tmp_path / "out").items() if n != PLAN_FILE}
        remote = {posixpath.basename(p): memory.cat(p) for p in memory.ls("/reshard-test/out", detail=False)}
        assert remote.pop(PLAN_FILE) and remote == local
    finally:
        memory.rm("/reshard-test", recursive=True)


def test_an_input_shard_without_its_stats_file_is_not_used(clean, tmp_path):
    summary = reshard(str(clean), str(tmp_path / "out"), samples_per_shard=100)
    assert summary["input_shards"] == 4 and summary["samples"] == 11
    names = [m[0] for m in tar_members(tmp_path / "out" / "00000.tar")]
    assert not any(n.startswith("00004") for n in names)


def test_nothing_kept_anywhere_gives_no_output_shard(tmp_path):
    write_clean_shard(tmp_path / "clean", "00000", shard_samples("00001", SHARDS["00001"]))
    summary = reshard(str(tmp_path / "clean"), str(tmp_path / "out"), bytes_per_shard=10**6)
    assert summary["samples"] == 0 and summary["output_shards"] == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == [PLAN_FILE]


# --- resume -----------------------------------------------------------------------------------------

def test_rerun_redoes_only_what_is_missing_byte_identically(clean, tmp_path):
    out = tmp_path / "out"
    reshard(str(clean), str(out), samples_per_shard=3)
    before = snapshot(out)
    last = output_shards(out)[-1]
    (out / f"{last}_stats.json").unlink()
    (out / f"{last}.tar").unlink()
    (out / "00001.tar").unlink()  # stats still there, but a shard is done only with all three files
    summary = reshard(str(clean), str(out), samples_per_shard=3)
    assert (summary["written"], summary["skipped"]) == (2, len(before) // 3 - 2)
    assert snapshot(out) == before
    again = reshard(str(clean), str(out), samples_per_shard=3)
    assert (again["written"], again["skipped"], again["bytes"]) == (0, summary["output_shards"], summary["bytes"])


def test_interrupted_mid_shard_then_rerun_equals_an_uninterrupted_run(clean, tmp_path):
    reshard(str(clean), str(tmp_path / "whole"), samples_per_shard=4)
    out = tmp_path / "out"
    seen = []

    def crash(done, total):
        seen.append((done, total))
        if done == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reshard(str(clean), str(out), samples_per_shard=4, progress=crash)
    assert seen == [(i, 11) for i in range(1, 7)]
    assert sorted(p.name for p in out.iterdir()) == [
        "00000.parquet", "00000.tar", "00000_stats.json", PLAN_FILE]  # no half shard, no temporary
    (out / ".00001.tar.tmp-0123456789ab").write_bytes(b"left by a killed run")
    progress = []
    summary = reshard(str(clean), str(out), samples_per_shard=4, progress=lambda d, t: progress.append(d))
    assert (summary["written"], summary["skipped"]) == (2, 1)
    assert progress == [4] + list(range(5, 12))
    assert snapshot(out) == snapshot(tmp_path / "whole")


def test_timing_in_the_input_stats_does_not_change_the_plan(clean, tmp_path):
    out = tmp_path / "out"
    reshard(str(clean), str(out), samples_per_shard=4)
    stats = json.loads((clean / "00002_stats.json").read_text())
    stats["timing"]["seconds"] = 99.0
    (clean / "00002_stats.json").write_text(json.dumps(stats))
    assert reshard(str(clean), str(out), samples_per_shard=4)["skipped"] == 3


# --- refusals ---------------------------------------------------------------------------------------

def test_a_changed_target_is_refused_unless_overwrite(clean, tmp_path):
    out = tmp_path / "out"
    reshard(str(clean), str(out), samples_per_shard=2)
    before = snapshot(out)
    with pytest.raises(ReshardRefused, match="target changed"):
        reshard(str(clean), str(out), samples_per_shard=5)
    with pytest.raises(ReshardRefused, match="target changed"):
        reshard(str(clean), str(out), bytes_per_shard=10**6)
    assert snapshot(out) == before
    summary = reshard(str(clean), str(out), samples_per_shard=5, overwrite=True)
    assert (summary["output_shards"], summary["written"]) == (3, 3)
    assert output_shards(out) == ["00000", "00001", "00002"]  # the old 00003..00005 are gone
    assert [len(k) for k in check_output(clean, out)] == [5, 5, 1]
    reshard(str(clean), str(tmp_path / "fresh"), samples_per_shard=5)
    assert snapshot(out) == snapshot(tmp_path / "fresh")


def test_changed_inputs_are_refused(clean, tmp_path):
    out = tmp_path / "out"
    reshard(str(clean), str(out), samples_per_shard=4)
    stats = (clean / "00003_stats.json").read_bytes()
    redone = shard_samples("00003", SHARDS["00003"])
    redone[1].text = "another caption, same counts"
    write_clean_shard(clean, "00003", redone)
    assert (clean / "00003_stats.json").read_bytes() == stats
    with pytest.raises(ReshardRefused, match="input shards changed"):
        reshard(str(clean), str(out), samples_per_shard=4)
    write_clean_shard(clean, "00004", shard_samples("00004", [(KEEP, "jpg")] * 3))  # now done
    with pytest.raises(ReshardRefused, match="input shards changed"):
        reshard(str(clean), str(out), samples_per_shard=4)
    assert reshard(str(clean), str(out), samples_per_shard=4, overwrite=True)["samples"] == 14


def test_a_folder_of_other_shards_is_not_taken_for_a_reshard(clean, tmp_path):
    other = tmp_path / "other"
    write_clean_shard(other, "00000", shard_samples("00003", SHARDS["00003"]))
    with pytest.raises(ReshardRefused, match="no reshard_plan.json"):
        reshard(str(clean), str(other), samples_per_shard=4)
    with pytest.raises(ReshardError, match="is the input folder"):
        reshard(str(clean), str(clean), samples_per_shard=4)


@pytest.mark.parametrize("recorded", [True, False], ids=["with_run_json", "without"])
def test_shards_of_two_configs_are_refused_naming_them(clean, tmp_path, recorded):
    """An overwrite killed half-way leaves done shards of the old config: not one corpus."""
    mixed = tmp_path / "mixed"
    shutil.copytree(clean, mixed)
    for marker in mixed.glob("*_stats.json"):
        stats = json.loads(marker.read_text())
        stats["fingerprint"] = "old" if marker.name == "00001_stats.json" else "new"
        marker.write_text(json.dumps(stats))
    if recorded:
        (mixed / "run.json").write_text(json.dumps({"fingerprint": "new"}))
    with pytest.raises(ReshardError, match=r"shards \['00001'\] were made by another config"):
        reshard(str(mixed), str(tmp_path / "out"), samples_per_shard=4)


def test_duplicate_keys_across_shards_are_refused_naming_both(clean, tmp_path):
    again = shard_samples("00002", [(KEEP, "jpg")])  # key 000020000, kept in 00002 too
    write_clean_shard(clean, "00009", again)
    with pytest.raises(ReshardError, match=r"'000020000' in input shards '00002' and '00009'"):
        reshard(str(clean), str(tmp_path / "out"), samples_per_shard=4)
    assert not (tmp_path / "out").exists()


def test_a_dropped_duplicate_is_no_conflict(clean, tmp_path):
    write_clean_shard(clean, "00009", shard_samples("00002", [(DROP, "jpg")]))
    assert reshard(str(clean), str(tmp_path / "out"), samples_per_shard=4)["samples"] == 11


def test_a_tar_that_disagrees_with_its_parquet_is_an_error(clean, tmp_path):
    (clean / "00003.tar").write_bytes((clean / "00000.tar").read_bytes())
    with pytest.raises(ReshardError, match="00003"):
        reshard(str(clean), str(tmp_path / "out"), samples_per_shard=100)
    assert not (tmp_path / "out" / "00000_stats.json").exists()


@pytest.mark.parametrize("kwargs", [{}, {"samples_per_shard": 4, "bytes_per_shard": 10},
                                    {"samples_per_shard": 0}, {"bytes_per_shard": -1}])
def test_bad_targets_are_refused(kwargs):
    with pytest.raises(ReshardError):
        Target(**kwargs)


def test_an_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(ReshardError, match="no NAME_stats.json"):
            plan_reshard(str(folder), Target(samples_per_shard=1))


# --- the command line -------------------------------------------------------------------------------

def parse(argv):
    parser = argparse.ArgumentParser(prog="capfilt reshard")
    reshard_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_command_line_end_to_end(clean, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert reshard_cli.run_from_args(parse([str(clean), out, "--bytes-per-shard", "20kB"])) == 0
    printed = capsys.readouterr()
    assert "written" in printed.out and "11" in printed.out
    first = snapshot(tmp_path / "out")
    check_output(clean, tmp_path / "out")
    assert reshard_cli.run_from_args(parse([str(clean), out, "--bytes-per-shard", "20kB", "--no-progress"])) == 0
    assert snapshot(tmp_path / "out") == first
    assert reshard_cli.run_from_args(parse([str(clean), out, "--samples-per-shard", "4"])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "target changed" in err
    args = parse([str(clean), out, "--samples-per-shard", "4", "--mode", "overwrite", "--no-progress"])
    assert reshard_cli.run_from_args(args) == 0
    assert output_shards(tmp_path / "out") == ["00000", "00001", "00002"]
    assert reshard_cli.run_from_args(parse([str(tmp_path / "missing"), out, "--samples-per-shard", "4"])) == 2
    assert "no NAME_stats.json" in capsys.readouterr().err


@pytest.mark.parametrize("text, size", [("500MB", 500 * 10**6), ("1GiB", 2**30), ("123", 123),
                                        ("1.5kB", 1500), ("64 KiB", 65536), ("2gb", 2 * 10**9)])
def test_sizes_accept_decimal_and_binary_units(text, size):
    assert reshard_cli.parse_size(text) == size
    assert parse(["in", "out", "--bytes-per-shard", text]).bytes_per_shard == size


@pytest.mark.parametrize("argv", [["in", "out"], ["in", "out", "--bytes-per-shard", "5XB"],
                                  ["in", "out", "--bytes-per-shard", "0"],
                                  ["in", "out", "--samples-per-shard", "-3"],
                                  ["in", "out", "--samples-per-shard", "3", "--bytes-per-shard", "1MB"]])
def test_bad_command_lines_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert info.value.code == 2


def test_an_output_without_tar_bytes_reshards_by_samples_only(clean, tmp_path):
    """A parquet from before capfilt recorded each sample's tar bytes: no guessing its sizes."""
    old = tmp_path / "old"
    shutil.copytree(clean, old)
    path = old / "00000.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["tar_bytes"]), path)
    with pytest.raises(ReshardError, match=r"00000.parquet: no tar_bytes .* --samples-per-shard"):
        reshard(str(old), str(tmp_path / "by_bytes"), bytes_per_shard=10**6)
    assert reshard(str(old), str(tmp_path / "by_samples"), samples_per_shard=4)["samples"] == len(KEPT_KEYS)


# --- the recorded scores' columns (scores:) ---------------------------------------------------------

@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """test_select's run that recorded clip and sig scores (NAME_web, NAME_captions)."""
    from test_select import recorded_run

    return recorded_run(tmp_path_factory.mktemp("recorded"))


SCORE_COLUMNS = ["clip_web", "clip_captions", "sig_web", "sig_captions"]


def test_the_recorded_scores_columns_are_carried_from_a_run_and_a_selection(scored, tmp_path):
    from capfilt.select import select
    from test_select import selecting

    ran = {r["key"]: dict(r, source_shard=p.stem) for p in sorted(scored.glob("*.parquet"))
           for r in pq.read_table(p).to_pylist()}
    assert reshard(str(scored), str(tmp_path / "out"), samples_per_shard=3)["samples"] == 4
    tables = [pq.read_table(tmp_path / "out" / f"{shard}.parquet") for shard in ("00000", "00001")]
    assert all(t.schema.names == OUTPUT_SCHEMA.names[:-1] + SCORE_COLUMNS + ["source_shard"] for t in tables)
    rows = [row for table in tables for row in table.to_pylist()]
    assert rows == [ran[key] for key in "abcd"]  # the run's rows, their scores with them
    assert rows[0]["clip_captions"] == [0.35, 0.40]
    assert json.loads((tmp_path / "out" / PLAN_FILE).read_text())["scores"] == ["clip", "sig"]
    # A selection has no run.json: the scores of its parquet are carried, select_reason is not.
    select(str(scored), selecting(tmp_path / "selected", "select.score_thresholds={clip: 0.3}"))
    reshard(str(tmp_path / "selected"), str(tmp_path / "again"), samples_per_shard=10)
    table = pq.read_table(tmp_path / "again" / "00000.parquet")
    assert table.schema.names == OUTPUT_SCHEMA.names[:-1] + SCORE_COLUMNS + ["source_shard"]
    assert [(r["key"], r["clip_web"], r["sig_captions"]) for r in table.to_pylist()] == \
        [(key, ran[key]["clip_web"], ran[key]["sig_captions"]) for key in "acd"]


def test_a_shard_without_a_recorded_scores_columns_is_an_error(scored, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(scored, broken)
    path = broken / "00001.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["sig_web", "sig_captions"]), path)
    with pytest.raises(ReshardError, match=r"00001.parquet: no sig_web column, where the run recorded score 'sig'"):
        reshard(str(broken), str(tmp_path / "out"), samples_per_shard=3)
