"""The model slots (issue 18): the kind read from the checkpoint or forced, refused before Ray starts
when the slot cannot hold it, and a CLIP or SigLIP model in the filter's seat deciding with its own
score (the threshold means what that score means)."""

import pytest
import torch
from conftest import write_shard
from test_scorers import SHARD, build_checkpoint, reference_scores

from transformers import CLIPModel, SiglipModel

from capfilt.config import ScoreConfig, load_config
from capfilt.io.fs import read_parquet
from capfilt.io.images import decode_rgb
from capfilt.models.scorers import load_scorer
from capfilt.models.slots import ScorerFilter, load_captioner, load_filter, slot_kind
from capfilt.run import check_models

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("slots")
    return {kind: build_checkpoint(kind, root / kind) for kind in ("clip", "siglip")}


def config(tiny_models, *overrides, **paths):
    return load_config("configs/tiny.yaml", [f"captioner.model={tiny_models[0]}", f"filter.model={tiny_models[1]}",
                                             "captioner.num_captions=2", "runtime.batch_size=5", *overrides], **paths)


def test_the_kind_is_the_checkpoints_model_type_unless_forced(tiny_models, checkpoints):
    cfg = config(tiny_models, f"filter.model={checkpoints['siglip']}")
    assert type(load_captioner(cfg.captioner, "cpu", "float32")).__name__ == "Captioner"
    chosen = load_filter(cfg.filter, "cpu", "float32")
    assert isinstance(chosen, ScorerFilter) and chosen.kind == "siglip"
    assert type(load_filter(config(tiny_models).filter, "cpu", "float32")).__name__ == "ITMFilter"
    assert slot_kind("filter", "clip", {"model_type": "blip"}, "x") == "clip"  # forced: the load check judges it


@pytest.mark.parametrize("overrides, message", [
    (["captioner.model={clip}"], r"captioner.model: \S+clip is a 'clip' checkpoint .*the captioner takes blip, blip2"),
    (["captioner.kind=blip2"], r"captioner.model: \S+ is a BlipForConditionalGeneration checkpoint, not the "
                               r"Blip2ForConditionalGeneration this slot needs"),
    (["filter.kind=clip"], r"filter.model: \S+ is a BlipForImageTextRetrieval checkpoint, not the CLIPModel"),
    (["filter.model={clip}", "filter.max_text_tokens=30"], r"filter.max_text_tokens: 30 tokens, but \S+clip's text "
                                                           r"model has 24 positions"),
])
def test_a_checkpoint_its_slot_cannot_hold_is_refused_before_ray_starts(tiny_models, checkpoints, overrides,
                                                                        message):
    cfg = config(tiny_models, *[o.format(**checkpoints) for o in overrides])
    with pytest.raises(ValueError, match=message):
        check_models(cfg)


def test_a_clip_or_siglip_checkpoint_passes_the_filter_check(tiny_models, checkpoints):
    weights = check_models(config(tiny_models, f"filter.model={checkpoints['clip']}", "filter.max_text_tokens=24"))
    assert weights["filter"].startswith("sha256:")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_a_clip_or_siglip_filter_decides_with_its_own_score(tiny_models, checkpoints, tmp_path, kind):
    from test_select import make_run

    scorer = load_scorer(ScoreConfig(name="f", model=checkpoints[kind]), "cpu", "float32")
    model = {"clip": CLIPModel, "siglip": SiglipModel}[kind].from_pretrained(checkpoints[kind]).eval()
    judged = [s for s in SHARD if s.get("jpg", b"").startswith(b"\xff") or "png" in s]

    def pixels(sample):
        image = decode_rgb(sample.get("jpg") or sample["png"], 10**8)
        return torch.from_numpy(scorer.image_processor(images=image, return_tensors="np")["pixel_values"])

    # The threshold between the web texts' own scores: the cut must fall on this model's scale.
    web = sorted(reference_scores(kind, model, scorer.tokenizer, pixels(s), s["txt"])[0][0].item()
                 for s in judged if "txt" in s)
    threshold = (web[0] + web[-1]) / 2
    (tmp_path / "in").mkdir()
    url = write_shard(tmp_path / "in" / "00000.tar", SHARD)
    cfg = config(tiny_models, f"filter.model={checkpoints[kind]}", "filter.max_text_tokens=24",
                 f"filter.threshold={threshold}", input=url, output=str(tmp_path / "out"))
    make_run(cfg, {"captioner": "tiny", "filter": "tiny"})
    rows = {r["key"]: r for r in read_parquet(str(tmp_path / "out" / "00000.parquet")).to_pylist()}
    scorer = load_scorer(ScoreConfig(name="f", model=checkpoints[kind]), "cpu", "float32")
    model = {"clip": CLIPModel, "siglip": SiglipModel}[kind].from_pretrained(checkpoints[kind]).eval()
    kept = dropped = 0
    for sample in SHARD:
        row = rows[sample["key"]]
        if row["status"] == "error":
            continue
        pv = pixels(sample)
        texts = ([row["web_text"]] if row["web_text"] else []) + row["captions"]
        scores = ([row["web_score"]] if row["web_text"] else []) + row["caption_scores"]
        itcs = ([row["web_itc"]] if row["web_text"] else []) + row["caption_itc"]
        for text, score, itc in zip(texts, scores, itcs):
            want, cosine = reference_scores(kind, model, scorer.tokenizer, pv, text)
            assert score == pytest.approx(want[0].item(), abs=TOLERANCE), (kind, text)  # the model's own score
            assert itc == pytest.approx(cosine[0].item(), abs=TOLERANCE), (kind, text)  # and the cosine
            if score >= threshold:
                assert text in row["kept_texts"]
                kept += 1
            else:
                assert text not in row["kept_texts"]
                dropped += 1
    assert kept and dropped  # the threshold cut between this model's scores
    if kind == "siglip":
        assert all(0.0 < r["web_score"] < 1.0 for r in rows.values() if r["web_score"] is not None)


