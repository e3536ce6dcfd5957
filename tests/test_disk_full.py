"""A full disk: the shard fails with an error naming the output, leaves nothing under a final
name (so it is not done), and once space is freed a rerun writes the same bytes as a run that
never ran short.

The disk is filled by injection (ENOSPC from the output files' writes after a budget): a small
tmpfs or loop device needs mount rights that neither this machine's user namespace nor CI is
sure to give, and a test that skips where it cannot mount proves nothing there.
"""

import errno
import os

import pytest
from conftest import make_web_shards
from faults import snapshot
from fsspec.implementations.local import LocalFileOpener

from capfilt.config import load_config
from capfilt.runtime.shards import plan_shards
from capfilt.step import CapFiltStep


@pytest.mark.parametrize("filling", [".tar", ".parquet", "_stats.json"])
def test_a_full_disk_fails_the_shard_naming_the_output_and_a_rerun_is_identical(
        tiny_models, tmp_path, monkeypatch, filling):
    inputs = make_web_shards(tmp_path / "in", shards=1, per_shard=6)
    cap, itm = tiny_models
    step = CapFiltStep(load_config("configs/tiny.yaml", [f"captioner.model={cap}", f"filter.model={itm}",
                                                         "runtime.batch_size=3"]), "f1")
    full, roomy = tmp_path / "full", tmp_path / "roomy"
    [task] = plan_shards(inputs, str(full))

    real_write = LocalFileOpener.write

    def write(self, data):  # the disk fills while the ``filling`` file is written
        if filling + ".tmp-" in self.path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(LocalFileOpener, "write", write)
    with pytest.raises(OSError) as failure:
        step.run(task)
    message = str(failure.value)
    assert "No space left on device" in message and f"writing into {full}" in message, message
    assert os.listdir(full) == []  # not done, and no temporary left behind
    monkeypatch.undo()  # space freed

    step.run(task)
    step.run(plan_shards(inputs, str(roomy))[0])
    assert snapshot(full) == snapshot(roomy)
