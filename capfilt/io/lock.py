"""One run at a time in an output folder, and a killed run never blocks the next.

Locally, the lock is an OS lock (``flock``) on ``.capfilt.lock`` in the folder: the kernel drops
it when the process dies, however it dies. An object store has no such lock, so there the file
is a lease: the holder rewrites it every third of ``LEASE_SECONDS``, and a lease not renewed in
time (its holder SIGKILLed, its node gone) expires. Either way the file says who holds it (host,
pid, start time), so a second run is refused naming the first.

Hand-written: neither fsspec nor the object stores' Python clients offer a lock or a lease.
A store without conditional writes cannot make two runs started in the same instant exclusive;
reading the lease back after a pause narrows that window to the pause.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from capfilt.io.fs import OutputDir
from capfilt.io.layout import LOCK_FILE

log = logging.getLogger(__name__)

LEASE_SECONDS = 60.0
LEASE_SETTLE_SECONDS = 1.0  # between writing a lease and reading it back


class OutputLocked(RuntimeError):
    """Another run holds the output folder."""


@contextlib.contextmanager
def hold(out: OutputDir, command: str, lease_seconds: float = LEASE_SECONDS) -> Iterator[None]:
    """Hold ``out`` for the duration, or raise ``OutputLocked`` naming the holder."""
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "command": command,
              "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    local = out.local_path()
    if local is not None:
        with _flock(out, local, holder):
            yield
    else:
        with _lease(out, holder, lease_seconds):
            yield


def describe(holder: dict[str, Any]) -> str:
    return (f"{holder.get('command', 'capfilt')} on host {holder.get('host')}, pid {holder.get('pid')}, "
            f"started {holder.get('started_at')}")


@contextlib.contextmanager
def _flock(out: OutputDir, folder: str, holder: dict[str, Any]) -> Iterator[None]:
    import fcntl

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLocked(f"{out.url} is in use by another run ({describe(_holder_of(fd))}); "
                               "wait for it to end, or stop it") from None
        # Not removed at the end: another process may already have it open to lock.
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(fd)  # the kernel drops the lock with the last descriptor


def _holder_of(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except ValueError:
        return {}


@contextlib.contextmanager
def _lease(out: OutputDir, holder: dict[str, Any], lease_seconds: float) -> Iterator[None]:
    token = uuid.uuid4().hex
    current = _read_lease(out)
    if current is not None and current.get("expires_at", 0) > time.time():
        _refuse(out, current)
    _write_lease(out, holder, token, lease_seconds)
    time.sleep(LEASE_SETTLE_SECONDS)
    current = _read_lease(out)
    if current is None or current.get("token") != token:  # another run wrote one at the same time
        _refuse(out, current or {})
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease_seconds / 3):
            try:
                _write_lease(out, holder, token, lease_seconds)
            except Exception as exc:  # the next renewal may get through before it expires
                log.warning("%s: could not renew the lease on the output: %s", out.url, exc)

    thread = threading.Thread(target=renew, name="capfilt-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if (_read_lease(out) or {}).get("token") == token:
            out.remove(LOCK_FILE)


def _refuse(out: OutputDir, current: dict[str, Any]) -> None:
    left = max(0.0, current.get("expires_at", 0) - time.time())
    raise OutputLocked(f"{out.url} is in use by another run ({describe(current)}; its lease expires "
                       f"in {left:.0f} s unless renewed); wait for it to end, or stop it")


def _read_lease(out: OutputDir) -> dict[str, Any] | None:
    if not out.exists(LOCK_FILE):
        return None
    try:
        lease = json.loads(out.read_text(LOCK_FILE))
    except ValueError:
        return None  # cut short: nobody holds it
    return lease if isinstance(lease, dict) else None


def _write_lease(out: OutputDir, holder: dict[str, Any], token: str, lease_seconds: float) -> None:
    lease = {**holder, "token": token, "expires_at": time.time() + lease_seconds}
    out.write_bytes(LOCK_FILE, json.dumps(lease).encode())
