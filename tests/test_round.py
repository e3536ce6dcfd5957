"""``make round`` end to end at a tiny size: the world, capfilt run, the four training sets,
training and evaluation on the held-out test split, and round.json."""

import glob
import hashlib
import json

import pyarrow.parquet as pq
import pytest

from capfilt.io.reader import read_shard

pytestmark = pytest.mark.timeout(300)

SETS = ("web", "filtered", "captioned", "capfilt")


def texts_of(urls):
    """(image sha256, text) of every sample training reads: blank texts are not pairs."""
    return [(hashlib.sha256(s.image).hexdigest(), s.web_text.strip()) for url in urls for s in read_shard(url)
            if s.error is None and s.web_text and s.web_text.strip()]


@pytest.fixture(scope="module")
def round_output(tmp_path_factory):
    from pipelines import round as round_pipeline

    out = tmp_path_factory.mktemp("round") / "out"
    # Threshold 0.3: the 2-step filter's scores sit near its prior, so some texts pass and some not.
    assert round_pipeline.main(["--output", str(out), "--web", "120", "--test", "16", "--train", "120",
                                "--val", "16", "--clean", "40", "--steps", "2", "--batch", "8", "--seeds", "0",
                                "--captioner-steps", "2", "--filter-steps", "2", "--threshold", "0.5",
                                "--no-progress"]) == 0
    return out, json.loads((out / "round.json").read_text())


def test_round_json_has_every_row_with_blips_beside_it(round_output):
    _, record = round_output
    assert record["seeds"] == [0]
    assert [r["set"] for r in record["runs"]] == list(SETS)
    for name in SETS:
        row = record["table"][name]
        for metric in ("txt_r1", "img_r1"):
            assert row[metric]["values"] == [next(r[metric] for r in record["runs"] if r["set"] == name)]
            assert 0 <= row[metric]["min"] <= row[metric]["mean"] <= row[metric]["max"] <= 100
    assert record["table"]["capfilt"]["blip"] == {"txt_r1": 80.6, "img_r1": 63.1}
    assert record["table"]["web"]["blip"] == {"txt_r1": 78.4, "img_r1": 60.7}
    assert set(record["verdict"]) == {"txt_r1", "img_r1", "wins"}
    assert record["seconds"] > 0 and record["cpu_seconds"] > 0


def test_the_four_sets_hold_what_they_should(round_output):
    out, record = round_output
    sets = record["sets"]
    rows = [r for p in sorted(glob.glob(f"{out}/capfilt/*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(rows) == 120
    web = [r["web_text"].strip() for r in rows if r["web_text"].strip()]
    kept_web = [r for r in rows if r["web_kept"] and r["web_text"].strip()]
    captions = sum(len({c for c in r["captions"] if c.strip()} - {r["web_text"]}) for r in rows)
    kept_pairs = sum(len(r["kept_texts"]) for r in rows if r["status"] == "kept")
    expected = {"web": len(web), "filtered": len(kept_web), "captioned": len(web) + captions, "capfilt": kept_pairs}
    assert 0 < expected["filtered"] < expected["web"]  # the filter kept some web texts and dropped some
    clean = sets["web"]["clean_pairs"]
    assert clean > 0
    for name in SETS:
        pairs = texts_of(sets[name]["shards"])
        assert sets[name]["web_pairs"] == expected[name], name
        assert sets[name]["clean_pairs"] == clean, name  # the same clean pairs in every set
        assert len(pairs) == expected[name] + clean == sets[name]["pairs"], name
        assert clean / len(pairs) <= 0.10, name
    # the clean pairs are the clean split's first ones, in every set
    human = texts_of(sorted(glob.glob(f"{out}/clean/train/*.tar")))[:clean]
    for name in SETS:
        assert set(human) <= set(texts_of(sets[name]["shards"])), name


def test_the_test_split_is_new_images(round_output):
    out, record = round_output
    test = texts_of(sorted(glob.glob(f"{out}/test/*.tar")))
    assert len(test) == 16 == record["test_images"]
    assert len({image for image, _ in test}) == 16 and len({text for _, text in test}) == 16
    training = {u for s in record["sets"].values() for u in s["shards"]}
    training |= set(glob.glob(f"{out}/clean/*/*.tar")) | set(glob.glob(f"{out}/web/*.tar"))
    seen = {image for image, _ in texts_of(sorted(training))}
    assert seen and not seen & {image for image, _ in test}


def test_each_row_is_capfilt_evaluate_on_the_test_split(round_output):
    from capfilt.config import load_config
    from capfilt.evaluate import evaluate
    from pipelines import round as round_pipeline

    out, record = round_output
    run = record["runs"][-1]
    config = load_config(round_pipeline.CONFIG, [f"filter.model={run['model']}"])
    found = evaluate(sorted(glob.glob(f"{out}/test/*.tar")), config)
    assert found["images"] == 16
    assert (run["txt_r1"], run["img_r1"], run["r_mean"]) == (
        found["retrieval"]["txt_r1"], found["retrieval"]["img_r1"], found["retrieval"]["r_mean"])
    # the whole report beside the model, down to ITM's mean scores and the data it read (a 2-step
    # model ranks near-constant scores by index alone, so recalls could match on other data)
    beside = json.loads(open(f"{run['model']}/evaluate.json").read())
    assert beside["data"] == found["data"] and beside["data"][0].endswith("/test/00000.tar")
    assert {k: v for k, v in beside.items() if k != "seconds"} == json.loads(json.dumps(
        {k: v for k, v in found.items() if k != "seconds"}))


def test_finetune_filter_scores_each_epoch_with_capfilt_evaluate_when_given_eval(tmp_path):
    """``finetune.filter.eval``: each epoch's metrics are capfilt evaluate's on those shards, in
    place of the in-batch R@1 on ``val``; the last epoch's are the saved model's."""
    from capfilt.config import load_config
    from capfilt.evaluate import evaluate
    from pipelines import demo, finetune
    from pipelines import round as round_pipeline

    root = str(tmp_path)
    round_pipeline.make_world(root, train=48, val=8, web=4, test=12, seed=0)
    config = load_config(round_pipeline.CONFIG, demo.train_overrides("filter", root, 6, [
        f"finetune.filter.eval={root}/test", "finetune.filter.batch_size=16", "finetune.filter.threads=1"]))
    model = finetune.run(config, "filter", progress=False)
    history = json.loads(open(f"{model}/training.json").read())["history"]
    assert [h["step"] for h in history] == [3, 6]  # two epochs of 3 steps
    assert all(set(h) == {"epoch", "step", "val_txt_r1", "val_img_r1", "val_r_mean"} for h in history)
    found = evaluate(sorted(glob.glob(f"{root}/test/*.tar")), load_config(None, [f"filter.model={model}"]))
    assert (history[-1]["val_txt_r1"], history[-1]["val_img_r1"], history[-1]["val_r_mean"]) == (
        found["retrieval"]["txt_r1"], found["retrieval"]["img_r1"], found["retrieval"]["r_mean"])
