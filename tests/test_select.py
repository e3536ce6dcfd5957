"""capfilt select: decide again from a finished run's scores, never loading a model.

Two runs of the tiny models (CapFiltStep, as each Ray worker runs it, with the run.json that
capfilt.run writes) give the equivalence test; the policies are tested on runs made by hand
(ShardWriter and decide, no model) with scores chosen so that each answer can be worked out.
"""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys

import pytest
from conftest import image_bytes, make_web_shards, write_shard

from capfilt.config import ConfigError, Config, load_config
from capfilt.decision import decide
from capfilt.identity import RunRefused, fingerprint, output_identity
from capfilt.io.fs import OutputDir, expand_input, read_parquet
from capfilt.io.layout import RUN_FILE, SELECT_FILE
from capfilt.io.reader import read_shard
from capfilt.io.writer import PARQUET_SCHEMA, ShardWriter
from capfilt.run import run_record
from capfilt.runtime.shards import plan_shards
from capfilt.select import REASON, SelectError, select
from capfilt.stats import ShardStats

SHARDS = ("00000", "00001", "00002")


# --- two real runs of the tiny models -------------------------------------------------------------

def make_run(config: Config, weights: dict) -> None:
    """What capfilt run leaves in config.output: each shard by CapFiltStep, and run.json."""
    from capfilt.step import CapFiltStep

    identity = output_identity(config, weights)
    fp = fingerprint(identity)
    tasks = plan_shards(expand_input(config.input), config.output)
    step = CapFiltStep(config, fp)
    for task in tasks:
        step.run(task)
    record = run_record(config, identity, fp, len(tasks))
    OutputDir(config.output).write_bytes(RUN_FILE, json.dumps(record, indent=2, sort_keys=True).encode())


def tiny_config(tiny_models, inputs: str, output, threshold: float) -> Config:
    cap, itm = tiny_models
    return load_config("configs/tiny.yaml", [
        f"captioner.model={cap}", f"filter.model={itm}", "captioner.num_captions=2",
        "runtime.batch_size=4", f"filter.threshold={threshold}"], input=inputs, output=str(output))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models):
    """A run at 0.9, which keeps nothing (the tiny filter scores near 0.466), and one at the
    median of its images' best scores, which keeps about half."""
    root = tmp_path_factory.mktemp("select")
    make_web_shards(root / "in", shards=2, per_shard=2)
    write_shard(root / "in" / "00002.tar", [
        {"key": "bad_html", "jpg": b"<html>not an image</html>", "txt": "a red square"},
        {"key": "no_image", "txt": "a caption without its image"},
        {"key": "ok", "png": image_bytes("yellow", "PNG"), "txt": "a yellow square"}])
    inputs = str(root / "in" / "{00000..00002}.tar")
    weights = {"captioner": "tiny", "filter": "tiny"}
    make_run(tiny_config(tiny_models, inputs, root / "high", 0.9), weights)
    best = [max([r["web_score"], *r["caption_scores"]]) for r in rows(root / "high") if r["status"] != "error"]
    mid = statistics.median(best)
    make_run(tiny_config(tiny_models, inputs, root / "mid", mid), weights)
    return {"root": root, "inputs": inputs, "thresholds": {"high": 0.9, "mid": mid}}


def rows(folder, shards=None) -> list[dict]:
    """The rows of ``shards`` (all, by default) of an output folder, in shard order."""
    shards = shards or sorted(p.name[:-len(".parquet")] for p in folder.glob("*.parquet"))
    return [row for shard in shards for row in read_parquet(str(folder / f"{shard}.parquet")).to_pylist()]


def unaddressed(row: dict) -> dict:
    return {**row, "error": re.sub(r" at 0x[0-9a-f]+", " at 0x…", row["error"] or "") or None}


def selecting(output, *overrides, input=None) -> Config:
    return load_config(None, list(overrides), output=str(output), input=input)


