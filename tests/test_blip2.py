"""BLIP-2 in capfilt's slots (issue 18): ``Blip2Captioner`` held to transformers'
``Blip2ForConditionalGeneration.generate`` (OPT and T5), ``Blip2Filter`` and the ``blip2`` scorer held
to ``Blip2ForImageTextRetrieval``'s per-pair forward.

The checkpoints are tiny and random (``capfilt.models.tiny.build_tiny_blip2_models``), saved with
``save_pretrained`` and loaded through capfilt's own loading code.
"""

import json
import os

import numpy as np
import pytest
import torch

from capfilt.config import CaptionerConfig, FilterConfig, ScoreConfig
from capfilt.models.blip2 import Blip2Captioner, Blip2Filter
from capfilt.models.loading import check_loads_whole
from capfilt.models.scorers import Blip2Scorer, load_scorer, scorer_kind
from capfilt.models.tiny import build_tiny_blip2_models

TOLERANCE = 1e-4
MAX_TOKENS = 8
# Per image, texts of different counts and lengths, one cut at MAX_TOKENS.
TEXTS = [["a red square", "red circle on the left of a large picture of the sky with a dog", "sky"],
         ["blue"],
         ["a green triangle", "a cat and a dog"]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models' ops are microseconds: with two threads on a busy machine each one waits
    for the other thread's time slice (milliseconds per op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    opt, t5, itm = build_tiny_blip2_models(str(tmp_path_factory.mktemp("blip2")), image_size=32)
    return {"opt": opt, "t5": t5, "itm": itm}


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def captioner(path, **kw) -> Blip2Captioner:
    settings = dict(model=path, prompt="a photo of", num_captions=2, top_k=1, max_length=7, min_length=3,
                    repetition_penalty=1.3)
    settings.update(kw)
    return Blip2Captioner(CaptionerConfig(**settings), "cpu", "float32")


def reference_captions(cap: Blip2Captioner, pixel_values, prompt: str) -> list[str]:
    """transformers' own greedy captions: the prompt after the image tokens, as Blip2Processor
    lays them out, the lengths counted in new tokens."""
    model, cfg = cap.model, cap.cfg
    ids = [model.config.image_token_index] * model.config.num_query_tokens + cap.tokenizer(prompt).input_ids
    input_ids = torch.tensor([ids] * pixel_values.shape[0])
    out = model.generate(pixel_values=pixel_values, input_ids=input_ids, do_sample=False,
                         max_new_tokens=cfg.max_length, min_new_tokens=cfg.min_length,
                         repetition_penalty=cfg.repetition_penalty, eos_token_id=cap.eos_token_id)
    new = out[:, input_ids.shape[1]:] if model.config.use_decoder_only_language_model else out
    return [t.strip() for t in cap.tokenizer.batch_decode(new, skip_special_tokens=True)]


@pytest.mark.parametrize("prompt", ["a photo of", ""])
@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_greedy_captions_are_generates_own(tiny, pixels, lm, prompt):
    cap = captioner(tiny[lm], prompt=prompt)
    got = cap(pixels, seed=0)
    want = reference_captions(cap, pixels, prompt)
    assert len(set(want)) > 1  # the images caption differently: a wrong image row would show
    assert got == [[w, w] for w in want]  # N per image, image-major
    assert cap(pixels, seed=5, image_embeds=cap.encode(pixels)) == got
    if lm == "opt":  # LAVIS ends an OPT caption at a newline as well
        assert cap.tokenizer("\n", add_special_tokens=False).input_ids[0] in cap.eos_token_id


def count_rows(module, seen: list[int]):
    def hook(_module, args, kwargs):
        tensor = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
        seen.append(tensor.shape[0])

    return module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_sampled_captions_follow_the_seed_and_encode_each_image_once(tiny, pixels, lm):
    cap = captioner(tiny[lm], num_captions=4, top_k=50, top_p=0.95, repetition_penalty=1.0)
    seen = {"vision": [], "qformer": [], "t5 encoder": [], "opt layer": []}
    hooks = [count_rows(cap.model.vision_model, seen["vision"]), count_rows(cap.model.qformer, seen["qformer"])]
    if lm == "t5":
        hooks.append(count_rows(cap.model.language_model.get_encoder(), seen["t5 encoder"]))
    else:  # (rows, positions) through OPT's first layer
        hooks.append(cap.model.language_model.get_decoder().layers[0].register_forward_pre_hook(
            lambda _m, args, kwargs: seen["opt layer"].append(tuple((args or (kwargs["hidden_states"],))[0].shape[:2])),
            with_kwargs=True))
    try:
        first = cap(pixels, seed=1)
    finally:
        for h in hooks:
            h.remove()
    assert seen["vision"] == [3] and seen["qformer"] == [3]
    assert seen["t5 encoder"] == ([3] if lm == "t5" else [])
    if lm == "opt":  # the prefix (queries and prompt) but its last position once per image, then a step per token
        prefix = cap.prefix_ids.shape[1]
        assert seen["opt layer"][0] == (3, prefix - 1)
        assert seen["opt layer"][1] == (12, 1) and all(shape == (12, 1) for shape in seen["opt layer"][1:])
    assert [len(c) for c in first] == [4, 4, 4]
    assert cap(pixels, seed=1) == first
    assert cap(pixels, seed=1, image_embeds=cap.encode(pixels)) == first
    others = [cap(pixels, seed=s) for s in (2, 3)]
    assert any(o != first for o in others)
    assert any(len(set(c)) > 1 for c in first)  # an image's N captions are N draws


def test_no_captions_asked_encodes_nothing(tiny, pixels):
    cap = captioner(tiny["opt"], num_captions=0)
    assert cap.encode(pixels) is None
    assert cap(pixels, seed=0) == [[], [], []]


def blip2_filter(path, **kw) -> Blip2Filter:
    return Blip2Filter(FilterConfig(model=path, kind="blip2", max_text_tokens=MAX_TOKENS, **kw), "cpu", "float32")


def per_pair(flt: Blip2Filter, pixel_values, image: int, text: str) -> tuple[float, float, torch.Tensor]:
    """(ITM probability, ITC cosine, ITC's normalised query features) of one pair, as
    Blip2ForImageTextRetrieval's forward gives them, the text cut at MAX_TOKENS."""
    tokens = flt.tokenizer([text], truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    ids, mask = tokens.input_ids, tokens.attention_mask
    config = flt.model.config
    if config.image_token_index is not None:  # the processor puts image tokens first then
        ids = torch.cat([torch.full((1, config.num_query_tokens), config.image_token_index), ids], dim=1)
        mask = torch.cat([torch.ones((1, config.num_query_tokens), dtype=mask.dtype), mask], dim=1)
    image = pixel_values[image:image + 1]
    with torch.no_grad():
        itm = flt.model(pixel_values=image, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        itc = flt.model(pixel_values=image, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
    return (torch.softmax(itm.logits_per_image, dim=-1)[0, 1].item(), itc.logits_per_image.item(),
            itc.image_embeds[0])


def test_filter_scores_are_the_per_pair_forwards(tiny, pixels):
    flt = blip2_filter(tiny["itm"])
    got = flt.launch(pixels, TEXTS, embeddings=True).result()
    for i, texts in enumerate(TEXTS):
        for j, text in enumerate(texts):
            itm, itc, queries = per_pair(flt, pixels, i, text)
            assert got.itm[i][j] == pytest.approx(itm, abs=TOLERANCE), (i, text)
            assert got.itc[i][j] == pytest.approx(itc, abs=TOLERANCE), (i, text)
        mean = torch.nn.functional.normalize(queries.mean(dim=0), dim=-1).numpy()
        np.testing.assert_allclose(got.embeddings[i], mean, atol=TOLERANCE)
    assert got.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got.embeddings, axis=1), 1.0, atol=1e-5)
    spread = [s for row in got.itm for s in row]
    assert max(spread) - min(spread) > 1e-3  # the pairs score differently: a wrong row would show


def test_filter_scores_do_not_depend_on_the_batch(tiny, pixels):
    flt = blip2_filter(tiny["itm"])
    together = flt(pixels, TEXTS)
    for i, texts in enumerate(TEXTS):
        alone = flt(pixels[i:i + 1], [texts])
        np.testing.assert_allclose(alone.itm[0], together.itm[i], atol=1e-5)
        np.testing.assert_allclose(alone.itc[0], together.itc[i], atol=1e-5)
    states = flt.image_states(pixels)
    assert flt.launch(pixels, TEXTS, states=states).result() == together
    no_itc = blip2_filter(tiny["itm"], itc=False)(pixels, TEXTS)
    assert no_itc.itc is None and no_itc.itm == together.itm
    empty = flt(pixels, [[], [], []])
    assert empty.itm == [[], [], []] and empty.embeddings is None


def test_blip2_scorer_is_the_filters_numbers(tiny, pixels):
    with open(os.path.join(tiny["itm"], "config.json")) as f:
        config = json.load(f)
    assert scorer_kind("auto", config, "scores[0].model", tiny["itm"]) == "blip2"
    with open(os.path.join(tiny["opt"], "config.json")) as f:
        with pytest.raises(ValueError, match="Blip2ForImageTextRetrieval"):
            scorer_kind("auto", json.load(f), "scores[0].model", tiny["opt"])
    scorer = load_scorer(ScoreConfig(name="b2", model=tiny["itm"]), "cpu", "float32")
    assert isinstance(scorer, Blip2Scorer)
    texts = [t + [" ".join(["red square"] * 20)] for t in TEXTS]  # and a text of 41 tokens, cut at 32
    got = scorer.score(pixels, texts, embeddings=True)
    want = Blip2Filter(FilterConfig(model=tiny["itm"], kind="blip2", max_text_tokens=32), "cpu", "float32")(
        pixels, texts, embeddings=True)
    assert got.scores == want.itm and got.similarity == want.itc
    longer = Blip2Filter(FilterConfig(model=tiny["itm"], kind="blip2", max_text_tokens=48), "cpu", "float32")(
        pixels, texts)
    assert longer.itm[0][-1] != got.scores[0][-1]  # the cut at LAVIS's 32 tokens matters to that text
    np.testing.assert_array_equal(got.embeddings, want.embeddings)
    itm, itc, _ = per_pair(scorer.filter, pixels, 2, TEXTS[2][1])
    assert got.scores[2][1] == pytest.approx(itm, abs=TOLERANCE)
    assert got.similarity[2][1] == pytest.approx(itc, abs=TOLERANCE)


def test_tiny_checkpoints_load_whole(tiny):
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    for name, cls in (("opt", Blip2ForConditionalGeneration), ("t5", Blip2ForConditionalGeneration),
                      ("itm", Blip2ForImageTextRetrieval)):
        with open(os.path.join(tiny[name], "config.json")) as f:
            config = json.load(f)
        check_loads_whole(f"{name}.model", tiny[name], None, cls, config)
    with pytest.raises(ValueError, match="not the Blip2ForImageTextRetrieval"):
        check_loads_whole("filter.model", tiny["opt"], None, Blip2ForImageTextRetrieval, config | {
            "architectures": ["Blip2ForConditionalGeneration"]})
