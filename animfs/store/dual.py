"""Two (or more) sites as one: write to all at once, read with failover.

Writes: a :class:`WriteBatch` puts every object of one instance to every site
in parallel, then flushes each site.  The batch is acknowledged when at least
``min_sites`` sites hold all of it; the sites that missed something are
reported back as repair-journal entries, which the caller commits to the index
in the same transaction as the instance (so the journal never names an object
the index does not know, and never forgets one it does).

Reads: :meth:`DualStore.read` tries the preferred site first, then the others;
a copy that is missing or fails its check is reported to ``on_bad_copy`` (the
index's repair journal) and the next site is tried.  A site that fails to
answer is marked down for :data:`DOWN_SECONDS`, during which it is tried last,
so readers stop paying its time-out; it is probed again after that.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from animfs.store.base import CorruptObject, ObjectNotFound, ObjectStore, StoreError

DOWN_SECONDS = 30.0

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
    """The objects of one instance on their way to every site."""

    store: DualStore
    keys: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    pending: deque[dict[str, Future[None]]] = field(default_factory=deque)

    def put(self, key: str, data: bytes) -> None:
        """Start writing ``data`` to every site; waits only while too much is in flight."""
        while len(self.pending) >= MAX_PENDING:
            self._settle(self.pending.popleft())
        self.keys.append(key)
        self.pending.append(
            {site.name: self.store.pool.submit(site.put, key, data) for site in self.store.sites}
        )

    def _settle(self, per_site: dict[str, Future[None]]) -> None:
        for name, future in per_site.items():
            try:
                future.result()
            except StoreError as exc:
                self.failed.setdefault(name, exc.reason)

    def commit(self) -> list[Missed]:
        """Wait for every put and flush every site that took them all.

        Returns the repair entries for the sites that missed something, or
        raises :class:`NotEnoughSites` when fewer than ``min_sites`` hold it all.
        """
        while self.pending:
            self._settle(self.pending.popleft())
        for site in self.store.sites:
            if site.name not in self.failed:
                try:
                    site.flush()
                except StoreError as exc:
                    self.failed[site.name] = exc.reason
        good = len(self.store.sites) - len(self.failed)
        if good < self.store.min_sites:
            detail = "; ".join(f"{name}: {reason}" for name, reason in sorted(self.failed.items()))
            raise NotEnoughSites(
                f"only {good} of {len(self.store.sites)} sites took the write "
                f"(min_sites = {self.store.min_sites}): {detail}"
            )
        for name, reason in self.failed.items():
            self.store.state[name].last_error = reason
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
    ) -> None:
        self.sites = sorted(sites, key=lambda s: s.name != preferred)
        self.min_sites = min_sites
        self.on_bad_copy = on_bad_copy
        self.state = {s.name: SiteState(s.name) for s in self.sites}
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="animfs-put")
        self._lock = threading.Lock()

    def close(self) -> None:
        self.pool.shutdown(wait=True)

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

    def read(self, key: str, check: Callable[[bytes], T]) -> tuple[T, str]:
        """``check(stored bytes)`` of the first good copy, and the site it came from.

        ``check`` raises CorruptObject for a bad copy.  Raises :class:`NoGoodCopy`
        when no site has a good one.
        """
        errors = []
        for site in self.read_order():
            state = self.state[site.name]
            try:
                stored = site.get(key)
                value = check(stored)
            except ObjectNotFound:
                self._bad_copy(site.name, key, "missing")
                errors.append(f"{site.name}: missing")
                continue
            except CorruptObject as exc:
                self._bad_copy(site.name, key, f"corrupt: {exc.reason}")
                errors.append(f"{site.name}: corrupt")
                continue
            except StoreError as exc:
                with self._lock:
                    state.errors += 1
                    state.last_error = exc.reason
                    state.down_until = time.monotonic() + DOWN_SECONDS
                errors.append(f"{site.name}: {exc.reason}")
                continue
            with self._lock:
                state.down_until = 0.0
                state.reads += 1
                state.bytes_read += len(stored)
            return value, site.name
        raise NoGoodCopy(f"{key}: no good copy at any site ({'; '.join(errors)})")

    def _bad_copy(self, site: str, key: str, reason: str) -> None:
        with self._lock:
            self.state[site].errors += 1
            self.state[site].last_error = f"{key}: {reason}"
        if self.on_bad_copy is not None:
            self.on_bad_copy(Missed(site, key, reason))
