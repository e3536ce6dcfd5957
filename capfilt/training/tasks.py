"""What is trained: the captioner's LM loss and the filter's ITC + ITM losses, and their metrics.

Both work on any BLIP checkpoint's modules (``vision_model``, ``text_decoder``,
``text_encoder``, ``vision_proj``, ``text_proj``, ``itm_head``) as transformers defines them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from capfilt.config import TrainConfig
from capfilt.models.loading import ITM_FIRST_TOKEN_KEY, itm_first_token


class CaptionerTask:
    """BLIP's captioning loss: LM on "prompt + caption", prompt masked out, label smoothing."""

    name = "captioner"

    def __init__(self, model, tokenizer, cfg: TrainConfig, prompt: str):
        self.model, self.tokenizer, self.cfg, self.prompt = model, tokenizer, cfg, prompt
        # As BLIP: the prompt's tokens after [CLS]->[DEC], without the final [SEP].
        self.prompt_len = len(tokenizer(prompt).input_ids) - 1
        self.extra_parameters: dict[str, torch.nn.Parameter] = {}

    def _forward(self, pixels, texts):
        tokens = self.tokenizer([self.prompt + t for t in texts], padding="longest", truncation=True,
                                max_length=self.cfg.max_text_tokens, return_tensors="pt").to(pixels.device)
        input_ids = tokens.input_ids.clone()
        input_ids[:, 0] = self.model.config.text_config.bos_token_id
        labels = input_ids.masked_fill(tokens.attention_mask == 0, -100)
        labels[:, : self.prompt_len] = -100
        image_embeds = self.model.vision_model(pixel_values=pixels).last_hidden_state
        logits = self.model.text_decoder(
            input_ids=input_ids, attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_embeds, return_dict=True).logits
        return logits[:, :-1], labels[:, 1:]

    def loss(self, pixels, texts, generator) -> tuple[torch.Tensor, dict[str, float]]:
        logits, targets = self._forward(pixels, texts)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=-100, label_smoothing=self.cfg.label_smoothing)
        return loss, {"loss": loss.item()}

    @torch.no_grad()
    def evaluate(self, batches) -> dict[str, float]:
        total_loss, tokens, correct = 0.0, 0, 0
        for pixels, texts in batches:
            logits, targets = self._forward(pixels, texts)
            mask = targets != -100
            total_loss += F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum").item()
            correct += (logits.argmax(-1)[mask] == targets[mask]).sum().item()
            tokens += mask.sum().item()
        return {"val_loss": total_loss / max(tokens, 1), "val_token_accuracy": correct / max(tokens, 1)}


