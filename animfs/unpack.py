"""Chunks opened in processes of their own: read from the disk cache or from a local
site, checked and decompressed away from the mount's GIL.

Why: a warm read of a series is one small file after another, each a chunk in
the disk cache.  Opened by the mount's fetch threads, each chunk's read, seal
check, decompression and un-shuffle is a dozen calls that release the GIL and
take it back, and the trio thread, which answers every FUSE request, takes it
in between: measured on 400 such files, 30 futex calls per file and a third
of the mount's CPU in waking and switching threads, even with one fetch
thread.  In a process of its own the same work costs the trio thread one
record on a pipe each way and a copy of the plain bytes.

Each unpacker is a child process (``python -m animfs.unpack CONFIG FD SLOTS
PRIORITY SITE...``)
that shares with the mount a memory file of ``SLOTS`` slots of
:data:`~animfs.chunks.CHUNK_SIZE` bytes (``FD``, a memfd).  The mount writes a
request for each chunk to the child's stdin, and the child answers on its
stdout, one fixed record each way (:data:`REQUEST`, :data:`REPLY`), the reply
followed by a reason (UTF-8) of the length it gives:

- ``OK``: the plain chunk is in the slot, ``length`` bytes;
- ``MISSING``: no entry under that name (evicted, or never cached);
- ``DAMAGED``: the entry does not open, decompress or match its id (a reason);
- ``UNREADABLE``: the entry is there but reading it failed (the cache's disk; a
  reason);
- ``NOT_KEPT``: a chunk fetched from a site is in the slot, as for ``OK``, but it
  could not be written to the disk cache (a reason);
- ``FETCH_FAILED``: the site's copy is missing, damaged or unreadable (a reason).

By default the child reads a disk-cache entry, sets its mtime when asked to (the
LRU order a later mount rebuilds, as :meth:`DiskCache.get` does), and opens it
with :func:`animfs.chunks.unseal` exactly as a fetch thread would.  With
``FETCH``, it reads the chunk from the local site the request names instead (the
folders the mount gives on its command line, ``SITE...``), opens it the same way
and, with ``KEEP``, writes it to the disk cache by temp-and-rename, under the
room the mount reserved for it.  A cold series is a site read, a check, a
decompression and a cache write per small file: done by the fetch threads, those
were 39 futex calls per file and half the mount's CPU in the kernel.

Only the happy path is done here.  The mount keeps every part of the disk cache's
bookkeeping and of the sites' health (:mod:`animfs.cache`); a missing or damaged
entry, and a site copy that is not good, go on to its fetch threads, which read
the sites again with all of it: a bad copy journalled for repair, the next site
asked.  The child exits when its stdin closes: at unmount, or when the mount dies.

A child takes about 0.14 s of CPU to start (the interpreter, numpy, zstd, the
key ring; a third of a second before OpenBLAS was kept to one thread, see
:mod:`animfs`), which must not come out of the mount's first requests: a
``find`` right after mounting took twice as long.  So a mount run
by root starts its children at nice 19, and each takes back the mount's
priority once started; the cache sends a child nothing until it says
``READY`` (a reply record with no slot), and its fetch threads serve
meanwhile.  Started at the first read instead, the children cost a warm read
right after mounting a sixth of its speed.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from animfs import chunks, heap
from animfs import config as config_mod
from animfs import keys as keys_mod
from animfs.chunks import CHUNK_SIZE, ChunkRef, CorruptChunk
from animfs.diskcache import entry_path, read_entry, write_entry
from animfs.store.local import LocalStore, TempNames

REQUEST = struct.Struct("<IIIBB32s")  # slot, plain size, stored size, flags, site, raw id
REPLY = struct.Struct("<IBII")  # slot, status, length of the plain bytes, of the reason
PROMOTE = 1  # request flag: a reader's hit, which sets the entry's mtime (not a backup's)
FETCH = 2  # request flag: from the site numbered ``site``, not from the disk cache
KEEP = 4  # request flag, with FETCH: write the chunk to the disk cache
OK, MISSING, DAMAGED, UNREADABLE, READY, NOT_KEPT, FETCH_FAILED = range(7)
SLOTS = 2  # chunks in flight per child: one being opened, one waiting in its pipe
START_NICENESS = 19  # of a child while it starts (root only: it can take its priority back)
STOP_SECONDS = 10.0  # how long an unmount waits for a child to finish its chunk


def reply(slot: int, status: int, length: int = 0, reason: bytes = b"") -> bytes:
    """One reply record as the child writes it, with its reason: ``length`` is the
    plain chunk's (``OK``, ``NOT_KEPT``)."""
    return REPLY.pack(slot, status, length, len(reason)) + reason


