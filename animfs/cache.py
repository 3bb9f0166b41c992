"""Chunks on their way to readers: a memory LRU of plain chunks, single-flight fetches
and read-ahead.

Everything here runs on the trio thread except :meth:`ChunkCache._fetch_sync`,
which does the blocking work (site I/O, zstd, SHA-256) in a worker thread under
a capacity limiter.  Two readers that need the same chunk share one fetch.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from animfs import chunks
from animfs.chunks import ChunkRef, CorruptChunk
from animfs.store.base import CorruptObject
from animfs.store.dual import DualStore, NoGoodCopy

log = logging.getLogger(__name__)

FETCH_THREADS = 4  # concurrent chunk fetches (site I/O + decompression)
READ_AHEAD = 8  # chunks fetched ahead of a sequential reader (32 MiB)


class ChunkUnavailable(Exception):
    """No site could deliver a good copy of a chunk."""


@dataclass
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BaseException | None = None


@dataclass
class CacheStats:
    memory_hits: int = 0
    fetches: int = 0
    fetched_bytes: int = 0
    errors: int = 0


class ChunkCache:
    def __init__(self, store: DualStore, *, memory_bytes: int, nursery: trio.Nursery) -> None:
        self.store = store
        self.memory_bytes = memory_bytes
        self.nursery = nursery
        self.limiter = trio.CapacityLimiter(FETCH_THREADS)
        self.stats = CacheStats()
        self._lru: OrderedDict[str, bytes] = OrderedDict()
        self._lru_bytes = 0
        self._flights: dict[str, _Flight] = {}

    async def get(self, ref: ChunkRef) -> bytes:
        """The plain bytes of a chunk.  Raises :class:`ChunkUnavailable`."""
        data = self._lru.get(ref.id)
        if data is not None:
            self._lru.move_to_end(ref.id)
            self.stats.memory_hits += 1
            return data
        flight = self._flights.get(ref.id)
        if flight is None:
            flight = self._start(ref)
        await flight.done.wait()
        if flight.error is not None:
            raise ChunkUnavailable(str(flight.error)) from flight.error
        assert flight.data is not None
        return flight.data

    def prefetch(self, refs: Sequence[ChunkRef]) -> None:
        """Start fetching chunks that are neither cached nor on their way; returns at once."""
        for ref in refs:
            if ref.id not in self._lru and ref.id not in self._flights:
                self._start(ref)

    def _start(self, ref: ChunkRef) -> _Flight:
        flight = self._flights[ref.id] = _Flight()
        self.nursery.start_soon(self._fetch, ref, flight)
        return flight

    async def _fetch(self, ref: ChunkRef, flight: _Flight) -> None:
        try:
            data = await trio.to_thread.run_sync(self._fetch_sync, ref, limiter=self.limiter)
        except NoGoodCopy as exc:
            log.error("chunk %s: %s", ref.id[:16], exc)
            self.stats.errors += 1
            flight.error = exc
        except Exception as exc:  # a bug must fail this read, not the whole mount
            log.exception("chunk %s: fetch failed", ref.id[:16])
            self.stats.errors += 1
            flight.error = exc
        else:
            flight.data = data
            self._remember(ref.id, data)
            self.stats.fetches += 1
            self.stats.fetched_bytes += len(data)
        finally:
            del self._flights[ref.id]
            flight.done.set()

    def _fetch_sync(self, ref: ChunkRef) -> bytes:
        def check(stored: bytes) -> bytes:
            try:
                return chunks.unseal(ref.id, stored, ref.size)
            except CorruptChunk as exc:
                raise CorruptObject("", chunks.chunk_key(ref.id), str(exc)) from exc

        data, _site = self.store.read(chunks.chunk_key(ref.id), check)
        return data

    def _remember(self, chunk_id: str, data: bytes) -> None:
        if len(data) > self.memory_bytes:
            return
        self._lru[chunk_id] = data
        self._lru_bytes += len(data)
        while self._lru_bytes > self.memory_bytes:
            _, old = self._lru.popitem(last=False)
            self._lru_bytes -= len(old)
