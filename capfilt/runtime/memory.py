"""Keep freed memory in the process for reuse, instead of handing it back to the OS.

A BLIP-base batch allocates activations of tens of megabytes per layer (16 images x 577
tokens x 3072 x 4 bytes is 113 MB). glibc serves every block over its mmap threshold
(at most 32 MB) with a fresh ``mmap`` and returns it with ``munmap`` when freed, so every
layer of every batch page-faults its activations in again and the kernel zeroes them:
on the 2-core benchmark machine that was 3-6 s of system time per 16 BLIP-base images, and
up to 7% of the wall time (BENCHMARKS.md). With mmap off and the heap never trimmed, a
freed block is reused by the next layer and the next batch.

What it costs, and why a worker can afford it:
- the setting is process-wide: Ray's own code and the decode threads keep their freed
  memory too, and a block too big for a thread's arena (about 64 MB) comes from the main
  heap, under its lock (the models run on one thread, so that is the usual case anyway);
- resident memory becomes a high-water mark: it does not fall after a batch, and rises
  only when a batch needs more than any before (longer texts or captions, a bigger batch)
  or when freed holes fit no new block. Over six BLIP-base batches it stayed flat.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4


def retain_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse; False where that is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl and macOS have no such mallopt options
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("not glibc: freed memory goes back to the OS as the allocator decides")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all([
        mallopt(_M_MMAP_MAX, 0),  # large blocks from the heap, which is reused...
        mallopt(_M_TRIM_THRESHOLD, 2**31 - 1),  # ...and never given back while running
        mallopt(_M_TOP_PAD, 256 << 20),  # and grown in steps of 256 MB, not one page
    ])
