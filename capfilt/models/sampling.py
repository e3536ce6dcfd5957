"""Nucleus sampling as transformers' ``generate(do_sample=True)`` does it, at a fraction of the cost.

transformers samples each step over the whole vocabulary: ``TopPLogitsWarper`` sorts all
30,524 scores of every row, and ``torch.multinomial`` draws one exponential per vocabulary
entry per row, single-threaded. For BLIP-base's decoder with 5 captions for 16 images that
was a quarter of the captioner's decode time (BENCHMARKS.md), spent on tokens that top-k
has already ruled out.

``NucleusSampler`` keeps the same distribution: temperature, then top-k (ties with the k-th
score kept, as ``TopKLogitsWarper`` keeps them), then top-p over what is left (as
``TopPLogitsWarper``: the smallest set whose probability exceeds ``top_p``), then a draw in
proportion to the softmax. It works on the top-k candidates only, and draws from its own
``torch.Generator``. It runs as the last logits processor of a *greedy* ``generate``: the
token it draws is left the only finite score, so the greedy step picks it, and everything
else ``generate`` does (repetition penalty, minimum length, end of sequence, padding of
finished rows) stays transformers' own.

A row with more ties at the k-th score than the slack holds takes the full sort, and asking
whether a step has one is a host read of the device's answer: on a GPU, a stall at every
decoding step. The captioner defers the question (``defer_tie_check``): each step goes on as if
there were none and keeps the answer on the device; after ``generate`` it reads
``ties_overflowed()`` once, and where a step had one, samples the batch again with the check at
every step. The captions are those of the check at every step either way. (Taking the full
sort's path always would not give them: it draws over the whole vocabulary, which moves the
generator's stream and so every later draw of the batch.)

The draws are not transformers' draws: captions for a seed differ from
``generate(do_sample=True)`` after ``torch.manual_seed(seed)``, while following the same
distribution (tests/test_models.py checks the probabilities against transformers' warpers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where sampling runs: capfilt's commands that read only start without it
    import torch

# Candidates beyond top_k taken at once, so that ties with the k-th score are kept
# without a second pass; more ties than this fall back to a full sort.
_TIE_SLACK = 8


class NucleusSampler:
    def __init__(self, top_p: float, top_k: int, temperature: float, generator: torch.Generator,
                 defer_tie_check: bool = False):
        self.top_p, self.top_k, self.temperature = top_p, top_k, temperature
        self.generator = generator
        self.defer_tie_check = defer_tie_check
        self._overflowed: torch.Tensor | None = None  # on the device; only when deferred

    def ties_overflowed(self) -> bool:
        """Whether a deferred step had more ties than the slack, so that its draws are not the
        ones the full sort gives. Reads the device once (a host sync): call it after ``generate``."""
        return self._overflowed is not None and bool(self._overflowed)

    def candidates(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, token ids) of each row's candidates, best first; zero outside the nucleus."""
        import torch

        vocab = scores.shape[-1]
        if self.temperature != 1.0:
            scores = scores / self.temperature
        k = vocab if self.top_k <= 0 else min(self.top_k, vocab)
        width = min(vocab, k + _TIE_SLACK)
        values, ids = torch.topk(scores, width, dim=-1)
        kth = values[:, k - 1:k]
        if width < vocab:
            overflowed = (values[:, -1:] >= kth).any()  # more ties than slack
            if self.defer_tie_check:
                previous = self._overflowed
                self._overflowed = overflowed if previous is None else previous | overflowed
            elif bool(overflowed):
                values, ids = torch.sort(scores, dim=-1, descending=True)
        values = values.masked_fill(values < kth, float("-inf"))
        # Top-p as TopPLogitsWarper: in ascending order, drop the tokens whose cumulative
        # probability stays at or below 1 - top_p; the most likely one always stays.
        ascending = values.flip(-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - self.top_p)
        drop[..., -1] = False
        values = ascending.masked_fill(drop, float("-inf")).flip(-1)
        return values.softmax(dim=-1), ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        probs, ids = self.candidates(scores)
        choice = torch.multinomial(probs, 1, generator=self.generator)
        token = ids.gather(1, choice)
        drawn = torch.full_like(scores, float("-inf"))
        return drawn.scatter_(1, token, 0.0)


def sample(cfg: Any, device: str, seed: int, generate: Callable[[Any], "torch.Tensor"],
           defer_tie_check: bool = True) -> "torch.Tensor":
    """What ``generate(logits_processor)`` writes, a greedy ``generate`` (``do_sample=False``, one
    beam) given a ``LogitsProcessorList`` whose last processor is a ``NucleusSampler`` of ``cfg``'s
    ``top_p``, ``top_k`` and ``temperature``, its draws seeded by ``seed`` on ``device``. No decoding
    step waits on the device for the tie check; a batch where a step had more ties than the slack is
    sampled again with the check at every step (one host read per batch), which gives the captions
    checking at every step gives. Every captioner samples through here."""
    import torch
    from transformers import LogitsProcessorList

    generator = torch.Generator(device=device).manual_seed(seed)
    sampler = NucleusSampler(cfg.top_p, cfg.top_k, cfg.temperature, generator, defer_tie_check=defer_tie_check)
    out = generate(LogitsProcessorList([sampler]))
    if defer_tie_check and sampler.ties_overflowed():
        return sample(cfg, device, seed, generate, defer_tie_check=False)
    return out
