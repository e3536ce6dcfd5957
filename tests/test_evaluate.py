"""capfilt evaluate: BLIP's retrieval evaluation (train_retrieval.py) of a filter checkpoint, and the
converter of Karpathy-split annotations into its shards."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from conftest import image_bytes, write_shard
from PIL import Image

from capfilt.config import EvaluateConfig
from capfilt.evaluate import (EvalSet, candidates, descending, pairs_to_score, ranks, read_set, recalls,
                              reranked_ranks)
from capfilt.io.reader import read_shard
from capfilt.karpathy import blip_caption
from pipelines.cli import main


# --- Ranking and recall, by hand and against BLIP's own code -----------------------------------


def blip_ranks(scores, targets):
    """BLIP's itm_eval ranking, with numpy's stable sort (its default sort is stable only for
    short rows): the first place any target takes in argsort(row)[::-1]."""
    out = []
    for row, wanted in zip(scores, targets):
        order = np.argsort(row, kind="stable")[::-1]
        out.append(min(int(np.where(order == t)[0][0]) for t in wanted))
    return np.array(out)


def test_ranks_and_recall_of_a_hand_computed_case_with_ties_and_several_texts_per_image():
    """Image 0 owns texts 0 and 1, image 1 text 2, image 2 texts 3 and 4. Ties: the later
    candidate is placed first."""
    scores = np.array([
        [0.5, 0.9, 0.9, 0.1, 0.9],  # order 4, 2, 1, 0, 3: its best text (1) is third -> 2
        [0.2, 0.2, 0.2, 0.2, 0.2],  # all equal: 4, 3, 2, ... -> 2
        [0.3, 0.0, 0.7, 0.7, 0.1],  # text 3 ties text 2 and goes first -> 0
    ], dtype=np.float32)
    assert ranks(scores, [[0, 1], [2], [3, 4]]).tolist() == [2, 2, 0]
    # Texts 0..4 against the 3 images, each text's own image marked.
    per_text = np.array([[0.1, 0.1, 0.0], [0.4, 0.4, 0.4], [0.0, 0.3, 0.3], [0.1, 0.5, 0.2], [0.0, 0.0, 0.9]])
    assert ranks(per_text, [[0], [0], [1], [2], [2]]).tolist() == [1, 2, 1, 1, 0]
    report = recalls(np.array([2, 2, 0]), np.array([1, 2, 1, 1, 0]))
    assert report["txt_r1"] == pytest.approx(100 / 3) and report["txt_r5"] == 100
    assert report["img_r1"] == pytest.approx(20) and report["img_r5"] == report["img_r10"] == 100
    assert report["txt_r_mean"] == pytest.approx((100 / 3 + 200) / 3)
    assert report["r_mean"] == pytest.approx((report["txt_r_mean"] + report["img_r_mean"]) / 2)


def test_recall_at_each_k_counts_ranks_below_k():
    report = recalls(np.array([0, 4, 5, 9, 10]), np.array([0, 1, 10, 11]))
    assert (report["txt_r1"], report["txt_r5"], report["txt_r10"]) == (20, 40, 80)
    assert (report["img_r1"], report["img_r5"], report["img_r10"]) == (25, 50, 50)


def test_ranks_and_top_k_order_as_blip_with_a_stable_sort_on_many_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(40, 30)).astype(np.float32)  # ties everywhere
    targets = [sorted(rng.choice(30, size=rng.integers(1, 4), replace=False).tolist()) for _ in range(40)]
    assert ranks(scores, targets).tolist() == blip_ranks(scores, targets).tolist()
    values, index = descending(torch.from_numpy(scores), 7)
    for row, top, got in zip(scores, index.numpy(), values.numpy()):
        assert top.tolist() == np.argsort(row, kind="stable")[::-1][:7].tolist()
        assert got.tolist() == row[top].tolist()


def blip_evaluation(sims, itm, image_texts, text_image, k):
    """salesforce/BLIP's evaluation and itm_eval, written plainly over whole matrices:
    ``itm[i, t]`` is ITM's logit of image i and text t."""
    n_images, n_texts = sims.shape
    i2t = np.full((n_images, n_texts), -100.0, dtype=np.float32)
    for i in range(n_images):
        top = np.argsort(sims[i], kind="stable")[::-1][:k]
        i2t[i, top] = itm[i, top] + sims[i, top]
    t2i = np.full((n_texts, n_images), -100.0, dtype=np.float32)
    for t in range(n_texts):
        top = np.argsort(sims[:, t], kind="stable")[::-1][:k]
        t2i[t, top] = itm[top, t] + sims[top, t]
    return recalls(blip_ranks(i2t, image_texts), blip_ranks(t2i, [[i] for i in text_image]))


