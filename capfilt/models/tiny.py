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


# BLIP-2: tiny Blip2ForConditionalGeneration (OPT and T5 language models) and
# Blip2ForImageTextRetrieval, in the layout of the hub's Salesforce/blip2-* checkpoints: the
# generation models' tokenizers carry an ``<image>`` token whose id is the config's
# ``image_token_index``, as the converted hub checkpoints' do (transformers' Blip2Processor puts
# ``num_query_tokens`` of them before the prompt).

IMAGE_TOKEN = "<image>"


def build_opt_tokenizer(words: list[str] | None = None):
    """A GPT-2-style byte-level BPE tokenizer as OPT's: ``</s>`` (2) is both BOS and EOS and starts
    every text, ``<pad>`` is 1; trained on ``words`` so that they are whole tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", IMAGE_TOKEN]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    words = list(words or DEFAULT_WORDS)
    tok.train_from_iterator([" ".join(words), *(" " + w for w in words), *words], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=[IMAGE_TOKEN], model_max_length=512,
    )


def build_t5_tokenizer(words: list[str] | None = None):
    """A T5-style tokenizer: ``<pad>`` 0 (also the decoder's start), ``</s>`` 1 ends every text,
    ``<unk>`` 2; WordPiece over ``words`` with single-character fallbacks."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab: dict[str, int] = {}
    for token in ["<pad>", "</s>", "<unk>", IMAGE_TOKEN] + list(words or DEFAULT_WORDS) + chars + ["##" + c for c in chars]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])])
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=[IMAGE_TOKEN], model_max_length=512,
    )


def tiny_blip2_config(text_config, image_size: int = 32, patch_size: int = 16, hidden: int = 32,
                      layers: int = 2, heads: int = 2, query_tokens: int = 4,
                      qformer_vocab: int | None = None, image_token_index: int | None = None):
    """A BLIP-2 config of the given shape around ``text_config`` (None for the retrieval model)
    (BLIP-2 ViT-g: 224, 14, 1408, 39 layers, 16 heads; Q-Former 768, 12, 12; 32 queries)."""
    from transformers import Blip2Config

    # Initialised wider than transformers' defaults (the vision tower's is 1e-10), so that a tiny
    # random model's outputs depend on the image and the text.
    vision = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=patch_size, initializer_range=0.2)
    qformer = dict(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                   num_attention_heads=heads, cross_attention_frequency=1, max_position_embeddings=64,
                   initializer_range=0.2)
    if qformer_vocab is not None:  # the retrieval model's Q-Former reads text too
        qformer.update(vocab_size=qformer_vocab, use_qformer_text_input=True)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text_config,
                       num_query_tokens=query_tokens, image_text_hidden_size=hidden,
                       image_token_index=image_token_index, initializer_range=0.2)


def build_tiny_blip2_models(out_dir: str, words: list[str] | None = None, image_size: int = 32,
                            seed: int = 0) -> tuple[str, str, str]:
    """Write ``out_dir/blip2_opt``, ``out_dir/blip2_t5`` (captioners: Blip2ForConditionalGeneration
    with an OPT / a T5 language model) and ``out_dir/blip2_itm`` (a Blip2ForImageTextRetrieval
    filter); return their paths."""
    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, OPTConfig, T5Config
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hidden = 32
    opt_tok, t5_tok, bert_tok = build_opt_tokenizer(words), build_t5_tokenizer(words), build_tokenizer(words)
    opt = OPTConfig(vocab_size=len(opt_tok), hidden_size=hidden, word_embed_proj_dim=hidden, ffn_dim=hidden * 2,
                    num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                    bos_token_id=opt_tok.bos_token_id, eos_token_id=opt_tok.eos_token_id,
                    pad_token_id=opt_tok.pad_token_id, init_std=0.3)
    t5 = T5Config(vocab_size=len(t5_tok), d_model=hidden, d_kv=hidden // 2, d_ff=hidden * 2, num_layers=2,
                  num_decoder_layers=2, num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                  pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
                  decoder_start_token_id=t5_tok.pad_token_id, initializer_factor=2.0)
    paths = []
    for name, text_config, tok in (("blip2_opt", opt, opt_tok), ("blip2_t5", t5, t5_tok)):
        config = tiny_blip2_config(text_config, image_size=image_size, hidden=hidden,
                                   image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN))
        torch.manual_seed(seed)
        model = _distinct_queries(Blip2ForConditionalGeneration(config))
        paths.append(save_checkpoint(model, tok, image_size, os.path.join(out_dir, name)))
    config = tiny_blip2_config(None, image_size=image_size, hidden=hidden, qformer_vocab=len(bert_tok))
    torch.manual_seed(seed)
    itm = _distinct_queries(Blip2ForImageTextRetrieval(config))
    paths.append(save_checkpoint(itm, bert_tok, image_size, os.path.join(out_dir, "blip2_itm")))
    return tuple(paths)


def _distinct_queries(model):
    """``model`` with random query tokens: transformers starts them at zero, all alike."""
    import torch

    with torch.no_grad():
        model.query_tokens.normal_()
    return model
