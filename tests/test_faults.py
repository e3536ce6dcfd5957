"""Nothing lost, nothing twice: driver and worker kills, node loss, failing shards.

Each test compares its output with that of one uninterrupted run of the same
config: every tar and parquet byte for byte, every stats file but its timing.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest
from conftest import make_web_shards
from faults import kill_group, names, snapshot, wait_for

from pipelines.cli import main

SHARDS, PER_SHARD = 4, 8


def args(tiny_models, inputs, output, *extra):
    cap, itm = tiny_models
    return ["run", "--config", "configs/tiny.yaml", "--input", str(inputs), "--output", str(output),
            "--no-progress", f"captioner.model={cap}", f"filter.model={itm}",
            "filter.threshold=0.4633", "captioner.num_captions=3", "runtime.batch_size=2", *extra]


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("faults")
    make_web_shards(root / "in", shards=SHARDS, per_shard=PER_SHARD)
    out = root / "clean"
    assert main(args(tiny_models, root / "in", out)) == 0
    return dict(root=root, inputs=root / "in", out=out, files=snapshot(out))


def tmp_tar_present(out):
    return any(".tar.tmp-" in n for n in names(out))


KILL_POINTS = {
    # run.json is written before any shard starts
    "before_first_shard": lambda out: "run.json" in names(out),
    # after a shard is done, while the next is written (a kill between shards: the same state,
    # less the temporaries this one also has to clean up)
    "while_writing": lambda out: any(n.endswith("_stats.json") for n in names(out))
    and tmp_tar_present(out),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_driver_sigkill_then_rerun_gives_identical_output(clean, tiny_models, tmp_path, point):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipelines.cli", *args(tiny_models, clean["inputs"], out)]
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: KILL_POINTS[point](out) or proc.poll() is not None)
        assert proc.poll() is None, "the run finished before the kill point"
        proc.send_signal(signal.SIGKILL)  # the driver only
        proc.wait()
    finally:
        kill_group(proc.pid)  # then the Ray processes it had started
    done_before = sorted(n for n in names(out) if n.endswith("_stats.json"))
    assert len(done_before) < SHARDS
    # Nothing partial under a final name: every final tar/parquet that exists is complete.
    for name in names(out):
        if name.endswith(".parquet"):
            assert pq.read_table(out / name).num_rows > 0
    assert main(args(tiny_models, clean["inputs"], out)) == 0
    assert snapshot(out) == clean["files"]


def markers_of(out, fingerprint: str) -> int:
    """Done markers in ``out`` that record ``fingerprint``."""
    count = 0
    for name in names(out):
        if name.endswith("_stats.json"):
            try:
                count += json.loads((out / name).read_text()).get("fingerprint") == fingerprint
            except (OSError, ValueError):
                pass
    return count


def test_an_overwrite_killed_anywhere_then_rerun_holds_only_the_new_config(clean, tiny_models, tmp_path):
    """A folder of threshold 0.3; ``--mode overwrite`` with the clean config, SIGKILLed after two
    new shards are done; then a plain rerun. Every file must be the new config's: an old shard's
    done marker must not count as done. (A kill before the first new shard is the driver-kill
    test's ``before_first_shard``.)"""
    out = tmp_path / "out"
    assert main(args(tiny_models, clean["inputs"], out, "filter.threshold=0.3")) == 0
    new = json.loads((clean["out"] / "run.json").read_text())["fingerprint"]
    assert markers_of(out, new) == 0
    command = [sys.executable, "-m", "pipelines.cli", *args(tiny_models, clean["inputs"], out), "--mode",
               "overwrite"]
    kill_when = [lambda: markers_of(out, new) >= 2]
    for point in kill_when:
        proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: proc.poll() is not None or point())
            assert proc.poll() is None, "the run finished before the kill point"
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            kill_group(proc.pid)
    assert 0 < markers_of(out, new) < SHARDS  # old shards are left, marked done for 0.3
    assert main(args(tiny_models, clean["inputs"], out)) == 0
    assert snapshot(out) == clean["files"]