def test_top_k_and_reranking_equal_blips_evaluation_over_whole_matrices():
    """The blockwise path (top-k both ways, the pairs scored once, rows ranked a block at a
    time) against BLIP's, with k below the number of candidates so that -100 takes part."""
    rng = np.random.default_rng(1)
    text_image = np.array([0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 5, 6], dtype=np.int64)
    image_texts = [np.flatnonzero(text_image == i).tolist() for i in range(7)]
    sims = rng.normal(size=(7, 12)).astype(np.float32)
    sims[:, 3] = sims[:, 5]  # two texts alike: ties in the top k
    itm = rng.normal(scale=2, size=(7, 12)).astype(np.float32)
    # Image 0's third place is a tie of texts 3 and 5: at k=3 text 5 (the later) is re-ranked,
    # and beats the image's own texts; text 3 would not have.
    sims[0] = [0.9, 0.8, -0.5, 0.5, -0.5, 0.5, -0.6, -0.7, -0.8, -0.9, -0.95, -0.99]
    itm[0, [0, 1, 3, 5]] = [0, 0, -5, 5]
    for k in (3, 12):
        chosen = candidates(torch.from_numpy(sims), image_texts, text_image, k)
        codes = pairs_to_score(chosen, text_image, 12)
        assert set(codes.tolist()) >= {i * 12 + t for t, i in enumerate(text_image)}  # every positive
        scored = itm.ravel()[codes]  # what ITM gives the pairs it is asked for
        lookup = lambda pairs: scored[np.searchsorted(codes, pairs)]  # noqa: E731
        got = recalls(reranked_ranks(*chosen.i2t, lambda r, i: lookup(r[:, None] * 12 + i), image_texts, 12),
                      reranked_ranks(*chosen.t2i, lambda r, i: lookup(i * 12 + r[:, None]),
                                     text_image[:, None], 7))
        assert got == blip_evaluation(sims, itm, image_texts, text_image, k)
        assert recalls(*chosen.itc_ranks) == blip_evaluation(sims, np.zeros_like(itm), image_texts,
                                                             text_image, 12)


def test_hardest_negative_is_the_most_similar_text_of_another_image():
    sims = torch.tensor([[0.9, 0.8, 0.7, 0.7], [0.3, 0.2, 0.3, 0.3]])
    text_image = np.array([0, 1, 1, 0])
    chosen = candidates(sims, [[0, 3], [1, 2]], text_image, 2)
    assert chosen.negatives.tolist() == [1, 3]  # image 1: texts 0 and 3 of image 0 tie; the later


# --- The data ----------------------------------------------------------------------------------


def read_eval_set(urls, cfg=EvaluateConfig()):
    found = EvalSet()
    images = [(s.source, s.key) for s in read_set(urls, cfg, None, found)]
    assert images == found.refs
    return found


