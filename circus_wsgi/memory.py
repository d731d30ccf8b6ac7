"""glibc malloc tuning for processes that move large bodies.

By default glibc serves an allocation over 128 KiB with its own mmap and
returns it with munmap when freed (and trims the heap top eagerly), so every
large body a worker or the dispatcher handles costs fresh page faults: measured
here, a third of the 1 MB upload-echo throughput. Keeping blocks up to
:data:`MMAP_THRESHOLD` in the heap and trimming only past
:data:`TRIM_THRESHOLD` reuses the memory instead; the price is that much
memory kept after a burst. :data:`ARENA_MAX` keeps every thread on that one heap.

:func:`tune_malloc` applies this to the running Python process;
:func:`glibc_tunables` gives the same tuning as the ``GLIBC_TUNABLES`` value for
mongrel2, a C program, which circus.ini starts with it.
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: Allocations smaller than this come from the heap (glibc M_MMAP_THRESHOLD).
MMAP_THRESHOLD = 8 * 1024 * 1024
#: Free memory at the heap top kept before it is returned (glibc M_TRIM_THRESHOLD).
TRIM_THRESHOLD = 32 * 1024 * 1024
#: One arena (glibc M_ARENA_MAX): a thread's own arena (libzmq's I/O thread) is a
#: second heap to fault in and trim.
ARENA_MAX = 1

#: (mallopt parameter, GLIBC_TUNABLES name, value) of each setting.
_TUNING = (
    (-8, "glibc.malloc.arena_max", ARENA_MAX),
    (-3, "glibc.malloc.mmap_threshold", MMAP_THRESHOLD),
    (-1, "glibc.malloc.trim_threshold", TRIM_THRESHOLD),
)


def tune_malloc() -> bool:
    """Apply the settings; False where the C library is not glibc (or refused one).

    Call it before any thread starts: a thread that has allocated keeps its arena.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    applied = [bool(mallopt(parameter, value)) for parameter, _, value in _TUNING]
    return all(applied)


def glibc_tunables() -> str:
    """The settings as a ``GLIBC_TUNABLES`` value (glibc reads it when a program starts)."""
    return ":".join(f"{name}={value}" for _, name, value in _TUNING)