class FilterTask:
    """BLIP's retrieval recipe without momentum distillation: ITC with a learnable temperature,
    plus ITM on each positive and two hard negatives drawn from softmax(similarity).

    ITM reads the text with ``first_token`` first (``filter.first_token``; auto: the token the
    starting checkpoint records, else [ENC] in place of [CLS], as BLIP's blip_retrieval.py);
    ITC reads it with [CLS]. The model's config records the token
    (``loading.ITM_FIRST_TOKEN_KEY``), so every checkpoint saved of it does, and ``capfilt
    run`` scores with it under ``filter.first_token: auto``.
    """

    name = "filter"

    def __init__(self, model, tokenizer, cfg: TrainConfig, first_token: str = "auto"):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        temp = torch.nn.Parameter(torch.tensor(float(cfg.temperature)))
        self.extra_parameters = {"temp": temp}
        self.first_token, self.first_token_id = itm_first_token(
            first_token, tokenizer, model.config.to_dict(), "finetune.filter.init", cfg.init or "the scratch model")
        setattr(model.config, ITM_FIRST_TOKEN_KEY, self.first_token)

    def _encode(self, pixels, texts):
        tokens = self.tokenizer(texts, padding="longest", truncation=True,
                                max_length=self.cfg.max_text_tokens, return_tensors="pt").to(pixels.device)
        image_embeds = self.model.vision_model(pixel_values=pixels).last_hidden_state
        image_feat = F.normalize(self.model.vision_proj(image_embeds[:, 0]), dim=-1)
        text_cls = self.model.text_encoder(input_ids=tokens.input_ids,
                                           attention_mask=tokens.attention_mask).last_hidden_state[:, 0]
        text_feat = F.normalize(self.model.text_proj(text_cls), dim=-1)
        return tokens, image_embeds, image_feat, text_feat

    def itm_logits(self, image_embeds, input_ids, attention_mask):
        if self.first_token_id is not None:
            input_ids = input_ids.clone()
            input_ids[:, 0] = self.first_token_id  # [ENC] in place of [CLS]; ITC's ids keep [CLS]
        hidden = self.model.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long,
                                              device=image_embeds.device)).last_hidden_state
        return self.model.itm_head(hidden[:, 0]).float()

    def loss(self, pixels, texts, generator) -> tuple[torch.Tensor, dict[str, float]]:
        tokens, image_embeds, image_feat, text_feat = self._encode(pixels, texts)
        temp = self.extra_parameters["temp"]
        with torch.no_grad():
            temp.clamp_(0.001, 0.5)
        sim_i2t = (image_feat @ text_feat.t()).float() / temp
        # Identical captions in a batch are positives of each other (BLIP does this by image id).
        same = torch.tensor([[a == b for b in texts] for a in texts], device=sim_i2t.device)
        targets = same.float() / same.float().sum(1, keepdim=True)
        loss_itc = (-(F.log_softmax(sim_i2t, 1) * targets).sum(1).mean()
                    - (F.log_softmax(sim_i2t.t(), 1) * targets).sum(1).mean()) / 2
        neg_images = _hard_negatives(sim_i2t.t(), same, generator)  # one image per text
        neg_texts = _hard_negatives(sim_i2t, same, generator)  # one text per image
        ids, mask = tokens.input_ids, tokens.attention_mask
        logits = self.itm_logits(
            torch.cat([image_embeds, image_embeds[neg_images], image_embeds]),
            torch.cat([ids, ids, ids[neg_texts]]), torch.cat([mask, mask, mask[neg_texts]]))
        batch = len(texts)
        labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(logits.device)
        class_weights = torch.tensor([1.0, self.cfg.itm_positive_weight], device=logits.device)
        loss_itm = F.cross_entropy(logits, labels, weight=class_weights)
        loss = loss_itc + self.cfg.itm_weight * loss_itm
        return loss, {"loss": loss.item(), "itc": loss_itc.item(), "itm": loss_itm.item(),
                      "temp": temp.item()}

    @torch.no_grad()
    def evaluate(self, batches, max_items: int = 1000) -> dict[str, float]:
        image_feats, text_feats, all_texts = [], [], []
        correct = total = 0
        for pixels, texts in batches:
            tokens, image_embeds, image_feat, text_feat = self._encode(pixels, texts)
            image_feats.append(image_feat.float())
            text_feats.append(text_feat.float())
            all_texts += texts
            # Balanced ITM accuracy: each image with its text and with the next image's text.
            shifted = [(i + 1) % len(texts) for i in range(len(texts))]
            keep = torch.tensor([texts[i] != texts[j] for i, j in enumerate(shifted)], device=pixels.device)
            pos = self.itm_logits(image_embeds, tokens.input_ids, tokens.attention_mask).softmax(-1)[:, 1]
            neg = self.itm_logits(image_embeds, tokens.input_ids[shifted],
                                  tokens.attention_mask[shifted]).softmax(-1)[:, 1]
            correct += (pos >= 0.5).sum().item() + (neg[keep] < 0.5).sum().item()
            total += len(texts) + keep.sum().item()
            if len(all_texts) >= max_items:
                break
        i2t, t2i = _top1_hits(torch.cat(image_feats) @ torch.cat(text_feats).t(), all_texts)
        return {
            "val_itm_accuracy": correct / max(total, 1),
            "val_i2t_r1": i2t.float().mean().item(),
            "val_t2i_r1": t2i.float().mean().item(),
        }


def _top1_hits(sims, texts) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether each image's most similar text, and each text's most similar image, matches.
    Built on ``sims``' device: a CPU tensor indexed by a CUDA argmax raises."""
    match = torch.tensor([[a == b for b in texts] for a in texts], device=sims.device)
    rows = torch.arange(len(texts), device=sims.device)
    return match[rows, sims.argmax(1)], match[sims.argmax(0), rows]


def _hard_negatives(sim, same, generator) -> torch.Tensor:
    """For each row, a column drawn from softmax(sim) with the positives zeroed."""
    with torch.no_grad():
        weights = F.softmax(sim.float(), dim=1).masked_fill(same, 0.0) + (~same).float() * 1e-9
        empty = weights.sum(1) == 0  # every text of the batch is the same: draw uniformly
        weights[empty] = 1.0
        return torch.multinomial(weights.cpu(), 1, generator=generator).squeeze(1).to(sim.device)
