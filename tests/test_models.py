"""The captioner and the filter on tiny BLIP checkpoints, loaded as users load hub ones."""

import io

import numpy as np
import pytest
import torch
from conftest import image_bytes
from PIL import Image

from capfilt.config import CaptionerConfig, FilterConfig
from capfilt.models.captioner import Captioner
from capfilt.models.itm_filter import ITMFilter


@pytest.fixture(scope="module")
def captioner(tiny_models):
    return Captioner(CaptionerConfig(model=tiny_models[0], num_captions=4), "cpu", "float32")


@pytest.fixture(scope="module")
def itm(tiny_models):
    return ITMFilter(FilterConfig(model=tiny_models[1]), "cpu", "float32")


@pytest.fixture(scope="module")
def sharp_itm(sharp_filter):
    return ITMFilter(FilterConfig(model=sharp_filter), "cpu", "float32")


@pytest.fixture(scope="module")
def sharp_itm_cls(sharp_filter):
    return ITMFilter(FilterConfig(model=sharp_filter, first_token="cls"), "cpu", "float32")


def per_pair_scores(itm, pv, text, first_token, **tokenize):
    """transformers' own forward of ``text`` against each image of ``pv``: one score per image.
    ``cls``: the forward as it is; ``enc``: with the first token replaced by the tokenizer's
    [ENC], as salesforce/BLIP's blip_retrieval.py does (``encoder_input_ids[:,0] = enc_token_id``)."""
    tokens = itm.tokenizer(text, return_tensors="pt", **tokenize)
    input_ids = tokens.input_ids.clone()
    assert input_ids[0, 0] == itm.tokenizer.cls_token_id
    if first_token == "enc":
        input_ids[:, 0] = itm.tokenizer.convert_tokens_to_ids("[ENC]")
    n = pv.shape[0]
    with torch.no_grad():
        logits = itm.model(input_ids=input_ids.repeat(n, 1), attention_mask=tokens.attention_mask.repeat(n, 1),
                           pixel_values=pv, use_itm_head=True).itm_score
    return torch.softmax(logits, dim=-1)[:, 1]


def assert_scores_equal_per_pair(itm, pv, texts, got, tolerance, first_token, **tokenize):
    """Each score equals the per-pair forward (with ``first_token`` first) against its own
    image, and differs from the forward against every other image by at least 100
    tolerances: a text scored against the wrong image fails here."""
    assert [len(s) for s in got] == [len(t) for t in texts]
    gaps = []
    for i, image_texts in enumerate(texts):
        for text, score in zip(image_texts, got[i]):
            reference = per_pair_scores(itm, pv, text, first_token, **tokenize)
            assert score == pytest.approx(reference[i].item(), abs=tolerance), (i, text)
            gaps.append(min(abs(reference[i] - reference[j]).item() for j in range(len(pv)) if j != i))
    assert min(gaps) >= 100 * tolerance, f"the scores barely depend on the image: gaps {gaps}"


def pixels(processor, colours=("red", "blue", "green")):
    images = [Image.open(io.BytesIO(image_bytes(c, seed=i))).convert("RGB") for i, c in enumerate(colours)]
    return torch.from_numpy(np.stack([processor(images=im, return_tensors="np")["pixel_values"][0]
                                      for im in images]))


PARITY_TEXTS = [["a red square", "a blue circle on the left", ""],
                ["blue", "a very long text " * 20],
                ["green triangle", "a green square in the middle of a large picture of the sky"]]


@pytest.mark.parametrize("first_token", ["enc", "cls"])
def test_filter_scores_equal_per_pair_retrieval_forward(sharp_itm, sharp_itm_cls, first_token):
    """cls: BlipForImageTextRetrieval's forward as it is; enc (the default, BLIP's): the same
    forward with the text's first token replaced by [ENC]."""
    itm = {"enc": sharp_itm, "cls": sharp_itm_cls}[first_token]
    assert itm.first_token == first_token
    pv = pixels(itm.image_processor)
    scores = itm(pv, PARITY_TEXTS).itm
    assert_scores_equal_per_pair(itm, pv, PARITY_TEXTS, scores, 1e-4, first_token, truncation=True, max_length=35)


def test_enc_and_cls_scores_differ(sharp_itm, sharp_itm_cls):
    """The setting changes what the filter scores: on this model by far more than the parity
    tolerance, for every text."""
    pv = pixels(sharp_itm.image_processor)
    enc, cls = torch.tensor(sharp_itm(pv, [["a red square", "blue", ""]] * 3).itm), \
        torch.tensor(sharp_itm_cls(pv, [["a red square", "blue", ""]] * 3).itm)
    assert (enc - cls).abs().min() > 100 * 1e-4, (enc, cls)


