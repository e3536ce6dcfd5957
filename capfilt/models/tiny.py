"""Tiny, randomly initialised BLIP checkpoints built locally, for tests and the demo.

They are saved with ``save_pretrained`` in the layout of the hub's ``Salesforce/blip-*``
checkpoints (config, safetensors weights, a BERT tokenizer with BLIP's ``[DEC]`` and
``[ENC]`` tokens, and an image processor config), so they load through exactly the
code path users' checkpoints take.
"""

from __future__ import annotations

import os
import string

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
DEFAULT_WORDS = (
    "a an the picture of photo image on in with and at is are to left right top bottom "
    "center middle small large big red green blue yellow white black orange purple "
    "circle square triangle shape shapes dog cat man woman car tree house sky"
).split()


def build_tokenizer(words: list[str] | None = None):
    """A BERT-style WordPiece tokenizer over ``words``, with single-character fallbacks."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + list(words or DEFAULT_WORDS) + chars + ["##" + c for c in chars]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    return BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
        cls_token="[CLS]", mask_token="[MASK]", bos_token="[DEC]",
        additional_special_tokens=["[ENC]"], model_max_length=512,
    )


def tiny_config(tokenizer, image_size: int = 64, patch_size: int = 16, hidden: int = 64,
                layers: int = 2, heads: int = 2, intermediate: int | None = None):
    """A BLIP config of the given shape (BLIP-base: 384, 16, 768, 12, 12, 3072)."""
    from transformers import BlipConfig

    intermediate = intermediate or hidden * 2
    text = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, encoder_hidden_size=hidden,
        intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
        sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
    )
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=hidden,
                      image_text_hidden_size=hidden)


def save_checkpoint(model, tokenizer, image_size: int, path: str) -> str:
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    BlipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def build_tiny_models(out_dir: str, words: list[str] | None = None, image_size: int = 64,
                      seed: int = 0, **shape) -> tuple[str, str]:
    """Write ``out_dir/captioner`` and ``out_dir/filter``; return their paths."""
    import torch
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = build_tokenizer(words)
    config = tiny_config(tokenizer, image_size=image_size, **shape)
    torch.manual_seed(seed)
    captioner = BlipForConditionalGeneration(config)
    itm = BlipForImageTextRetrieval(config)
    return (
        save_checkpoint(captioner, tokenizer, image_size, os.path.join(out_dir, "captioner")),
        save_checkpoint(itm, tokenizer, image_size, os.path.join(out_dir, "filter")),
    )
