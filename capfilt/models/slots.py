"""capfilt's two model slots, and which implementation fills each: the one place a kind is read.

A **captioner** takes a batch's pixels and a seed and gives ``num_captions`` captions per image
(``encode`` then ``__call__``). A **filter** takes a batch's pixels and each image's texts and gives
one score per text, the score that decides, with a similarity and an image embedding where the
model has them (``image_states`` then ``launch(...).result()``: ``itm_filter.FilterScores``).

The kind is the checkpoint's own ``config.json`` ``model_type`` unless ``captioner.kind`` /
``filter.kind`` forces it:

========== ================================== =========================================
kind        captioner                          filter (the score ``filter.threshold`` cuts)
========== ================================== =========================================
blip        ``BlipForConditionalGeneration``   ``BlipForImageTextRetrieval``: ITM probability
blip2       ``Blip2ForConditionalGeneration``  ``Blip2ForImageTextRetrieval``: ITM probability
clip        (none)                             ``CLIPModel``: the cosine ("CLIP score")
siglip      (none)                             ``SiglipModel``: sigmoid(logits_per_image)
========== ================================== =========================================

A clip or siglip filter is a recorded scorer (``scorers.py``) put in the deciding seat: its
``itm`` is the model's own score and its ``itc`` the cosine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from capfilt.models.itm_filter import FilterScores
from capfilt.models.loading import Holds, Loaded

# model_type in a checkpoint's config.json -> capfilt's kind
MODEL_TYPES = {"blip": "blip", "blip-2": "blip2", "clip": "clip", "siglip": "siglip"}
CAPTIONER_KINDS = {"blip": "BlipForConditionalGeneration", "blip2": "Blip2ForConditionalGeneration"}
FILTER_KINDS = {"blip": "BlipForImageTextRetrieval", "blip2": "Blip2ForImageTextRetrieval",
                "clip": "CLIPModel", "siglip": "SiglipModel"}
SLOTS = {"captioner": CAPTIONER_KINDS, "filter": FILTER_KINDS}


def slot_kind(slot: str, setting: str, config: dict[str, Any], name: str) -> str:
    """The kind of checkpoint ``name`` in ``slot``: ``setting`` unless ``auto``, else its
    ``config.json``'s ``model_type``. Raises ValueError naming the slot and the checkpoint when
    that kind cannot fill the slot."""
    kinds = SLOTS[slot]
    if setting != "auto":
        return setting
    model_type = config.get("model_type")
    kind = MODEL_TYPES.get(model_type)
    if kind not in kinds:
        raise ValueError(f"{slot}.model: {name} is a {model_type!r} checkpoint (its config.json's model_type); "
                         f"the {slot} takes {', '.join(kinds)} checkpoints (or set {slot}.kind)")
    return kind


def model_class(slot: str, kind: str):
    """The transformers class a ``kind`` checkpoint loads as in ``slot``."""
    import transformers

    return getattr(transformers, SLOTS[slot][kind])


def load_captioner(cfg, device: str, dtype: str, config: dict[str, Any] | None = None):
    """The captioner of ``cfg`` (``CaptionerConfig``), of its checkpoint's kind."""
    kind = slot_kind("captioner", cfg.kind, config if config is not None else _config(cfg), cfg.model)
    if kind == "blip2":
        from capfilt.models.blip2 import Blip2Captioner

        return Blip2Captioner(cfg, device, dtype)
    from capfilt.models.captioner import Captioner

    return Captioner(cfg, device, dtype)


def load_filter(cfg, device: str, dtype: str, config: dict[str, Any] | None = None):
    """The deciding filter of ``cfg`` (``FilterConfig``), of its checkpoint's kind."""
    kind = slot_kind("filter", cfg.kind, config if config is not None else _config(cfg), cfg.model)
    if kind == "blip2":
        from capfilt.models.blip2 import Blip2Filter

        return Blip2Filter(cfg, device, dtype)
    if kind in ("clip", "siglip"):
        return ScorerFilter(cfg, kind, device, dtype)
    from capfilt.models.itm_filter import ITMFilter

    return ITMFilter(cfg, device, dtype)


def shares_vision(captioner, filter_) -> bool:
    """Whether the filter's vision states (``image_states``) are the captioner's too: the same
    vision model class, config and weights, bit for bit. A CLIP or SigLIP filter's are not."""
    import torch

    if isinstance(filter_, ScorerFilter):  # its states are its projected features, not the vision model's
        return False
    mine, theirs = captioner.model.vision_model, filter_.model.vision_model
    if type(mine) is not type(theirs) or _shape(mine.config) != _shape(theirs.config):
        return False
    a, b = mine.state_dict(), theirs.state_dict()
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and
                                        torch.equal(a[k], b[k]) for k in a)


def _shape(config) -> dict[str, Any]:
    """What of a vision config decides what its model computes (not where it came from)."""
    return {k: v for k, v in config.to_dict().items()
            if not k.startswith("_") and k not in ("transformers_version", "architectures", "dtype", "torch_dtype")}


def _config(cfg) -> dict[str, Any]:
    from capfilt.models.loading import check_checkpoint

    return check_checkpoint(f"{_slot_of(cfg)}.model", cfg.model, cfg.revision)


def _slot_of(cfg) -> str:
    return "captioner" if hasattr(cfg, "num_captions") else "filter"


class ScorerFilter(Holds):
    """A CLIP or SigLIP scorer deciding: ``itm`` is the model's score (what ``filter.threshold``
    cuts), ``itc`` the cosine (when ``filter.itc``), the embedding its image feature."""

    def __init__(self, cfg, kind: str, device: str, dtype: str):
        from capfilt.config import ScoreConfig
        from capfilt.models.scorers import SCORERS

        self.kind = kind
        self.scorer = SCORERS[kind](ScoreConfig(name="filter", model=cfg.model, revision=cfg.revision, kind=kind),
                                    device, dtype)
        scorer = self.scorer
        super().__init__(cfg, device, Loaded(scorer.model, scorer.tokenizer, scorer.image_processor, scorer.revision))

    def image_states(self, pixel_values):
        """Each image's normalised feature (its one vision pass), which ``launch`` takes as ``states``."""
        return self.scorer.image_features(pixel_values)

    def launch(self, pixel_values, texts: list[list[str]], embeddings: bool = False, states=None):
        return _AsFilterScores(self.scorer.launch(pixel_values, texts, embeddings, image_feats=states), self.cfg.itc)

    def __call__(self, pixel_values, texts: list[list[str]], embeddings: bool = False) -> FilterScores:
        return self.launch(pixel_values, texts, embeddings).result()


@dataclass
class _AsFilterScores:
    pending: Any  # scorers.PendingTextScores
    itc: bool

    def result(self) -> FilterScores:
        scores = self.pending.result()
        return FilterScores(scores.scores, scores.similarity if self.itc else None, scores.embeddings)