def snapshot(folder) -> dict:
    """Every file's bytes; a stats file's content without its timing."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name.endswith("stats.json"):
            stats = json.loads(path.read_text())
            stats.pop("timing")
            files[path.name] = stats
        elif not path.name.startswith("."):
            files[path.name] = path.read_bytes()
    return files


@pytest.mark.parametrize("source, target", [("high", "mid"), ("mid", "high")])
def test_select_at_a_threshold_gives_what_run_gives_at_it(runs, tmp_path, source, target):
    root, threshold = runs["root"], runs["thresholds"][target]
    outcome = select(str(root / source), selecting(tmp_path / "new", f"select.threshold={threshold}"))
    new, ran = tmp_path / "new", root / target
    for shard in SHARDS:
        assert (new / f"{shard}.tar").read_bytes() == (ran / f"{shard}.tar").read_bytes()
        for field in ("shard", "samples", "kept", "dropped", "error", "web_texts", "web_kept", "captions",
                      "captions_kept", "tar_samples"):
            assert json.loads((new / f"{shard}_stats.json").read_text())[field] == \
                json.loads((ran / f"{shard}_stats.json").read_text())[field]
    selected, expected = rows(new), rows(ran)
    # All but PIL's message for the undecodable image, which names an object's address: select
    # keeps the message of the run it reads, and the two runs differ there.
    assert [unaddressed({k: r[k] for k in PARQUET_SCHEMA.names}) for r in selected] == \
        [unaddressed(r) for r in expected]  # kept texts and all
    assert [r[REASON] for r in selected] == [
        {"kept": None, "dropped": "below_threshold", "error": "error"}[r["status"]] for r in expected]
    assert json.loads((new / "sizes.json").read_text()) == {
        f"{shard}.tar": json.loads((ran / f"{shard}_stats.json").read_text())["tar_samples"] for shard in SHARDS}
    kept = sum(r["status"] == "kept" for r in expected)
    assert outcome.stats["reasons"] == {k: v for k, v in {
        "kept": kept, "error": 2, "below_threshold": len(expected) - kept - 2}.items() if v}
    assert json.loads((new / SELECT_FILE).read_text())["reasons"] == outcome.stats["reasons"]
    assert 0 < kept < 5 if target == "mid" else kept == 0


def test_the_command_line_in_a_fresh_process_never_imports_transformers(runs, tmp_path):
    """The real entry point; transformers is blocked, and not in sys.modules after."""
    root, threshold = runs["root"], runs["thresholds"]["mid"]
    code = f"""
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "transformers":
            raise ImportError("capfilt select imported transformers")
sys.meta_path.insert(0, Blocked())
from pipelines.cli import main
rc = main(["select", {str(root / 'high')!r}, {str(tmp_path / 'cli')!r}, "--no-progress",
           "select.threshold={threshold}"])
