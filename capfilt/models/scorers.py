"""Scorers: models whose image-text scores are recorded beside the filter's (``scores:``).

A scorer takes a batch of pixels, preprocessed as its own checkpoint preprocesses them, and each
image's texts; it gives one score per text, the cosine similarity of each pair, and, when asked,
each image's normalised embedding. The vision tower runs once per image, and all the texts of a
batch go through the text tower in one batch, each against its own image's embedding.

The score means what the model's own score means:

- ``clip`` (``CLIPModel``): the cosine of the normalised projected image and text embeddings,
  ``logits_per_image / logit_scale.exp()``. This is the "CLIP score" of LAION and DataComp
  (their metadata's ``clip_b32_similarity_score`` / ``clip_l14_similarity_score``). DataComp's
  README gives B/32 > 0.25 and LAION-2B's B/32 > 0.28 as thresholds, and its best filter keeps the
  top 30% of the pool by L/14 score: a cut worked out from the pool (``get_threshold`` in
  DataComp's baselines/apply_filter.py), not a fixed value.
- ``siglip`` (``SiglipModel``): ``sigmoid(cos * logit_scale.exp() + logit_bias)``, that is
  ``sigmoid(logits_per_image)``: the model's probability that the pair matches, 0.5 its own
  boundary. The texts are padded to ``max_length``, as transformers' SigLIP docs require ("that's
  how the model was trained"): its text tower pools the last position.
- ``blip2`` (``Blip2ForImageTextRetrieval``): the ITM head's match probability,
  ``softmax(itm logits)[1]``, 0.5 its own boundary; the similarity is its ITC cosine (the best of its
  query tokens). The computation is ``Blip2Filter``'s (blip2.py), with the filter's defaults.

The kind is the checkpoint's ``model_type`` (``scorer_kind``) unless ``kind`` forces it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from capfilt.config import ScoreConfig
from capfilt.models.itm_filter import _per_image, bounded, on_host, to_host
from capfilt.models.loading import check_checkpoint, load_model

log = logging.getLogger(__name__)

# kind -> (the transformers model class, its PIL image processor's module and class)
KINDS = {
    "clip": ("CLIPModel", "transformers.models.clip.image_processing_pil_clip", "CLIPImageProcessorPil"),
    "siglip": ("SiglipModel", "transformers.models.siglip.image_processing_pil_siglip", "SiglipImageProcessorPil"),
    "blip2": ("Blip2ForImageTextRetrieval", "transformers.models.blip.image_processing_pil_blip", "BlipImageProcessorPil"),
}
# A BLIP-2 checkpoint (model_type blip-2) scores only as the retrieval model; its captioning
# checkpoints have no ITM head.
BLIP2_RETRIEVAL = "Blip2ForImageTextRetrieval"


def scorer_kind(setting: str, config: dict[str, Any], key: str, name: str) -> str:
    """The kind of scorer a checkpoint is: ``setting`` unless ``auto``, else its config.json's
    ``model_type`` (``blip-2`` is ``blip2`` when its architecture is Blip2ForImageTextRetrieval).
    Raises ValueError naming ``key`` and the checkpoint when that is no kind known."""
    if setting != "auto":
        return setting
    model_type = config.get("model_type")
    if model_type == "blip-2":
        architectures = config.get("architectures") or []
        if BLIP2_RETRIEVAL in architectures:
            return "blip2"
        raise ValueError(f"{key}: {name} is a {' / '.join(architectures) or 'blip-2'} checkpoint; a blip2 "
                         f"scorer needs a {BLIP2_RETRIEVAL} one (e.g. Salesforce/blip2-itm-vit-g)")
    if model_type not in KINDS or model_type == "blip2":
        raise ValueError(f"{key}: {name} is a {model_type!r} checkpoint (its config.json's model_type); "
                         f"capfilt scores with {', '.join(KINDS)} checkpoints")
    return model_type


def model_class(kind: str):
    import transformers

    return getattr(transformers, KINDS[kind][0])


def processor_class(kind: str):
    import importlib

    _, module, cls = KINDS[kind]
    return getattr(importlib.import_module(module), cls)


@dataclass(frozen=True)
class TextScores:
    """What a scorer says of a batch: per image, one value per text in the order given."""

    scores: list[list[float]]  # what the model means by a score (clip: the cosine; siglip: a probability)
    similarity: list[list[float]]  # the cosine of the normalised embeddings
    embeddings: Any = None  # (images, dim) float32 numpy, rows normalised; None unless asked


class Scorer:
    """One checkpoint of a two-tower model: ``score`` (or ``launch``, then ``result()``)."""

    kind = ""
    padding = "longest"

    def __init__(self, cfg: ScoreConfig, device: str, dtype: str):
        self.cfg, self.device = cfg, device
        kwargs = {} if _is_local(cfg.model) else {"revision": cfg.revision}
        self.model, self.tokenizer, self.revision = load_model(model_class(self.kind), cfg.model, cfg.revision,
                                                               device, dtype)
        try:
            self.image_processor = processor_class(self.kind).from_pretrained(cfg.model, **kwargs)
        except OSError as exc:
            raise ValueError(f"scores {cfg.name}: {cfg.model} has no preprocessor_config.json; a {self.kind} "
                             "scorer preprocesses as its checkpoint says") from exc
        positions = self.model.config.text_config.max_position_embeddings
        self.max_tokens = min(positions, self.tokenizer.model_max_length or positions)

    def score(self, pixel_values, texts: list[list[str]], embeddings: bool = False) -> TextScores:
        return self.launch(pixel_values, texts, embeddings).result()

    def launch(self, pixel_values, texts: list[list[str]], embeddings: bool = False,
               image_feats=None) -> "PendingTextScores":
        """``score``'s work queued on the device with its one copy to the host; ``result()``
        waits for that copy only. ``image_feats``: ``image_features(pixel_values)``, when staged."""
        import torch

        pairs = [(i, t) for i, image_texts in enumerate(texts) for t in image_texts]
        if not pairs and not embeddings:
            return PendingTextScores(texts, None, None)
        with torch.inference_mode():
            if image_feats is None:
                image_feats = self.image_features(pixel_values)
            parts = []
            if pairs:
                index = torch.tensor([i for i, _ in pairs], device=image_feats.device)
                cosine = (image_feats.index_select(0, index) * self.text_features([t for _, t in pairs])).sum(dim=-1)
                parts += [self.from_cosine(cosine), cosine]
            if embeddings:
                parts.append(image_feats.flatten())
            copy = to_host(parts)
        return PendingTextScores(texts, copy, tuple(image_feats.shape) if embeddings else None)

    def image_features(self, pixel_values):
        """Each image's projected embedding, normalised, float32: one vision pass per image."""
        from torch.nn.functional import normalize

        return normalize(self.model.get_image_features(pixel_values=pixel_values).pooler_output.float(), dim=-1)

    def text_features(self, texts: list[str]):
        """Each text's projected embedding, normalised, float32: one text batch, tokenized as the
        model's processor does (``padding``), cut at the model's positions."""
        from torch.nn.functional import normalize

        tokens = self.tokenizer([bounded(t, self.max_tokens) for t in texts], padding=self.padding,
                                truncation=True, max_length=self.max_tokens, return_tensors="pt")
        mask = tokens.get("attention_mask")  # SigLIP's tokenizer gives none: it was trained without
        out = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                           attention_mask=mask.to(self.device) if mask is not None else None)
        return normalize(out.pooler_output.float(), dim=-1)

    def from_cosine(self, cosine):
        """The model's score of each pair from its cosine."""
        raise NotImplementedError