def next_reply(pending: bytearray) -> tuple[int, int, int, bytes] | None:
    """The first whole reply at the front of ``pending``, taken off it: (slot, status,
    length, reason); None while it has not all arrived (a pipe read may end anywhere)."""
    if len(pending) < REPLY.size:
        return None
    slot, status, length, reason_length = REPLY.unpack_from(pending)
    end = REPLY.size + reason_length
    if len(pending) < end:
        return None
    reason = bytes(pending[REPLY.size : end])
    del pending[:end]
    return slot, status, length, reason


class Unpacker:
    """The mount's end of one child process: its pipes and its slots.  Used from the
    trio thread only; :meth:`replies` is the one task that reads the child's answers."""

    def __init__(self, config_path: Path, sites: Sequence[Path] = (), slots: int = SLOTS) -> None:
        """``sites``: the folders of the local sites, which :meth:`send` numbers from 0."""
        memfd = os.memfd_create("animfs-unpack", os.MFD_CLOEXEC)
        try:
            os.ftruncate(memfd, slots * CHUNK_SIZE)
            self._shared = mmap.mmap(memfd, slots * CHUNK_SIZE)
            argv = [sys.executable, "-m", "animfs.unpack", str(config_path), str(memfd), str(slots)]
            if os.geteuid() == 0:  # started niced, it takes the mount's priority back
                argv = ["nice", "-n", str(START_NICENESS), *argv]
                argv.append(str(os.getpriority(os.PRIO_PROCESS, 0)))
            else:
                argv.append("-")
            argv += [str(folder) for folder in sites]
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=(memfd,),
                bufsize=0,
            )
        finally:
            os.close(memfd)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._requests = self._proc.stdin
        self._replies = self._proc.stdout.fileno()
        os.set_blocking(self._replies, False)
        self._free = list(range(slots))
        self.pid = self._proc.pid
        self.ready = False  # set when the child says so: until then, nothing is sent

    @property
    def idle(self) -> int:
        """Slots free for another request."""
        return len(self._free)

    def send(
        self, ref: ChunkRef, *, promote: bool, site: int | None = None, keep: bool = False
    ) -> int:
        """Ask for a chunk from the disk cache, or from local site number ``site`` (and then
        written to the disk cache if ``keep``); returns its slot.  Raises OSError if the
        child is gone.  Never blocks: at most ``slots`` small records wait in the pipe."""
        slot = self._free.pop()
        flags = PROMOTE if promote else 0
        if site is not None:
            flags |= FETCH | (KEEP if keep else 0)
        try:
            self._requests.write(
                REQUEST.pack(slot, ref.size, ref.stored, flags, site or 0, bytes.fromhex(ref.id))
            )
        except OSError:
            self._free.append(slot)
            raise
        return slot

    async def replies(self) -> AsyncIterator[tuple[int, int, bytes | None, str]]:
        """(slot, status, plain bytes or None, reason) as the child answers; ends when it
        exits."""
        import trio  # here: the child never needs it, and it is half the child's imports

        pending = bytearray()
        while True:
            await trio.lowlevel.wait_readable(self._replies)
            try:
                data = os.read(self._replies, 1 << 16)
            except BlockingIOError:
                continue
            if not data:
                return
            pending += data
            while (record := next_reply(pending)) is not None:
                slot, status, length, reason = record
                if status == READY:
                    self.ready = True
                    continue
                start = slot * CHUNK_SIZE
                self._free.append(slot)
                plain = self._shared[start : start + length] if status in (OK, NOT_KEPT) else None
                yield slot, status, plain, reason.decode(errors="replace")

    def exit_status(self) -> int | None:
        """The child's exit status, or None while it runs."""
        return self._proc.poll()

    def close(self) -> int | None:
        """Close the child's stdin and wait for it to exit (blocks: call in a thread, once
        nothing waits on its replies); its exit status, or None if it had to be killed."""
        with contextlib.suppress(OSError):
            self._requests.close()
        try:
            return self._proc.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            return None
        finally:
            assert self._proc.stdout is not None
            self._proc.stdout.close()
            self._shared.close()


