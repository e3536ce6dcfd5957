"""Recorded scores (``scores:``, issue 18): CLIP and SigLIP scorers held to transformers' own
``CLIPModel`` / ``SiglipModel`` forward, the kind read from the checkpoint, and what a run records
of them (NAME_web, NAME_captions) while the filter alone decides.

The checkpoints are tiny and random, built here with ``save_pretrained``, a tokenizer built with
the ``tokenizers`` library and each kind's image processor, and loaded through capfilt's own code.
"""

import io
import json
import re
import tarfile

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import Recorder, image_bytes, write_shard
from PIL import Image

from capfilt.config import ConfigError, ScoreConfig, load_config
from capfilt.identity import output_identity
from capfilt.io.fs import read_parquet
from capfilt.io.images import decode_rgb
from capfilt.io.writer import PARQUET_SCHEMA
from capfilt.models.scorers import ClipScorer, SiglipScorer, load_scorer, scorer_kind

TOLERANCE = 1e-4
MAX_TOKENS = 24  # the tiny text towers' positions
# Per image: texts of different lengths, one cut at MAX_TOKENS, one empty.
TEXTS = [["a red square on a plain background", "red", "a very long text " * 20],
         ["blue circle", "a blue circle in the middle of a large picture of the sky", "sky"],
         ["a green triangle", "green", ""]]
COLOURS = ("red", "blue", "green")


def build_checkpoint(kind: str, path) -> str:
    """A tiny random CLIP or SigLIP checkpoint in ``path``: weights, tokenizer, image processor.
    SigLIP's tokenizer gives input_ids only, as the hub's does (its text tower was trained unmasked)."""
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from capfilt.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=MAX_TOKENS, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if kind == "clip":
            model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
            # CLIP's own: the shortest side resized, then the centre cropped (non-square images differ)
            processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        else:
            model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
            processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    processor.save_pretrained(path)
    if kind == "siglip":  # as google/siglip-*'s tokenizer_config.json says
        config_file = path / "tokenizer_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_input_names": ["input_ids"]}))
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorers")
    return {kind: build_checkpoint(kind, root / kind) for kind in ("clip", "siglip")}


@pytest.fixture(scope="module")
def scorers(checkpoints):
    return {kind: load_scorer(ScoreConfig(name=kind, model=path), "cpu", "float32")
            for kind, path in checkpoints.items()}


@pytest.fixture(scope="module")
def references(checkpoints):
    from transformers import CLIPModel, SiglipModel

    return {"clip": CLIPModel.from_pretrained(checkpoints["clip"]).eval(),
            "siglip": SiglipModel.from_pretrained(checkpoints["siglip"]).eval()}


def pixels(processor, colours=COLOURS) -> torch.Tensor:
    images = [Image.open(io.BytesIO(image_bytes(c, seed=i))).convert("RGB") for i, c in enumerate(colours)]
    return torch.from_numpy(np.stack([processor(images=im, return_tensors="np")["pixel_values"][0] for im in images]))


