"""Attention as capfilt runs it: images projected once, fused kernels, no repeated copies.

Scoring K texts of an image, or sampling N captions of it, runs the text model on a batch
whose encoder states repeat each image K (or N) times. transformers' BLIP cross-attention
projects those states to keys and values row by row, so each image's projection is computed
K times: for BLIP-base, about as much work per image as the vision encoder itself. Then every
decoding step reads the K copies of those keys and values again (the cross-attention cache
holds one per row), which made caption sampling memory-bound.

Here, inside ``repeated_states``, each patched cross-attention layer projects the distinct
images once and keeps the result for the whole call (every decoding step reuses it). The
query rows of an image (its N samples, or its texts, zero-padded to the widest image) are laid
side by side as one longer query against the image's single copy of the keys and values, with
plain matmul and softmax: for such short queries that beats the fused kernel on CPU. The
vision encoder's attention, 577 queries against 577 keys at 384 px, uses
``scaled_dot_product_attention`` instead (transformers' BLIP has no SDPA path), which avoids
materialising the score matrices.

The weights and the module tree are untouched (``save_pretrained`` is unaffected); a call
outside ``repeated_states``, or with other encoder states, or that asks for attention maps,
runs transformers' own code. Only inference calls take the fast path: dropout is not applied.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Shared:
    repeated: Any  # the tensor handed to the model as encoder_hidden_states
    unique: Any  # one row per image
    width: int  # the most rows any image has
    slots: Any  # row -> image * width + its place among the image's rows; None if all have width
    kv: dict = field(default_factory=dict)  # layer -> (keys, values) of the unique images


def _heads(tensor, heads: int):
    batch, length, _ = tensor.shape
    return tensor.view(batch, length, heads, -1).transpose(1, 2)


def _cross_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                   encoder_attention_mask=None, cache=None, **kwargs):
    shared: _Shared | None = self._capfilt_shared
    if (shared is None or encoder_hidden_states is not shared.repeated or self.training
            or kwargs.get("output_attentions")):
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states,
                                  encoder_attention_mask, cache, **kwargs)
    import torch

    heads = self.num_attention_heads
    if id(self) not in shared.kv:
        # (images, heads, head_dim, states) and (images, heads, states, head_dim)
        # Contiguous once here, or every decoding step's matmul copies them again.
        shared.kv[id(self)] = (_heads(self.key(shared.unique), heads).transpose(-1, -2).contiguous(),
                               _heads(self.value(shared.unique), heads).contiguous())
    keys_t, values = shared.kv[id(self)]
    rows, length, _ = hidden_states.shape
    images, width = keys_t.shape[0], shared.width
    query = _heads(self.query(hidden_states), heads)  # (rows, heads, length, head_dim)
    if shared.slots is not None:  # images with fewer rows than the widest: pad with zeros
        padded = query.new_zeros((images * width, *query.shape[1:]))
        query = padded.index_copy_(0, shared.slots, query)
    # The rows of an image become one longer query against its single key/value copy.
    query = query.reshape(images, width, heads, length, -1).transpose(1, 2).reshape(images, heads, width * length, -1)
    # Plain matmul and softmax, in the model's dtype as transformers computes it: for these short
    # queries it is faster on CPU than scaled_dot_product_attention's fused kernel. The encoder
    # mask is all ones here (image states have no padding), so it is not applied.
    scores = torch.matmul(query, keys_t) / math.sqrt(self.attention_head_size)
    context = torch.matmul(scores.softmax(dim=-1), values)
    context = context.reshape(images, heads, width, length, -1).transpose(1, 2).reshape(images * width, heads, length, -1)
    if shared.slots is not None:
        context = context.index_select(0, shared.slots)
    return context.transpose(1, 2).reshape(rows, length, -1), None


def _vision_forward(self, hidden_states, **kwargs):
    if self.training or kwargs.get("output_attentions"):
        return type(self).forward(self, hidden_states, **kwargs)
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    batch, length, dim = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    context = sdpa(qkv[0], qkv[1], qkv[2], scale=self.scale)
    return self.projection(context.transpose(1, 2).reshape(batch, length, dim)), None


def install_vision(vision_model) -> None:
    """Route a BLIP vision encoder's attention through scaled_dot_product_attention."""
    for layer in vision_model.encoder.layers:
        layer.self_attn.forward = types.MethodType(_vision_forward, layer.self_attn)


def install(text_model) -> list:
    """Patch the cross-attention layers of a BLIP text model; return them."""
    layers = []
    for layer in text_model.encoder.layer:
        attention = getattr(layer, "crossattention", None)
        if attention is None:
            continue
        attention.self._capfilt_shared = None
        attention.self.forward = types.MethodType(_cross_forward, attention.self)
        layers.append(attention.self)
    return layers


@contextlib.contextmanager
def repeated_states(layers: list, unique, index) -> Iterator:
    """Yield ``unique.index_select(0, index)`` for the model to carry; inside, ``layers``
    attend to ``unique`` directly. ``index`` maps each row to its image and must be sorted
    (each image's rows together, as the captioner's samples and the filter's texts are)."""
    import torch

    counts = torch.bincount(index, minlength=unique.shape[0])
    width = int(counts.max()) if index.numel() else 0
    slots = None
    if not bool((counts == width).all()):
        starts = torch.cumsum(counts, 0) - counts
        slots = index * width + torch.arange(index.numel(), device=index.device) - starts[index]
    repeated = unique.index_select(0, index)
    shared = _Shared(repeated, unique, width, slots)
    for layer in layers:
        layer._capfilt_shared = shared
    try:
        yield repeated
    finally:
        for layer in layers:
            layer._capfilt_shared = None
