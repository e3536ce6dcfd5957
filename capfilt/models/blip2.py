"""BLIP-2 in capfilt's two slots: ``Blip2Captioner`` and ``Blip2Filter``, on transformers' own
``Blip2ForConditionalGeneration`` and ``Blip2ForImageTextRetrieval``, with the public surface of
``Captioner`` and ``ITMFilter``.

Captioner
---------
BLIP-2 captions from the image's Q-Former query outputs, projected into the language model's
embedding space (``language_projection``), followed by the prompt. ``encode`` runs the vision model
and the Q-Former once per image, and for a Flan-T5 language model the T5 encoder too (over the
queries and the prompt: nothing in it depends on the sample); ``__call__`` repeats that prefix
``num_captions`` times, image-major as ``num_return_sequences`` lays it out, and decodes with a
greedy ``generate`` of the language model whose last logits processor is capfilt's
``NucleusSampler`` (sampling.py says why), seeded by ``torch.Generator(device).manual_seed(seed)``.
For OPT, the prefix (queries and prompt) but its last position runs once per image too: its keys
and values are repeated for the image's captions and ``generate`` restarts from that cache
(``_prefix_cache``), as from any cache it is given; its first step runs the last position.

With ``top_k: 1`` the captions are ``Blip2ForConditionalGeneration.generate(pixel_values,
input_ids=<num_query_tokens image tokens> + tokenizer(prompt), do_sample=False,
max_new_tokens=max_length, min_new_tokens=min_length, eos_token_id=...)``'s (tests/test_blip2.py).
The query embeddings take the place of the image tokens there, as transformers' Blip2Processor
lays them out; here they are put in directly, so a checkpoint whose config has no
``image_token_index`` (converted before transformers 4.47) captions the same.

- **The prompt** is tokenized as the checkpoint's tokenizer does by default, as Blip2Processor and
  LAVIS do: OPT's starts with ``</s>`` (its BOS), T5's ends with ``</s>``. ``""`` is no prompt: OPT
  then starts from its BOS alone (as ``generate`` without ``input_ids`` does), T5's encoder reads
  the queries and ``</s>``. BLIP's trailing space (``"a picture of "``) is a token of its own to a
  byte-level BPE: give BLIP-2 its prompt without one (``"a photo of"``).
- **max_length and min_length count the caption's own tokens** (those written after the prompt,
  the end-of-text token included), not the prompt's nor the query tokens: ``max_new_tokens`` and
  ``min_new_tokens``. That is what LAVIS's ``max_length`` means (blip2_opt.py and blip2_t5.py pass
  ``max_new_tokens=max_length``), and the one count that means the same for OPT, whose output
  follows the prompt, and T5, whose prompt goes to the encoder. (BLIP counts the prompt in
  ``max_length``. transformers' ``Blip2ForConditionalGeneration.generate`` 5.x counts everything,
  the query tokens included, in a ``max_length`` it is given, since it passes ``input_ids`` with the
  image tokens beside ``inputs_embeds``; LAVIS's OPT counts the prompt in ``min_length``.)
- **End of a caption**: the language model's end-of-text token (its generation config's
  ``eos_token_id``) and, for OPT, also the newline: LAVIS's blip2_opt.py ends its captions at
  ``"\\n"`` (``eos_token_id = opt_tokenizer("\\n").input_ids[0]``), having trained them ending with
  one. The captions are the tokens after the prompt, decoded without special tokens and stripped
  (as LAVIS decodes ``outputs[:, prompt_length:]``).
- **BLIP-2's own captioning settings** (salesforce/LAVIS ``lavis/models/blip2_models/blip2_opt.py``
  ``generate``): nucleus ``top_p: 0.9``, ``repetition_penalty: 1.0``, ``max_length: 30`` (new
  tokens), ``min_length: 1`` (8 in LAVIS's COCO caption evaluation configs), and the prompt
  ``"a photo of"`` of its COCO caption models (``blip2_caption_opt*.yaml``). Set them in the
  config: its defaults are BLIP's (``top_p`` and ``top_k`` apart, not BLIP-2's).

Filter
------
``Blip2ForImageTextRetrieval`` reads a text with the Q-Former, whose query tokens attend to the
image. The vision model runs once per image (``image_states``); all pairs of a batch go through the
Q-Former in one batch, each against its image's states (``index_select``).

- **ITM** is ``softmax(logits)[:, 1]`` of ``forward(..., use_image_text_matching_head=True)``: the
  ITM head on each query output, averaged over the queries.
- **ITC** is ``forward(..., use_image_text_matching_head=False)``: the cosine of each query's
  projected, normalised output with the text's ([CLS] state, text-only Q-Former), the maximum over
  the queries; no temperature. The queries' features are computed once per image.
- **The image embedding** (``embeddings=True``) is the normalised mean of the normalised query
  features. BLIP-2 has no single image vector: its ITC takes the best of its queries per text. The
  mean weighs every query alike, depends on nothing but the image, and its cosine with a text's
  feature is proportional to the queries' mean cosine, so near-duplicate images (same queries)
  still come out near-identical, which is what the stored embeddings are for.
- Texts are cut at ``filter.max_text_tokens`` (LAVIS's BLIP-2 reads 32; BLIP 35).
  ``filter.first_token`` does not apply: BLIP-2 has no [ENC] token; the Q-Former reads [CLS] first.

All scores equal transformers' per-pair forward to 1e-4 (tests/test_blip2.py). The Q-Former and
the query tokens stay float32 as transformers keeps them (``_keep_in_fp32_modules``).
"""

