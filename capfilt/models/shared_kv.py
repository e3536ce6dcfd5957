"""Project each image's encoder states once for all of its texts in cross-attention.

Scoring K texts of an image, or sampling N captions of it, runs the text model on a batch
whose encoder states repeat each image K (or N) times. transformers' BLIP cross-attention
projects those states to keys and values row by row, so each image's projection is computed
K times: for BLIP-base, about as much work per image as the vision encoder itself. Here the
cross-attention key and value layers project the distinct images once and index the result.
The weights and the module tree are untouched (``save_pretrained`` is unaffected), and a
call whose encoder states are not the registered repeated tensor computes as before.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator


def _shared_forward(self, states):
    shared = self._capfilt_shared
    if shared is not None and states is shared[0]:
        unique, index = shared[1], shared[2]
        return type(self).forward(self, unique).index_select(0, index)
    return type(self).forward(self, states)


def install(text_model) -> list:
    """Patch the cross-attention key/value layers of a BLIP text model; return them."""
    layers = []
    for layer in text_model.encoder.layer:
        attention = getattr(layer, "crossattention", None)
        if attention is None:
            continue
        for linear in (attention.self.key, attention.self.value):
            linear._capfilt_shared = None
            linear.forward = types.MethodType(_shared_forward, linear)
            layers.append(linear)
    return layers


@contextlib.contextmanager
def repeated_states(layers: list, unique, index) -> Iterator:
    """Yield ``unique.index_select(0, index)``; while inside, ``layers`` project it from ``unique``."""
    repeated = unique.index_select(0, index)
    for linear in layers:
        linear._capfilt_shared = (repeated, unique, index)
    try:
        yield repeated
    finally:
        for linear in layers:
            linear._capfilt_shared = None