def test_both_data_forms_group_texts_by_image(tmp_path):
    """Samples sharing a json image_id are one image (the first one's), texts in reading order;
    a sample's json captions list, or its .txt lines, are its texts."""
    jpg = image_bytes("red")
    shared = write_shard(tmp_path / "a.tar", [
        {"key": "0", "jpg": jpg, "txt": "a red square", "json": {"image_id": 7}},
        {"key": "1", "jpg": image_bytes("blue"), "txt": "blue", "json": {"image_id": "7b"}},
        {"key": "2", "jpg": jpg, "txt": "red again\n", "json": {"image_id": 7}},
    ])
    listed = write_shard(tmp_path / "b.tar", [
        {"key": "0", "jpg": jpg, "txt": "ignored", "json": {"captions": ["one", " ", "two"]}},
        {"key": "1", "jpg": jpg, "txt": "line a\n\nline b\n"},
        {"key": "2", "jpg": jpg, "json": {"image_id": 7, "captions": "three"}},  # image 7 of a.tar
    ])
    found = read_eval_set([shared, listed])
    assert found.texts == ["a red square", "blue", "red again", "one", "two", "line a", "line b", "three"]
    assert found.text_image == [0, 1, 0, 2, 2, 3, 3, 0]
    assert [key for _, key in found.refs] == ["0", "1", "0", "1"]
    assert found.image_texts() == [[0, 2, 7], [1], [3, 4], [5, 6]]


def test_a_set_that_cannot_be_evaluated_is_refused(tmp_path):
    no_text = write_shard(tmp_path / "a.tar", [{"key": "0", "jpg": image_bytes("red"), "txt": "red"},
                                               {"key": "1", "jpg": image_bytes("blue"), "txt": " \n"}])
    with pytest.raises(ValueError, match=r"1 images have no text, the first .*a.tar: 1"):
        read_eval_set([no_text]).check()
    bad = write_shard(tmp_path / "b.tar", [{"key": "0", "jpg": image_bytes("red"), "json": {"captions": [1]}}])
    with pytest.raises(ValueError, match=r"b.tar: 0.json: 'captions' must be a list of strings"):
        read_eval_set([bad])
    broken = write_shard(tmp_path / "c.tar", [{"key": "0", "txt": "no image"}])
    with pytest.raises(ValueError, match=r"evaluation needs every sample: .*has no image"):
        read_eval_set([broken])


# --- The converter -----------------------------------------------------------------------------


def karpathy_set(tmp_path):
    """dataset_coco.json's layout: images in FOLDER/filepath/filename; a train image to leave out."""
    (tmp_path / "img" / "val2014").mkdir(parents=True)
    files = {}
    for n, (colour, ext, fmt) in enumerate([("red", "jpg", "JPEG"), ("blue", "png", "PNG"), ("green", "jpg", "JPEG")]):
        files[f"COCO_{n}.{ext}"] = image_bytes(colour, fmt, seed=n)
        (tmp_path / "img" / "val2014" / f"COCO_{n}.{ext}").write_bytes(files[f"COCO_{n}.{ext}"])
    images = [
        {"filepath": "val2014", "filename": "COCO_0.jpg", "split": "test", "imgid": 10, "cocoid": 100,
         "sentences": [{"raw": "A Red square, on the LEFT."}, {"raw": "red  (square)!"}]},
        {"filepath": "val2014", "filename": "COCO_1.png", "split": "train", "imgid": 11,
         "sentences": [{"raw": "train only"}]},
        {"filepath": "val2014", "filename": "COCO_2.jpg", "split": "test", "imgid": 12, "cocoid": 102,
         "sentences": [{"raw": "a green: square " + "word " * 40}]},
    ]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return tmp_path / "dataset_coco.json", tmp_path / "img", files


def test_blip_caption_cleans_as_blips_retrieval_evaluation():
    assert blip_caption("A Red square, on the LEFT.") == "a red square, on the left"
    assert blip_caption("red  (square)!\n") == "red square"
    assert blip_caption("w " * 40) == " ".join(["w"] * 30)