def reference_scores(kind: str, reference, tokenizer, pv, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, cosine) of ``text`` against each image of ``pv`` by the transformers class's forward,
    the text tokenized as its processor tokenizes (SigLIP: padding="max_length")."""
    padding = "max_length" if kind == "siglip" else True
    tokens = tokenizer(text, padding=padding, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    with torch.no_grad():
        out = reference(input_ids=tokens["input_ids"], pixel_values=pv, attention_mask=tokens.get("attention_mask"))
    logits = out.logits_per_image[:, 0]
    if kind == "clip":
        cosine = logits / reference.logit_scale.exp()
        return cosine, cosine
    return torch.sigmoid(logits), (logits - reference.logit_bias) / reference.logit_scale.exp()


# --- each scorer against its transformers class ----------------------------------------------------

# Short texts only: no text of the batch reaches MAX_TOKENS, so padding to the longest is not
# padding to max_length (SigLIP's text tower pools the last position).
SHORT = [["red"], ["blue circle", "sky"], ["a green triangle"]]


@pytest.mark.parametrize("texts", [TEXTS, SHORT], ids=["texts", "short"])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_scores_equal_the_transformers_forward(kind, texts, scorers, references):
    scorer, reference = scorers[kind], references[kind]
    pv = pixels(scorer.image_processor)
    got = scorer.score(pv, texts, embeddings=True)
    assert [len(s) for s in got.scores] == [len(s) for s in got.similarity] == [len(t) for t in texts]
    gaps = []
    for i, image_texts in enumerate(texts):
        for text, score, cosine in zip(image_texts, got.scores[i], got.similarity[i]):
            want, want_cosine = reference_scores(kind, reference, scorer.tokenizer, pv, text)
            assert score == pytest.approx(want[i].item(), abs=TOLERANCE), (i, text)
            assert cosine == pytest.approx(want_cosine[i].item(), abs=TOLERANCE), (i, text)
            gaps.append(min(abs(want[i] - want[j]).item() for j in range(len(pv)) if j != i))
    # The test's power: a text scored against another image is off by far more than the tolerance.
    assert min(gaps) > 10 * TOLERANCE, gaps
    with torch.no_grad():
        image_embeds = reference(input_ids=torch.tensor([[2, 3]]), pixel_values=pv).image_embeds
    np.testing.assert_allclose(got.embeddings, image_embeds.numpy(), atol=1e-5)


def test_clip_scores_the_cosine_and_siglip_a_probability(scorers):
    assert "attention_mask" not in scorers["siglip"].tokenizer(["a red square"])  # unmasked, as trained
    clip = scorers["clip"].score(pixels(scorers["clip"].image_processor), TEXTS)
    assert clip.scores == clip.similarity
    siglip = scorers["siglip"].score(pixels(scorers["siglip"].image_processor), TEXTS)
    assert all(0 < s < 1 for row in siglip.scores for s in row)
    assert siglip.scores != siglip.similarity


def test_texts_of_no_image_and_images_of_no_text(scorers, references):
    scorer = scorers["clip"]
    pv = pixels(scorer.image_processor)
    got = scorer.score(pv, [[], TEXTS[1], []])
    assert got.scores[0] == got.scores[2] == [] and len(got.scores[1]) == 3
    # the middle image's texts against the middle image
    want = [reference_scores("clip", references["clip"], scorer.tokenizer, pv, t)[0][1].item() for t in TEXTS[1]]
    assert got.scores[1] == pytest.approx(want, abs=TOLERANCE)
    none = scorer.score(pv, [[], [], []])
    assert none.scores == [[], [], []] and none.embeddings is None


# --- the kind, from the checkpoint ------------------------------------------------------------------

def test_the_kind_is_the_checkpoints_model_type(checkpoints, scorers, tiny_models):
    assert type(scorers["clip"]) is ClipScorer and type(scorers["siglip"]) is SiglipScorer
    assert scorer_kind("auto", {"model_type": "siglip"}, "scores[0].model", "x") == "siglip"
    assert scorer_kind("clip", {"model_type": "siglip"}, "scores[0].model", "x") == "clip"  # forced
    with pytest.raises(ValueError, match=r"scores itm: .*filter is a 'blip' checkpoint .*clip, siglip"):
        load_scorer(ScoreConfig(name="itm", model=tiny_models[1]), "cpu", "float32")


def test_an_unknown_or_mismatched_checkpoint_is_refused_before_ray_starts(checkpoints, tiny_models):
    from capfilt.run import check_models

    def config(*scores):
        items = ", ".join(f"{{name: s{i}, model: {m}{', kind: ' + k if k else ''}}}" for i, (m, k) in enumerate(scores))
        return load_config("configs/tiny.yaml", [f"captioner.model={tiny_models[0]}",
                                                  f"filter.model={tiny_models[1]}", f"scores=[{items}]"])

    weights = check_models(config((checkpoints["clip"], None), (checkpoints["siglip"], None)))
    assert set(weights) == {"captioner", "filter", "scores.s0", "scores.s1"}
    assert weights["scores.s0"].startswith("sha256:") and weights["scores.s0"] != weights["scores.s1"]
    with pytest.raises(ValueError, match=r"scores\[1\].model: .*filter is a 'blip' checkpoint"):
        check_models(config((checkpoints["clip"], None), (tiny_models[1], None)))
    with pytest.raises(ValueError, match=r"scores\[0\].model: .*siglip is a SiglipModel checkpoint, not the CLIPModel"):
        check_models(config((checkpoints["siglip"], "clip")))


def test_two_scores_of_one_name_are_refused():
    with pytest.raises(ConfigError, match="scores: two scores named clip"):
        load_config(None, ["scores=[{name: clip, model: a}, {name: clip, model: b}]"])
    with pytest.raises(ConfigError, match=r"scores\[0\].name: 'CLIP-L'"):
        load_config(None, ["scores=[{name: CLIP-L, model: a}]"])
    with pytest.raises(ConfigError, match=r"unknown config key 'scores\[0\].modle'"):
        load_config(None, ["scores=[{name: clip, modle: a}]"])
    assert load_config(None, []).scores == []


def test_the_scores_are_part_of_the_output_identity_and_absent_ones_change_nothing():
    plain = load_config("configs/tiny.yaml")
    scored = load_config("configs/tiny.yaml", ["scores=[{name: clip, model: some/clip}]"])
    assert "scores" not in output_identity(plain, {})  # a run without them resumes as before
    assert output_identity(scored, {})["scores"] == [
        {"name": "clip", "model": "some/clip", "revision": "main", "kind": "auto"}]


# --- what a run records ----------------------------------------------------------------------------

SHARD = [
    {"key": "red", "jpg": image_bytes("red", seed=1), "txt": "a red square"},
    {"key": "bad", "jpg": b"<html>not an image</html>", "txt": "a broken image"},
    {"key": "blue", "png": image_bytes("blue", "PNG", seed=2), "txt": "a blue square on the left"},
    {"key": "notext", "jpg": image_bytes("green", seed=3)},
    {"key": "yellow", "jpg": image_bytes("yellow", seed=4), "txt": "yellow"},
]


def make_run(tiny_models, checkpoints, folder, with_scores: bool):
    """The shard through CapFiltStep, and run.json, as capfilt run leaves them."""
    from test_select import make_run as make_run_folder

    from capfilt.step import CapFiltStep

    (folder / "in").mkdir(parents=True)
    url = write_shard(folder / "in" / "00000.tar", SHARD)
    scores = [f"scores=[{{name: clip, model: {checkpoints['clip']}}}, {{name: sig, model: {checkpoints['siglip']}}}]"]
    config = load_config("configs/tiny.yaml", [
        f"captioner.model={tiny_models[0]}", f"filter.model={tiny_models[1]}", "captioner.num_captions=2",
        "runtime.batch_size=5", "filter.threshold=0.4"] + (scores if with_scores else []),
        input=url, output=str(folder / "out"))
    recorders = {}
    real_init = CapFiltStep.__init__

    def init(self, *args, **kwargs):  # the step make_run builds, its scorers recorded
        real_init(self, *args, **kwargs)
        for name in self.scorers:
            self.scorers[name] = recorders[name] = Recorder(self.scorers[name])

    with pytest.MonkeyPatch.context() as m:
        m.setattr(CapFiltStep, "__init__", init)
        make_run_folder(config, {"captioner": "tiny", "filter": "tiny"})
    return folder / "out", recorders


@pytest.fixture(scope="module")
def runs(tiny_models, checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("scored_runs")
    return {scored: make_run(tiny_models, checkpoints, root / str(scored), scored) for scored in (True, False)}


def test_a_run_records_each_scorers_scores_aligned_with_the_texts(runs, references, scorers):
    out, recorders = runs[True]
    table = read_parquet(str(out / "00000.parquet"))
    added = ["clip_web", "clip_captions", "sig_web", "sig_captions"]
    assert table.schema.names == PARQUET_SCHEMA.names + added  # after the fixed columns, in config order
    assert [table.schema.field(c).type for c in added] == [pa.float64(), pa.list_(pa.float64())] * 2
    rows = {r["key"]: r for r in table.to_pylist()}
    good = ["red", "blue", "notext", "yellow"]
    for name, kind in (("clip", "clip"), ("sig", "siglip")):
        (pv, texts), = recorders[name].calls  # one batch, the good samples
        for i, key in enumerate(good):
            row = rows[key]
            assert texts[i] == list(dict.fromkeys(([row["web_text"]] if row["web_text"] else []) + row["captions"]))
            assert len(row[f"{name}_captions"]) == len(row["captions"]) == 2
            pairs = list(zip(row["captions"], row[f"{name}_captions"]))
            pairs += [(row["web_text"], row[f"{name}_web"])] if row["web_text"] else []
            for text, score in pairs:
                want = reference_scores(kind, references[kind], scorers[kind].tokenizer, pv, text)[0][i].item()
                assert score == pytest.approx(want, abs=TOLERANCE), (name, key, text)
        assert rows["notext"][f"{name}_web"] is None
        assert rows["bad"]["status"] == "error"
        assert (rows["bad"][f"{name}_web"], rows["bad"][f"{name}_captions"]) == (None, None)
    # Each scorer got its own checkpoint's preprocessing of each image (CLIP's centre crop of the
    # 48x40 images), not BLIP's.
    for name, kind in (("clip", "clip"), ("sig", "siglip")):
        processor = scorers[kind].image_processor
        decoded = [decode_rgb(s.get("jpg") or s["png"], 10**8) for s in SHARD if s["key"] in good]
        want = torch.from_numpy(np.stack([processor(images=im, return_tensors="np")["pixel_values"][0]
                                          for im in decoded]))
        assert torch.equal(recorders[name].calls[0][0], want)


def test_recorded_scores_change_no_decision_and_no_tar_byte(runs):
    scored, plain = runs[True][0], runs[False][0]
    assert (scored / "00000.tar").read_bytes() == (plain / "00000.tar").read_bytes()
    def fixed_columns(row):  # an error names its shard, in another folder
        return {k: re.sub(r"^\S+/00000\.tar: ", "", row[k]) if k == "error" and row[k] else row[k]
                for k in PARQUET_SCHEMA.names}

    assert [fixed_columns(r) for r in read_parquet(str(scored / "00000.parquet")).to_pylist()] == \
        [fixed_columns(r) for r in read_parquet(str(plain / "00000.parquet")).to_pylist()]
    with tarfile.open(scored / "00000.tar") as tar:
        assert any(m.name.endswith(".json") for m in tar.getmembers())  # something was kept
    record = json.loads((scored / "run.json").read_text())
    assert [s["name"] for s in record["identity"]["scores"]] == ["clip", "sig"]


def test_select_reads_a_run_with_recorded_scores(runs, tmp_path):
    from capfilt.select import select

    out = runs[True][0]
    select(str(out), load_config(None, ["select.threshold=0.4"], output=str(tmp_path / "selected")))
    selected = read_parquet(str(tmp_path / "selected" / "00000.parquet")).to_pylist()
    ran = read_parquet(str(out / "00000.parquet")).to_pylist()
    assert [(r["key"], r["status"], r["kept_texts"]) for r in selected] == \
        [(r["key"], r["status"], r["kept_texts"]) for r in ran]
    # The recorded scores are carried into the selection, for a later select or report.
    scored = ["clip_web", "clip_captions", "sig_web", "sig_captions"]
    assert [[r[c] for c in scored] for r in selected] == [[r[c] for c in scored] for r in ran]
    assert any(r["clip_web"] is not None for r in selected)


def test_blip_clip_yaml_is_blip_base_with_clip_l14_recorded():
    base, clip = load_config("configs/blip_base.yaml"), load_config("configs/blip_clip.yaml")
    assert clip.scores == [ScoreConfig(name="clip", model="openai/clip-vit-large-patch14")]
    assert {**clip.to_dict(), "scores": []} == base.to_dict()