def test_evaluate_refuses_a_filter_that_is_not_blip(tiny_models, checkpoints):
    from capfilt.evaluate import load_models

    with pytest.raises(ValueError, match=r"filter.model: \S+clip is a clip checkpoint; capfilt evaluate"):
        load_models(config(tiny_models, f"filter.model={checkpoints['clip']}"))


@pytest.fixture(scope="module")
def blip2_models(tmp_path_factory):
    from capfilt.models.tiny import build_tiny_blip2_models

    opt, _, itm = build_tiny_blip2_models(str(tmp_path_factory.mktemp("blip2")))
    return opt, itm


def test_a_blip2_filter_is_checked_against_its_q_formers_positions(tiny_models, blip2_models):
    opt, itm = blip2_models
    ok = config(tiny_models, f"captioner.model={opt}", f"filter.model={itm}", "filter.max_text_tokens=64")
    assert set(check_models(ok)) == {"captioner", "filter"}
    # The retrieval checkpoint's config also carries a text_config (2048 positions) it has no model for.
    with pytest.raises(ValueError, match=r"filter.max_text_tokens: 65 tokens, but \S+blip2_itm's text model has 64"):
        check_models(config(tiny_models, f"filter.model={itm}", "filter.max_text_tokens=65"))


def test_a_blip2_run_captions_and_decides_with_blip2(tiny_models, blip2_models, tmp_path):
    from test_select import make_run

    from capfilt.models.blip2 import Blip2Filter
    from capfilt.config import FilterConfig

    opt, itm = blip2_models
    (tmp_path / "in").mkdir()
    url = write_shard(tmp_path / "in" / "00000.tar", SHARD)
    cfg = config(tiny_models, f"captioner.model={opt}", f"filter.model={itm}", "captioner.prompt=a photo of",
                 "captioner.max_length=8", "captioner.min_length=2", "writer.embeddings=true",
                 input=url, output=str(tmp_path / "out"))
    make_run(cfg, {"captioner": "tiny", "filter": "tiny"})
    rows = {r["key"]: r for r in read_parquet(str(tmp_path / "out" / "00000.parquet")).to_pylist()}
    judge = Blip2Filter(FilterConfig(model=itm), "cpu", "float32")
    judged = [s for s in SHARD if rows[s["key"]]["status"] != "error"]
    assert len(judged) == 4 and rows["bad"]["status"] == "error"
    scores = []
    for sample in judged:
        row = rows[sample["key"]]
        assert len(row["captions"]) == 2 and all(row["captions"]), row  # BLIP-2's captions, prompt stripped
        assert not any(c.startswith("a photo of") for c in row["captions"])
        image = decode_rgb(sample.get("jpg") or sample["png"], 10**8)
        pv = torch.from_numpy(judge.image_processor(images=image, return_tensors="np")["pixel_values"])
        texts = ([row["web_text"]] if row["web_text"] else []) + row["captions"]
        want = judge(pv, [texts], embeddings=True)
        got = ([row["web_score"]] if row["web_text"] else []) + row["caption_scores"]
        assert got == pytest.approx(want.itm[0], abs=TOLERANCE)  # BLIP-2's ITM decided
        itc = ([row["web_itc"]] if row["web_text"] else []) + row["caption_itc"]
        assert itc == pytest.approx(want.itc[0], abs=TOLERANCE)
        assert row["image_embedding"] == pytest.approx(want.embeddings[0].tolist(), abs=1e-3)  # float16
        kept = [t for t, s in zip(texts, got) if s >= cfg.filter.threshold]
        assert sorted(row["kept_texts"]) == sorted(kept)
        scores += got
    assert min(scores) < cfg.filter.threshold <= max(scores)  # the cut fell between its scores