def test_convert_writes_the_test_split_as_evaluation_shards(tmp_path, capsys):
    annotations, images, files = karpathy_set(tmp_path)
    out = tmp_path / "shards"
    argv = ["evaluate-convert", "--karpathy", str(annotations), "--images", str(images),
            "--output", str(out), "--per-shard", "1"]
    assert main(argv) == 0
    assert "2 test images, 3 captions, 2 shards" in capsys.readouterr().out
    samples = [s for shard in ("00000", "00001") for s in read_shard(str(out / f"{shard}.tar"))]
    assert [(s.key, s.image_ext, s.image) for s in samples] == [
        ("000000", "jpg", files["COCO_0.jpg"]), ("000001", "jpg", files["COCO_2.jpg"])]
    assert samples[0].meta == {"image_id": 10, "captions": ["a red square, on the left", "red square"],
                               "filename": "COCO_0.jpg", "filepath": "val2014", "imgid": 10, "cocoid": 100}
    assert samples[1].meta["captions"] == ["a green square " + " ".join(["word"] * 27)]
    found = read_eval_set([str(out / "00000.tar"), str(out / "00001.tar")])
    assert found.image_texts() == [[0, 1], [2]]
    with tarfile.open(out / "00000.tar") as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}
    # An output folder that already holds shards, and a missing image, are refused.
    assert main(argv) == 2
    (images / "val2014" / "COCO_2.jpg").unlink()
    assert main(argv[:-4] + ["--output", str(tmp_path / "other")]) == 2
    assert "1 of the 2 test images are missing, the first" in capsys.readouterr().err


def test_convert_keeps_raw_captions_and_finds_flickr_images_in_one_folder(tmp_path):
    (tmp_path / "flickr").mkdir()
    (tmp_path / "flickr" / "1.jpg").write_bytes(image_bytes("red"))
    (tmp_path / "f.json").write_text(json.dumps({"images": [
        {"filename": "1.jpg", "split": "test", "imgid": 0, "sentences": [{"raw": "A Dog."}]}]}))
    out = tmp_path / "out"
    assert main(["evaluate-convert", "--karpathy", str(tmp_path / "f.json"), "--images", str(tmp_path / "flickr"),
                 "--output", str(out), "--raw-captions"]) == 0
    (sample,) = read_shard(str(out / "00000.tar"))
    assert sample.meta == {"image_id": 0, "captions": ["A Dog."], "filename": "1.jpg", "imgid": 0}
    assert Image.open(io.BytesIO(sample.image)).size == (48, 40)


# --- The models: held to transformers' BlipForImageTextRetrieval --------------------------------


COLOURS = ["red", "green", "blue", "yellow"]
TEXTS = [["a red square", "red"], ["a green square on the left", "green", "a big green shape"],
         ["a blue circle"], ["yellow", "a yellow square at the top", "a picture of the sky"]]


def reference(folder, images: list[bytes], texts: list[str]):
    """transformers' own forward, loaded plainly: the ITC cosine of each (image, text) from
    ``use_itm_head=False``, and ITM's logits of each pair from ``use_itm_head=True``, with the
    text as tokenized ([CLS] first) and with [ENC] in its place (salesforce/BLIP's
    ``text_ids[:,0] = enc_token_id``)."""
    from transformers import AutoTokenizer, BlipForImageTextRetrieval
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    model = BlipForImageTextRetrieval.from_pretrained(folder).eval()
    tokenizer, processor = AutoTokenizer.from_pretrained(folder), BlipImageProcessorPil.from_pretrained(folder)
    pixels = torch.from_numpy(np.stack([
        processor(images=Image.open(io.BytesIO(b)).convert("RGB"), return_tensors="np")["pixel_values"][0]
        for b in images]))
    n = len(images)
    sims, logits = np.zeros((n, len(texts)), np.float32), {"cls": np.zeros((n, len(texts), 2), np.float32)}
    logits["enc"] = logits["cls"].copy()
    with torch.no_grad():
        for t, text in enumerate(texts):
            tokens = tokenizer(text, return_tensors="pt", truncation=True, max_length=35)
            ids, mask = tokens.input_ids.repeat(n, 1), tokens.attention_mask.repeat(n, 1)
            sims[:, t] = model(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                               use_itm_head=False).itm_score[:, 0].numpy()
            logits["cls"][:, t] = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).itm_score.numpy()
            ids = ids.clone()
            ids[:, 0] = tokenizer.convert_tokens_to_ids("[ENC]")
            logits["enc"][:, t] = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).itm_score.numpy()
    return sims, logits


