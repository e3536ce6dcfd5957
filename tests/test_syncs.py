"""Host-device syncs of the captioner's decoding loop, counted on the CPU.

On a GPU, every Python branch on a tensor's value (``if t``, ``bool(t)``, ``.item()``,
``.tolist()``, ``int(t)``) makes the host wait for the device, so the next step's kernels are not
queued while the current ones run. The test wraps those conversions on ``torch.Tensor`` during
``Captioner.__call__`` and attributes each call to the first frame outside torch itself: a capfilt
file, or transformers' own. On the CPU a conversion costs nothing, but it is the same call that
stalls a GPU.

Measured with transformers 5.24: per decoding step, transformers makes one sync of its own, the
stopping check (``StopCheck.__call__``, ``bool(unfinished_sequences.max() == 0)``), and capfilt
none. Before issue 15 there were three: that check, capfilt's tie check in ``NucleusSampler``, and
transformers' ``padding_mask.all()`` on the all-ones ``encoder_attention_mask`` capfilt passed.
"""

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers

import capfilt
from capfilt.config import CaptionerConfig
from capfilt.models.captioner import Captioner

CONVERSIONS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__")
CAPFILT = str(Path(capfilt.__file__).parent)
TORCH = str(Path(torch.__file__).parent)
TRANSFORMERS = str(Path(transformers.__file__).parent)
STEP = "step"


def _origin() -> tuple[str, str]:
    """(who, where) of the code that asked for a tensor's value: the first frame outside torch."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(TORCH):
        frame = frame.f_back
    path = frame.f_code.co_filename
    for who, root in (("capfilt", CAPFILT), ("transformers", TRANSFORMERS)):
        if path.startswith(root):
            return who, f"{Path(path).relative_to(root)}:{frame.f_code.co_name}"
    return path, frame.f_code.co_name


@pytest.fixture
def syncs(monkeypatch):
    """The events of the test, in order: STEP at each decoder forward, (who, where) at each sync."""
    events: list = []
    for name in CONVERSIONS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, __original=original, **kwargs):
            events.append(_origin())
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return events


@pytest.fixture(scope="module")
def captioner(tiny_models):
    # max_length short of the default keeps the test quick; still more steps than five.
    return Captioner(CaptionerConfig(model=tiny_models[0], num_captions=3, max_length=12), "cpu", "float32")


PIXELS = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def per_step(captioner, events, monkeypatch) -> list[Counter]:
    """The syncs of each decoding step, from one decoder forward to the next; the last step's
    (which also holds generate's wrap-up, after the loop) is left out."""
    hook = captioner.model.text_decoder.register_forward_pre_hook(lambda *_: events.append(STEP))
    try:
        captions = captioner(PIXELS, seed=3)
    finally:
        hook.remove()
    monkeypatch.undo()  # conversions below are the test's own
    assert len(captions) == 2 and all(len(c) == 3 for c in captions)
    starts = [i for i, e in enumerate(events) if e == STEP]
    assert len(starts) >= 5, "too few decoding steps to tell a per-step sync"
    return [Counter(events[a + 1:b]) for a, b in zip(starts, starts[1:])]


def test_decoding_loop_makes_no_capfilt_sync(captioner, syncs, monkeypatch):
    steps = per_step(captioner, syncs, monkeypatch)
    capfilt_syncs = Counter(k for step in steps for k in step.elements() if k[0] == "capfilt")
    assert not capfilt_syncs, f"capfilt syncs in {len(steps)} steps: {dict(capfilt_syncs)}"
    # transformers' own: the stopping check only, once a step. A sync transformers makes on
    # what capfilt hands it (an encoder mask it inspects) counts here too.
    stop_check = ("transformers", "generation/utils.py:__call__")
    for step in steps:
        assert step == Counter({stop_check: 1}), dict(step)
    # capfilt's syncs of the whole call are per batch: the shared keys' layout, before the
    # loop, and whether a step had more ties than the sampler's slack, after it.
    assert Counter(e for e in syncs if e != STEP and e[0] == "capfilt") == {
        ("capfilt", "models/shared_kv.py:repeated_states"): 2,
        ("capfilt", "models/sampling.py:ties_overflowed"): 1,
    }


def test_a_batch_with_more_ties_than_the_slack_is_sampled_again_with_the_check(captioner, monkeypatch):
    """With no slack, every step has more ties than it holds. The captions are then the ones
    the tie check at every step draws (the sampler's full sort), as before the check was
    deferred; without sampling again, they would not be."""
    from capfilt.models import sampling

    monkeypatch.setattr(sampling, "_TIE_SLACK", 0)
    real_sample, calls = sampling.sample, []

    def counted(*args, defer_tie_check=True):
        calls.append(defer_tie_check)
        return real_sample(*args, defer_tie_check=defer_tie_check)

    monkeypatch.setattr(sampling, "sample", counted)
    got = captioner(PIXELS, seed=3)
    assert calls == [True, False]
    monkeypatch.setattr(sampling, "sample", lambda *args: real_sample(*args, defer_tie_check=False))
    checked_each_step = captioner(PIXELS, seed=3)
    assert got == checked_each_step
    monkeypatch.setattr(sampling.NucleusSampler, "ties_overflowed", lambda self: False)
    monkeypatch.setattr(sampling, "sample", real_sample)
    assert captioner(PIXELS, seed=3) != checked_each_step  # the first pass's own draws
