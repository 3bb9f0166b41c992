"""Keep the C heap's freed chunk buffers for reuse instead of handing them back.

Every chunk read or written passes through buffers of about 4 MiB: the
decompressed chunk, the compressed one, a file's bytes.  glibc gives a block
that large its own fresh mapping (or trims it off the top of the heap when it
is freed), so the next one costs 1,024 page faults and the zeroing of 4 MiB:
measured here, that halves zstd's decompression speed (570 MB/s of CPU time
against 870 with the buffers reused) and makes the un-shuffle of a shuffled
chunk three times slower.  Raising the mapping and trim thresholds above a
chunk's size keeps freed buffers in the heap, where the next chunk reuses them.

The mount also faults in the pages of its memory LRU after mounting, in a
thread of its own at the lowest priority (:class:`Blocks`,
:func:`keep_at_least`): filled for the first time, the LRU would otherwise take
every chunk's pages fresh from the kernel on the trio thread, which answers
every request.  Measured on a warm read of 524 MB of cached chunks through a
fresh mount, the page faults of those copies were a sixth of that thread's
time.  A mount that has run a while reuses the pages of the chunks its LRU
dropped, and this makes a new one start the same way.

The price is that the process holds on to its peak heap instead of returning
it, in each of glibc's arenas: it makes one per thread that finds the others
busy, up to 8 per core, and the mount runs a few dozen threads.  So the arenas
are capped at one per core (at least 2): under 16 readers with an 8 MiB memory
LRU the mount's peak RSS is then 160 MiB, against 211 MiB with glibc's defaults
and 433 MiB with the thresholds raised alone.  The memory LRU and read-ahead
bound what the mount holds, and ingest's look-ahead bounds its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # from glibc's <malloc.h>
THRESHOLD = 64 << 20  # the most glibc takes for M_MMAP_THRESHOLD on 64-bit, and 16 chunks
INT_MAX = (1 << 31) - 1  # mallopt takes an int


def keep_freed_buffers() -> bool:
    """Tune glibc's malloc as the module docstring says; False where there is no glibc."""
    return _mallopt(
        (M_ARENA_MAX, max(2, os.cpu_count() or 1)),
        (M_MMAP_THRESHOLD, THRESHOLD),
        (M_TRIM_THRESHOLD, THRESHOLD),
    )


def keep_at_least(nbytes: int) -> bool:
    """Keep up to ``nbytes`` more of freed heap than :func:`keep_freed_buffers` does
    (the pages :class:`Blocks` leave behind when freed); False without glibc."""
    return _mallopt((M_TRIM_THRESHOLD, min(THRESHOLD + nbytes, INT_MAX)))


class Blocks:
    """Blocks of the calling thread's heap, to be faulted in by another thread.

    Made on the thread whose heap they belong to (glibc gives each thread an arena;
    the trio thread's is where the mount's chunks are copied), all at once, so that
    none takes the place of another; then :meth:`fault_in` writes to each in turn
    and frees it (a block goes back to the arena it came from), from another thread
    that can run at a low priority: the page faults cost the thread that made them
    nothing.  Freed, under a trim threshold raised by :func:`keep_at_least`, a
    block's pages stay mapped, and the heap's next allocations take them (best fit)
    without a fault, also while the blocks after it are still being written to: a
    read started right after mounting fills the LRU from them, not from fresh heap
    on top of them."""

    def __init__(self, count: int, size: int) -> None:
        """``count`` blocks of ``size`` bytes each (under :data:`THRESHOLD`: not a
        mapping of its own), none written to yet; empty where there is no glibc."""
        self.size = size
        self._libc = _libc()
        self._addresses: list[int] = []
        if self._libc is not None:
            self._addresses = [a for a in (self._libc.malloc(size) for _ in range(count)) if a]

    def __len__(self) -> int:
        return len(self._addresses)

    def fault_in(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Write to every page of each block (ctypes lets go of the GIL meanwhile) and
        free it; once ``stop()`` says so, free the rest as they are."""
        while self._addresses:
            address = self._addresses.pop(0)
            if not stop():
                ctypes.memset(address, 0, self.size)
            assert self._libc is not None  # (it made the blocks)
            self._libc.free(address)


def to_fault_in(nbytes: int) -> int:
    """How much of ``nbytes`` to fault in now: at most half the memory available (an LRU
    configured larger than the machine can hold must not make mounting take it all)."""
    available = available_bytes()
    return nbytes if available is None else min(nbytes, available // 2)


def available_bytes() -> int | None:
    """The memory the kernel reckons it can give without swapping (MemAvailable), or
    None where /proc/meminfo does not say."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, with the signatures of what is called here; None without one."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]
    except (OSError, AttributeError):  # no C library, or not glibc's functions
        return None
    return libc


def _mallopt(*settings: tuple[int, int]) -> bool:
    libc = _libc()
    return libc is not None and all(libc.mallopt(option, value) for option, value in settings)