from __future__ import annotations

import os

from capfilt.config import CaptionerConfig, FilterConfig
from capfilt.models.itm_filter import FilterScores, PendingScores, bounded, to_host
from capfilt.models.loading import Holds, Loaded, load_image_processor, load_model
from capfilt.models import sampling


def load_blip2(model_cls, name: str, revision: str, device: str, dtype: str) -> Loaded:
    """Model, tokenizer and image processor (PIL backend, as BLIP's) of one BLIP-2 checkpoint."""
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    model, tokenizer, resolved = load_model(model_cls, name, revision, device, dtype)
    kwargs = {} if os.path.isdir(os.path.expanduser(name)) else {"revision": revision}
    image_processor = load_image_processor(BlipImageProcessorPil, name, model.config, kwargs)
    return Loaded(model, tokenizer, image_processor, resolved)


class Blip2Captioner(Holds):
    def __init__(self, cfg: CaptionerConfig, device: str, dtype: str):
        import torch
        from transformers import Blip2ForConditionalGeneration

        super().__init__(cfg, device, load_blip2(Blip2ForConditionalGeneration, cfg.model, cfg.revision, device, dtype))
        config = self.model.config
        self.decoder_only = config.use_decoder_only_language_model
        self.prompt_ids = self.tokenizer(cfg.prompt, return_tensors="pt").input_ids.to(device)
        lm = self.model.language_model
        generation = lm.generation_config
        eos = generation.eos_token_id if generation.eos_token_id is not None else lm.config.eos_token_id
        self.eos_token_id = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        if self.decoder_only:
            newline = self.tokenizer("\n", add_special_tokens=False).input_ids
            if len(newline) == 1 and newline[0] != self.tokenizer.unk_token_id and newline[0] not in self.eos_token_id:
                self.eos_token_id.append(newline[0])  # LAVIS's end of an OPT caption
        pad = generation.pad_token_id if generation.pad_token_id is not None else lm.config.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_token_id[0]
        # What generate() is given as OPT's input_ids beside the embeddings (the repetition penalty
        # and the output read them): the image token, as Blip2Processor writes it, where the
        # queries go (pad on a checkpoint without one), then the prompt.
        placeholder = config.image_token_index if config.image_token_index is not None else self.pad_token_id
        queries = torch.full((1, config.num_query_tokens), placeholder, dtype=torch.long, device=device)
        self.prefix_ids = torch.cat([queries, self.prompt_ids], dim=1)

    def encode(self, pixel_values, vision_states=None):
        """Each image's prefix, which ``__call__`` decodes from: for OPT the input embeddings of its
        projected queries and the prompt; for T5 the encoder's output over them. The vision model,
        the Q-Former (and T5's encoder) run once per image; the vision model not at all when its
        ``vision_states`` are given (a filter with the same vision weights computed them: step.py)."""
        import torch

        if self.cfg.num_captions == 0:
            return None
        with torch.inference_mode():
            if vision_states is None:
                vision_states = self.model.vision_model(pixel_values=pixel_values).last_hidden_state
            queries = self._queries(vision_states)
            prompt = self.model.get_input_embeddings()(self.prompt_ids)
            embeds = torch.cat([queries.to(prompt.dtype), prompt.expand(queries.shape[0], -1, -1)], dim=1)
            if self.decoder_only:
                return embeds
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            return self.model.language_model.get_encoder()(inputs_embeds=embeds, attention_mask=mask,
                                                           return_dict=True).last_hidden_state

    def _queries(self, image_embeds):
        """The projected query outputs of the vision model's states, as
        ``Blip2ForConditionalGeneration.get_image_features`` computes them from its own."""
        import torch

        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query_tokens = self.model.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_output = self.model.qformer(query_embeds=query_tokens, encoder_hidden_states=image_embeds,
                                          encoder_attention_mask=mask, return_dict=True).last_hidden_state
        return self.model.language_projection(query_output.to(image_embeds.dtype))  # the Q-Former is float32

    def __call__(self, pixel_values, seed: int, image_embeds=None) -> list[list[str]]:
        """``num_captions`` captions for each image of the batch, image-major, prompt stripped; from
        ``image_embeds`` (``encode``'s) when given."""
        import torch

        n = self.cfg.num_captions
        batch = pixel_values.shape[0]
        if n == 0 or batch == 0:
            return [[] for _ in range(batch)]
        if image_embeds is None:
            image_embeds = self.encode(pixel_values)
        with torch.inference_mode():
            out = sampling.sample(self.cfg, self.device, seed,
                                  lambda processors: self._generate(image_embeds, n, processors))
        new = out[:, self.prefix_ids.shape[1]:] if self.decoder_only else out
        texts = [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        return [texts[i * n:(i + 1) * n] for i in range(batch)]

    def _generate(self, image_embeds, n: int, processors):
        import torch
        from transformers.modeling_outputs import BaseModelOutput

        prefix = image_embeds.repeat_interleave(n, dim=0)  # image-major, as num_return_sequences
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        if self.decoder_only:  # as Blip2ForConditionalGeneration.generate calls OPT
            inputs = dict(inputs_embeds=prefix, input_ids=self.prefix_ids.repeat(prefix.shape[0], 1),
                          cache=self._prefix_cache(image_embeds, n))
        else:  # T5's encoder ran in encode(), once per image
            inputs = dict(encoder_outputs=BaseModelOutput(last_hidden_state=prefix))
        return self.model.language_model.generate(
            **inputs,
            attention_mask=mask,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            do_sample=False,
            num_beams=1,
            logits_processor=processors,  # the sampler's draws (sampling.sample)
            max_new_tokens=self.cfg.max_length,
            min_new_tokens=self.cfg.min_length,
            repetition_penalty=self.cfg.repetition_penalty,
        )


    def _prefix_cache(self, image_embeds, n: int):
        """OPT's keys and values of each image's prefix (its queries and the prompt) but the last
        position, computed once per image and repeated for its ``n`` captions: ``generate`` runs
        the last position and decodes from there, as it does when restarting from a cache."""
        import torch

        head = image_embeds[:, :-1]
        mask = torch.ones(head.shape[:2], dtype=torch.long, device=head.device)
        decoder = self.model.language_model.get_decoder()
        cache = decoder(inputs_embeds=head, attention_mask=mask, use_cache=True).cache
        cache.batch_repeat_interleave(n)
        return cache


class Blip2Filter(Holds):
    def __init__(self, cfg: FilterConfig, device: str, dtype: str):
        from transformers import Blip2ForImageTextRetrieval

        super().__init__(cfg, device, load_blip2(Blip2ForImageTextRetrieval, cfg.model, cfg.revision, device, dtype))

    def __call__(self, pixel_values, texts: list[list[str]], embeddings: bool = False) -> FilterScores:
        return self.launch(pixel_values, texts, embeddings).result()

    def launch(self, pixel_values, texts: list[list[str]], embeddings: bool = False,
               states=None) -> PendingScores:
        """The scores of each text of each image (and each image's embedding), queued on the device
        with one copy to the host; ``result()`` waits for that copy. ``states``: ``image_states``'."""
        import torch

        pairs = [(i, t) for i, image_texts in enumerate(texts) for t in image_texts]
        if not pairs and not embeddings:
            return PendingScores(texts, self.cfg.itc, None, None)
        with torch.inference_mode():
            states = self.image_states(pixel_values) if states is None else states
            query_feats = self.image_features(states) if self.cfg.itc or embeddings else None
            itm = itc = None
            if pairs:
                tokens = self.tokenize([t for _, t in pairs]).to(self.device)
                index = torch.tensor([i for i, _ in pairs], device=states.device)
                itm = torch.softmax(self.itm_logits(states, tokens.input_ids, tokens.attention_mask, index), dim=-1)[:, 1]
                if self.cfg.itc:
                    text_feats = self.text_features(tokens.input_ids, tokens.attention_mask)
                    itc = (query_feats.index_select(0, index) * text_feats[:, None, :]).sum(dim=-1).amax(dim=-1)
            image_embeds = self.image_embedding(query_feats) if embeddings else None
            parts = [t for t in (itm, itc, image_embeds.flatten() if embeddings else None) if t is not None]
            copy = to_host(parts)
        shape = tuple(image_embeds.shape) if embeddings else None
        return PendingScores(texts, self.cfg.itc, copy, shape)

    def image_states(self, pixel_values):
        """The vision model's last hidden states: one pass per image serves ITM and ITC."""
        return self.model.vision_model(pixel_values=pixel_values).last_hidden_state

    def image_features(self, states):
        """(images, queries, dim) float32: each query's normalize(vision_projection(Q-Former output)),
        the Q-Former reading the image alone, as ITC does."""
        import torch
        from torch.nn.functional import normalize

        model = self.model
        queries = model.query_tokens.expand(states.shape[0], -1, -1)
        out = model.qformer(query_embeds=queries, encoder_hidden_states=states,
                            encoder_attention_mask=torch.ones(states.shape[:-1], dtype=torch.long, device=states.device),
                            return_dict=True).last_hidden_state
        return normalize(model.vision_projection(out.to(model.vision_projection.weight.dtype)).float(), dim=-1)

    @staticmethod
    def image_embedding(query_feats):
        """One vector per image: the normalised mean of its normalised query features."""
        from torch.nn.functional import normalize

        return normalize(query_feats.mean(dim=1), dim=-1)

    def tokenize(self, texts: list[str], padding: str = "longest"):
        """The texts' tokens on the host, [CLS] first, cut at ``max_text_tokens``."""
        limit = self.cfg.max_text_tokens
        return self.tokenizer([bounded(t, limit) for t in texts], padding=padding, truncation=True,
                              max_length=limit, return_tensors="pt")

    def text_features(self, input_ids, attention_mask):
        """(texts, dim) float32: normalize(text_projection(the [CLS] state)) of the Q-Former reading
        the text alone (no queries, no image)."""
        from torch.nn.functional import normalize

        model = self.model
        out = model.qformer(query_embeds=model.embeddings(input_ids=input_ids), query_length=0,
                            attention_mask=attention_mask, return_dict=True).last_hidden_state
        return normalize(model.text_projection(out[:, 0, :].to(model.text_projection.weight.dtype)).float(), dim=-1)

    def itm_logits(self, states, input_ids, attention_mask, index):
        """ITM logits (texts, 2), float32, of each text against row ``index[n]`` of ``states``: the
        queries and the text through the Q-Former together, the queries attending to the image; the
        ITM head on each query's output, averaged over the queries."""
        import torch

        model = self.model
        n = input_ids.shape[0]
        queries = model.query_tokens.expand(n, -1, -1)
        length = queries.shape[1]
        mask = torch.cat([torch.ones((n, length), dtype=attention_mask.dtype, device=attention_mask.device),
                          attention_mask], dim=1)
        image = states.index_select(0, index)
        out = model.qformer(
            query_embeds=model.embeddings(input_ids=input_ids, query_embeds=queries),
            query_length=length,
            attention_mask=mask,
            encoder_hidden_states=image,
            encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long, device=image.device),
            return_dict=True,
        ).last_hidden_state
        logits = model.itm_head(out[:, :length, :].to(model.itm_head.weight.dtype))
        return logits.mean(dim=1).float()
