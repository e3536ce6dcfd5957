"""BLIP ITM filter: every text of an image scored against one image embedding.

``BlipForImageTextRetrieval.forward`` runs the vision encoder once per (image, text)
pair. Here the vision encoder runs once per image, and all texts of a batch go
through the text encoder in one padded batch against their image's embedding,
whose cross-attention keys and values are projected once per image (shared_kv);
the scores equal the per-pair forward's (a test checks to 1e-4).

The text's first token is [ENC], as BLIP trained and scores its ITM head, or [CLS], as
``BlipForImageTextRetrieval`` feeds it: ``filter.first_token`` (``loading.itm_first_token``).

With ``filter.itc``, each text's ITC similarity too, from the same checkpoint's unimodal
encoders, as ``BlipForImageTextRetrieval(..., use_itm_head=False)`` scores a pair: the cosine of
normalize(vision_proj(image [CLS] state)) and normalize(text_proj(text [CLS] state)), the text
encoder run without the image (no cross-attention) on the same tokens with [CLS] first, and no
temperature. The vision pass is the ITM's own; the image feature is also what ``embeddings``
returns (``writer.embeddings``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from capfilt.config import FilterConfig
from capfilt.models import shared_kv
from capfilt.models.loading import Holds, itm_first_token, load_blip

log = logging.getLogger(__name__)

# A token never needs more characters than this: a text is cut here, its whitespace runs
# collapsed first, before it is tokenized (a 60 MB web text is otherwise tokenized whole, only
# for all but its first tokens to be thrown away).
CHARS_PER_TOKEN = 1000


def bounded(text: str, max_tokens: int) -> str:
    """``text`` as far as its first ``max_tokens`` tokens can reach."""
    limit = max_tokens * CHARS_PER_TOKEN
    return text if len(text) <= limit else " ".join(text[: 4 * limit].split())[:limit]


@dataclass(frozen=True)
class FilterScores:
    """What the filter says of a batch: per image, a score per text in the order given."""

    itm: list[list[float]]  # softmax(itm_logits)[1]: the score that decides
    itc: list[list[float]] | None  # the ITC cosine; None when filter.itc is off
    embeddings: Any = None  # (images, projection dim) float32 numpy, rows normalised; None unless asked


class ITMFilter(Holds):
    def __init__(self, cfg: FilterConfig, device: str, dtype: str):
        from transformers import BlipForImageTextRetrieval

        super().__init__(cfg, device, load_blip(BlipForImageTextRetrieval, cfg.model, cfg.revision, device, dtype))
        self.first_token, self.first_token_id = itm_first_token(
            cfg.first_token, self.tokenizer, self.model.config.to_dict(), "filter.model", cfg.model)
        log.info("filter %s: ITM reads the text with [%s] first", cfg.model, self.first_token.upper())
        self.shared_layers = shared_kv.install(self.model.text_encoder)
        shared_kv.install_vision(self.model.vision_model)

    def __call__(self, pixel_values, texts: list[list[str]], embeddings: bool = False) -> FilterScores:
        """The scores of each text of each image; ``embeddings``: each image's ITC embedding too.
        One copy to the host for the whole batch."""
        return self.launch(pixel_values, texts, embeddings).result()

    def launch(self, pixel_values, texts: list[list[str]], embeddings: bool = False,
               states=None) -> "PendingScores":
        """``__call__``'s work, queued on the device with its one copy to the host; its
        ``result()`` waits for that copy only, so a step can queue the next batch's vision
        pass first. ``states``: ``image_states(pixel_values)``, when already computed."""
        import torch

        pairs = [(i, t) for i, image_texts in enumerate(texts) for t in image_texts]
        if not pairs and not embeddings:
            return PendingScores(texts, self.cfg.itc, None, None)
        with torch.inference_mode():
            states = self.image_states(pixel_values) if states is None else states
            image_feats = self.image_features(states) if self.cfg.itc or embeddings else None
            itm = itc = None
            if pairs:
                tokens = self.tokenize([t for _, t in pairs]).to(self.device)  # tokenized once
                index = torch.tensor([i for i, _ in pairs], device=states.device)
                logits = self.itm_logits(states, tokens.input_ids, tokens.attention_mask, index)
                itm = torch.softmax(logits, dim=-1)[:, 1]
                if self.cfg.itc:
                    text_feats = self.text_features(tokens.input_ids, tokens.attention_mask)
                    itc = (image_feats.index_select(0, index) * text_feats).sum(dim=-1)
            parts = [t for t in (itm, itc, image_feats.flatten() if embeddings else None) if t is not None]
            copy = to_host(parts)  # float32 all: one copy
        shape = tuple(image_feats.shape) if embeddings else None
        return PendingScores(texts, self.cfg.itc, copy, shape)

    # The parts, for callers that score other pairs than every text of its own image (evaluate).

    def image_states(self, pixel_values):
        """The vision encoder's last hidden states: one pass per image serves ITM and ITC."""
        return self.model.vision_model(pixel_values=pixel_values).last_hidden_state

    def image_features(self, states):
        """normalize(vision_proj(the [CLS] state)), float32: each image's ITC embedding."""
        from torch.nn.functional import normalize

        return normalize(self.model.vision_proj(states[:, 0, :]).float(), dim=-1)

    def tokenize(self, texts: list[str], padding: str = "longest"):
        """The texts' tokens on the host, [CLS] first, cut at ``max_text_tokens``."""
        limit = self.cfg.max_text_tokens
        return self.tokenizer([bounded(t, limit) for t in texts], padding=padding, truncation=True,
                              max_length=limit, return_tensors="pt")

    def text_features(self, input_ids, attention_mask):
        """normalize(text_proj(the [CLS] state)) of the text encoder without the image (no
        cross-attention), float32: each text's ITC embedding. The tokens as ``tokenize`` gives them."""
        from torch.nn.functional import normalize

        hidden = self.model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return normalize(self.model.text_proj(hidden[:, 0, :]).float(), dim=-1)

    def itm_logits(self, states, input_ids, attention_mask, index):
        """ITM logits (texts, 2), float32, of each text against row ``index[n]`` of ``states``
        (one row per image; ``index`` sorted). The tokens as ``tokenize`` gives them: their first
        token is replaced here by the ITM's (``first_token``)."""
        import torch

        if self.first_token_id is not None:
            input_ids = input_ids.clone()
            input_ids[:, 0] = self.first_token_id  # [ENC] in place of [CLS]
        with shared_kv.repeated_states(self.shared_layers, states, index) as encoder_states:
            hidden = self.model.text_encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                encoder_hidden_states=encoder_states,
                encoder_attention_mask=torch.ones(
                    encoder_states.shape[:-1], dtype=torch.long, device=encoder_states.device
                ),
            ).last_hidden_state
        return self.model.itm_head(hidden[:, 0, :]).float()