def with_record(folder, tmp_path, name, record):
    """A copy of checkpoint ``folder`` whose config.json records ``record`` as the ITM first
    token it was trained with, as ``capfilt finetune filter`` writes it."""
    import json
    import shutil

    from capfilt.models.loading import ITM_FIRST_TOKEN_KEY

    copy = tmp_path / name
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config[ITM_FIRST_TOKEN_KEY] = record
    (copy / "config.json").write_text(json.dumps(config))
    return str(copy)


def test_auto_takes_the_token_the_checkpoint_records_else_enc(sharp_filter, sharp_itm, sharp_itm_cls, tmp_path):
    pv = pixels(sharp_itm.image_processor)
    texts = [["a red square", "blue"]] * 3
    assert sharp_itm.cfg.first_token == "auto" and sharp_itm.first_token == "enc"  # nothing recorded
    recorded_cls = with_record(sharp_filter, tmp_path, "cls", "cls")
    auto = ITMFilter(FilterConfig(model=recorded_cls), "cpu", "float32")
    assert auto.first_token == "cls" and auto(pv, texts).itm == sharp_itm_cls(pv, texts).itm
    recorded_enc = with_record(sharp_filter, tmp_path, "enc", "enc")
    assert ITMFilter(FilterConfig(model=recorded_enc), "cpu", "float32")(pv, texts).itm == sharp_itm(pv, texts).itm
    # A setting other than auto wins over the record.
    assert ITMFilter(FilterConfig(model=recorded_cls, first_token="enc"), "cpu", "float32").first_token == "enc"
    with pytest.raises(ValueError, match="records capfilt_itm_first_token='sep'"):
        ITMFilter(FilterConfig(model=with_record(sharp_filter, tmp_path, "bad", "sep")), "cpu", "float32")


def without_enc(folder, tmp_path):
    """A copy of checkpoint ``folder`` whose tokenizer is BERT's without [ENC]: the ids stay."""
    import shutil

    from transformers import AutoTokenizer, BertTokenizerFast

    copy = tmp_path / "no_enc"
    shutil.copytree(folder, copy)
    vocab = AutoTokenizer.from_pretrained(folder).get_vocab()
    words = sorted(vocab, key=vocab.get)
    assert words.index("[ENC]") == vocab["[ENC]"]
    words[vocab["[ENC]"]] = "[unused0]"
    for f in copy.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "added_tokens", "vocab")):
            f.unlink()
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(copy)
    return str(copy)


def test_a_tokenizer_without_enc_is_refused_naming_the_checkpoint(tiny_models, tmp_path):
    from capfilt.models.loading import check_checkpoint, check_itm_first_token

    folder = without_enc(tiny_models[1], tmp_path)
    message = rf"filter.model: {folder}'s tokenizer has no \[ENC\] token.*filter.first_token: cls"
    with pytest.raises(ValueError, match=message):
        ITMFilter(FilterConfig(model=folder), "cpu", "float32")
    # The same refusal before any worker loads the model.
    config = check_checkpoint("filter.model", folder)
    with pytest.raises(ValueError, match=message):
        check_itm_first_token("filter.model", folder, None, "auto", config)
    assert check_itm_first_token("filter.model", folder, None, "cls", config) == "cls"
    assert ITMFilter(FilterConfig(model=folder, first_token="cls"), "cpu", "float32").first_token == "cls"
    assert check_itm_first_token("filter.model", tiny_models[1], None, "auto", config) == "enc"


def test_a_plain_bert_tokenizer_of_a_blip_model_takes_enc_after_dec(itm):
    """transformers' conversion gave BLIP's checkpoints plain BERT's tokenizer, whose vocabulary
    names neither [DEC] nor [ENC]; the model's embeddings hold both after it, [ENC] last."""
    from transformers import BertTokenizerFast

    from capfilt.models.loading import itm_first_token

    vocab = itm.tokenizer.get_vocab()
    words = [w for w in sorted(vocab, key=vocab.get) if w not in ("[DEC]", "[ENC]")]
    bert = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    assert len(bert) == len(words)
    blip_layout = {"text_config": {"vocab_size": len(words) + 2}}  # + [DEC] + [ENC]
    assert itm_first_token("auto", bert, blip_layout, "k", "m") == ("enc", len(words) + 1)
    with pytest.raises(ValueError, match=r"k: m's tokenizer has no \[ENC\] token"):
        itm_first_token("auto", bert, {"text_config": {"vocab_size": len(words) + 5}}, "k", "m")


def test_an_enc_id_past_the_vocabulary_is_refused(itm):
    from capfilt.models.loading import itm_first_token

    enc = itm.tokenizer.convert_tokens_to_ids("[ENC]")
    assert itm_first_token("enc", itm.tokenizer, {"text_config": {"vocab_size": enc + 1}}, "k", "m") == ("enc", enc)
    with pytest.raises(ValueError, match=rf"k: m's tokenizer gives \[ENC\] the id {enc}, past"):
        itm_first_token("enc", itm.tokenizer, {"text_config": {"vocab_size": enc}}, "k", "m")


