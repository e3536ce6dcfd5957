"""What decides an output's bytes, and its fingerprint.

An output folder holds the output of exactly one identity: ``run.json`` records it, and every
shard's done marker (``NAME_stats.json``) records its fingerprint, so a shard written under
another config, other weights or by an older capfilt is not done, whatever the mode of the
run that left it. When the identity changes, ``changes`` names what changed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Raised when capfilt itself makes different output from the same config, so that a run is
# not resumed into a folder of the older output. 2: captions drawn by NucleusSampler
# (capfilt/models/sampling.py) instead of transformers' sampling. 3: the parquet's tar_bytes.
# 4: the done marker records the fingerprint, which covers batch size and weights.
# 5: the parquet's web_itc, caption_itc and image_embedding, and the kept json's itc scores.
OUTPUT_REVISION = 5

# runtime settings that change the output: the random stream is drawn per batch, and the
# precision of the matmuls moves scores and draws.
RUNTIME_KEYS = ("seed", "dtype", "batch_size", "tf32")


class RunRefused(RuntimeError):
    """The output folder holds output of another identity; ``--mode overwrite`` replaces it."""


def refuse_if_changed(url: str, record: dict[str, Any] | None, identity: dict[str, Any], fp: str,
                      what: str) -> None:
    """Raise ``RunRefused`` naming what changed when ``record`` (the folder's ``run.json``, or
    capfilt download's record) holds another fingerprint than ``fp``."""
    if record is None or record.get("fingerprint") == fp:
        return
    if "identity" in record:
        changed = "; ".join(changes(record["identity"], identity))
    else:  # written by a capfilt before the identity was recorded
        changed = f"fingerprint {record.get('fingerprint')} -> {fp}"
    raise RunRefused(f"{url} holds {what} of another config ({changed}); use another output "
                     "folder, or --mode overwrite to redo it")


def output_identity(config, weights: dict[str, str | None]) -> dict[str, Any]:
    """Everything that changes the output's bytes: the model, reader and writer sections, the
    runtime settings above and the device kind, as ``auto`` resolves on this machine
    (``runtime/defaults.py``), the recorded scores' models (``scores``), the identity of each
    slot's and scorer's weights (hub commit or a hash of the local files) and capfilt's output
    revision. Not the input, the output or the placement."""
    from capfilt.runtime.defaults import resolve_runtime, run_facts

    runtime = resolve_runtime(config.runtime, run_facts(config.runtime))
    # The recorded scores only when there are some: a run without them keeps its fingerprint.
    sections = ("captioner", "filter", "reader", "writer") + (("scores",) if config.scores else ())
    return {
        **{section: config.to_dict()[section] for section in sections},
        "runtime": {**{key: getattr(runtime, key) for key in RUNTIME_KEYS}, "device": runtime.device},
        "weights": dict(weights),
        "output_revision": OUTPUT_REVISION,
    }


def fingerprint(identity: dict[str, Any]) -> str:
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["filter.threshold: 0.3 -> 0.6", ...]``: the dotted keys whose values differ."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    return [f"{key}: {_show(flat_old.get(key))} -> {_show(flat_new.get(key))}"
            for key in sorted(flat_old.keys() | flat_new.keys())
            if flat_old.get(key, _MISSING) != flat_new.get(key, _MISSING)]


_MISSING = object()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _show(value: Any) -> str:
    return "(none)" if value is None else json.dumps(value, default=str)
