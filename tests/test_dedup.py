"""select's near-duplicate removal and ITC policies.

The dedup core (capfilt/dedup.py) on embeddings built by hand, whose cosines are known, and on
random ones against a brute-force reading of its rule; then ``capfilt select`` with dedup and
itc_threshold over a real tiny run whose input holds one image twice under two keys.
"""

import json
import math
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import image_bytes, write_shard
from test_select import make_run, selecting, snapshot, tiny_config

from capfilt import dedup
from capfilt.config import Config
from capfilt.decision import decide
from capfilt.dedup import IndexPlan, near_duplicates
from capfilt.identity import RunRefused
from capfilt.io.fs import OutputDir, read_parquet
from capfilt.io.layout import RUN_FILE, SELECT_FILE
from capfilt.io.reader import read_shard
from capfilt.io.writer import IMAGE_EMBEDDING, ShardWriter
from capfilt.select import REASON, SelectError, select
from capfilt.stats import ShardStats


def unit(*values) -> np.ndarray:
    v = np.array(values, dtype=np.float64)
    return v / np.linalg.norm(v)


def at_angles(*cosines: float) -> np.ndarray:
    """Unit vectors in the plane, each at the given cosine to the first (x axis)."""
    return np.stack([unit(c, math.sqrt(max(0.0, 1 - c * c))) for c in cosines]).astype(np.float32)


def kept_or_keeper(duplicate_of, keys) -> dict:
    return {key: None if of < 0 else keys[of] for key, of in zip(keys, duplicate_of)}


# --- the core, by hand -----------------------------------------------------------------------------

def test_each_group_keeps_its_best_scored_image_and_the_others_name_it():
    # a, b, c within 0.95 of each other; d, e another group, far from the first; f alone.
    e = np.concatenate([
        np.stack([unit(1, 0, 0, 0), unit(1, 0.05, 0, 0), unit(1, 0, 0.05, 0)]),
        np.stack([unit(0, 1, 0, 0), unit(0, 1, 0.1, 0)]),
        np.stack([unit(0, 0, 0, 1)])]).astype(np.float32)
    keys = ["a", "b", "c", "d", "e", "f"]
    got = near_duplicates(e, [0.5, 0.9, 0.7, 0.6, 0.8, 0.1], keys, 0.95)
    assert kept_or_keeper(got, keys) == {"a": "b", "b": None, "c": "b", "d": "e", "e": None, "f": None}


def test_equal_scores_keep_the_smallest_key_whatever_the_order():
    e = np.stack([unit(1, 2, 3)] * 3).astype(np.float32)  # the same image three times
    keys = ["k2", "k10", "k1"]
    got = near_duplicates(e, [0.7, 0.7, 0.7], keys, 0.95)
    assert kept_or_keeper(got, keys) == {"k2": "k1", "k10": "k1", "k1": None}  # by string: k1 < k10 < k2
    keys = [("k", "00001", 0), ("k", "00000", 3)]  # select's keys: (key, shard, row)
    assert near_duplicates(e[:2], [0.7, 0.7], keys, 0.95).tolist() == [1, -1]


def test_in_a_chain_only_kept_images_remove_others():
    # a ~ b and b ~ c at cosine 0.96, a and c at 0.96² ~ 0.84: not within 0.95.
    angle = math.acos(0.96)
    e = np.stack([unit(1, 0), unit(math.cos(angle), math.sin(angle)),
                  unit(math.cos(2 * angle), math.sin(2 * angle))]).astype(np.float32)
    keys = ["a", "b", "c"]
    # a best: a kept, b dropped for a; c, close only to the dropped b, kept.
    assert kept_or_keeper(near_duplicates(e, [0.9, 0.8, 0.7], keys, 0.95), keys) == {"a": None, "b": "a", "c": None}
    # b best: b removes both.
    assert kept_or_keeper(near_duplicates(e, [0.8, 0.9, 0.7], keys, 0.95), keys) == {"a": "b", "b": None, "c": "b"}


def test_the_threshold_is_inclusive_within_float32_rounding():
    e = at_angles(1.0, 0.5)  # cosine exactly 0.5 in float32: 1 x 0.5 + 0 x ...
    assert float(e[0] @ e[1]) == 0.5
    for threshold, dropped in ((0.5, True), (0.5 + 0.9 * dedup.TOLERANCE, True), (0.5 + 2 * dedup.TOLERANCE, False),
                               (0.49, True), (0.6, False)):
        assert bool(near_duplicates(e, [0.9, 0.8], ["a", "b"], threshold)[1] == 0) is dropped, threshold
    # threshold 1.0: the same embedding, though its float32 norm² rounds below 1.
    rng = np.random.default_rng(0)
    v = next(v for v in (unit(*rng.standard_normal(256)).astype(np.float32) for _ in range(100)) if v @ v < 1)
    assert near_duplicates(np.stack([v, v]), [0.9, 0.8], ["a", "b"], 1.0).tolist() == [-1, 0]