@pytest.fixture(scope="module")
def images():
    return [image_bytes(c, seed=i) for i, c in enumerate(COLOURS)]


@pytest.fixture(scope="module")
def expected(sharp_filter, images):
    return reference(sharp_filter, images, [t for image_texts in TEXTS for t in image_texts])


@pytest.mark.parametrize("first_token", ["enc", "cls"])
def test_itc_similarities_and_itm_logits_equal_transformers_retrieval_model(
        sharp_filter, images, expected, first_token, tmp_path):
    """evaluate's passes (decode and resize as capfilt run, one vision pass per batch, the pairs
    chunked across images) against the per-pair forward, to 1e-4: the similarity, and the raw
    ITM logits with [CLS] or [ENC] first."""
    from capfilt.config import Config, FilterConfig, RuntimeConfig
    from capfilt.evaluate import encode_texts, image_batches, load_models, pair_logits

    shard = write_shard(tmp_path / "a.tar", [{"key": str(i), "jpg": b, "json": {"captions": TEXTS[i]}}
                                             for i, b in enumerate(images)])
    cfg = EvaluateConfig(batch_size=4)
    config = Config(filter=FilterConfig(model=sharp_filter, first_token=first_token),
                    runtime=RuntimeConfig(device="cpu"), evaluate=cfg)
    models = load_models(config)
    found = EvalSet()
    with torch.inference_mode():
        ((_, states),) = image_batches(read_set([shard], cfg, config.reader, found), models, cfg, config.reader)
        ids, mask, text_feats = encode_texts(models.itm, found.texts, 3, "cpu")
        sims = (models.itm.image_features(states) @ text_feats.T).numpy()
        pairs = [(i, t) for i in range(4) for t in range(len(found.texts))]
        logits = pair_logits(models.itm, states, ids, mask, np.array([i for i, _ in pairs]),
                             np.array([t for _, t in pairs]), 5)
    ref_sims, ref_logits = expected
    np.testing.assert_allclose(sims, ref_sims, atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits.reshape(4, -1, 2), ref_logits[first_token], atol=1e-4, rtol=0)
    # A tolerance far below what separates any two images, and [ENC] from [CLS]: a text scored
    # against another image, or with the other first token, fails.
    for scores in (ref_sims, ref_logits[first_token][..., 1]):
        gaps = np.abs(scores[:, None] - scores[None, :])[~np.eye(4, dtype=bool)]
        assert gaps.min() > 10 * 1e-4
    assert np.abs(ref_logits["enc"] - ref_logits["cls"]).min() > 10 * 1e-4


def itm_scores(logits, text_image, sims):
    """softmax(ITM logits)[1] of each text with its image (positives), and of each image with
    its hardest negative, the other images' text most similar to it (the later of equals)."""
    score = lambda pair: torch.softmax(torch.from_numpy(pair), -1)[1].item()  # noqa: E731
    positives = np.array([score(logits[i, t]) for t, i in enumerate(text_image)])
    negatives = []
    for i in range(len(sims)):
        others = [t for t in range(len(text_image)) if text_image[t] != i]
        negatives.append(score(logits[i, max(others, key=lambda t: (sims[i, t], t))]))
    return positives, np.array(negatives)


