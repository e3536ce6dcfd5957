"""BLIP captioner: nucleus-sampled synthetic captions, the image encoded once per image."""

from __future__ import annotations

import hashlib

from capfilt.config import CaptionerConfig
from capfilt.models import shared_kv
from capfilt.models.loading import Holds, load_blip
from capfilt.models import sampling


def batch_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from the run seed and the batch's identity (shard name, batch index)."""
    text = "/".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


class Captioner(Holds):
    def __init__(self, cfg: CaptionerConfig, device: str, dtype: str):
        from transformers import BlipForConditionalGeneration

        super().__init__(cfg, device, load_blip(BlipForConditionalGeneration, cfg.model, cfg.revision, device, dtype))
        # BLIP tokenizes the prompt as [CLS] prompt [SEP]; generate() puts [DEC] in
        # place of [CLS] and drops the [SEP].
        self.prompt_ids = self.tokenizer(cfg.prompt, return_tensors="pt").input_ids
        self.prompt_len = self.prompt_ids.shape[1] - 1
        self.prompt_text = self.tokenizer.decode(self.prompt_ids[0], skip_special_tokens=True)
        self.shared_layers = shared_kv.install(self.model.text_decoder.bert)
        shared_kv.install_vision(self.model.vision_model)

    def encode(self, pixel_values, vision_states=None):
        """The vision encoder's states of a batch, which ``__call__`` decodes from; a step may
        start it before the previous batch's post-processing (``CapFiltStep``). ``vision_states``:
        those states already, from a filter with the same vision weights (step.py)."""
        import torch

        if self.cfg.num_captions == 0:
            return None
        if vision_states is not None:
            return vision_states
        with torch.inference_mode():
            return self.model.vision_model(pixel_values=pixel_values).last_hidden_state

    def __call__(self, pixel_values, seed: int, image_embeds=None) -> list[list[str]]:
        """``num_captions`` captions for each image of the batch, prompt stripped; from
        ``image_embeds`` (``encode``'s) when given."""
        import torch

        n = self.cfg.num_captions
        batch = pixel_values.shape[0]
        if n == 0 or batch == 0:
            return [[] for _ in range(batch)]
        # BlipForConditionalGeneration.generate, with the N samples of each image laid out as
        # its num_return_sequences does (image-major); the image is encoded once, and its
        # cross-attention keys and values projected once. Sampling is NucleusSampler's, on
        # top of a greedy generate (sampling.py says why).
        input_ids = self.prompt_ids.repeat(batch * n, 1).to(self.device)
        input_ids[:, 0] = self.model.config.text_config.bos_token_id
        input_ids = input_ids[:, :-1]  # generate() drops the prompt's [SEP]
        if image_embeds is None:
            image_embeds = self.encode(pixel_values)
        with torch.inference_mode():
            index = torch.arange(batch, device=image_embeds.device).repeat_interleave(n)
            with shared_kv.repeated_states(self.shared_layers, image_embeds, index) as states:
                out = sampling.sample(self.cfg, self.device, seed,
                                      lambda processors: self._generate(input_ids, states, processors))
        texts = [self._strip_prompt(t) for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        return [texts[i * n:(i + 1) * n] for i in range(batch)]

    def _generate(self, input_ids, states, processors):
        import torch

        text_config = self.model.config.text_config
        return self.model.text_decoder.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            encoder_hidden_states=states,
            # No encoder_attention_mask: the image states have no padding, and BLIP's text
            # model treats None as all ones. Given one, it asks the device each step whether
            # it is all ones (masking_utils' padding_mask.all(), a host sync).
            eos_token_id=text_config.sep_token_id,
            pad_token_id=text_config.pad_token_id,
            do_sample=False,
            num_beams=1,
            logits_processor=processors,  # the sampler's draws (sampling.sample)
            max_length=self.cfg.max_length,
            min_length=self.cfg.min_length,
            repetition_penalty=self.cfg.repetition_penalty,
        )

    def _strip_prompt(self, text: str) -> str:
        # As BLIP does: decode the whole sequence, then cut the prompt's text off.
        # Decoding only the new tokens would mangle a word piece that continues the prompt.
        if text.startswith(self.prompt_text):
            text = text[len(self.prompt_text):]
        return text.strip()
