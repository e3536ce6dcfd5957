"""BLIP ITM filter: every text of an image scored against one image embedding.

``BlipForImageTextRetrieval.forward`` runs the vision encoder once per (image, text)
pair. Here the vision encoder runs once per image, and all texts of a batch go
through the text encoder in one padded batch against their image's embedding,
whose cross-attention keys and values are projected once per image (shared_kv);
the scores equal the per-pair forward's (a test checks to 1e-4).

The text's first token is [ENC], as BLIP trained and scores its ITM head, or [CLS], as
``BlipForImageTextRetrieval`` feeds it: ``filter.first_token`` (``loading.itm_first_token``).
"""

from __future__ import annotations

import logging

from capfilt.config import FilterConfig
from capfilt.models import shared_kv
from capfilt.models.loading import itm_first_token, load_blip

log = logging.getLogger(__name__)

# A token never needs more characters than this: a text is cut here, its whitespace runs
# collapsed first, before it is tokenized (a 60 MB web text is otherwise tokenized whole, only
# for all but its first tokens to be thrown away).
CHARS_PER_TOKEN = 1000


def bounded(text: str, max_tokens: int) -> str:
    """``text`` as far as its first ``max_tokens`` tokens can reach."""
    limit = max_tokens * CHARS_PER_TOKEN
    return text if len(text) <= limit else " ".join(text[: 4 * limit].split())[:limit]


class ITMFilter:
    def __init__(self, cfg: FilterConfig, device: str, dtype: str):
        from transformers import BlipForImageTextRetrieval

        self.cfg, self.device = cfg, device
        self.loaded = load_blip(BlipForImageTextRetrieval, cfg.model, cfg.revision, device, dtype)
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.image_processor = self.loaded.image_processor
        self.first_token, self.first_token_id = itm_first_token(
            cfg.first_token, self.tokenizer, self.model.config.to_dict(), "filter.model", cfg.model)
        log.info("filter %s: ITM reads the text with [%s] first", cfg.model, self.first_token.upper())
        self.shared_layers = shared_kv.install(self.model.text_encoder)
        shared_kv.install_vision(self.model.vision_model)

    def __call__(self, pixel_values, texts: list[list[str]]) -> list[list[float]]:
        """``softmax(itm_logits)[1]`` for each text of each image."""
        import torch

        pairs = [(i, t) for i, image_texts in enumerate(texts) for t in image_texts]
        if not pairs:
            return [[] for _ in texts]
        with torch.inference_mode():
            image_embeds = self.model.vision_model(pixel_values=pixel_values).last_hidden_state
            tokens = self.tokenizer(
                [bounded(t, self.cfg.max_text_tokens) for _, t in pairs], padding="longest", truncation=True,
                max_length=self.cfg.max_text_tokens, return_tensors="pt",
            ).to(self.device)
            if self.first_token_id is not None:
                tokens.input_ids[:, 0] = self.first_token_id  # [ENC] in place of [CLS]
            index = torch.tensor([i for i, _ in pairs], device=image_embeds.device)
            with shared_kv.repeated_states(self.shared_layers, image_embeds, index) as encoder_states:
                hidden = self.model.text_encoder(
                    input_ids=tokens.input_ids,
                    attention_mask=tokens.attention_mask,
                    encoder_hidden_states=encoder_states,
                    encoder_attention_mask=torch.ones(
                        encoder_states.shape[:-1], dtype=torch.long, device=encoder_states.device
                    ),
                ).last_hidden_state
            logits = self.model.itm_head(hidden[:, 0, :]).float()
            scores = torch.softmax(logits, dim=-1)[:, 1].cpu().tolist()
        result: list[list[float]] = [[] for _ in texts]
        for (i, _), score in zip(pairs, scores):
            result[i].append(score)
        return result