@dataclass
class PendingScores:
    """A batch's scores on their way to the host (``ITMFilter.launch``)."""

    texts: list[list[str]]
    itc: bool
    copy: Any  # (host tensor, CUDA event or None), or None: nothing to score
    embedding_shape: tuple[int, int] | None

    def result(self) -> FilterScores:
        texts = self.texts
        if self.copy is None:
            return FilterScores([[] for _ in texts], [[] for _ in texts] if self.itc else None, None)
        host = on_host(self.copy)
        n = sum(len(t) for t in texts)
        shape = self.embedding_shape
        return FilterScores(
            _per_image(texts, host[:n].tolist()),
            _per_image(texts, host[n:2 * n].tolist()) if self.itc else None,
            host[len(host) - shape[0] * shape[1]:].reshape(shape) if shape is not None else None,
        )


def to_host(parts) -> tuple[Any, Any]:
    """``parts`` (float32 tensors on the model's device) in one copy to the host, queued now (into
    pinned memory on CUDA), with a CUDA event recorded after it: ``(host tensor, event or None)``.
    ``on_host`` waits for that copy only, not for the work queued after it (the next batch's)."""
    import torch

    flat = torch.cat(parts)
    host = flat.to("cpu", non_blocking=True)
    done = None
    if flat.device.type == "cuda":
        done = torch.cuda.Event()
        done.record()
    return host, done


def on_host(copy: tuple[Any, Any]):
    """``to_host``'s copy as a numpy array, once it has arrived."""
    host, done = copy
    if done is not None:
        done.synchronize()
    return host.numpy()


def _per_image(texts: list[list[str]], values: list[float]) -> list[list[float]]:
    """``values``, one per text in order, grouped as ``texts`` is."""
    result, start = [], 0
    for image_texts in texts:
        result.append(values[start:start + len(image_texts)])
        start += len(image_texts)
    return result
