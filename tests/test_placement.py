"""Placement on the loopback cluster: ``runtime.num_workers``/``cpus_per_worker``/
``gpus_per_worker: auto`` worked out from the nodes, and a number winning.

One cluster for the module: two CPU nodes (4 CPUs and 1) first, then two nodes that
declare GPUs (Ray believes them; nothing here runs CUDA: a worker given one only reports what
it was given).
"""

import json
import os
from collections import Counter

import pytest
from conftest import make_web_shards
from faults import names

from capfilt.config import ConfigError, RuntimeConfig, load_config
from capfilt.runtime.executor import (NodeResources, RayExecutor, WorkerStartError, cluster_nodes,
                                      local_node, machine_cores, plan_workers)
from capfilt.runtime.shards import ShardTask
from pipelines.cli import main

LOOPBACK = dict(node_ip_address="127.0.0.1")


def test_auto_is_the_default_and_the_one_word_taken():
    rt = load_config().runtime
    assert (rt.num_workers, rt.cpus_per_worker, rt.gpus_per_worker) == ("auto", "auto", "auto")
    for key in ("num_workers", "cpus_per_worker", "gpus_per_worker"):
        with pytest.raises(ConfigError, match=rf"runtime\.{key}: 'all'"):
            load_config(None, [f"runtime.{key}=all"])


