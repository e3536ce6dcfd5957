"""Progress over samples from every worker, and an estimate of how many there are."""

from __future__ import annotations

import logging
import sys

from capfilt.io.fs import read_json
from capfilt.io.layout import stats_beside
from capfilt.runtime.shards import ShardTask

log = logging.getLogger(__name__)


def estimate_samples(tasks: list[ShardTask]) -> int | None:
    """Sum of img2dataset's ``successes`` from the ``NAME_stats.json`` beside each input tar.

    None when any shard lacks it: the bar then shows a count and a rate, no ETA.
    """
    total = 0
    for task in tasks:
        stats_url = stats_beside(task.url, task.name)
        try:
            total += int(read_json(stats_url)["successes"])
        except Exception:  # absent or not img2dataset's: no estimate
            return None
    return total


def bar_interval() -> float:
    """Seconds between a progress bar's updates: tqdm's 0.1 on a terminal; 30 when stderr is a
    log file, which would otherwise fill with a line of carriage returns ten times a second."""
    isatty = getattr(sys.stderr, "isatty", None)
    return 0.1 if isatty is not None and isatty() else 30.0


class DoneBar:
    """A tqdm bar fed ``(done, total)``, opened at the first report (so a refusal shows none):
    reshard's and select's."""

    def __init__(self, desc: str, disable: bool):
        self.desc, self.disable = desc, disable
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc=self.desc, disable=self.disable,
                            dynamic_ncols=True, mininterval=bar_interval())
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class SampleBar:
    """A tqdm bar over samples, fed with the executor's running totals."""

    def __init__(self, total: int | None, shards: int, disable: bool = False):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="img", desc="capfilt", disable=disable, dynamic_ncols=True,
                        mininterval=bar_interval())
        self.shards = shards
        self.shards_done = 0

    def update(self, totals: dict[str, int]) -> None:
        samples = totals.get("samples", 0)
        self.bar.update(max(0, samples - self.bar.n))
        if samples:
            self.bar.set_postfix(
                kept=f"{100 * totals.get('kept', 0) / samples:.1f}%",
                errors=totals.get("error", 0),
                shards=f"{self.shards_done}/{self.shards}",
                refresh=False,
            )

    def shard_done(self) -> None:
        self.shards_done += 1

    def write(self, line: str) -> None:
        self.bar.write(line)

    def close(self) -> None:
        self.bar.close()