def test_nothing_and_mismatched_lengths():
    assert near_duplicates(np.zeros((0, 4), np.float32), [], [], 0.9).tolist() == []
    with pytest.raises(ValueError, match="2 embeddings, 1 scores and 2 keys"):
        near_duplicates(np.eye(2, dtype=np.float32), [0.5], ["a", "b"], 0.9)


# --- the core against its rule, brute force ---------------------------------------------------------

def greedy_reference(e: np.ndarray, scores, keys, threshold: float) -> list[int]:
    """The module's rule read literally: every pair's cosine, images walked best first."""
    order = np.array(sorted(range(len(e)), key=lambda i: (-scores[i], keys[i])))
    cos = e.astype(np.float64) @ e.astype(np.float64).T
    kept, answer = np.zeros(len(e), dtype=bool), [-1] * len(e)
    for i in order:
        close = order[kept[order] & (cos[i, order] >= threshold)]  # kept ones within it, best first
        if len(close):
            answer[i] = int(close[0])
        else:
            kept[i] = True
    return answer


def corpus(n: int, copies: int, chains: int, seed: int = 0):
    """Clustered unit vectors (cosine ~0.2 within a cluster), then ``chains`` chains a ~ b ~ c
    (cosine 0.97 each step, a to c 0.88), then ``copies`` noisy copies (cosine ~0.99) of earlier
    rows, copies included; scores with ties (2 digits). No pair within 0.005 of 0.95, so float
    rounding decides none."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, 64))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    e = centres[rng.integers(0, 20, n)] + rng.standard_normal((n, 64)) * (2 / 8)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    step = math.acos(0.97)
    for a in range(n - copies - 3 * chains, n - copies, 3):
        away = rng.standard_normal(64)
        away -= (away @ e[a]) * e[a]
        away /= np.linalg.norm(away)
        e[a + 1], e[a + 2] = (math.cos(k * step) * e[a] + math.sin(k * step) * away for k in (1, 2))
    for i in range(n - copies, n):  # of the clustered ones or of earlier copies, not of a chain
        copy_of_copy = i > n - copies and rng.random() < 0.5
        source = rng.integers(n - copies, i) if copy_of_copy else rng.integers(0, n - copies - 3 * chains)
        e[i] = e[source] + rng.standard_normal(64) * (rng.uniform(0, 0.15) / 8)
        e[i] /= np.linalg.norm(e[i])
    cos = e @ e.T
    assert not ((cos > 0.945) & (cos < 0.955)).any()
    return e.astype(np.float32), rng.random(n).round(2).tolist(), [f"{i:04d}" for i in rng.permutation(n)]


def test_batches_and_the_ivf_index_give_the_rule_s_answer(monkeypatch):
    e, scores, keys = corpus(1200, 300, 100)
    expected = greedy_reference(e, scores, keys, 0.95)
    chained = [a for a in range(600, 900, 3) if expected[a + 1] >= 0 and expected[a] < 0 and expected[a + 2] < 0]
    assert 350 < sum(a >= 0 for a in expected) < 500 and len(chained) > 10  # b dropped, a and c kept
    assert near_duplicates(e, scores, keys, 0.95).tolist() == expected
    monkeypatch.setattr(dedup, "BATCH", 50)  # most pairs across batches (the index), some within
    assert near_duplicates(e, scores, keys, 0.95).tolist() == expected
    assert near_duplicates(e, scores, keys, 0.95, IndexPlan("ivf", nlist=8, nprobe=8)).tolist() == expected
    # One cell of 8 searched: some duplicates missed, none dropped wrongly.
    approx = near_duplicates(e, scores, keys, 0.95, IndexPlan("ivf", nlist=8, nprobe=1)).tolist()
    rank = {i: r for r, i in enumerate(sorted(range(len(e)), key=lambda i: (-scores[i], keys[i])))}
    for image, keeper in enumerate(approx):
        if keeper >= 0:
            assert approx[keeper] < 0 and rank[keeper] < rank[image] and e[image] @ e[keeper] >= 0.95
    found = sum(a >= 0 and b >= 0 for a, b in zip(approx, expected))
    assert approx != expected and found >= 0.95 * sum(b >= 0 for b in expected)


def test_the_plan_switches_to_ivf_above_the_exact_limit():
    assert IndexPlan.for_size(dedup.EXACT_LIMIT) == IndexPlan("flat")
    assert IndexPlan.for_size(2_000_000, exact_limit=10) == IndexPlan("ivf", round(math.sqrt(dedup.NPROBE * 2e6)),
                                                                      dedup.NPROBE)


# --- select's policies on runs made by hand ------------------------------------------------------

def hand_run(root, shards: dict, itc: bool = True, embeddings: bool = True):
    """A finished run of ``shards``: {shard: [(key, (web ITM, web ITC), [(caption ITM, ITC)],
    embedding)]}, what capfilt run leaves with these scores, over input tars of real images."""
    (root / "in").mkdir(parents=True)
    run = OutputDir(str(root / "run"))
    for shard, samples in shards.items():
        url = write_shard(root / "in" / f"{shard}.tar", [
            {"key": key, "jpg": image_bytes("red", seed=n), "txt": f"web {key}"}
            for n, (key, *_) in enumerate(samples)])
        with ShardWriter(run, shard, 0.5, "per_image", ShardStats(shard=shard, fingerprint="runfp")) as writer:
            for sample, (key, web, captions, vector) in zip(read_shard(url), samples):
                sample.width, sample.height = 48, 40
                sample.web_score, sample.web_itc = web
                sample.captions = [f"cap{i} {key}" for i in range(len(captions))]
                sample.caption_scores = [itm for itm, _ in captions]
                sample.caption_itc = [itc for _, itc in captions]
                sample.embedding = np.asarray(vector, dtype=np.float16)
                writer.write(decide(sample, 0.5, "best_score"))
    config = Config(input=str(root / "in")).to_dict()
    config["filter"]["itc"], config["writer"]["embeddings"] = itc, embeddings
    run.write_bytes(RUN_FILE, json.dumps({"config": config, "fingerprint": "runfp"}).encode())
    return root / "run"


def selected(folder) -> dict:
    return {r["key"]: r for shard in sorted(folder.glob("*.parquet")) for r in read_parquet(str(shard)).to_pylist()}


X, Y, Z = (1, 0, 0), (0, 1, 0), (0, 0, 1)
NEAR_X = unit(1, 0.1, 0)  # cosine 0.995 with X
SCORED = {
    "00000": [("a", (0.9, 0.1), [(0.8, 0.6), (0.3, 0.9)], X),  # of both thresholds, only cap0 passes
              ("b", (0.6, 0.2), [(0.7, 0.3)], Y)],             # no text passes ITC 0.35
    "00001": [("c", (0.95, 0.5), [], NEAR_X),                 # near a, scored higher
              ("d", (0.55, 0.6), [(0.4, 0.7)], Z)],            # ITC 0.7 of a caption below the ITM threshold
}


def test_itc_threshold_keeps_a_text_only_above_both_thresholds(tmp_path):
    run = hand_run(tmp_path, SCORED)
    outcome = select(str(run), selecting(tmp_path / "new", "select.threshold=0.5", "select.itc_threshold=0.35"))
    rows = selected(tmp_path / "new")
    assert {k: (r[REASON], r["kept_texts"], r["text"]) for k, r in rows.items()} == {
        "a": (None, ["cap0 a"], "cap0 a"), "b": ("below_itc_threshold", [], None),
        "c": (None, ["web c"], "web c"), "d": (None, ["web d"], "web d")}
    assert outcome.stats["texts_removed"] == {"below_itc_threshold": 3}  # a's web, b's web and caption
    assert outcome.stats["reasons"] == {"below_itc_threshold": 1, "kept": 3}
    # Carried: the ITC similarities and the embeddings, as the run recorded them.
    ran = selected(run)
    for key, row in rows.items():
        assert (row["web_itc"], row["caption_itc"], row[IMAGE_EMBEDDING]) == \
            (ran[key]["web_itc"], ran[key]["caption_itc"], ran[key][IMAGE_EMBEDDING])


def test_top_score_itc_ranks_the_images_by_their_best_itc(tmp_path):
    run = hand_run(tmp_path, SCORED)
    select(str(run), selecting(tmp_path / "itm", "select.threshold=0", "select.top_fraction=0.5"))
    select(str(run), selecting(tmp_path / "itc", "select.threshold=0", "select.top_fraction=0.5",
                               "select.top_score=itc"))
    kept = {name: sorted(key for key, row in selected(tmp_path / name).items() if row[REASON] is None)
            for name in ("itm", "itc")}
    # Best ITM: c 0.95, a 0.9, b 0.7, d 0.55; best ITC: a 0.9, d 0.7, c 0.5, b 0.3.
    assert kept == {"itm": ["a", "c"], "itc": ["a", "d"]}


def test_dedup_removes_only_for_a_kept_image_and_keeps_the_best_scored(tmp_path):
    run = hand_run(tmp_path, SCORED)
    outcome = select(str(run), selecting(tmp_path / "new", "select.threshold=0.5", "select.dedup=true"))
    # a and c within 0.95 (over two shards), both kept by the threshold: c scores 0.95 to a's 0.9.
    assert {k: r[REASON] for k, r in selected(tmp_path / "new").items()} == {
        "a": "duplicate_of c", "b": None, "c": None, "d": None}
    assert outcome.stats["reasons"] == {"duplicate_of": 1, "kept": 3}
    assert outcome.record["dedup"] | {"digest": None} == {
        "threshold": 0.95, "images": 4, "duplicates": 1, "index": {"kind": "flat", "nlist": 0, "nprobe": 0},
        "digest": None}
    # c dropped by the ITC threshold first: a, its duplicate, stays.
    select(str(run), selecting(tmp_path / "c_out", "select.threshold=0.5", "select.itc_threshold=0.55",
                               "select.dedup=true"))
    assert {k: r[REASON] for k, r in selected(tmp_path / "c_out").items()} == {
        "a": None, "b": "below_itc_threshold", "c": "below_itc_threshold", "d": None}


def test_a_policy_that_needs_a_column_the_run_did_not_record_is_refused(tmp_path):
    no_itc = hand_run(tmp_path / "no_itc", SCORED, itc=False)
    for setting in ("select.itc_threshold=0.3", "select.top_score=itc"):
        with pytest.raises(SelectError, match=rf"{setting.split('=')[0]}.* needs the run's web_itc column, which the "
                                              r"run did not record \(filter.itc off"):
            select(str(no_itc), selecting(tmp_path / "new", setting, "select.top_fraction=0.5"))
    no_embeddings = hand_run(tmp_path / "no_emb", SCORED, embeddings=False)
    with pytest.raises(SelectError, match=r"select.dedup needs the run's image_embedding column.*"
                                          r"run again with writer.embeddings: true"):
        select(str(no_embeddings), selecting(tmp_path / "new", "select.dedup=true"))
    assert not (tmp_path / "new").exists()
    # A run older than the columns: its parquet lacks them. Refused when needed, else selected
    # from, with the columns null.
    older = hand_run(tmp_path / "older", SCORED)
    for parquet in older.glob("*.parquet"):
        pq.write_table(pq.read_table(parquet).drop_columns(["web_itc", "caption_itc", IMAGE_EMBEDDING]), parquet)
    with pytest.raises(SelectError, match="select.dedup needs the run's image_embedding column"):
        select(str(older), selecting(tmp_path / "new", "select.dedup=true"))
    select(str(older), selecting(tmp_path / "new", "select.threshold=0.5", "select.top_fraction=0.5"))
    rows = selected(tmp_path / "new")
    assert [r[REASON] for r in rows.values()].count(None) == 2
    assert {(r["web_itc"], r[IMAGE_EMBEDDING]) for r in rows.values()} == {(None, None)}


def test_a_resumed_dedup_that_finds_other_duplicates_is_refused(tmp_path):
    run = hand_run(tmp_path, SCORED)
    config = selecting(tmp_path / "new", "select.threshold=0.5", "select.dedup=true")
    select(str(run), config)
    before = snapshot(tmp_path / "new")
    (tmp_path / "new" / "00001_stats.json").unlink()
    assert select(str(run), config).stats["timing"]["shards_written"] == 1  # the same duplicates: resumed
    assert snapshot(tmp_path / "new") == before
    record = json.loads((tmp_path / "new" / SELECT_FILE).read_text())
    record["dedup"]["digest"] = "found on another machine"
    (tmp_path / "new" / SELECT_FILE).write_text(json.dumps(record))
    (tmp_path / "new" / "00001_stats.json").unlink()
    with pytest.raises(SelectError, match="found 1 near-duplicates now, 1 when the done shards were written"):
        select(str(run), config)
    assert select(str(run), config, mode="overwrite").stats["timing"]["shards_written"] == 2
    with pytest.raises(RunRefused, match=r"select\.dedup_threshold: 0\.95 -> 0\.9"):
        select(str(run), selecting(tmp_path / "new", "select.threshold=0.5", "select.dedup=true",
                                   "select.dedup_threshold=0.9"))


# --- a real run of the tiny models ---------------------------------------------------------------

def best(row: dict, score: str) -> float:
    """An image's score as dedup ranks it: its best text's ITM score, or ITC similarity."""
    if score == "itc":
        return max(v for v in [row["web_itc"], *row["caption_itc"]] if v is not None)
    return max(v for v in [row["web_score"], *row["caption_scores"]] if v is not None)


def test_select_drops_one_copy_of_an_image_over_a_real_run(tiny_models, sharp_filter, tmp_path):
    """The same image under two keys in two shards, through CapFiltStep with a filter whose
    embeddings depend on the image, recording ITC and embeddings by default."""
    (tmp_path / "in").mkdir()
    write_shard(tmp_path / "in" / "00000.tar", [
        {"key": "red", "jpg": image_bytes("red", seed=1), "txt": "a red square"},
        {"key": "blue", "png": image_bytes("blue", "PNG", seed=2), "txt": "a blue square"},
        {"key": "green", "jpg": image_bytes("green", seed=3), "txt": "a green square"}])
    write_shard(tmp_path / "in" / "00001.tar", [
        {"key": "red_again", "jpg": image_bytes("red", seed=1), "txt": "a red square"},
        {"key": "yellow", "jpg": image_bytes("yellow", seed=4), "txt": "a yellow square"}])
    make_run(tiny_config((tiny_models[0], sharp_filter), str(tmp_path / "in" / "{00000..00001}.tar"),
                         tmp_path / "run", 0.0), {"captioner": "tiny", "filter": "sharp"})
    ran = selected(tmp_path / "run")
    vectors = {key: np.asarray(row[IMAGE_EMBEDDING], dtype=np.float32) for key, row in ran.items()}
    cosine = {(a, b): float(v @ w / np.linalg.norm(v) / np.linalg.norm(w))
              for a, v in vectors.items() for b, w in vectors.items() if a < b}
    assert cosine.pop(("red", "red_again")) > 0.999 and max(cosine.values()) < 0.9  # one pair of copies
    # The copies' captions differ (sampled per shard), their web texts' ITM and ITC do not.
    assert best(ran["red_again"], "itm") > best(ran["red"], "itm")
    assert best(ran["red_again"], "itc") == best(ran["red"], "itc") == ran["red"]["web_itc"]

    # By ITM, the copy scored lower goes, though its key comes first; ITC >= 0 takes texts too.
    outcome = select(str(tmp_path / "run"), selecting(tmp_path / "itm", "select.dedup=true",
                                                      "select.itc_threshold=0"))
    rows = selected(tmp_path / "itm")
    assert {key: row[REASON] for key, row in rows.items()} == {
        "red": "duplicate_of red_again", "blue": None, "green": None, "red_again": None, "yellow": None}
    negative = sum(itc < 0 for row in ran.values() for itc in [row["web_itc"], *row["caption_itc"]])
    assert outcome.stats["texts_removed"] == {"below_itc_threshold": negative, "duplicate_of": 1} and negative > 0
    for row in rows.values():
        itc = {row["web_text"]: row["web_itc"], **dict(zip(row["captions"], row["caption_itc"]))}
        assert all(itc[text] >= 0 for text in row["kept_texts"])
    assert outcome.record["reasons"] == {"duplicate_of": 1, "kept": 4}
    for key, row in rows.items():  # carried as the run recorded them
        assert (row["web_itc"], row["caption_itc"], row[IMAGE_EMBEDDING]) == \
            (ran[key]["web_itc"], ran[key]["caption_itc"], ran[key][IMAGE_EMBEDDING])
    with tarfile.open(tmp_path / "itm" / "00000.tar") as tar:
        assert sorted({m.name.split(".")[0] for m in tar.getmembers()}) == ["blue", "green"]

    # By ITC, the two tie: the later key goes.
    select(str(tmp_path / "run"), selecting(tmp_path / "itc", "select.dedup=true", "select.top_score=itc"))
    assert {key: row[REASON] for key, row in selected(tmp_path / "itc").items()} == {
        "red": None, "blue": None, "green": None, "red_again": "duplicate_of red", "yellow": None}
