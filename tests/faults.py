"""Helpers for the fault tests: comparing output folders, waiting for files, clean kills."""

import json
import os
import signal
import time

from capfilt.io.layout import LOCK_FILE
from capfilt.stats import TIMING

def snapshot(out) -> dict[str, object]:
    """Every output file's content, with the run-to-run timing fields taken out."""
    files = {}
    for name in sorted(os.listdir(out)):
        if name == LOCK_FILE:  # who held the folder last: another pid each run
            continue
        data = (out / name).read_bytes()
        if name.endswith(".json"):
            obj = json.loads(data)
            obj.pop(TIMING, None)
            if name.endswith("_stats.json"):
                obj.pop("input")  # the input folder differs in some tests
            if name == "run.json":
                # Where the run read and wrote, and its placement, differ between tests;
                # the fingerprint still covers seed and dtype.
                for key in ("input", "output", "runtime"):
                    obj["config"].pop(key)
            files[name] = obj
        else:
            files[name] = data
    return files


def wait_for(predicate, timeout: float = 120, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not reached")


def names(out) -> list[str]:
    try:
        return os.listdir(out)
    except FileNotFoundError:
        return []


def kill_group(pgid: int) -> None:
    """SIGKILL what is left of a process group this test started (its Ray processes)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
