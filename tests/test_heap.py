"""The heap tuning of animfs.heap, in a process of its own (it changes malloc for good)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from animfs import heap

# Prints the resident set (bytes) at each step: before, with blocks of the main thread's
# heap faulted in and freed in turn by another thread (the most seen meanwhile), once it
# is done, and after a new block of half their size is allocated (on the main thread)
# and written to.
PROBE = """
import mmap, threading
from animfs import heap
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * mmap.PAGESIZE
n = 96 << 20
assert heap.keep_freed_buffers() and heap.keep_at_least(n)
before = rss()
blocks = heap.Blocks(n // (4 << 20), 4 << 20)  # as the mount does
assert len(blocks) == n // (4 << 20) and rss() - before < n // 10  # not written to yet
held = []  # the resident set as each block is written to and freed
thread = threading.Thread(target=blocks.fault_in, args=(lambda: held.append(rss()),))
thread.start()
thread.join()
held = max(held)
freed = rss()
assert not len(blocks)
again = bytearray(n // 2)
again[:: mmap.PAGESIZE] = b"x" * (n // 2 // mmap.PAGESIZE)
print(before, held, freed, rss())
"""


def test_faulted_pages_stay_mapped_for_the_next_allocations() -> None:
    if not heap.keep_freed_buffers():
        pytest.skip("no glibc mallopt here")
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    before, held, freed, reused = map(int, out.split())
    n = 96 << 20
    assert held - before >= n * 0.95  # every page of the block was written: mapped
    assert freed - before >= n * 0.95  # freed, but kept in the heap
    assert reused - freed < n * 0.05  # the next allocation takes those pages, no new ones


def test_keep_at_least_caps_what_mallopt_takes() -> None:
    if not heap.keep_freed_buffers():
        pytest.skip("no glibc mallopt here")
    assert heap.keep_at_least(1 << 40)  # an int for mallopt, not an overflow
    assert heap.keep_at_least(0)


def test_at_most_half_the_available_memory_is_faulted_in() -> None:
    available = heap.available_bytes()
    total = int(open("/proc/meminfo").readline().split()[1]) * 1024  # MemTotal
    assert available is not None and 0 < available <= total
    assert heap.to_fault_in(1 << 20) == 1 << 20
    assert heap.to_fault_in(total * 4) <= available // 2 + (64 << 20)  # it moves a little