def test_worker_sigkill_mid_shard_is_redone_identically(clean, tiny_models, tmp_path):
    from capfilt.config import load_config
    from capfilt.io.fs import expand_input
    from capfilt.runtime.executor import RayExecutor
    from capfilt.runtime.shards import plan_shards
    from capfilt.run import make_step

    out = tmp_path / "out"
    config = load_config("configs/tiny.yaml", args(tiny_models, "x", "y")[8:],
                         input=str(clean["inputs"]), output=str(out))
    fingerprint = json.loads((clean["out"] / "run.json").read_text())["fingerprint"]
    executor = RayExecutor(lambda: make_step(config, fingerprint), config.runtime)
    killed = []

    def killer():
        wait_for(lambda: executor.worker_infos and tmp_tar_present(out))
        pid = executor.worker_infos[0].pid
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    results = executor.run(plan_shards(expand_input(config.input), str(out)))
    thread.join(timeout=5)
    assert killed, "the worker was never killed"
    assert all(r.ok for r in results) and len(results) == SHARDS
    pids = {json.loads((out / n).read_text())["timing"]["worker_pid"]
            for n in names(out) if n.endswith("_stats.json")}
    assert pids - {killed[0]}, "no restarted worker finished a shard"
    files = snapshot(out)
    for name, content in clean["files"].items():
        if name not in ("run.json", "stats.json", "sizes.json"):  # written by the pipeline, not the executor
            assert files[name] == content, name


