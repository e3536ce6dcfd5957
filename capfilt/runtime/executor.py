"""Run a step over shards with Ray actors, each holding the step (its models) loaded once.

The executor knows nothing of what the step does: it needs a picklable factory
returning an object with ``run(task, report, worker)`` and, optionally,
``revisions() -> dict``; what ``run`` returns must have ``counts() -> dict[str, int]``
(the shard's final counts, for the progress totals). A shard is the unit of work and of retry.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from capfilt.config import RuntimeConfig
from capfilt.models.loading import poisons_device
from capfilt.redaction import redact_text
from capfilt.runtime.shards import ShardTask

log = logging.getLogger(__name__)

StepFactory = Callable[[], Any]


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null for a moment. After Ctrl-C, Ray's core logs its own
    teardown straight to fd 2 (``task_manager.cc: Failed to push error to driver`` for the
    tasks its shutdown ends): noise around the one line the user is owed."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class WorkerStartError(RuntimeError):
    """The workers could not build the step (a model that does not load, a bad device)."""


@dataclass
class ShardResult:
    task: ShardTask
    stats: Any  # what the step's run returned; None when the shard failed
    error: str | None = None
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class WorkerInfo:
    pid: int
    node_id: str
    details: dict[str, Any] = field(default_factory=dict)


def import_ray(local: bool):
    """Import ray; for the embedded local instance, keep it on 127.0.0.1 (read at import)."""
    if local:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - install hint
        raise ImportError("capfilt needs ray: pip install 'ray>=2.60'") from exc
    return ray


def machine_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_threads(cpus: int) -> int:
    """Torch threads for a worker of ``cpus`` Ray CPUs: never more than the cores it may run on.

    Ray's CPUs are logical, so a config written for a bigger machine, or a node that declares
    more CPUs than it has, can put a worker on fewer cores; more compute threads than cores,
    meeting at a barrier after every operation, run far slower than one per core."""
    cores = machine_cores()
    if cpus > cores:
        log.warning("a worker of %d Ray CPUs on a node of %d cores: %d torch threads", cpus, cores, cores)
    return max(1, min(cpus, cores))


@dataclass(frozen=True)
class NodeResources:
    """What a node offers the run: Ray's CPUs and GPUs on it. ``node_id`` None: the local
    instance capfilt is about to start."""

    node_id: str | None
    cpus: int
    gpus: int


@dataclass(frozen=True)
class Slot:
    """One worker's place: its node (None: wherever Ray puts it), its Ray CPUs (its torch
    threads) and its GPUs."""

    node_id: str | None
    cpus: int
    gpus: float


@dataclass(frozen=True)
class Plan:
    """The workers a run starts, in the order it starts them (spread over the nodes)."""

    nodes: int  # in the cluster
    slots: tuple[Slot, ...]
    device: str  # what a worker runs its models on: cpu or cuda

    def describe(self) -> str:
        """One line for the user, e.g. ``plan: 3 nodes, 3 workers (cpu), 8 threads each``."""
        used = {s.node_id for s in self.slots}
        if None in used:
            where = " placed by Ray" if self.nodes > 1 else ""
        else:
            where = f" on {len(used)} of them" if len(used) < self.nodes else ""
        gpus = sum(s.gpus for s in self.slots)
        devices = f"{self.device}, {gpus:g} GPU{'' if gpus == 1 else 's'}" if gpus else self.device
        threads = sorted({s.cpus for s in self.slots})
        each = f"{threads[0]}" if len(threads) == 1 else f"{threads[0]}-{threads[-1]}"
        workers = _count(len(self.slots), "worker")
        return (f"plan: {_count(self.nodes, 'node')}, {workers}{where} ({devices}), "
                f"{each} thread{'' if threads == [1] else 's'} each")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def plan_workers(rt: RuntimeConfig, nodes: list[NodeResources]) -> Plan:
    """The workers for ``rt`` on ``nodes``; ``auto`` values are worked out from the nodes.

    With GPUs (and ``runtime.device`` not cpu), one worker per ``gpus_per_worker`` GPUs (1
    unless set) on each GPU node, that node's CPUs shared among its workers; else one worker per
    node with all its CPUs, or as many of ``cpus_per_worker`` as fit when that is set. A set
    ``num_workers`` is spread over the nodes, the biggest first. Each worker is pinned to its
    node; with both ``num_workers`` and ``cpus_per_worker`` set, Ray places them, as it always
    did."""
    gpus = _gpus_per_worker(rt, nodes)
    device = "cpu" if rt.device == "cpu" or not gpus else "cuda"
    if isinstance(rt.num_workers, int) and isinstance(rt.cpus_per_worker, int):
        if not any(n.cpus >= rt.cpus_per_worker and n.gpus >= gpus for n in nodes):
            raise WorkerStartError(_no_room(rt, nodes, gpus, 0))
        return Plan(len(nodes), (Slot(None, rt.cpus_per_worker, gpus),) * rt.num_workers, device)
    nodes = sorted(nodes, key=lambda n: (n.gpus, n.cpus), reverse=True)  # the biggest first
    counts = _workers_per_node(rt, nodes, gpus)
    slots: list[Slot] = []
    for rank in range(max(counts, default=0)):  # round robin: the first workers spread out
        slots += [Slot(n.node_id, _cpus_per_worker(rt, n, c), gpus)
                  for n, c in zip(nodes, counts) if rank < c]
    return Plan(len(nodes), tuple(slots), device)


def _gpus_per_worker(rt: RuntimeConfig, nodes: list[NodeResources]) -> float:
    has_gpus = any(n.gpus for n in nodes)
    if rt.gpus_per_worker == "auto":
        gpus = 1.0 if has_gpus and rt.device != "cpu" else 0.0
    else:
        gpus = rt.gpus_per_worker
    if rt.device == "cuda" and not gpus:
        why = "runtime.gpus_per_worker is 0" if has_gpus else "the cluster has no GPUs"
        raise WorkerStartError(f"runtime.device is cuda but {why}")
    return gpus


def _workers_per_node(rt: RuntimeConfig, nodes: list[NodeResources], gpus: float) -> list[int]:
    """How many workers each node gets: as many as fit for ``auto`` (one per node when each
    takes all the CPUs), else ``num_workers`` dealt round the nodes with room."""
    least_cpus = 1 if rt.cpus_per_worker == "auto" else rt.cpus_per_worker
    room = [n.cpus // least_cpus for n in nodes]
    if gpus:
        room = [min(r, int(n.gpus / gpus + 1e-9)) for r, n in zip(room, nodes)]
    if rt.num_workers == "auto":
        counts = room if gpus or rt.cpus_per_worker != "auto" else [min(1, r) for r in room]
        wanted = 1
    else:
        counts, wanted = [0] * len(nodes), rt.num_workers
        free = [i for i in range(len(nodes)) if room[i]]
        while free and sum(counts) < wanted:
            i = min(free, key=lambda i: counts[i])  # the first of the nodes with fewest so far
            counts[i] += 1
            free = [i for i in free if counts[i] < room[i]]
    if sum(counts) < wanted:
        raise WorkerStartError(_no_room(rt, nodes, gpus, sum(room)))
    return counts


def _cpus_per_worker(rt: RuntimeConfig, node: NodeResources, workers: int) -> int:
    return rt.cpus_per_worker if rt.cpus_per_worker != "auto" else node.cpus // workers


def _no_room(rt: RuntimeConfig, nodes: list[NodeResources], gpus: float, room: int) -> str:
    want = "a worker" if rt.num_workers == "auto" else f"runtime.num_workers={rt.num_workers} workers"
    cpus = 1 if rt.cpus_per_worker == "auto" else rt.cpus_per_worker
    each = _count(cpus, "CPU") + (f" and {gpus:g} GPU{'' if gpus == 1 else 's'}" if gpus else "")
    offered = "; ".join(f"{_count(n.cpus, 'CPU')}, {_count(n.gpus, 'GPU')}" for n in nodes) or "none"
    return (f"no room for {want} of {each} (room for {room}); the cluster's nodes: {offered} "
            "(runtime.num_workers, cpus_per_worker, gpus_per_worker)")


def cluster_nodes(ray) -> list[NodeResources]:
    """The alive nodes of the cluster Ray is connected to, with their CPUs and GPUs."""
    return [NodeResources(n["NodeID"], int(n["Resources"].get("CPU", 0)), int(n["Resources"].get("GPU", 0)))
            for n in ray.nodes() if n.get("Alive")]


def local_node(rt: RuntimeConfig) -> NodeResources:
    """The machine, as the local instance capfilt starts will offer it: its cores (or more, for
    set numbers that ask for more) and the GPUs torch sees."""
    gpus = 0
    if rt.device != "cpu":
        import torch

        gpus = torch.cuda.device_count()
    asked = ((rt.num_workers if rt.num_workers != "auto" else 1)
             * (rt.cpus_per_worker if rt.cpus_per_worker != "auto" else 1))
    return NodeResources(None, max(machine_cores(), asked), gpus)


def configure_worker_process(cpus: int, retain_memory: bool) -> int:
    """Set up a process that runs the models as a worker does; return its torch threads."""
    import torch

    if retain_memory:
        from capfilt.runtime.memory import retain_freed_memory

        retain_freed_memory()
    torch.set_num_threads(worker_threads(cpus))
    return torch.get_num_threads()


DEVICE_POISONED_EXIT = 75  # EX_TEMPFAIL: a fresh process may succeed


class _Worker:
    """Ray actor body: builds the step once, then processes whole shards."""

    def __init__(self, step_factory: StepFactory, progress_name: str, cpus: int,
                 retain_memory: bool, gpus: float = 0.0):
        import ray

        if not gpus:  # Ray 2.60 leaves a worker without GPUs seeing all of them: device auto is cpu
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        self.threads = configure_worker_process(cpus, retain_memory)
        self.step = step_factory()
        # Looked up by name: an actor handle as a constructor argument would pin it
        # in the object store, which actor restarts then depend on.
        self.progress = ray.get_actor(progress_name)

    def info(self) -> WorkerInfo:
        import ray

        revisions = getattr(self.step, "revisions", None)
        return WorkerInfo(os.getpid(), ray.get_runtime_context().get_node_id(),
                          revisions() if revisions else {})

    def process(self, task: ShardTask) -> Any:
        last = [0.0]

        def report(counts: dict[str, int]) -> None:
            now = time.monotonic()
            if now - last[0] >= 0.5:
                last[0] = now
                self.progress.update.remote(task.name, counts)

        import ray

        worker = {"worker_pid": os.getpid(), "worker_node": ray.get_runtime_context().get_node_id(),
                  "worker_threads": self.threads}
        try:
            stats = self.step.run(task, report, worker)
        except Exception as exc:
            if poisons_device(exc):
                # A CUDA error leaves this process's CUDA context unusable: every later shard
                # would fail on it. Die, so that Ray (or the run) replaces the worker and the
                # shard is tried again on a fresh process.
                log.error("shard %s: %s: the worker's CUDA context is unusable; the worker exits",
                          task.name, redact_text(f"{type(exc).__name__}: {exc}"))
                os._exit(DEVICE_POISONED_EXIT)
            raise
        self.progress.update.remote(task.name, stats.counts())
        return stats


class _Progress:
    """Ray actor: the latest counts of every shard, from any node."""

    def __init__(self):
        self.shards: dict[str, dict[str, int]] = {}

    def update(self, shard: str, counts: dict[str, int]) -> None:
        self.shards[shard] = counts

    def totals(self) -> dict[str, int]:
        total: Counter = Counter()
        for counts in self.shards.values():
            total.update(counts)
        return dict(total)


class RayExecutor:
    def __init__(self, step_factory: StepFactory, runtime: RuntimeConfig):
        self.step_factory = step_factory
        self.runtime = runtime
        self.worker_infos: list[WorkerInfo] = []
        self.plan: Plan | None = None  # set when the run starts
        self._replacements = 0  # dead workers replaced in this run
        self._slots: dict[Any, Slot] = {}  # each worker's slot, for its replacement

    def run(self, tasks: list[ShardTask],
            on_result: Callable[[ShardResult], None] | None = None,
            on_progress: Callable[[dict[str, int]], None] | None = None,
            on_plan: Callable[[str], None] | None = None) -> list[ShardResult]:
        """Process ``tasks``; ``on_plan`` gets the plan's one line before any shard starts
        (else it is logged at INFO)."""
        if not tasks:
            return []
        ray = import_ray(local=self.runtime.ray_address is None)
        self.plan = None
        started_here = self._init(ray)  # plans a local instance before it starts it
        interrupted = False
        try:
            if self.plan is None:
                self.plan = plan_workers(self.runtime, cluster_nodes(ray))
            (on_plan or log.info)(self.plan.describe())
            return self._run(ray, tasks, on_result, on_progress)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            if started_here:
                with _quiet_stderr() if interrupted else contextlib.nullcontext():
                    ray.shutdown()

    def _init(self, ray) -> bool:
        """Connect to Ray, or start a local instance sized for the plan; whether Ray was
        started here (and so is to be shut down)."""
        rt = self.runtime
        if ray.is_initialized():
            return False
        if rt.ray_address is not None:
            ray.init(address=rt.ray_address, log_to_driver=True)
            return True
        machine = local_node(rt)
        self.plan = plan_workers(rt, [machine])  # before Ray starts: a plan that cannot be, at once
        # Room for one worker more than the plan (a replacement starts while the worker it
        # replaces is still being killed); the cores, when there are more.
        planned = [s.cpus for s in self.plan.slots]
        cpus = max(machine.cpus, sum(planned) + max(planned))
        # Ray starts workers at nice 15, so that any of its daemons, or the driver, takes
        # a core from a worker at once; with the model's threads meeting at barriers, one
        # delayed thread stalls all of them. A worker here does the run's work: normal
        # priority (BENCHMARKS.md: this machine's drift hid how much that is worth).
        ray.init(address="local", num_cpus=cpus, num_gpus=machine.gpus,
                 include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=True, _system_config={"worker_niceness": 0})
        return True

    def _new_worker(self, ray, progress_name: str, slot: Slot):
        """A worker in ``slot``, pinned to its node when the plan names one."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        rt = self.runtime
        pinned = {} if slot.node_id is None else {
            "scheduling_strategy": NodeAffinitySchedulingStrategy(slot.node_id, soft=False)}
        actor_cls = ray.remote(_Worker).options(
            num_cpus=slot.cpus, num_gpus=slot.gpus,
            max_restarts=rt.max_restarts, max_task_retries=rt.max_task_retries, **pinned,
        )
        worker = actor_cls.remote(self.step_factory, progress_name, slot.cpus,
                                  rt.retain_freed_memory, slot.gpus)
        self._slots[worker] = slot
        return worker

    def _replace(self, ray, worker, progress_name: str):
        """A new worker in the slot of ``worker``, gone; None when its node is gone too (a
        worker pinned there could never start: the run goes on with the others)."""
        slot = self._slots.pop(worker)
        if slot.node_id is not None and slot.node_id not in {n.node_id for n in cluster_nodes(ray)}:
            log.warning("node %s is gone: its worker is not replaced", slot.node_id)
            return None
        return self._new_worker(ray, progress_name, slot)

    def _start(self, ray, slots: tuple[Slot, ...]) -> tuple[str, Any, list]:
        """The progress actor (its name and handle) and a worker in each slot, the step built."""
        progress_name = f"capfilt-progress-{uuid.uuid4().hex}"
        # On the driver's node, which lives as long as the run; workers' nodes may not.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        progress = ray.remote(_Progress).options(
            name=progress_name, num_cpus=0, scheduling_strategy=here).remote()
        started = [self._new_worker(ray, progress_name, slot) for slot in slots]
        try:
            self.worker_infos = ray.get([w.info.remote() for w in started])
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError) as exc:
            raise WorkerStartError(f"workers failed to start: {_root_cause(exc)}") from exc
        return progress_name, progress, started

    def _run(self, ray, tasks, on_result, on_progress) -> list[ShardResult]:
        progress_name, progress, idle = self._start(ray, self.plan.slots[:len(tasks)])
        run = _Run(tasks, idle, self.runtime, on_result)
        while run.pending or run.inflight:
            run.dispatch()
            ready, _ = ray.wait(list(run.inflight) + list(run.starting), num_returns=1, timeout=0.5)
            if on_progress:
                _report_progress(ray, progress, on_progress)
            for ref in ready:
                if ref in run.starting:
                    self._started(ray, run, ref, progress_name)
                    continue
                worker, task, _ = run.inflight.pop(ref)
                result, next_worker = self._collect(ray, ref, worker, task, run.attempts[task], progress_name)
                if next_worker is worker:
                    run.idle.append(worker)
                elif next_worker is not None:
                    run.start(next_worker)
                run.settle(result)
            self._abandon_overdue(ray, run, progress_name)
            if run.pending and not (run.idle or run.inflight or run.starting):  # every worker died for good
                run.give_up(f"no worker left: workers kept dying and the {self._replacements} replacements "
                            "allowed (runtime.num_workers x runtime.max_restarts) are spent")
        if on_progress:
            _report_progress(ray, progress, on_progress)
        return run.results

    def _abandon_overdue(self, ray, run: "_Run", progress_name: str) -> None:
        """Kill the worker of each shard past ``runtime.shard_timeout``, start its replacement."""
        for ref in run.overdue():
            worker, task, _ = run.inflight.pop(ref)
            ray.kill(worker, no_restart=True)  # the one way to stop an actor's running task
            replacement = self._replace(ray, worker, progress_name)
            if replacement is not None:
                run.start(replacement)
            run.settle(ShardResult(task, None, f"timed out after {self.runtime.shard_timeout:g} s "
                                   "(runtime.shard_timeout)", run.attempts[task]))

    def _started(self, ray, run: "_Run", ref, progress_name: str) -> None:
        """A replacement worker has built its step: it is idle. One that died starting is
        replaced in turn while replacements are left."""
        worker = run.starting.pop(ref)
        try:
            ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError) as exc:
            log.warning("a replacement worker did not start: %s", _root_cause(exc))
            if self._replacements < len(self.plan.slots) * max(1, self.runtime.max_restarts):
                self._replacements += 1
                worker = self._replace(ray, worker, progress_name)
                if worker is not None:
                    run.start(worker)
            return
        run.idle.append(worker)

    def _collect(self, ray, ref, worker, task: ShardTask, attempt: int,
                 progress_name: str) -> tuple[ShardResult, Any]:
        """A finished task's result, and the worker to give the next task: a new one if it died
        and replacements are left, else None (a dead worker is never given another task)."""
        rt = self.runtime
        try:
            return ShardResult(task, ray.get(ref), attempts=attempt), worker
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError) as exc:
            # Unschedulable: a pinned worker whose node is gone, which Ray cannot restart there.
            dead, worker = worker, None
            if self._replacements < len(self.plan.slots) * max(1, rt.max_restarts):
                self._replacements += 1
                worker = self._replace(ray, dead, progress_name)
            return ShardResult(task, None, redact_text(f"worker died: {exc}"), attempt), worker
        except ray.exceptions.RayTaskError as exc:
            return ShardResult(task, None, redact_text(_task_error(exc)), attempt), worker