def test_a_local_instance_plans_on_this_machine(monkeypatch):
    """What capfilt's own Ray gets: this machine's cores and the GPUs torch sees."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)  # none here: as if there were
    assert local_node(RuntimeConfig()) == NodeResources(None, machine_cores(), 3)
    assert local_node(RuntimeConfig(device="cpu")).gpus == 0
    plan = plan_workers(RuntimeConfig(device="cpu"), [NodeResources(None, 8, 0)])
    assert plan.describe() == "plan: 1 node, 1 worker (cpu), 8 threads each"
    plan = plan_workers(RuntimeConfig(), [NodeResources(None, 16, 8)])
    assert plan.describe() == "plan: 1 node, 8 workers (cuda, 8 GPUs), 2 threads each"
    # Set numbers that ask for more CPUs than there are cores still start, as before.
    assert local_node(RuntimeConfig(num_workers=machine_cores() + 1)).cpus == machine_cores() + 1


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args=dict(num_cpus=4, include_dashboard=False, **LOOPBACK))
    try:
        cluster.add_node(num_cpus=1, **LOOPBACK)
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def gpu_cluster(cluster):
    """The same cluster with two nodes more: 6 CPUs and 2 GPUs, 2 CPUs and 1 GPU."""
    cluster.add_node(num_cpus=6, num_gpus=2, **LOOPBACK)
    cluster.add_node(num_cpus=2, num_gpus=1, **LOOPBACK)
    cluster.wait_for_nodes()
    return cluster


def nodes_now():
    import ray

    return {n.node_id: n for n in cluster_nodes(ray)}


def slots(plan):
    return sorted((s.node_id or "", s.cpus, s.gpus) for s in plan.slots)


def test_cpu_nodes_get_one_worker_each_with_all_their_cpus(cluster):
    nodes = nodes_now()
    assert sorted(n.cpus for n in nodes.values()) == [1, 4]
    plan = plan_workers(RuntimeConfig(), list(nodes.values()))
    assert slots(plan) == sorted((n.node_id, n.cpus, 0.0) for n in nodes.values())
    assert plan.device == "cpu"
    assert plan.describe() == "plan: 2 nodes, 2 workers (cpu), 1-4 threads each"


def test_a_run_with_auto_puts_one_worker_on_each_node(cluster, tiny_models, tmp_path, capsys):
    cap, itm = tiny_models
    make_web_shards(tmp_path / "in", shards=2, per_shard=2)
    out = tmp_path / "out"
    rc = main(["run", "--config", "configs/tiny.yaml", "--input", str(tmp_path / "in"), "--output", str(out),
               "--no-progress", "-v", f"captioner.model={cap}", f"filter.model={itm}",
               "captioner.num_captions=1", "runtime.batch_size=2", "runtime.num_workers=auto",
               "runtime.cpus_per_worker=auto", "runtime.gpus_per_worker=auto"])
    printed = capsys.readouterr().out
    assert rc == 0
    # The plan is the first line, before any shard's.
    assert printed.splitlines()[0] == "plan: 2 nodes, 2 workers (cpu), 1-4 threads each"
    assert printed.count("plan: ") == 1
    threads = {}
    for name in names(out):
        if name.endswith("_stats.json"):
            timing = json.loads((out / name).read_text())["timing"]
            threads[timing["worker_node"]] = timing["worker_threads"]
    # Two shards, two workers started before the first: one shard each, one per node,
    # each with its node's CPUs as threads (at most this machine's cores).
    assert threads == {n.node_id: min(n.cpus, machine_cores()) for n in nodes_now().values()}


def test_a_number_wins(cluster):
    nodes = nodes_now()
    head = next(n.node_id for n in nodes.values() if n.cpus == 4)
    other = next(n.node_id for n in nodes.values() if n.cpus == 1)
    listed = list(nodes.values())
    # Both set: as many workers of as many CPUs, placed by Ray as before.
    plan = plan_workers(RuntimeConfig(num_workers=2, cpus_per_worker=1), listed)
    assert slots(plan) == [("", 1, 0.0), ("", 1, 0.0)]
    assert plan.describe() == "plan: 2 nodes, 2 workers placed by Ray (cpu), 1 thread each"
    # Workers set, CPUs auto: spread over the nodes, a node's CPUs shared by its workers.
    plan = plan_workers(RuntimeConfig(num_workers=3), listed)
    assert slots(plan) == sorted([(head, 2, 0.0), (head, 2, 0.0), (other, 1, 0.0)])
    assert slots(plan_workers(RuntimeConfig(num_workers=1), listed)) == [(head, 4, 0.0)]
    # CPUs set, workers auto: as many as fit.
    assert slots(plan_workers(RuntimeConfig(cpus_per_worker=2), listed)) == [(head, 2, 0.0)] * 2
    assert Counter(s.node_id for s in plan_workers(RuntimeConfig(cpus_per_worker=1), listed).slots) == {
        head: 4, other: 1}
    # More than the cluster holds is refused, not left pending for ever.
    with pytest.raises(WorkerStartError, match=r"num_workers=6 .*room for 5"):
        plan_workers(RuntimeConfig(num_workers=6), listed)
    with pytest.raises(WorkerStartError, match="5 CPUs"):
        plan_workers(RuntimeConfig(cpus_per_worker=5), listed)
    with pytest.raises(WorkerStartError, match="no GPUs"):
        plan_workers(RuntimeConfig(device="cuda"), listed)


def reporting_step():
    """A step whose shard result says where its worker ran and which GPUs it could see:
    CUDA_VISIBLE_DEVICES is what decides ``runtime.device: auto`` in a worker."""

    class Seen:  # defined in a function so that Ray pickles it by value
        def __init__(self, worker):
            self.node, self.threads = worker["worker_node"], worker["worker_threads"]
            self.visible = os.environ.get("CUDA_VISIBLE_DEVICES")

        def counts(self):
            return {}

    class ReportingStep:
        def run(self, task, report=None, worker=None):
            return Seen(worker)

    return ReportingStep


def tasks(n):
    return [ShardTask(f"/nowhere/{i:05d}.tar", f"{i:05d}", "/nowhere/out") for i in range(n)]


def test_workers_run_on_their_planned_nodes_and_see_no_gpu(cluster):
    # Room for 5 workers of 1 CPU (4 on the head); 2 shards start the first two planned,
    # one per node. Unpinned, Ray would put both on the driver's node, the head.
    executor = RayExecutor(reporting_step(), RuntimeConfig(cpus_per_worker=1))
    seen = [r.stats for r in executor.run(tasks(2))]
    planned = [s.node_id for s in executor.plan.slots[:2]]
    assert len(set(planned)) == 2
    assert [w.node_id for w in executor.worker_infos] == planned
    assert sorted(s.node for s in seen) == sorted(planned)
    # Ray 2.60 leaves every GPU visible to a worker given none; the executor hides them.
    assert [s.visible for s in seen] == ["", ""]


def test_gpu_nodes_get_one_worker_per_gpu(gpu_cluster):
    nodes = nodes_now()
    big = next(n.node_id for n in nodes.values() if n.gpus == 2)
    small = next(n.node_id for n in nodes.values() if n.gpus == 1)
    plan = plan_workers(RuntimeConfig(), list(nodes.values()))
    # The CPU-only nodes get none; each GPU node's CPUs are shared among its GPUs.
    assert slots(plan) == sorted([(big, 3, 1.0), (big, 3, 1.0), (small, 2, 1.0)])
    assert plan.device == "cuda"
    assert plan.describe() == "plan: 4 nodes, 3 workers on 2 of them (cuda, 3 GPUs), 2-3 threads each"
    # The first workers spread over the GPU nodes.
    assert {s.node_id for s in plan.slots[:2]} == {big, small}


def test_with_gpus_a_number_still_wins(gpu_cluster):
    listed = list(nodes_now().values())
    plan = plan_workers(RuntimeConfig(gpus_per_worker=0), listed)  # CPU workers, one per node
    assert len(plan.slots) == 4 and plan.device == "cpu" and {s.gpus for s in plan.slots} == {0.0}
    assert plan_workers(RuntimeConfig(device="cpu"), listed).device == "cpu"
    plan = plan_workers(RuntimeConfig(gpus_per_worker=0.5), listed)
    assert len(plan.slots) == 6 and {s.gpus for s in plan.slots} == {0.5}
    plan = plan_workers(RuntimeConfig(num_workers=1, cpus_per_worker=4, gpus_per_worker=1), listed)
    assert slots(plan) == [("", 4, 1.0)]
    with pytest.raises(WorkerStartError, match=r"num_workers=4 .*room for 3"):
        plan_workers(RuntimeConfig(num_workers=4), listed)


def test_workers_see_the_gpus_they_are_given(gpu_cluster):
    executor = RayExecutor(reporting_step(), RuntimeConfig(shard_attempts=1))
    visible = {}
    for result in executor.run(tasks(3)):  # a worker per GPU, one shard each
        visible.setdefault(result.stats.node, []).append(result.stats.visible)
    assert {node: sorted(ids, key=str) for node, ids in visible.items()} == {
        n.node_id: [str(i) for i in range(n.gpus)] for n in nodes_now().values() if n.gpus}