def serve(config_path: str, memfd: int, slots: int, priority: int | None, sites: list[str]) -> None:
    """The child: answer requests until stdin closes.  ``priority``: the niceness to take
    once started (see the module docstring); ``sites``: the local sites' folders."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the mount's to handle
    heap.keep_freed_buffers()
    config = config_mod.load(config_path)
    ring = keys_mod.for_config(config)
    chunks_dir = str(config.cache_dir / "chunks")
    tmp_dir = str(config.cache_dir / "tmp")
    tmp_names = TempNames("")
    stores = [LocalStore(f"site {n}", Path(folder)) for n, folder in enumerate(sites)]
    shared = memoryview(mmap.mmap(memfd, slots * CHUNK_SIZE))
    slots_view = [shared[n * CHUNK_SIZE : (n + 1) * CHUNK_SIZE] for n in range(slots)]
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    if priority is not None:
        with contextlib.suppress(PermissionError):
            os.setpriority(os.PRIO_PROCESS, 0, priority)
    replies.write(reply(0, READY))
    replies.flush()
    while len(record := requests.read(REQUEST.size)) == REQUEST.size:
        slot, size, stored_size, flags, site, raw_id = REQUEST.unpack(record)
        chunk_id = raw_id.hex()
        if flags & FETCH:
            stored, status, reason = _read_site(stores[site], chunk_id, stored_size)
        else:
            stored, status, reason = _read_entry(chunks_dir, chunk_id, stored_size, flags)
        length = 0
        if stored is not None:
            try:
                chunks.unseal_into(chunk_id, stored, size, slots_view[slot], ring, rehash=False)
            except CorruptChunk as exc:
                status = FETCH_FAILED if flags & FETCH else DAMAGED
                reason = str(exc).encode()
            else:
                length = size
                if flags & KEEP:
                    tmp = os.path.join(tmp_dir, tmp_names.next())
                    try:
                        write_entry(entry_path(chunks_dir, chunk_id), tmp, stored)
                    except OSError as exc:
                        status, reason = NOT_KEPT, _reason(exc)
        replies.write(reply(slot, status, length, reason))
        replies.flush()


def _read_site(site: LocalStore, chunk_id: str, size: int) -> tuple[bytes | None, int, bytes]:
    """(stored bytes, OK, b"") of a chunk's copy at a local site, or (None, FETCH_FAILED,
    reason): the mount's fetch threads then read the sites again, with the bookkeeping.
    Read as a disk-cache entry is (one read of the size expected), never promoted."""
    try:
        path = str(site.path(chunks.chunk_key(chunk_id)))
        return read_entry(path, size, promote=False), OK, b""
    except OSError as exc:
        return None, FETCH_FAILED, _reason(exc)


def _read_entry(
    chunks_dir: str, chunk_id: str, size: int, flags: int
) -> tuple[bytes | None, int, bytes]:
    """(stored bytes, OK, b"") of a disk-cache entry, or (None, status, reason)."""
    try:
        stored = read_entry(entry_path(chunks_dir, chunk_id), size, promote=bool(flags & PROMOTE))
    except FileNotFoundError:
        return None, MISSING, b""
    except OSError as exc:
        return None, UNREADABLE, _reason(exc)
    return stored, OK, b""


def _reason(exc: OSError) -> bytes:
    """A failed system call, as a reply's reason."""
    return str(exc.strerror or exc).encode()


if __name__ == "__main__":
    config_arg, memfd_arg, slots_arg, priority_arg, *site_args = sys.argv[1:]
    priority = None if priority_arg == "-" else int(priority_arg)
    serve(config_arg, int(memfd_arg), int(slots_arg), priority, site_args)