def test_filter_scores_differ_between_images_and_texts(itm):
    pv = pixels(itm.image_processor)
    scores = itm(pv, [["a red square", "blue"]] * 3).itm
    flat = [s for row in scores for s in row]
    assert len(set(round(s, 7) for s in flat)) > 1
    assert all(0.0 <= s <= 1.0 for s in flat)


def test_captioner_gives_num_captions_per_image_with_prompt_stripped(captioner):
    pv = pixels(captioner.image_processor)
    captions = captioner(pv, seed=123)
    assert [len(c) for c in captions] == [4, 4, 4]
    assert all(c and not c.startswith("a picture of") for image_caps in captions for c in image_caps)


def test_captioner_decodes_as_transformers_generate(tiny_models, captioner):
    """With top_k=1 the sampler has one candidate, so the captions must be exactly what
    ``generate`` gives greedily: the prompt, the shared image keys and values, the
    repetition penalty, min and max length, the end token and the prompt stripping all
    as transformers does them."""
    greedy = Captioner(CaptionerConfig(model=tiny_models[0], num_captions=2, top_k=1), "cpu", "float32")
    pv = pixels(greedy.image_processor)
    captions = greedy(pv, seed=5)
    tok = greedy.tokenizer
    prompt = tok(greedy.cfg.prompt, return_tensors="pt").input_ids.repeat(6, 1)
    with torch.no_grad():
        out = greedy.model.generate(
            pixel_values=pv.repeat_interleave(2, 0), input_ids=prompt.clone(),
            attention_mask=torch.ones_like(prompt), do_sample=False, max_length=20, min_length=5,
            repetition_penalty=1.1)
    full = tok.batch_decode(out, skip_special_tokens=True)
    assert all(t.startswith("a picture of") for t in full)
    expected = [t.replace("a picture of", "", 1).strip() for t in full]
    assert [c for image_caps in captions for c in image_caps] == expected
    # max_length counts the prompt: at most 20 tokens in all.
    assert out.shape[1] <= 20


