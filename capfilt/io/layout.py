"""Every file name an output folder can hold, and nothing else: the one place they are spelled.

Per shard ``NAME``: ``NAME.tar`` (the kept samples), ``NAME.parquet`` (a row per input
sample) and, renamed into place last, ``NAME_stats.json``, the done marker. Per run:
``run.json`` (config, fingerprint, versions), ``stats.json`` (totals) and ``sizes.json``
(samples per tar, webdataset's and open_clip's convention). ``capfilt reshard`` adds
``reshard_plan.json``. While a file is written it has a hidden temporary name; while a run
writes the folder, it holds the hidden ``.capfilt.lock``.

img2dataset writes a ``NAME_stats.json`` of its own beside each tar it downloads, under the
same name as capfilt's done marker; ``stats_beside`` finds it for an input shard.
"""

from __future__ import annotations

import posixpath
import re

RUN_FILE = "run.json"
STATS_FILE = "stats.json"
SIZES_FILE = "sizes.json"
RESHARD_PLAN_FILE = "reshard_plan.json"
# capfilt select's record: the policy, the run it decided from, and the count of each reason.
SELECT_FILE = "select.json"
# capfilt download's record (JSON) of what decided the shards in its folder (capfilt/ingest.py).
# Not named *.json: img2dataset takes every *.json in its folder for a shard's stats.
DOWNLOAD_FILE = ".capfilt-download"
# Held by the run writing the folder (capfilt/io/lock.py); hidden, so no reader takes it for data.
LOCK_FILE = ".capfilt.lock"

STATS_SUFFIX = "_stats.json"
PARQUET_SUFFIX = ".parquet"
TMP_MARKER = ".tmp-"

# Shards that capfilt reshard writes: NNNNN.tar, NNNNN.parquet, NNNNN_stats.json.
NUMBERED_SHARD_FILE = re.compile(r"^\d{5,}(\.tar|\.parquet|" + re.escape(STATS_SUFFIX) + r")$")


def tar_name(shard: str) -> str:
    return f"{shard}.tar"


def parquet_name(shard: str) -> str:
    return f"{shard}{PARQUET_SUFFIX}"


def stats_name(shard: str) -> str:
    """The shard's stats file, written last: its presence marks the shard done."""
    return f"{shard}{STATS_SUFFIX}"


def shard_files(shard: str) -> tuple[str, str, str]:
    """A done shard's files, in the order they are renamed into place."""
    return tar_name(shard), parquet_name(shard), stats_name(shard)


def shard_of_stats(name: str) -> str | None:
    """``00012_stats.json`` -> ``00012``; None for any other name (``stats.json`` included)."""
    if name.endswith(STATS_SUFFIX) and len(name) > len(STATS_SUFFIX):
        return name[: -len(STATS_SUFFIX)]
    return None


def temporary_name(name: str, unique: str) -> str:
    """The hidden name ``name`` is written under before it is renamed into place."""
    return f".{name}{TMP_MARKER}{unique}"


def is_temporary(name: str) -> bool:
    return name.startswith(".") and TMP_MARKER in name


def stats_beside(shard_url: str, shard: str) -> str:
    """The ``NAME_stats.json`` beside an input tar (img2dataset's, or capfilt's in its output)."""
    return posixpath.join(posixpath.dirname(shard_url), stats_name(shard))
