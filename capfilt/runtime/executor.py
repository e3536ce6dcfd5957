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


def worker_threads(cpus: int) -> int:
    """Torch threads for a worker of ``cpus`` Ray CPUs: never more than the cores it may run on.

    Ray's CPUs are logical, so a config written for a bigger machine (blip_large.yaml asks for
    4) can land on a smaller one; more compute threads than cores, meeting at a barrier after
    every operation, run far slower than one per core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    if cpus > cores:
        log.warning("runtime.cpus_per_worker is %d but this node has %d cores: %d torch threads",
                    cpus, cores, cores)
    return max(1, min(cpus, cores))


def configure_worker_process(cpus: int, retain_memory: bool) -> int:
    """Set up a process that runs the models as a worker does; return its torch threads."""
    import torch

    if retain_memory:
        from capfilt.runtime.memory import retain_freed_memory

        retain_freed_memory()
    torch.set_num_threads(worker_threads(cpus))
    return torch.get_num_threads()


class _Worker:
    """Ray actor body: builds the step once, then processes whole shards."""

    def __init__(self, step_factory: StepFactory, progress_name: str, cpus: int,
                 retain_memory: bool):
        import ray

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
        stats = self.step.run(task, report, worker)
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
        self._replacements = 0  # dead workers replaced in this run

    def run(self, tasks: list[ShardTask],
            on_result: Callable[[ShardResult], None] | None = None,
            on_progress: Callable[[dict[str, int]], None] | None = None) -> list[ShardResult]:
        if not tasks:
            return []
        ray = import_ray(local=self.runtime.ray_address is None)
        started_here = self._init(ray)
        interrupted = False
        try:
            return self._run(ray, tasks, on_result, on_progress)
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            if started_here:
                with _quiet_stderr() if interrupted else contextlib.nullcontext():
                    ray.shutdown()

    def _init(self, ray) -> bool:
        rt = self.runtime
        if ray.is_initialized():
            return False
        if rt.ray_address is not None:
            ray.init(address=rt.ray_address, log_to_driver=True)
        else:
            # Ray starts workers at nice 15, so that any of its daemons, or the driver, takes
            # a core from a worker at once; with the model's threads meeting at barriers, one
            # delayed thread stalls all of them. A worker here does the run's work: normal
            # priority (BENCHMARKS.md: this machine's drift hid how much that is worth).
            ray.init(address="local", num_cpus=rt.num_workers * rt.cpus_per_worker + 1,
                     include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=True, _system_config={"worker_niceness": 0})
        return True

    def _new_worker(self, ray, progress_name: str):
        rt = self.runtime
        actor_cls = ray.remote(_Worker).options(
            num_cpus=rt.cpus_per_worker, num_gpus=rt.gpus_per_worker,
            max_restarts=rt.max_restarts, max_task_retries=rt.max_task_retries,
        )
        return actor_cls.remote(self.step_factory, progress_name, rt.cpus_per_worker,
                                rt.retain_freed_memory)

    def _start(self, ray, workers: int) -> tuple[str, Any, list]:
        """The progress actor (its name and handle) and ``workers`` workers with the step built."""
        progress_name = f"capfilt-progress-{uuid.uuid4().hex}"
        # On the driver's node, which lives as long as the run; workers' nodes may not.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        progress = ray.remote(_Progress).options(
            name=progress_name, num_cpus=0, scheduling_strategy=here).remote()
        started = [self._new_worker(ray, progress_name) for _ in range(workers)]
        try:
            self.worker_infos = ray.get([w.info.remote() for w in started])
        except ray.exceptions.RayActorError as exc:
            raise WorkerStartError(f"workers failed to start: {_root_cause(exc)}") from exc
        return progress_name, progress, started

    def _run(self, ray, tasks, on_result, on_progress) -> list[ShardResult]:
        rt = self.runtime
        progress_name, progress, idle = self._start(ray, min(rt.num_workers, len(tasks)))
        run = _Run(tasks, idle, rt, on_result)
        while run.pending or run.inflight:
            run.dispatch()
            ready, _ = ray.wait(list(run.inflight), num_returns=1, timeout=0.5)
            if on_progress:
                _report_progress(ray, progress, on_progress)
            for ref in ready:
                worker, task, _ = run.inflight.pop(ref)
                result, worker = self._collect(ray, ref, worker, task, run.attempts[task], progress_name)
                if worker is not None:
                    run.idle.append(worker)
                run.settle(result)
            for ref in run.overdue():
                worker, task, _ = run.inflight.pop(ref)
                ray.kill(worker, no_restart=True)  # the one way to stop an actor's running task
                run.idle.append(self._new_worker(ray, progress_name))
                run.settle(ShardResult(task, None, f"timed out after {rt.shard_timeout:g} s "
                                       "(runtime.shard_timeout)", run.attempts[task]))
            if run.pending and not run.idle and not run.inflight:  # every worker died for good
                run.give_up(f"no worker left: workers kept dying and the {self._replacements} replacements "
                            "allowed (runtime.num_workers x runtime.max_restarts) are spent")
        if on_progress:
            _report_progress(ray, progress, on_progress)
        return run.results

    def _collect(self, ray, ref, worker, task: ShardTask, attempt: int,
                 progress_name: str) -> tuple[ShardResult, Any]:
        """A finished task's result, and the worker to give the next task: a new one if it died
        and replacements are left, else None (a dead worker is never given another task)."""
        rt = self.runtime
        try:
            return ShardResult(task, ray.get(ref), attempts=attempt), worker
        except ray.exceptions.RayActorError as exc:
            worker = None
            if self._replacements < rt.num_workers * max(1, rt.max_restarts):
                self._replacements += 1
                worker = self._new_worker(ray, progress_name)
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
        self.results: list[ShardResult] = []
        self.runtime, self.on_result = runtime, on_result

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
