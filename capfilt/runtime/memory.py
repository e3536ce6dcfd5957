"""Keep freed memory in the process for reuse, instead of handing it back to the OS.

A BLIP-base batch allocates activations of tens of megabytes per layer (16 images x 577
tokens x 3072 x 4 bytes is 113 MB). glibc serves every block over its mmap threshold
(at most 32 MB) with a fresh ``mmap`` and returns it with ``munmap`` when freed, so every
layer of every batch page-faults its activations in again and the kernel zeroes them:
on the 2-core benchmark machine that was 3-6 s of system time per 16 BLIP-base images, and
up to 7% of the wall time (BENCHMARKS.md). With mmap off and the heap never trimmed, a
freed block is reused by the next layer and the next batch.

The cost is that the worker's resident memory stays at its peak, which a worker holding
its models for the whole run reaches within its first batch anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4


def retain_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse; False where that is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl and macOS have no such mallopt options
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("not glibc: leaving the allocator as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = all([
        mallopt(_M_MMAP_MAX, 0),  # large blocks from the heap, which is reused...
        mallopt(_M_TRIM_THRESHOLD, 2**31 - 1),  # ...and never given back while running
        mallopt(_M_TOP_PAD, 256 << 20),  # and grown in steps of 256 MB, not one page
    ])
    return ok