print("RESULT", rc, "transformers" in sys.modules)
"""
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "RESULT 0 False", done.stdout + done.stderr
    assert "capfilt select" in done.stdout and "left: below_threshold" in done.stdout
    for shard in SHARDS:
        assert (tmp_path / "cli" / f"{shard}.tar").read_bytes() == (root / "mid" / f"{shard}.tar").read_bytes()


def test_an_interrupted_selection_resumes_byte_identically(runs, tmp_path):
    root, threshold = runs["root"], runs["thresholds"]["mid"]
    config = selecting(tmp_path / "new", f"select.threshold={threshold}")
    select(str(root / "high"), selecting(tmp_path / "whole", f"select.threshold={threshold}"))
    first = len(rows(root / "high", ["00000"]))

    def crash(done, total):
        if done == first + 1:  # inside the writer of the second shard
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt, match="1 of 3 shards done"):
        select(str(root / "high"), config, progress=crash)
    assert sorted(os.listdir(tmp_path / "new")) == [
        ".capfilt.lock", "00000.parquet", "00000.tar", "00000_stats.json", SELECT_FILE]
    outcome = select(str(root / "high"), config)
    assert outcome.stats["timing"]["shards_written"] == 2
    assert snapshot(tmp_path / "new") == snapshot(tmp_path / "whole")


def test_another_policy_is_refused_naming_the_change_unless_overwrite(runs, tmp_path):
    root, threshold = runs["root"], runs["thresholds"]["mid"]
    select(str(root / "high"), selecting(tmp_path / "new", f"select.threshold={threshold}"))
    before = snapshot(tmp_path / "new")
    again = select(str(root / "high"), selecting(tmp_path / "new", f"select.threshold={threshold}"))
    assert again.stats["timing"]["shards_written"] == 0
    with pytest.raises(RunRefused, match=rf"select\.threshold: {threshold} -> 0\.9"):
        select(str(root / "high"), selecting(tmp_path / "new", "select.threshold=0.9"))
    assert snapshot(tmp_path / "new") == before
    select(str(root / "high"), selecting(tmp_path / "new", "select.threshold=0.9"), mode="overwrite")
    select(str(root / "high"), selecting(tmp_path / "fresh", "select.threshold=0.9"))
    assert snapshot(tmp_path / "new") == snapshot(tmp_path / "fresh")


def test_the_run_folder_and_input_folders_are_refused(runs, tmp_path):
    root = runs["root"]
    for new, why in ((root / "high", "is an input folder"), (root / "in", "is an input folder"),
                     (root / "in" / "sub", "inside an input folder")):
        with pytest.raises(ValueError, match=why):
            select(str(root / "high"), selecting(new))
    assert not (root / "high" / SELECT_FILE).exists() and not (root / "in" / "sub").exists()
    with pytest.raises(SelectError, match="holds a capfilt run's output"):
        select(str(root / "high"), selecting(root / "mid"))


# --- runs made by hand: the policies -------------------------------------------------------------

def hand_run(root, shards: dict, layout: str = "per_image"):
    """A finished run of ``shards`` ({shard: [(key, web score, [caption scores])]}): input tars
    of real images, and what capfilt run leaves, with these scores. Returns the run folder."""
    (root / "in").mkdir(parents=True)
    run = OutputDir(str(root / "run"))
    for shard, samples in shards.items():
        url = write_shard(root / "in" / f"{shard}.tar", [
            {"key": key, "jpg": image_bytes("red", seed=n), "txt": f"web {key}", "json": {"n": n}}
            for n, (key, _, _) in enumerate(samples)])
        with ShardWriter(run, shard, 0.5, layout, ShardStats(shard=shard, fingerprint="runfp")) as writer:
            for sample, (key, web, captions) in zip(read_shard(url), samples):
                sample.width, sample.height, sample.web_score = 48, 40, web
                sample.captions = [f"cap{i} {key}" for i in range(len(captions))]
                sample.caption_scores = list(captions)
                writer.write(decide(sample, 0.5, "best_score"))
    config = Config(input=str(root / "in")).to_dict()
    config["writer"]["layout"] = layout
    run.write_bytes(RUN_FILE, json.dumps({"config": config, "fingerprint": "runfp"}).encode())
    return root / "run"


TIES = {  # best scores 0.9, 0.5, 0.7 | 0.7, 0.7, 0.1: three tied at 0.7, met in another order than by key
    "00000": [("k9", 0.9, [0.2]), ("k5", 0.5, []), ("k8", 0.7, [0.1])],
    "00001": [("k2", 0.3, [0.7]), ("k6", 0.7, []), ("k1", 0.1, [])],
}


def reasons(folder) -> dict:
    return {r["key"]: r[REASON] for r in rows(folder)}


def test_top_fraction_of_images_keeps_exactly_the_global_top_with_ties_by_key(tmp_path):
    run = hand_run(tmp_path, TIES)
    outcome = select(str(run), selecting(tmp_path / "new", "select.top_fraction=0.5", "select.threshold=0.6"))
    # 3 of 6: 0.9 (k9), then two of the three at 0.7 by key (k2, k6; not k8, met first);
    # k5 and k1 fall at the threshold first.
    assert reasons(tmp_path / "new") == {"k9": None, "k5": "below_threshold", "k8": "not_top_fraction",
                                         "k2": None, "k6": None, "k1": "below_threshold"}
    assert outcome.record["top_fraction"] == {"keep": 3, "of": 6, "score": 0.7, "last": ["k6", "00001", 0]}
    assert {r["key"]: r["kept_texts"] for r in rows(tmp_path / "new") if r["status"] == "kept"} == {
        "k9": ["web k9"], "k2": ["cap0 k2"], "k6": ["web k6"]}
    select(str(run), selecting(tmp_path / "all", "select.top_fraction=1", "select.threshold=0"))
    assert set(reasons(tmp_path / "all").values()) == {None}


def test_top_fraction_of_texts_ranks_every_text_of_the_run(tmp_path):
    run = hand_run(tmp_path, TIES)
    outcome = select(str(run), selecting(tmp_path / "new", "select.top_fraction=0.34", "select.top_of=texts",
                                         "select.threshold=0"))
    # 9 texts, floor(0.34 * 9) = 3: k9's web (0.9), then of k8's web, k2's caption and k6's web
    # (0.7 each) the first two by (key, shard, position): k2's caption, k6's web.
    assert outcome.record["top_fraction"] == {"keep": 3, "of": 9, "score": 0.7, "last": ["k6", "00001", 0]}
    kept = {r["key"]: r["kept_texts"] for r in rows(tmp_path / "new") if r["status"] == "kept"}
    assert kept == {"k9": ["web k9"], "k2": ["cap0 k2"], "k6": ["web k6"]}
    assert outcome.stats["texts_removed"] == {"not_top_fraction": 6}
    assert outcome.stats["reasons"] == {"kept": 3, "not_top_fraction": 3}


def test_max_captions_keeps_the_best_captions_and_selection_picks_among_them(tmp_path):
    run = hand_run(tmp_path, {"00000": [("a", 0.8, [0.65, 0.6, 0.9, 0.7]), ("b", 0.1, [0.7])]})
    select(str(run), selecting(tmp_path / "new", "select.max_captions=2", "select.threshold=0.62"))
    a = rows(tmp_path / "new")[0]
    # Over the threshold: 0.65, 0.9, 0.7; the best two, in their order: 0.9 and 0.7.
    assert a["kept_texts"] == ["web a", "cap2 a", "cap3 a"] and a["text"] == "cap2 a"
    select(str(run), selecting(tmp_path / "web", "select.max_captions=0", "select.threshold=0.62",
                               "select.selection=prefer_web"))
    a, b = rows(tmp_path / "web")
    assert (a["kept_texts"], a["text"], b[REASON]) == (["web a"], "web a", "max_captions")


def test_the_mix_draws_the_share_of_synthetic_pairs_deterministically(tmp_path):
    images = [(f"m{n:03d}", 0.8, [0.7, 0.75, 0.9]) for n in range(60)] + [(f"w{n}", 0.8, []) for n in range(10)]
    run = hand_run(tmp_path, {"00000": images}, layout="pairs")
    outcome = select(str(run), selecting(tmp_path / "new", "select.synthetic_share=0.8", "select.threshold=0.5"))
    mix = outcome.record["mix"]  # 70 web and 180 synthetic pairs: web pairs kept with a chance of 36/56
    assert (mix["web_pairs"], mix["synthetic_pairs"], mix["synthetic_chance"]) == (70, 180, 1.0)
    assert mix["web_chance"] == pytest.approx(36 / 56)
    origins = [o for r in rows(tmp_path / "new") for o in r["kept_origins"]]
    assert origins.count("synthetic") == 180 and 0.77 < origins.count("synthetic") / len(origins) < 0.83
    assert outcome.stats["reasons"].get("mix", 0) == sum(r[REASON] == "mix" for r in rows(tmp_path / "new")) > 0
    select(str(run), selecting(tmp_path / "again", "select.synthetic_share=0.8", "select.threshold=0.5"))
    assert snapshot(tmp_path / "again") == snapshot(tmp_path / "new")
    select(str(run), selecting(tmp_path / "seed", "select.synthetic_share=0.8", "select.threshold=0.5",
                               "select.seed=1"))
    assert (tmp_path / "seed" / "00000.tar").read_bytes() != (tmp_path / "new" / "00000.tar").read_bytes()
    half = select(str(run), selecting(tmp_path / "half", "select.synthetic_share=0.5", "select.threshold=0.5"))
    assert (half.record["mix"]["web_chance"], half.record["mix"]["synthetic_chance"]) == (1.0, pytest.approx(70 / 180))
    origins = [o for r in rows(tmp_path / "half") for o in r["kept_origins"]]
    assert origins.count("web") == 70 and 0.42 < origins.count("synthetic") / len(origins) < 0.58


def test_bad_policies_and_runs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="select.top_fraction: 1.5"):
        load_config(None, ["select.top_fraction=1.5"])
    with pytest.raises(ConfigError, match="unknown config key 'select.quantile'"):
        load_config(None, ["select.quantile=0.3"])
    run = hand_run(tmp_path, TIES)
    with pytest.raises(SelectError, match="synthetic_share: a mix of pairs needs select.layout: pairs"):
        select(str(run), selecting(tmp_path / "new", "select.synthetic_share=0.5"))
    (run / "00001_stats.json").unlink()
    with pytest.raises(SelectError, match=r"not finished: 1 of 2 input shards are not done \(00001\)"):
        select(str(run), selecting(tmp_path / "new"))


def test_an_input_tar_that_changed_since_the_run_is_an_error(tmp_path):
    run = hand_run(tmp_path, TIES)
    shutil.copy(tmp_path / "in" / "00000.tar", tmp_path / "in" / "00001.tar")
    with pytest.raises(SelectError, match=r"00001.tar: sample 0 is key 'k9' where the run read key 'k2'"):
        select(str(run), selecting(tmp_path / "new"))
    assert not (tmp_path / "new" / "00001_stats.json").exists()


# --- policies on recorded scores (scores:): a run made by hand with CLIP and SigLIP scores ------

RECORDED = ["clip", "sig"]
# {shard: [(key, (web ITM, web clip, web sig), [(caption ITM, clip, sig)], embedding)]}. Best ITM:
# a 0.9, c 0.85, b 0.7, d 0.7; best clip: c 0.5, d 0.45, a 0.4, b 0.25. d's web text has no clip
# score. a and c are one image twice (the same embedding).
CLIPPED = {
    "00000": [("a", (0.9, 0.10, 0.9), [(0.8, 0.35, 0.2), (0.3, 0.40, 0.9)], (1, 0, 0)),
              ("b", (0.6, 0.20, 0.9), [(0.7, 0.25, 0.9)], (0, 1, 0))],
    "00001": [("c", (0.85, 0.50, 0.6), [], (1, 0, 0)),
              ("d", (0.55, None, 0.9), [(0.7, 0.45, 0.7)], (0, 0, 1))],
}


def recorded_run(root, shards: dict = CLIPPED):
    """A finished run of ``shards`` that recorded the scores RECORDED (``scores:``, NAME_web and
    NAME_captions), with ITC and embeddings, as capfilt run leaves it, over input tars of real
    images. test_reshard and test_report read it too."""
    import numpy as np

    from capfilt.io.writer import run_schema

    (root / "in").mkdir(parents=True)
    run = OutputDir(str(root / "run"))
    for shard, samples in shards.items():
        url = write_shard(root / "in" / f"{shard}.tar", [
            {"key": key, "jpg": image_bytes(["red", "blue"][n % 2], seed=n), "txt": f"web {key}"}
            for n, (key, *_) in enumerate(samples)])
        with ShardWriter(run, shard, 0.5, "per_image", ShardStats(shard=shard, fingerprint="runfp"),
                         schema=run_schema(RECORDED)) as writer:
            for sample, (key, (web, *web_recorded), captions, vector) in zip(read_shard(url), samples):
                sample.width, sample.height, sample.web_score, sample.web_itc = 48, 40, web, web - 0.5
                sample.captions = [f"cap{i} {key}" for i in range(len(captions))]
                sample.caption_scores = [itm for itm, *_ in captions]
                sample.caption_itc = [itm - 0.5 for itm, *_ in captions]
                sample.scores = {name: {"web": web_recorded[i], "captions": [c[1 + i] for c in captions]}
                                 for i, name in enumerate(RECORDED)}
                sample.embedding = np.asarray(vector, dtype=np.float16)
                writer.write(decide(sample, 0.5, "best_score"))
    config = Config(input=str(root / "in")).to_dict()
    config["scores"] = [{"name": name, "model": f"tiny-{name}", "revision": "main", "kind": "auto"}
                        for name in RECORDED]
    run.write_bytes(RUN_FILE, json.dumps({"config": config, "fingerprint": "runfp"}).encode())
    return root / "run"


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    return recorded_run(tmp_path_factory.mktemp("recorded"))


def kept_texts(folder) -> dict:
    return {r["key"]: (r[REASON], r["kept_texts"]) for r in rows(folder)}


def test_score_thresholds_keep_a_text_only_when_each_named_recorded_score_passes(scored, tmp_path):
    outcome = select(str(scored), selecting(tmp_path / "clip", "select.threshold=0.5",
                                            "select.score_thresholds={clip: 0.3}"))
    # Of the texts over the ITM threshold: a's web (clip 0.1) out, cap0 (0.35) in; b's both out;
    # d's web, with no clip score, out.
    assert kept_texts(tmp_path / "clip") == {"a": (None, ["cap0 a"]), "b": ("below_score_threshold", []),
                                             "c": (None, ["web c"]), "d": (None, ["cap0 d"])}
    assert outcome.stats["texts_removed"] == {"below_score_threshold": 4}
    assert outcome.stats["reasons"] == {"below_score_threshold": 1, "kept": 3}
    assert outcome.record["policy"]["score_thresholds"] == {"clip": 0.3}
    # Each named score: sig 0.5 also takes a's cap0 (sig 0.2).
    both = select(str(scored), selecting(tmp_path / "both", "select.threshold=0.5",
                                         "select.score_thresholds={clip: 0.3, sig: 0.5}"))
    assert kept_texts(tmp_path / "both") == {"a": ("below_score_threshold", []), "b": ("below_score_threshold", []),
                                             "c": (None, ["web c"]), "d": (None, ["cap0 d"])}
    assert both.stats["texts_removed"] == {"below_score_threshold": 5}
    # The recorded scores are carried as the run wrote them.
    ran = {r["key"]: r for r in rows(scored)}
    for row in rows(tmp_path / "both"):
        assert [row[c] for c in ("clip_web", "clip_captions", "sig_captions")] == \
            [ran[row["key"]][c] for c in ("clip_web", "clip_captions", "sig_captions")]


def test_top_score_ranks_by_a_recorded_score_as_datacomp_ranks_by_clip(scored, tmp_path):
    for name, top_score in (("itm", "itm"), ("clip", "clip")):
        select(str(scored), selecting(tmp_path / name, "select.threshold=0", "select.top_fraction=0.5",
                                      f"select.top_score={top_score}"))
    kept = {name: sorted(k for k, (reason, _) in kept_texts(tmp_path / name).items() if reason is None)
            for name in ("itm", "clip")}
    assert kept == {"itm": ["a", "c"], "clip": ["c", "d"]}  # best clip: c 0.5, d 0.45
    # Each text ranked: 7 with a clip score (d's web has none), floor(0.43 * 7) = 3 of them.
    outcome = select(str(scored), selecting(tmp_path / "texts", "select.threshold=0", "select.top_fraction=0.43",
                                            "select.top_of=texts", "select.top_score=clip"))
    assert outcome.record["top_fraction"] == {"keep": 3, "of": 7, "score": 0.4, "last": None}
    assert kept_texts(tmp_path / "texts") == {"a": (None, ["cap1 a"]), "b": ("not_top_fraction", []),
                                              "c": (None, ["web c"]), "d": (None, ["cap0 d"])}


def test_dedup_ranks_near_duplicates_by_a_recorded_top_score(scored, tmp_path):
    # a and c are one image: by ITM a (0.9) stays, by clip c (0.5).
    for top_score, want in (("itm", {"a": None, "c": "duplicate_of a"}), ("clip", {"a": "duplicate_of c", "c": None})):
        select(str(scored), selecting(tmp_path / top_score, "select.dedup=true", f"select.top_score={top_score}"))
        assert {k: reason for k, (reason, _) in kept_texts(tmp_path / top_score).items() if k in "ac"} == want


def test_a_policy_on_a_score_the_run_did_not_record_is_refused_at_start(scored, tmp_path):
    for setting, named in (("select.score_thresholds={siglip: 0.1}", r"select\.score_thresholds\.siglip"),
                           ("select.top_score=siglip", "select.top_score: siglip")):
        with pytest.raises(SelectError, match=rf"{re.escape(str(scored))}: {named} needs the run's recorded score "
                                              r"'siglip', which the run did not record \(its scores: clip, sig\)"):
            select(str(scored), selecting(tmp_path / "new", setting, "select.top_fraction=0.5"))
    plain = hand_run(tmp_path / "plain", TIES)
    with pytest.raises(SelectError, match=r"select.score_thresholds.clip needs .* \(its scores: none\): "
                                          r"run again with scores: \[\{name: clip"):
        select(str(plain), selecting(tmp_path / "new", "select.score_thresholds={clip: 0.1}"))
    assert not (tmp_path / "new").exists()
    for bad, message in (("select.score_thresholds={CLIP: 0.1}", "select.score_thresholds: 'CLIP': string should "
                                                                 "match pattern"),
                         ("select.score_thresholds={clip: high}", "select.score_thresholds: 'high': input should be "
                                                                  "a valid number"),
                         ("select.top_score=CLIP-L", "select.top_score: 'CLIP-L': input should be 'itm' or 'itc' or")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, [bad])


def test_a_policy_without_the_new_settings_keeps_its_identity(tmp_path):
    """select.json's policy (part of the fingerprint) as before score_thresholds: an older
    selection resumes, not refused as another policy."""
    run = hand_run(tmp_path, TIES)
    outcome = select(str(run), selecting(tmp_path / "new"))
    assert sorted(outcome.record["identity"]["select"]) == [
        "dedup", "dedup_threshold", "itc_threshold", "layout", "max_captions", "seed", "selection", "synthetic_share",
        "threshold", "top_fraction", "top_of", "top_score"]
    assert outcome.record["identity"]["select_revision"] == 2
