"""Chunks on their way to readers: a memory LRU of plain chunks, the disk cache of
stored chunks (:mod:`animfs.diskcache`), single-flight fetches and read-ahead.

Everything here runs on the trio thread except :meth:`ChunkCache._fetch_sync`,
which does the blocking work (disk cache, site I/O, zstd, AES-GCM) in one of the
cache's own fetch threads.  Two readers that need the same chunk share one fetch.

Why its own threads and not a trio task with ``trio.to_thread.run_sync`` per
chunk: that round trip (spawn a task, take the limiter, hand over to the thread
cache, come back through the entry queue) costs the trio thread about 75 µs,
against about 18 µs for a queue put and one ``run_sync_soon`` back; the trio
thread also answers every FUSE request, and a series of small files costs it one
fetch per file.  The threads are started and stopped with the cache's nursery.

Fetches wait on two different things, so they are bounded twice: up to
:data:`FETCH_THREADS` are in flight (waiting on a disk or a site: enough to
hide a remote site's latency behind the reader), but at most
:data:`CHECK_THREADS` (the cores) check and decompress at once, so that
decompression ahead of the reader never crowds the trio thread and the reader
itself off the CPU.  A chunk a reader is waiting for goes before read-ahead
in the queue for those (:class:`_CheckSlots`).

With unpackers (:mod:`animfs.unpack`), a chunk the disk cache holds is read,
checked and decompressed in one of those processes instead, off the GIL that
the trio thread needs for every request, and so is a chunk the disk cache lacks
when the first site to ask is a local folder: read, checked, decompressed and
written to the disk cache there, the mount keeping the books of both.  What they
cannot serve (an entry gone or damaged, a site copy that is not good) goes on
to the fetch threads.

Backup reads (``bypass=True``) stream past both caches: they are served from
what is cached but promote nothing, fill nothing and evict nothing.  What read-
ahead fetches for them waits in a small stream buffer of its own until read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from animfs import chunks, heap, unpack
from animfs.chunks import ChunkRef, CorruptChunk
from animfs.diskcache import DiskCache, save_stats
from animfs.keys import KeyRing
from animfs.store.base import CorruptObject
from animfs.store.dual import DualStore, NoGoodCopy
from animfs.store.local import LocalStore
from animfs.unpack import Unpacker

log = logging.getLogger(__name__)

FETCH_THREADS = 16  # chunk fetches in flight (disk cache or site I/O, then the check)
CHECK_THREADS = min(4, os.cpu_count() or 1)  # of which checking and decompressing at once
READ_AHEAD = 8  # chunks fetched ahead of a sequential reader (32 MiB)
STREAM_BYTES = 64 << 20  # backup read-ahead waiting to be read (not in the memory LRU)
HOUSEKEEPING_SECONDS = 5.0  # how often the disk cache's stats are saved and the folder watched
HEDGE_TICK = 0.1  # how often fetches are looked at for a site silent too long (seconds)
FAULT_STEP = 4 << 20  # the memory LRU's pages are faulted in this much at a time
LOWEST_PRIORITY = 19  # the niceness of the thread that does it


class ChunkUnavailable(Exception):
    """No site could deliver a good copy of a chunk."""


@dataclass(eq=False)  # a flight is itself: queues and memories find it by identity
class _Flight:
    """One chunk on its way, from wherever it comes, to the readers that wait for it."""

    ref: ChunkRef
    bypass: bool = False  # a backup read: keep the result out of both caches
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BaseException | None = None
    wanted: bool = False  # a reader waits for it (set on the trio thread, read by workers)
    # What an unpacker found instead of a good entry (status, reason): the fetch
    # thread that takes it over does the disk cache's bookkeeping, then the sites.
    unpacked: tuple[int, str] | None = None
    # The local site an unpacker fetches it from (not in the disk cache: the miss is
    # counted), and whether room is reserved in the disk cache for the unpacker to keep it.
    site: str = ""
    keeping: bool = False
    # The site being asked for the chunk (by a fetch thread or an unpacker), and since
    # when (monotonic) it waits there, or waits for or at an unpacker: one silent for the
    # store's hedge_seconds is hedged (see ChunkCache._hedge_slow_sites).
    asking: str = ""
    since: float = 0.0
    hedged: bool = False
    reads: int = 1  # reads of it under way, each of which will land (a hedge is one more)


class _CheckSlots:
    """At most ``n`` threads check and decompress at once, and a chunk that a reader
    waits for goes before read-ahead: read-ahead that has caught up must not make
    the reader wait behind the chunks it will need only later.

    A freed slot is handed to the first waiting flight that is wanted, else to the
    first waiting one.  Used from worker threads; the lock is held only to count,
    never while anything is decompressed."""

    def __init__(self, n: int) -> None:
        self._free = n
        self._waiting: list[tuple[_Flight, threading.Event]] = []
        self._lock = threading.Lock()

    @contextmanager
    def slot(self, flight: _Flight) -> Iterator[None]:
        with self._lock:
            turn = None
            if self._free and not self._waiting:
                self._free -= 1
            else:
                turn = threading.Event()
                self._waiting.append((flight, turn))
        if turn is not None:
            turn.wait()  # until a slot is handed over
        try:
            yield
        finally:
            with self._lock:
                handed = self._hand_over()
                if not handed:
                    self._free += 1

    def _hand_over(self) -> bool:
        """Give the slot being freed to the next waiter (lock held)."""
        if not self._waiting:
            return False
        wanted = (i for i, (flight, _) in enumerate(self._waiting) if flight.wanted)
        _, turn = self._waiting.pop(next(wanted, 0))
        turn.set()
        return True

    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)


@dataclass
class CacheStats:
    memory_hits: int = 0
    fetches: int = 0
    fetched_bytes: int = 0
    errors: int = 0
    streamed: int = 0  # chunks read for the backup role


def check_stored(
    ref: ChunkRef, stored: bytes, keys: KeyRing | None = None, *, rehash: bool = True
) -> bytes:
    """The plain bytes of a chunk as a site (or the disk cache) stores it; raises
    CorruptObject for a copy that does not decompress or match its id, or is
    sealed under a key ``keys`` lacks (wrong key, or tampered): never served.
    ``rehash=False``: a sealed copy is checked by its seal alone (:func:`chunks.unseal`)."""
    try:
        return chunks.unseal(ref.id, stored, ref.size, keys, rehash=rehash)
    except CorruptChunk as exc:
        raise CorruptObject("", chunks.chunk_key(ref.id), str(exc)) from exc


class ChunkCache:
    def __init__(
        self,
        store: DualStore,
        *,
        memory_bytes: int,
        nursery: trio.Nursery,
        disk: DiskCache | None = None,
        keys: KeyRing | None = None,
        unpackers: int = 0,
        config_path: Path | None = None,
    ) -> None:
        """With ``disk``, chunks are looked up there before the sites, and kept there;
        its bookkeeping is loaded from the folder in the background (reads meanwhile
        find entries by name), and its stats are saved every few seconds.
        ``unpackers`` processes (of the archive at ``config_path``) open what the disk
        cache holds once they are ready (:mod:`animfs.unpack`); the cache stops them
        when its nursery is cancelled."""
        self.store = store
        self.memory_bytes = memory_bytes
        self.nursery = nursery
        self.disk = disk
        self.keys = keys  # opens sealed chunks; the disk cache holds them sealed
        self._checking = _CheckSlots(CHECK_THREADS)
        self.stats = CacheStats()
        self._lru: OrderedDict[str, bytes] = OrderedDict()
        self._lru_bytes = 0
        self._stream: OrderedDict[str, bytes] = OrderedDict()  # backup read-ahead
        self._stream_bytes = 0
        self._flights: dict[str, _Flight] = {}
        self._unpackers: list[Unpacker] = []
        self._unpacking: dict[tuple[Unpacker, int], _Flight] = {}  # by unpacker and slot
        self._to_unpack: deque[_Flight] = deque()  # waiting for a slot
        self._stuck: set[Unpacker] = set()  # silent on a chunk for hedge_seconds: sent nothing
        self._started = time.time()
        self._token = trio.lowlevel.current_trio_token()
        self._jobs: queue.SimpleQueue[_Flight | None] = queue.SimpleQueue()
        self._stopping = False
        self._fetchers = [
            threading.Thread(target=self._fetcher, name=f"animfs-fetch-{i}", daemon=True)
            for i in range(FETCH_THREADS)
        ]
        for thread in self._fetchers:
            thread.start()
        nursery.start_soon(self._stop_fetchers_at_exit)
        nursery.start_soon(self._hedge_slow_sites)
        self._fault_in_memory()
        if disk is not None:
            nursery.start_soon(self._keep_disk, disk)
        local = [site for site in store.sites if isinstance(site, LocalStore)]
        self._local_sites = {site.name: number for number, site in enumerate(local)}
        if disk is not None and config_path is not None:
            for _ in range(unpackers):
                try:
                    unpacker = Unpacker(config_path, [site.root for site in local])
                except OSError as exc:  # the fetch threads do it all, as before unpackers
                    log.warning("cannot start a chunk unpacker: %s", exc.strerror or exc)
                    break
                self._unpackers.append(unpacker)
                nursery.start_soon(self._take_replies, unpacker)

    def _fault_in_memory(self) -> None:
        """Fault in the memory LRU's pages now, not in the copy of each chunk the LRU
        takes while it first fills (:mod:`animfs.heap`): blocks of the trio thread's heap,
        where the chunks are copied, written to by a thread of its own at the lowest
        priority, so that requests right after mounting neither wait for it nor lose a
        core to it; at most half the memory available (:func:`heap.to_fault_in`)."""
        nbytes = heap.to_fault_in(self.memory_bytes)
        if not heap.keep_at_least(nbytes):
            return
        blocks = heap.Blocks(nbytes // FAULT_STEP, FAULT_STEP)  # (on the trio thread)
        threading.Thread(
            target=self._fault_in, args=(blocks,), name="animfs-fault-in", daemon=True
        ).start()

    def _fault_in(self, blocks: heap.Blocks) -> None:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOWEST_PRIORITY)
        blocks.fault_in(stop=lambda: self._stopping)

    def stats_dict(self) -> dict[str, object]:
        """Memory LRU and disk cache figures, for ``/.animfs/status``."""
        s = self.stats
        return {
            "memory": {
                "max_bytes": self.memory_bytes,
                "bytes": self._lru_bytes,
                "chunks": len(self._lru),
                "hits": s.memory_hits,
                "fetches": s.fetches,
                "fetched_bytes": s.fetched_bytes,
                "errors": s.errors,
                "streamed": s.streamed,
                "in_flight": len(self._flights),
                "unpackers": sum(u.ready for u in self._unpackers),
            },
            "disk": self.disk.stats() if self.disk is not None else None,
        }

    async def get(self, ref: ChunkRef, *, bypass: bool = False) -> bytes:
        """The plain bytes of a chunk.  Raises :class:`ChunkUnavailable`.

        ``bypass`` (backup reads): use what is cached, change nothing cached."""
        data = self._lru.get(ref.id)
        if data is not None:
            if not bypass:
                self._lru.move_to_end(ref.id)
            self.stats.memory_hits += 1
            return data
        if bypass:
            self.stats.streamed += 1
            data = self._stream.pop(ref.id, None)
            if data is not None:
                self._stream_bytes -= len(data)
                return data
        flight = self._flights.get(ref.id)
        if flight is None:
            flight = self._start(ref, bypass, wanted=True)
        elif not flight.wanted:
            flight.wanted = True  # read when a decompression slot is handed over
            self._hurry(flight)
        await flight.done.wait()
        if flight.error is not None:
            raise ChunkUnavailable(str(flight.error)) from flight.error
        assert flight.data is not None
        if flight.bypass and ref.id in self._stream:  # read-ahead we now read: done with it
            self._stream_bytes -= len(self._stream.pop(ref.id))
        return flight.data

    def prefetch(self, refs: Sequence[ChunkRef], *, bypass: bool = False) -> None:
        """Start fetching chunks that are neither cached nor on their way; returns at once."""
        for ref in refs:
            if ref.id not in self._lru and ref.id not in self._flights:
                if not (bypass and ref.id in self._stream):
                    self._start(ref, bypass)

    def _start(self, ref: ChunkRef, bypass: bool = False, *, wanted: bool = False) -> _Flight:
        flight = self._flights[ref.id] = _Flight(ref, bypass, wanted=wanted)
        disk = self.disk
        if disk is not None and self._unpackers_ready():
            if not disk.may_hold(ref.id):
                flight.site = self._local_first()
                if not flight.site:
                    self._jobs.put(flight)
                    return flight
                disk.missed(ref.id, promote=not bypass)
            flight.since = time.monotonic()
            if wanted:
                self._to_unpack.appendleft(flight)
            else:
                self._to_unpack.append(flight)
            self._send_unpacks()
        else:
            self._jobs.put(flight)
        return flight

    def _local_first(self) -> str:
        """The site to read first, if it is a local folder, which an unpacker can read."""
        first = self.store.read_order()[0].name
        return first if first in self._local_sites else ""

    def _unpackers_ready(self) -> bool:
        """Whether an unpacker takes chunks now."""
        return any(self._takes(u) for u in self._unpackers)

    def _takes(self, unpacker: Unpacker) -> bool:
        """Ready, and not silent on a chunk for too long (see _hedge_slow_sites)."""
        return unpacker.ready and unpacker not in self._stuck

    def _hurry(self, flight: _Flight) -> None:
        """A reader now waits for a chunk that waits for an unpacker: it goes first."""
        if flight in self._to_unpack:
            self._to_unpack.remove(flight)
            self._to_unpack.appendleft(flight)

    def _send_unpacks(self) -> None:
        """Hand waiting chunks to the unpackers that have a slot free."""
        while self._to_unpack and self._unpackers:
            unpacker = max(self._unpackers, key=lambda u: u.idle if self._takes(u) else -1)
            if not (self._takes(unpacker) and unpacker.idle):
                return
            flight = self._to_unpack.popleft()
            ref, site = flight.ref, self._local_sites.get(flight.site)
            flight.keeping = (
                site is not None
                and not flight.bypass
                and self.disk is not None
                and self.disk.reserve(ref.id, ref.stored)
            )
            try:
                slot = unpacker.send(ref, promote=not flight.bypass, site=site, keep=flight.keeping)
            except OSError:  # it died: its replies task reports it
                self._release(flight)
                self._to_unpack.appendleft(flight)
                self._unpackers.remove(unpacker)
                continue
            self._unpacking[unpacker, slot] = flight
            flight.since, flight.asking = time.monotonic(), flight.site  # (_hedge_slow_sites)
        while self._to_unpack and not self._unpackers:  # none left: the fetch threads
            self._jobs.put(self._to_unpack.popleft())

    async def _take_replies(self, unpacker: Unpacker) -> None:
        """Land what an unpacker opens; what it could not goes to the fetch threads.
        If it exits, its chunks go to the others or to the fetch threads."""
        assert self.disk is not None
        try:
            async for slot, status, plain, reason in unpacker.replies():
                if unpacker in self._stuck:
                    self._stuck.discard(unpacker)
                    log.info("chunk unpacker %d answers again", unpacker.pid)
                flight = self._unpacking.pop((unpacker, slot))
                if flight.site:
                    self._fetched(flight, status, plain, reason)
                elif status == unpack.OK:
                    self.disk.hit(flight.ref.id, flight.ref.stored, promote=not flight.bypass)
                    self._landed(flight, plain, None)
                elif flight.hedged:  # the fetch threads read it too (_hedge_slow_sites)
                    self._landed(flight, None, NoGoodCopy(f"disk cache: {reason or 'missing'}"))
                else:
                    flight.unpacked = (status, reason)
                    self._jobs.put(flight)
                self._send_unpacks()
            log.error(
                "chunk unpacker %d exited (status %s); the fetch threads take its chunks",
                unpacker.pid,
                unpacker.exit_status(),
            )
        finally:
            if unpacker in self._unpackers:
                self._unpackers.remove(unpacker)
            self._stuck.discard(unpacker)
            for key in [k for k in self._unpacking if k[0] is unpacker]:
                flight = self._unpacking.pop(key)
                self._release(flight)
                flight.asking = ""
                if flight.done.is_set():  # a hedge of it landed first: its read ends here
                    flight.reads -= 1
                else:
                    self._to_unpack.appendleft(flight)
            self._send_unpacks()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(unpacker.close)

    def _fetched(self, flight: _Flight, status: int, plain: bytes | None, reason: str) -> None:
        """What an unpacker fetched from a local site: the books of the disk cache and of
        the site, then the readers.  A copy that was not good goes to the fetch threads,
        which read the sites again, journalling it for repair (unless a hedge of this
        slow read has landed the chunk meanwhile)."""
        assert self.disk is not None
        flight.asking = ""
        self._release(flight, written=status == unpack.OK)
        if status == unpack.NOT_KEPT:
            self.disk.write_failed(reason)
        if plain is not None:
            self.store.record_read(flight.site, flight.ref.stored)
            self._landed(flight, plain, None)
        elif flight.hedged:  # the other sites are asked too: this read failed, that one may not
            self._landed(flight, None, NoGoodCopy(f"{flight.site}: {reason}"))
        else:
            self._jobs.put(flight)

    def _release(self, flight: _Flight, *, written: bool = False) -> None:
        """End the disk-cache reservation held for an unpacker to keep the chunk, if any:
        the entry is there (``written``), or its room is free again."""
        if flight.keeping and self.disk is not None:
            flight.keeping = False
            self.disk.release(flight.ref.id, written=written)

    def _fetcher(self) -> None:
        """A fetch thread: fetch what is queued, and hand each result to the trio thread."""
        while (flight := self._jobs.get()) is not None:
            if self._stopping:  # unmounting: nobody waits for what is still queued
                continue
            data: bytes | None = None
            error: BaseException | None = None
            try:
                data = self._fetch_sync(flight)
            except BaseException as exc:  # reported, and answered, on the trio thread
                error = exc
            try:
                self._token.run_sync_soon(self._landed, flight, data, error)
            except trio.RunFinishedError:
                return

    async def _stop_fetchers_at_exit(self) -> None:
        """Stop the fetch threads when the nursery is cancelled (unmount), once the fetch
        in hand is done, so that nothing reads the stores or the disk cache after it."""
        try:
            await trio.sleep_forever()
        finally:
            self._stopping = True
            for _ in self._fetchers:
                self._jobs.put(None)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._join_fetchers)

    def _join_fetchers(self) -> None:
        for thread in self._fetchers:
            thread.join()

    async def _hedge_slow_sites(self) -> None:
        """A fetch thread reads a chunk from one site at a time (DualStore.read_here); when
        that site has been silent for the store's ``hedge_seconds``, the other sites are
        asked as well, in a thread of trio's (the fetch threads may all be waiting on
        that site), and the first good copy lands the chunk.  The silent site is then
        marked down, so that the reads after it ask the others first.  An unpacker reading
        a local site is watched the same way; one silent that long on a disk-cache entry
        (its disk hung, or the process stopped) has the fetch threads read the chunk too,
        and chunks that waited that long for an unpacker go to them instead."""
        hedge = self.store.hedge_seconds
        while True:
            await trio.sleep(HEDGE_TICK)
            now = time.monotonic()
            for flight in list(self._flights.values()):
                if flight.asking and not flight.hedged and now - flight.since >= hedge:
                    flight.hedged = True
                    flight.reads += 1
                    self.nursery.start_soon(self._hedge, flight, flight.asking)
            for (unpacker, _slot), flight in self._unpacking.items():
                if now - flight.since < hedge:
                    continue
                if unpacker not in self._stuck:
                    self._stuck.add(unpacker)
                    log.warning(
                        "chunk unpacker %d silent for %g s; the fetch threads serve meanwhile",
                        unpacker.pid,
                        hedge,
                    )
                if not flight.asking and not flight.hedged:
                    flight.hedged = True
                    flight.reads += 1
                    self._jobs.put(flight)
            for flight in [f for f in self._to_unpack if now - f.since >= hedge]:
                self._to_unpack.remove(flight)
                self._jobs.put(flight)

    async def _hedge(self, flight: _Flight, silent: str) -> None:
        data: bytes | None = None
        error: BaseException | None = None
        try:
            data = await trio.to_thread.run_sync(
                self._from_sites, flight, silent, abandon_on_cancel=True
            )
        except Exception as exc:  # reported, and answered, as the fetch threads' are
            error = exc
        self._landed(flight, data, error, hedge_for=silent)

    def _landed(
        self,
        flight: _Flight,
        data: bytes | None,
        error: BaseException | None,
        *,
        hedge_for: str = "",
    ) -> None:
        """A read is done (on the trio thread): keep its chunk and wake its readers.  Of
        two reads of one chunk (a hedge), the first good copy counts; a failure counts
        only once the other has failed too."""
        flight.reads -= 1
        if flight.done.is_set() or (error is not None and flight.reads > 0):
            return
        if hedge_for and error is None:
            self.store.mark_slow(hedge_for)
        ref = flight.ref
        del self._flights[ref.id]
        if isinstance(error, NoGoodCopy):
            log.error("chunk %s: %s", ref.id[:16], error)
        elif error is not None:  # a bug must fail this read, not the whole mount
            log.error("chunk %s: fetch failed", ref.id[:16], exc_info=error)
        if error is not None or data is None:
            self.stats.errors += 1
            flight.error = error or RuntimeError("fetch returned nothing")
        else:
            flight.data = data
            if flight.bypass:
                self._hold(ref.id, data)
            else:
                self._remember(ref.id, data)
            self.stats.fetches += 1
            self.stats.fetched_bytes += len(data)
        flight.done.set()

    def _check(self, flight: _Flight, stored: bytes) -> bytes:
        """The plain bytes of a stored copy of the flight's chunk (CorruptObject if bad),
        opened when a checking slot is free (:class:`_CheckSlots`)."""
        with self._checking.slot(flight):
            return check_stored(flight.ref, stored, self.keys, rehash=False)

    def _fetch_sync(self, flight: _Flight) -> bytes:
        ref, bypass = flight.ref, flight.bypass
        if self.disk is not None and not flight.site:  # (else known to be missing there)
            if flight.unpacked is None:
                cached = self.disk.get(
                    ref.id, partial(self._check, flight), promote=not bypass, size=ref.stored
                )
                if cached is not None:
                    return cached
            else:  # an unpacker read the entry: it is gone or bad
                status, reason = flight.unpacked
                if status == unpack.DAMAGED:
                    self.disk.drop_damaged(ref.id, reason, promote=not bypass)
                elif status == unpack.UNREADABLE:
                    self.disk.unreadable(ref.id, reason, promote=not bypass)
                else:
                    self.disk.missed(ref.id, promote=not bypass)
        return self._from_sites(flight)

    def _from_sites(self, flight: _Flight, silent: str = "") -> bytes:
        """The chunk from the sites, kept in the disk cache: read here one site after
        another, the hedge watching (a fetch thread), or with ``silent`` as a hedge of
        a read from that site, from the others (DualStore.read, which hedges itself)."""

        def check(stored: bytes) -> tuple[bytes, bytes]:
            return self._check(flight, stored), stored

        def asking(site: str) -> None:
            flight.since, flight.asking = time.monotonic(), site

        ref = flight.ref
        key = chunks.chunk_key(ref.id)
        if silent:
            (data, stored), _site = self.store.read(key, check, exclude=silent)
        else:
            try:
                (data, stored), _site = self.store.read_here(key, check, asking=asking)
            finally:
                flight.asking = ""
        if self.disk is not None and not flight.bypass:
            self.disk.put(ref.id, stored)
        return data

    def _hold(self, chunk_id: str, data: bytes) -> None:
        """Keep a backup read-ahead chunk until it is read (or pushed out by newer ones)."""
        self._stream[chunk_id] = data
        self._stream_bytes += len(data)
        while self._stream_bytes > STREAM_BYTES and len(self._stream) > 1:
            _, old = self._stream.popitem(last=False)
            self._stream_bytes -= len(old)

    async def _keep_disk(self, disk: DiskCache) -> None:
        """Load the disk cache's state, then save its stats every few seconds and re-read
        the folder when ``animfs cache clear|prefetch`` changed it."""
        limiter = trio.CapacityLimiter(1)
        seen = disk.marker_mtime()
        saved: dict[str, object] | None = None
        try:
            await trio.to_thread.run_sync(disk.load, limiter=limiter)
            log.info("disk cache %s: %s", disk.dir, _brief(disk.stats()))
            while True:
                stats = disk.stats()
                if stats != saved:
                    await trio.to_thread.run_sync(save_stats, disk, limiter=limiter)
                    saved = stats
                await trio.sleep(HOUSEKEEPING_SECONDS)
                changed = await trio.to_thread.run_sync(disk.marker_mtime, limiter=limiter)
                if changed != seen:
                    seen = changed
                    await trio.to_thread.run_sync(disk.load, limiter=limiter)
        finally:
            with trio.CancelScope(shield=True):  # the last counters, at unmount
                await trio.to_thread.run_sync(save_stats, disk, limiter=limiter)

    def _remember(self, chunk_id: str, data: bytes) -> None:
        if len(data) > self.memory_bytes:
            return
        self._lru[chunk_id] = data
        self._lru_bytes += len(data)
        while self._lru_bytes > self.memory_bytes:
            _, old = self._lru.popitem(last=False)
            self._lru_bytes -= len(old)

    def holds(self, chunk_id: str) -> bool:
        """Is the chunk here, in memory or on the local disk?  Never fetches (it answers
        the ``user.animfs.cached`` attribute); at most a stat of the disk entry."""
        if chunk_id in self._lru:
            return True
        return self.disk is not None and self.disk.contains(chunk_id)


def _brief(stats: dict[str, object]) -> str:
    return f"{stats['entries']} entries, {stats['bytes']} of {stats['max_bytes']} bytes"