def amid(scores):
    """A threshold between the two middle scores, far from both: an accuracy that any score on
    the wrong side of it changes."""
    ordered = np.sort(scores)
    low, high = ordered[len(ordered) // 2 - 1], ordered[len(ordered) // 2]
    assert high - low > 1e-3
    return round(float(low + high) / 2, 6)


def forms(tmp_path, images):
    """The same evaluation set in both forms: samples sharing an image_id (one image's split
    across two shards), and one sample per image with a captions list (or .txt lines)."""
    shared, listed = tmp_path / "shared", tmp_path / "listed"
    shared.mkdir()
    listed.mkdir()
    samples = [{"key": f"{i}_{j}", "jpg": images[i], "txt": text, "json": {"image_id": f"img{i}"}}
               for i, texts in enumerate(TEXTS) for j, text in enumerate(texts)]
    write_shard(shared / "00000.tar", samples[:4])
    write_shard(shared / "00001.tar", samples[4:])
    per_image = [{"key": str(i), "jpg": images[i], "json": {"captions": texts}} for i, texts in enumerate(TEXTS)]
    per_image[3] = {"key": "3", "jpg": images[3], "txt": "\n".join(TEXTS[3])}
    write_shard(listed / "00000.tar", per_image)
    return shared, listed


def test_evaluate_end_to_end_in_both_data_forms_equals_blips_evaluation(
        sharp_filter, images, expected, tmp_path, capsys):
    """``capfilt evaluate`` writes evaluate.json with BLIP's recall (k_test below the number of
    candidates, so that -100 takes part) and the ITM accuracy, as BLIP's evaluation over
    transformers' own scores gives them, in either data form."""
    ref_sims, ref_logits = expected
    text_image = [i for i, texts in enumerate(TEXTS) for _ in texts]
    image_texts = [[t for t, i in enumerate(text_image) if i == image] for image in range(len(TEXTS))]
    want = blip_evaluation(ref_sims, ref_logits["enc"][..., 1], image_texts, text_image, 3)
    assert 0 < want["r_mean"] < 100
    positives, negatives = itm_scores(ref_logits["enc"], text_image, ref_sims)
    threshold = amid(np.concatenate([positives, negatives]))
    accuracy = 100 * (np.mean(positives >= threshold) + np.mean(negatives < threshold)) / 2
    reports = []
    for form in forms(tmp_path, images):
        out = tmp_path / f"eval_{form.name}"
        assert main(["evaluate", "--model", sharp_filter, "--data", str(form), "--output", str(out),
                     "--no-progress", "evaluate.k_test=3", "evaluate.batch_size=3", "evaluate.itm_batch_size=4",
                     "evaluate.text_batch_size=4", f"evaluate.threshold={threshold}", "runtime.device=cpu"]) == 0
        reports.append(json.loads((out / "evaluate.json").read_text()))
        assert "image -> text (TR)" in capsys.readouterr().out
    for report in reports:
        assert (report["images"], report["texts"], report["k_test"]) == (4, 9, {"i2t": 3, "t2i": 3})
        assert report["model"]["first_token"] == "enc"
        assert report["retrieval"] == pytest.approx(want)
        assert report["itc_retrieval"] == pytest.approx(
            blip_evaluation(ref_sims, np.zeros_like(ref_sims), image_texts, text_image, 9))
        itm = report["itm"]
        assert itm["balanced_accuracy"] == pytest.approx(accuracy)
        assert (itm["positives"], itm["negatives"], itm["threshold"]) == (9, 4, threshold)
        assert itm["positives_mean_score"] == pytest.approx(positives.mean(), abs=1e-5)
        assert itm["negatives_mean_score"] == pytest.approx(negatives.mean(), abs=1e-5)
    assert reports[0]["retrieval"] == reports[1]["retrieval"] and reports[0]["itm"] == reports[1]["itm"]


def test_evaluate_refuses_a_checkpoint_that_is_no_filter_in_one_line(tiny_models, tmp_path, capsys):
    shard = write_shard(tmp_path / "a.tar", [{"key": "0", "jpg": image_bytes("red"), "txt": "red"}])
    assert main(["evaluate", "--model", tiny_models[0], "--data", shard]) == 2
    assert capsys.readouterr().err.strip() == (f"capfilt: --model: {tiny_models[0]} is a BlipForConditionalGeneration "
                                               "checkpoint, not the BlipForImageTextRetrieval this slot needs")