def test_node_removed_mid_run_completes_on_the_others(clean, tiny_models, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, node_ip_address="127.0.0.1", include_dashboard=False,
        _system_config={"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                        "health_check_timeout_ms": 1000, "health_check_failure_threshold": 2}))
    workers = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(2)]
    removed = []
    try:
        ray.init(address=cluster.address)
        out = tmp_path / "out"

        def killer():
            by_id = {n.node_id: n for n in workers}

            def worker_node_busy():
                for name in names(out):
                    if name.endswith("_stats.json"):
                        node = json.loads((out / name).read_text())["timing"]["worker_node"]
                        if node in by_id and tmp_tar_present(out):
                            return by_id[node]
                return None

            node = wait_for(worker_node_busy)
            cluster.remove_node(node, allow_graceful=False)
            removed.append(node.node_id)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        rc = main(args(tiny_models, clean["inputs"], out, f"runtime.ray_address={cluster.address}",
                       "runtime.num_workers=2"))
        thread.join(timeout=10)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert removed, "no worker node was removed mid-run"
    assert rc == 0
    assert snapshot(out) == clean["files"]


def test_failed_shard_is_retried_on_rerun(clean, tiny_models, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in os.listdir(clean["inputs"]):
        (inputs / name).write_bytes((clean["inputs"] / name).read_bytes())
    broken = inputs / "00001.tar"
    good = broken.read_bytes()
    broken.write_bytes(b"this is not a tar file at all" * 100)
    out = tmp_path / "out"
    assert main(args(tiny_models, inputs, out, "runtime.shard_attempts=2")) == 1
    stats = json.loads((out / "stats.json").read_text())
    assert [f["shard"] for f in stats["failed"]] == ["00001"]
    assert "not a readable tar" in stats["failed"][0]["error"] and stats["failed"][0]["attempts"] == 2
    assert "00001_stats.json" not in names(out) and "00001.tar" not in names(out)
    broken.write_bytes(good)
    assert main(args(tiny_models, inputs, out)) == 0
    assert snapshot(out) == clean["files"]


def test_soak_fifty_shards_with_a_worker_kill_and_a_bad_shard(tiny_models, tmp_path):
    inputs = tmp_path / "in"
    make_web_shards(inputs, shards=50, per_shard=4)
    (inputs / "00017.tar").write_bytes(b"\x00garbage, not a tar" * 64)
    expected_keys = {f"{s:05d}{i:04d}" for s in range(50) if s != 17 for i in range(4)}
    out = tmp_path / "out"
    killed = []

    def killer():
        def busy_worker():
            for name in names(out):
                if name.endswith("_stats.json") and tmp_tar_present(out):
                    return json.loads((out / name).read_text())["timing"]["worker_pid"]
            return None

        pid = wait_for(busy_worker)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    rc = main(args(tiny_models, inputs, out, "runtime.num_workers=2", "captioner.num_captions=1",
                   "runtime.batch_size=4"))
    thread.join(timeout=10)
    assert killed and rc == 1
    stats = json.loads((out / "stats.json").read_text())
    assert [f["shard"] for f in stats["failed"]] == ["00017"]
    keys = []
    for name in names(out):
        if name.endswith(".parquet"):
            keys += pq.read_table(out / name, columns=["key"]).column("key").to_pylist()
    assert len(keys) == len(set(keys)) and set(keys) == expected_keys
    assert stats["samples"] == len(expected_keys) == stats["kept"] + stats["dropped"] + stats["error"]
    assert not [n for n in names(out) if ".tmp-" in n]


def test_workers_dying_for_good_stop_the_run_with_the_reason(tmp_path):
    """A dead worker is never given another shard; when no replacement is left, the shards not
    yet done are reported as such, not failed one by one on a dead actor as 'worker died'."""
    from capfilt.config import RuntimeConfig
    from capfilt.runtime.executor import RayExecutor
    from capfilt.runtime.shards import ShardTask

    class DyingStep:  # defined here so that Ray pickles it by value
        def run(self, task, report=None, worker=None):
            os._exit(1)

    runtime = RuntimeConfig(num_workers=1, max_restarts=0, max_task_retries=0, shard_attempts=1)
    tasks = [ShardTask(url=f"in/{i}.tar", name=f"{i:05d}", output=str(tmp_path)) for i in range(4)]
    results = RayExecutor(DyingStep, runtime).run(tasks)
    errors = [r.error for r in sorted(results, key=lambda r: r.task.name)]
    assert all(e.startswith("worker died") for e in errors[:2]), errors  # the first, and its one replacement
    assert all(e.startswith("no worker left") for e in errors[2:]), errors


def test_a_cuda_error_ends_its_worker_and_the_shard_is_redone_on_a_fresh_one(tmp_path):
    """A device-side assert poisons the process's CUDA context: the worker must exit, not take
    the next shard. Raised here on CPU with CUDA's message, once, by the first worker."""
    from capfilt.config import RuntimeConfig
    from capfilt.runtime.executor import RayExecutor
    from capfilt.runtime.shards import ShardTask

    class Done:
        def __init__(self):
            self.pid = os.getpid()

        def counts(self):
            return {"samples": 1}

    flag = tmp_path / "asserted"

    class AssertingStep:  # defined here so that Ray pickles it by value
        def run(self, task, report=None, worker=None):
            if not flag.exists():
                flag.write_text(str(os.getpid()))
                raise RuntimeError("CUDA error: device-side assert triggered")
            return Done()

    runtime = RuntimeConfig(num_workers=1, cpus_per_worker=1, max_task_retries=0, shard_attempts=2)
    tasks = [ShardTask(url=f"in/{i}.tar", name=f"{i:05d}", output=str(tmp_path)) for i in range(3)]
    results = {r.task.name: r for r in RayExecutor(AssertingStep, runtime).run(tasks)}
    assert all(r.ok for r in results.values()), [r.error for r in results.values()]
    first = int(flag.read_text())
    assert all(r.stats.pid != first for r in results.values())  # no shard ran on the poisoned worker


def test_a_hung_shard_is_abandoned_retried_and_reported_while_the_rest_complete(tmp_path):
    from capfilt.config import RuntimeConfig
    from capfilt.runtime.executor import RayExecutor
    from capfilt.runtime.shards import ShardTask

    class Done:
        def counts(self):
            return {"samples": 1}

    class HangingStep:  # a read that never returns, on one shard only
        def run(self, task, report=None, worker=None):
            if task.name == "00001":
                time.sleep(3600)
            return Done()

    runtime = RuntimeConfig(num_workers=1, shard_attempts=2, shard_timeout=3)
    tasks = [ShardTask(url=f"in/{i}.tar", name=f"{i:05d}", output=str(tmp_path)) for i in range(3)]
    start = time.monotonic()
    results = {r.task.name: r for r in RayExecutor(HangingStep, runtime).run(tasks)}
    assert time.monotonic() - start < 120
    assert results["00000"].ok and results["00002"].ok
    hung = results["00001"]
    assert not hung.ok and hung.attempts == 2 and "timed out after 3 s (runtime.shard_timeout)" in hung.error