def test_blip2_opt_yaml_is_blip_base_with_blip2_in_both_slots():
    base, blip2 = load_config("configs/blip_base.yaml"), load_config("configs/blip2_opt.yaml")
    cap, itm = blip2.captioner, blip2.filter
    assert (cap.model, itm.model) == ("Salesforce/blip2-opt-2.7b", "Salesforce/blip2-itm-vit-g")
    # BLIP-2's captioning settings (LAVIS blip2_opt.py and its COCO caption configs)
    assert (cap.prompt, cap.top_p, cap.max_length, cap.min_length, cap.repetition_penalty) == \
        ("a photo of", 0.9, 30, 8, 1.0)
    assert itm.max_text_tokens == 32
    assert {**blip2.to_dict(), "captioner": None, "filter": None} == {**base.to_dict(), "captioner": None, "filter": None}


def with_other_vision(filter_path, folder) -> str:
    """``filter_path``'s checkpoint with other vision weights. (The tiny BLIP-2 captioners and ITM
    are built from one seed: like the hub's, they hold the same vision weights.)"""
    from transformers import AutoTokenizer, Blip2ForImageTextRetrieval
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    itm = Blip2ForImageTextRetrieval.from_pretrained(filter_path)
    with torch.no_grad():
        itm.vision_model.post_layernorm.weight.mul_(1.5)
    itm.save_pretrained(folder)
    AutoTokenizer.from_pretrained(filter_path).save_pretrained(folder)
    BlipImageProcessorPil.from_pretrained(filter_path).save_pretrained(folder)
    return str(folder)


def test_one_vision_pass_serves_a_captioner_and_filter_of_the_same_vision_weights(tiny_models, blip2_models,
                                                                                 tmp_path, monkeypatch):
    from test_select import make_run

    import capfilt.step
    from capfilt.step import CapFiltStep

    opt, itm = blip2_models
    other = with_other_vision(itm, tmp_path / "itm_other")
    (tmp_path / "in").mkdir()
    url = write_shard(tmp_path / "in" / "00000.tar", SHARD + [{**s, "key": s["key"] + "2"} for s in SHARD])
    passes = {}
    real_init = CapFiltStep.__init__

    def init(self, *args, **kwargs):  # count each model's vision passes (batch rows)
        real_init(self, *args, **kwargs)
        for slot in ("captioner", "filter"):
            passes[slot] = []
            getattr(self, slot).model.vision_model.register_forward_hook(
                lambda module, args, kwargs, out, slot=slot: passes[slot].append(len(kwargs["pixel_values"])),
                with_kwargs=True)

    monkeypatch.setattr(CapFiltStep, "__init__", init)
    outputs = {}
    for name, filter_path in (("shared", itm), ("forced_apart", itm), ("other", other)):
        with monkeypatch.context() as m:
            if name == "forced_apart":
                m.setattr(capfilt.step, "shares_vision", lambda captioner, filter_: False)
            cfg = config(tiny_models, f"captioner.model={opt}", f"filter.model={filter_path}", "runtime.batch_size=4",
                         input=url, output=str(tmp_path / name))
            make_run(cfg, {"captioner": "tiny", "filter": "tiny"})
        outputs[name] = ((tmp_path / name / "00000.tar").read_bytes(),
                         read_parquet(str(tmp_path / name / "00000.parquet")).drop_columns(["error"]))
        if name == "shared":  # 10 samples in batches of 4, 2 of them broken: 8 images, one pass each
            assert passes == {"captioner": [], "filter": [3, 3, 2]}, passes
        else:
            assert passes["captioner"] == passes["filter"] == [3, 3, 2], passes
    assert outputs["shared"][0] == outputs["forced_apart"][0]  # the same bytes, one vision pass fewer
    assert outputs["shared"][1].equals(outputs["forced_apart"][1])
    assert outputs["shared"][1].column("caption_scores") != outputs["other"][1].column("caption_scores")


def test_a_clip_filters_vision_pass_is_staged_once_per_image(tiny_models, checkpoints, tmp_path, monkeypatch):
    from capfilt.runtime.shards import plan_shards
    from capfilt.step import CapFiltStep

    (tmp_path / "in").mkdir()
    url = write_shard(tmp_path / "in" / "00000.tar", SHARD + [{**s, "key": s["key"] + "2"} for s in SHARD])
    cfg = config(tiny_models, f"filter.model={checkpoints['clip']}", "filter.max_text_tokens=24",
                 "runtime.batch_size=4", input=url)
    step = CapFiltStep(cfg)
    passes = []
    step.filter.model.vision_model.register_forward_hook(
        lambda module, args, kwargs, out: passes.append(len(kwargs["pixel_values"])), with_kwargs=True)
    outputs = {}
    for name in ("staged", "unstaged"):
        with monkeypatch.context() as m:
            if name == "unstaged":
                m.setattr(CapFiltStep, "stage", lambda self, batch: None)
            step.run(plan_shards([url], str(tmp_path / name))[0])
        outputs[name] = (tmp_path / name / "00000.tar").read_bytes()
    assert passes == [3, 3, 2] * 2  # one pass per image, staged or not
    assert outputs["staged"] == outputs["unstaged"]