@pytest.mark.parametrize("top_k,top_p,temperature", [(50, 0.9, 1.0), (5, 0.5, 0.7), (0, 0.95, 1.3), (3, 1.0, 1.0)])
def test_nucleus_sampler_keeps_transformers_distribution(top_k, top_p, temperature):
    """The sampler's probabilities equal softmax(TopP(TopK(Temperature(scores)))) as
    transformers computes them for generate(do_sample=True), ties with the k-th kept."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    from capfilt.models.sampling import NucleusSampler

    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 3000, generator=gen) * 3
    scores[1] = scores[1].to(torch.bfloat16).float()  # a bf16 model's logits: many ties
    scores[2, :100] = scores[2].max()  # more ties at the k-th score than the sampler's slack
    warped = scores
    for warper in [TemperatureLogitsWarper(temperature) if temperature != 1.0 else None,
                   TopKLogitsWarper(top_k) if top_k else None,
                   TopPLogitsWarper(top_p) if top_p < 1.0 else None]:
        warped = warper(None, warped) if warper else warped
    expected = warped.softmax(-1)

    sampler = NucleusSampler(top_p, top_k, temperature, gen)
    probs, ids = sampler.candidates(scores)
    got = torch.zeros_like(scores).scatter_(1, ids, probs)
    # Where transformers' sort puts tied scores on both sides of the top-p cut, the two
    # keep different members of the tie: compare the probability of each score value.
    for row in range(scores.shape[0]):
        for value in scores[row].unique():
            same = scores[row] == value
            assert got[row][same].sum().item() == pytest.approx(expected[row][same].sum().item(), abs=1e-5)
    # What the sampler draws is always a candidate, left the only finite score.
    drawn = sampler(None, scores)
    assert (torch.isfinite(drawn).sum(-1) == 1).all()
    assert (expected.gather(1, drawn.argmax(-1, keepdim=True)) > 0).all()


def test_nucleus_sampler_draws_in_proportion():
    from capfilt.models.sampling import NucleusSampler

    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = NucleusSampler(0.9, 50, 1.0, torch.Generator().manual_seed(1))
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[sampler(None, scores).argmax()] += 1
    # top_p 0.9 keeps 0.5 + 0.3 + 0.15; renormalised: 0.526, 0.316, 0.158; never the last
    assert counts[3] == 0
    assert (counts[:3] / 4000).tolist() == pytest.approx([0.526, 0.316, 0.158], abs=0.03)


def test_captions_are_reproducible_for_a_seed(captioner):
    pv = pixels(captioner.image_processor)
    assert captioner(pv, seed=7) == captioner(pv, seed=7)
    assert captioner(pv, seed=7) != captioner(pv, seed=8)


def test_bfloat16_on_cpu_scores_close_to_float32(sharp_filter, sharp_itm):
    """bfloat16 scores are within a tolerance well under what a wrong image moves them by."""
    tolerance = 0.015  # measured bf16 error: 0.0025 with [ENC] first (0.0045 with [CLS])
    bf16 = ITMFilter(FilterConfig(model=sharp_filter), "cpu", "bfloat16")
    pv = pixels(sharp_itm.image_processor)
    texts = [["a red square", "a blue circle"]] * 3  # with [ENC], "blue" scores within 0.028 on two images
    exact = torch.tensor(sharp_itm(pv, texts).itm)
    approx = torch.tensor(bf16(pv.to(torch.bfloat16), texts).itm)
    # The test's power: its tolerance is under a tenth of the scores' spread between images,
    # and under half the smallest gap between two images' scores of a text.
    spread = (exact.max(0).values - exact.min(0).values).min().item()
    gap = min((exact[i] - exact[j]).abs().min().item() for i in range(3) for j in range(i))
    assert tolerance < spread / 10 and tolerance < gap / 2, (spread, gap)
    for row_exact, row_approx in zip(exact.tolist(), approx.tolist()):
        assert row_approx == pytest.approx(row_exact, abs=tolerance)


def test_float16_on_cpu_is_refused(tiny_models):
    with pytest.raises(ValueError, match="float16"):
        ITMFilter(FilterConfig(model=tiny_models[1]), "cpu", "float16")


def test_tiny_checkpoints_are_safetensors_with_blip_tokens(tiny_models):
    import os

    from transformers import AutoTokenizer

    for path in tiny_models:
        files = os.listdir(path)
        assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
        tok = AutoTokenizer.from_pretrained(path)
        assert tok.bos_token == "[DEC]" and "[ENC]" in tok.all_special_tokens


def test_checkpoint_without_preprocessor_config_uses_blip_preprocessing(tiny_models, tmp_path):
    import shutil

    folder = tmp_path / "filter"
    shutil.copytree(tiny_models[1], folder)
    (folder / "preprocessor_config.json").unlink()
    itm = ITMFilter(FilterConfig(model=str(folder)), "cpu", "float32")
    size = itm.model.config.vision_config.image_size
    assert (itm.image_processor.size.height, itm.image_processor.size.width) == (size, size)
    assert list(itm.image_processor.image_mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_cross_attention_projects_each_image_once(captioner, itm, monkeypatch):
    """The key/value projections see each image once, not once per text or per sample."""
    import torch.nn as nn

    projections = {id(p) for model in (captioner, itm) for layer in model.shared_layers
                   for p in (layer.key, layer.value)}
    seen = []
    original = nn.Linear.forward

    def spy(self, x):
        if id(self) in projections:
            seen.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(nn.Linear, "forward", spy)
    pv = pixels(itm.image_processor)
    itm(pv, [["a red square", "blue", "green"]] * 3)
    assert seen and set(seen) == {3}  # 3 images, 9 texts
    seen.clear()
    captioner(pixels(captioner.image_processor), seed=1)
    assert seen and set(seen) == {3}  # 3 images, 12 samples, every decoding step


def test_itm_scores_with_uneven_texts_per_image_equal_per_pair_forward(sharp_itm):
    """Images with different numbers of texts (zero-padded side by side) score as pairs do."""
    pv = pixels(sharp_itm.image_processor)
    texts = [["a red square", "blue"], [], ["green circle on a plain background", "x", "a b c"]]
    got = sharp_itm(pv, texts).itm
    assert [len(t) for t in got] == [2, 0, 3]
    assert_scores_equal_per_pair(sharp_itm, pv, texts, got, 1e-5, "enc")


def test_a_huge_web_text_is_cut_before_it_is_tokenized(itm, monkeypatch):
    """Only what the first max_text_tokens tokens can reach is tokenized, and it scores the same."""
    from capfilt.models.itm_filter import CHARS_PER_TOKEN

    pv = pixels(itm.image_processor, ("red",))
    head = "a red square on a plain background " * 3
    huge = head + "   \n  " * 100_000 + "word " * 1_200_000  # ~6.6 MB
    seen = []
    tokenize = itm.tokenizer.__class__.__call__

    def spy(self, texts, *args, **kwargs):
        seen.extend(len(t) for t in texts)
        return tokenize(self, texts, *args, **kwargs)

    monkeypatch.setattr(itm.tokenizer.__class__, "__call__", spy)
    scores = itm(pv, [[huge, head + " word word"]]).itm
    assert max(seen) <= itm.cfg.max_text_tokens * CHARS_PER_TOKEN
    reference = itm(pv, [[head + " word" * 40]]).itm[0][0]  # the same first 35 tokens
    assert scores[0][0] == pytest.approx(reference, abs=1e-6)