class ClipScorer(Scorer):
    """CLIP score: the cosine itself (``logits_per_image / logit_scale.exp()``)."""

    kind = "clip"

    def from_cosine(self, cosine):
        return cosine


class SiglipScorer(Scorer):
    """SigLIP's probability: ``sigmoid(logits_per_image)``."""

    kind = "siglip"
    padding = "max_length"

    def from_cosine(self, cosine):
        import torch

        scale, bias = self.model.logit_scale.float().exp(), self.model.logit_bias.float()
        return torch.sigmoid(cosine * scale + bias)


BLIP2_TEXT_TOKENS = 32


class Blip2Scorer(Scorer):
    """BLIP-2's ITM probability, with its ITC cosine as the similarity: ``Blip2Filter``'s numbers."""

    kind = "blip2"

    def __init__(self, cfg: ScoreConfig, device: str, dtype: str):
        from capfilt.config import FilterConfig
        from capfilt.models.blip2 import Blip2Filter

        self.cfg, self.device = cfg, device
        # Texts cut at 32 tokens, as LAVIS's BLIP-2 reads them (configs/blip2_opt.yaml's filter too).
        self.filter = Blip2Filter(FilterConfig(model=cfg.model, revision=cfg.revision, kind="blip2", itc=True,
                                               max_text_tokens=BLIP2_TEXT_TOKENS), device, dtype)
        self.model, self.tokenizer = self.filter.model, self.filter.tokenizer
        self.image_processor, self.revision = self.filter.image_processor, self.filter.loaded.revision
        self.max_tokens = self.filter.cfg.max_text_tokens

    def launch(self, pixel_values, texts: list[list[str]], embeddings: bool = False) -> "_FromFilter":
        return _FromFilter(self.filter.launch(pixel_values, texts, embeddings))


@dataclass
class _FromFilter:
    """``Blip2Filter``'s pending scores as a scorer's: ``scores`` the ITM, ``similarity`` the ITC."""

    pending: Any  # itm_filter.PendingScores

    def result(self) -> TextScores:
        got = self.pending.result()
        return TextScores(got.itm, got.itc, got.embeddings)


SCORERS = {cls.kind: cls for cls in (ClipScorer, SiglipScorer, Blip2Scorer)}


def load_scorer(cfg: ScoreConfig, device: str, dtype: str) -> Scorer:
    """The scorer of ``cfg``, of the kind its checkpoint is (``scorer_kind``)."""
    config = check_checkpoint(f"scores {cfg.name}", cfg.model, cfg.revision)
    return SCORERS[scorer_kind(cfg.kind, config, f"scores {cfg.name}", cfg.model)](cfg, device, dtype)


@dataclass
class PendingTextScores:
    """A batch's scores on their way to the host (``Scorer.launch``)."""

    texts: list[list[str]]
    copy: Any  # (host tensor, CUDA event or None), or None: nothing to score
    embedding_shape: tuple[int, int] | None = None

    def result(self) -> TextScores:
        texts = self.texts
        if self.copy is None:
            return TextScores([[] for _ in texts], [[] for _ in texts])
        host = on_host(self.copy)
        n, shape = sum(len(t) for t in texts), self.embedding_shape
        return TextScores(_per_image(texts, host[:n].tolist()), _per_image(texts, host[n:2 * n].tolist()),
                          host[2 * n:].reshape(shape) if shape is not None else None)


def _is_local(name: str) -> bool:
    import os

    return os.path.isdir(os.path.expanduser(name))
