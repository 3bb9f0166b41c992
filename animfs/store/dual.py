"""Two (or more) sites as one: write to all at once, read with failover.

Writes: a :class:`WriteBatch` puts every object of one instance to every site
in parallel, then flushes each site.  The batch is acknowledged when at least
``min_sites`` sites hold all of it; the sites that missed something are
reported back as repair-journal entries, which the caller commits to the index
in the same transaction as the instance (so the journal never names an object
the index does not know, and never forgets one it does).

Reads: :meth:`DualStore.read` tries the preferred site first, then the others;
a copy that is missing or fails its check is reported to ``on_bad_copy`` (the
index's repair journal) and the next site is tried.  A site that has not
answered within :data:`HEDGE_SECONDS` is not waited for: the next site is asked
as well and the first good copy wins.  A site that fails to answer (or loses
such a race) is marked down for :data:`DOWN_SECONDS`, during which it is tried
last, so readers stop paying its time-out; :meth:`DualStore.probe` brings it
back as soon as it answers again.

Threads: every method may be called from several threads at once; the site
states are guarded by one lock, never held while a site is asked anything.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TypeVar

from animfs.store.base import CorruptObject, ObjectNotFound, ObjectStore, StoreError

log = logging.getLogger(__name__)

DOWN_SECONDS = 30.0  # a failed site is tried last for this long (or until a probe answers)
HEDGE_SECONDS = 1.0  # a site silent this long on one object: ask the next site as well
READ_THREADS = 32  # reads in flight, including ones stuck on a hung site
PROBE_KEY = "probe/animfs"  # a key never written: a site that answers "not found" is up

T = TypeVar("T")


class NotEnoughSites(Exception):
    """Fewer than ``min_sites`` sites took a write; nothing may be acknowledged."""


class NoGoodCopy(Exception):
    """No site has a good copy of an object."""


@dataclass(frozen=True)
class Missed:
    """A repair-journal entry: ``site`` lacks a good copy of ``key``."""

    site: str
    key: str
    reason: str


@dataclass
class SiteState:
    """What this process has seen of one site (shown by ``animfs status``)."""

    name: str
    down_until: float = 0.0
    last_error: str = ""
    errors: int = 0
    bytes_read: int = 0
    reads: int = 0

    @property
    def up(self) -> bool:
        return time.monotonic() >= self.down_until


MAX_PENDING = 16  # objects per batch in flight at once: bounds memory on 600 MB files


@dataclass
class WriteBatch:
    """Objects on their way to every site, acknowledged together."""

    store: DualStore
    keys: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    pending: deque[dict[str, Future[None]]] = field(default_factory=deque)

    def put(self, key: str, data: bytes) -> None:
        """Start writing ``data`` to every site; waits only while too much is in flight."""
        while len(self.pending) >= MAX_PENDING:
            self._settle(self.pending.popleft())
        self.keys.append(key)
        # A site that already failed this batch is journalled for all of it:
        # don't make the ingest wait for its time-outs again.
        self.pending.append(
            {
                site.name: self.store.pool.submit(site.put, key, data)
                for site in self.store.sites
                if site.name not in self.failed
            }
        )

    def _settle(self, per_site: dict[str, Future[None]]) -> None:
        for name, future in per_site.items():
            try:
                future.result()
            except StoreError as exc:
                self.failed.setdefault(name, exc.reason)

    def drain(self) -> None:
        """Wait for every put so far and flush every site that took them all.

        The slow part of :meth:`commit`, for a caller that wants it done before
        it takes a lock; failures are remembered for :meth:`commit`.
        """
        while self.pending:
            self._settle(self.pending.popleft())
        for site in self.store.sites:
            if site.name not in self.failed:
                try:
                    site.flush()
                except StoreError as exc:
                    self.failed[site.name] = exc.reason

    def commit(self) -> list[Missed]:
        """Wait for every put and flush every site that took them all.

        Returns the repair entries for the sites that missed something, or
        raises :class:`NotEnoughSites` when fewer than ``min_sites`` hold it all.
        """
        self.drain()
        good = len(self.store.sites) - len(self.failed)
        if good < self.store.min_sites:
            detail = "; ".join(f"{name}: {reason}" for name, reason in sorted(self.failed.items()))
            raise NotEnoughSites(
                f"only {good} of {len(self.store.sites)} sites took the write "
                f"(min_sites = {self.store.min_sites}): {detail}"
            )
        for name, reason in self.failed.items():
            self.store._mark_down(name, reason)
        return [
            Missed(name, key, f"write failed: {reason}")
            for name, reason in self.failed.items()
            for key in self.keys
        ]


class DualStore:
    def __init__(
        self,
        sites: Sequence[ObjectStore],
        *,
        preferred: str,
        min_sites: int,
        on_bad_copy: Callable[[Missed], None] | None = None,
        threads: int = 8,
        hedge_seconds: float = HEDGE_SECONDS,
    ) -> None:
        self.sites = sorted(sites, key=lambda s: s.name != preferred)
        self.min_sites = min_sites
        self.on_bad_copy = on_bad_copy
        self.hedge_seconds = hedge_seconds
        self.state = {s.name: SiteState(s.name) for s in self.sites}
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="animfs-put")
        # Reads get their own threads: a hung site may hold some for its whole
        # time-out, and must not starve the reads that go to the other site.
        self.readers = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="animfs-get")
        self._lock = threading.Lock()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.readers.shutdown(wait=True, cancel_futures=True)

    def batch(self) -> WriteBatch:
        return WriteBatch(self)

    def site(self, name: str) -> ObjectStore:
        for site in self.sites:
            if site.name == name:
                return site
        raise KeyError(name)

    def read_order(self) -> list[ObjectStore]:
        """Sites to try: up ones first (preferred first among them), down ones last."""
        return sorted(self.sites, key=lambda s: not self.state[s.name].up)

    def read(
        self, key: str, check: Callable[[bytes], T], *, exclude: str | None = None
    ) -> tuple[T, str]:
        """``check(stored bytes)`` of the first good copy, and the site it came from.

        ``check`` raises CorruptObject for a bad copy.  Sites are tried in
        :meth:`read_order` (``exclude`` never); one that has not answered within
        ``hedge_seconds`` is not waited for: the next site is asked as well and
        the first good copy wins, so a hung site costs a reader that long, once
        (it is then marked down).  Raises :class:`NoGoodCopy` when no site has a
        good copy.
        """
        order = [s for s in self.read_order() if s.name != exclude]
        errors: list[str] = []
        running: dict[Future[tuple[T, int]], ObjectStore] = {}
        started = 0
        while started < len(order) or running:
            if not running:
                site = order[started]
                running[self.readers.submit(self._read_one, site, key, check, errors)] = site
                started += 1
            hedge = self.hedge_seconds if started < len(order) else None
            done, _ = wait(running, timeout=hedge, return_when=FIRST_COMPLETED)
            if not done:  # no answer yet: ask the next site too
                site = order[started]
                running[self.readers.submit(self._read_one, site, key, check, errors)] = site
                started += 1
                continue
            for future in done:
                site = running.pop(future)
                try:
                    value, size = future.result()
                except (StoreError, NoGoodCopy):
                    continue  # _read_one recorded it
                self.record_read(site.name, size)
                for slow in running.values():
                    self._mark_down(slow.name, f"no answer in {self.hedge_seconds:g} s")
                return value, site.name
        raise _no_good_copy(key, errors)

    def read_here(
        self, key: str, check: Callable[[bytes], T], *, asking: Callable[[str], None]
    ) -> tuple[T, str]:
        """As :meth:`read`, but in the calling thread and without hedging: for a caller
        that hedges on its own (the mount's chunk cache), which ``asking(site)`` tells
        before each site is asked, and which calls :meth:`mark_slow` when a copy from
        another site came first.  It saves a hand-over to a reader thread and back:
        on a 2-core machine, where a cold small file is one chunk, a tenth of its time."""
        errors: list[str] = []
        for site in self.read_order():
            asking(site.name)
            try:
                value, size = self._read_one(site, key, check, errors)
            except (StoreError, NoGoodCopy):
                continue  # _read_one recorded it
            self.record_read(site.name, size)
            return value, site.name
        raise _no_good_copy(key, errors)

    def mark_slow(self, site: str) -> None:
        """``site`` did not answer a read within ``hedge_seconds`` (see :meth:`read_here`)."""
        self._mark_down(site, f"no answer in {self.hedge_seconds:g} s")

    def _read_one(
        self, site: ObjectStore, key: str, check: Callable[[bytes], T], errors: list[str]
    ) -> tuple[T, int]:
        """Get and check one copy (in a reader thread); failures are recorded here,
        also those of a read that lost the race and is no longer waited for."""
        try:
            stored = site.get(key)
            return check(stored), len(stored)
        except ObjectNotFound:
            self._bad_copy(site.name, key, "missing")
            errors.append(f"{site.name}: missing")
            raise
        except CorruptObject as exc:
            self._bad_copy(site.name, key, f"corrupt: {exc.reason}")
            errors.append(f"{site.name}: corrupt")
            raise
        except StoreError as exc:
            self._mark_down(site.name, exc.reason)
            errors.append(f"{site.name}: {exc.reason}")
            raise

    def record_read(self, site: str, size: int) -> None:
        """A good copy of ``size`` bytes came from ``site``: read here, or by a process
        that reads a local site for this one (the mount's unpackers)."""
        with self._lock:
            state = self.state[site]
            state.down_until = 0.0
            state.reads += 1
            state.bytes_read += size

    def _mark_down(self, site: str, reason: str) -> None:
        with self._lock:
            state = self.state[site]
            if state.up:
                log.warning("site %s: marked down for %g s: %s", site, DOWN_SECONDS, reason)
            state.errors += 1
            state.last_error = reason
            state.down_until = time.monotonic() + DOWN_SECONDS

    def _bad_copy(self, site: str, key: str, reason: str) -> None:
        with self._lock:
            self.state[site].errors += 1
            self.state[site].last_error = f"{key}: {reason}"
        if self.on_bad_copy is not None:
            self.on_bad_copy(Missed(site, key, reason))

    def probe(self) -> None:
        """Ask every site that is marked down whether it answers again (blocks).

        A site that answers is up at once; one that does not stays down for
        another :data:`DOWN_SECONDS`.  The mount calls this every few seconds,
        so a site comes back long before its down time would run out.
        """
        for site in self.sites:
            state = self.state[site.name]
            if not state.down_until:
                continue
            try:
                site.exists(PROBE_KEY)
            except StoreError as exc:
                self._mark_down(site.name, exc.reason)
            else:
                with self._lock:
                    state.down_until = 0.0
                log.info("site %s: answers again; back up", site.name)

    def states(self) -> dict[str, dict[str, object]]:
        """What this process has seen of each site, for status reports."""
        with self._lock:
            return {
                name: {
                    "state": "up" if s.up else "down",
                    "last_error": s.last_error,
                    "errors": s.errors,
                    "reads": s.reads,
                    "bytes_read": s.bytes_read,
                }
                for name, s in self.state.items()
            }


def _no_good_copy(key: str, errors: list[str]) -> NoGoodCopy:
    """What a read of ``key`` raises when every site failed, each as ``errors`` says."""
    return NoGoodCopy(f"{key}: no good copy at any site ({'; '.join(errors) or 'no sites'})")