class _Run:
    """One run's bookkeeping: shards waiting, in flight (since when), settled; idle workers."""

    def __init__(self, tasks: list[ShardTask], idle: list, runtime: RuntimeConfig,
                 on_result: Callable[[ShardResult], None] | None):
        self.pending = deque(tasks)
        self.attempts: Counter = Counter()
        self.inflight: dict[Any, tuple[Any, ShardTask, float]] = {}  # ref -> worker, task, start
        self.idle = idle
        # Replacement workers still building their step (ref of their info() -> worker): a
        # shard's clock starts when its worker is ready, not while a process starts.
        self.starting: dict[Any, Any] = {}
        self.results: list[ShardResult] = []
        self.runtime, self.on_result = runtime, on_result

    def start(self, worker) -> None:
        self.starting[worker.info.remote()] = worker

    def dispatch(self) -> None:
        while self.idle and self.pending:
            worker, task = self.idle.pop(), self.pending.popleft()
            self.attempts[task] += 1
            self.inflight[worker.process.remote(task)] = (worker, task, time.monotonic())

    def settle(self, result: ShardResult) -> None:
        """Retry a failed shard while attempts are left; else it is a result."""
        task = result.task
        if not result.ok and self.attempts[task] < self.runtime.shard_attempts:
            log.warning("shard %s failed (attempt %d), retrying: %s", task.name, self.attempts[task], result.error)
            self.pending.append(task)
            return
        self._report(result)

    def _report(self, result: ShardResult) -> None:
        self.results.append(result)
        if self.on_result:
            self.on_result(result)

    def overdue(self) -> list:
        """Tasks in flight for longer than ``runtime.shard_timeout``."""
        limit = self.runtime.shard_timeout
        now = time.monotonic()
        return [] if limit is None else [ref for ref, (_, _, start) in self.inflight.items() if now - start > limit]

    def give_up(self, reason: str) -> None:
        log.error("%s; %d shards not processed", reason, len(self.pending))
        while self.pending:
            task = self.pending.popleft()
            self._report(ShardResult(task, None, reason, self.attempts[task]))


def _report_progress(ray, progress, on_progress) -> None:
    try:
        on_progress(ray.get(progress.totals.remote(), timeout=5))
    except (ray.exceptions.RayError, TimeoutError) as exc:  # progress is cosmetic
        log.debug("no progress update: %s", exc)


def _root_cause(exc: BaseException) -> str:
    """The last line of the innermost error, which says what went wrong."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _task_error(exc) -> str:
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return str(exc).strip().splitlines()[-1]
