"""Many mount hosts over the same sites: each host's log, and ``animfs sync`` that reads them.

Each mount host keeps its own LMDB index.  What one host writes, the others
learn from a log it keeps at the sites, one small object per write::

    hosts/<host>                        written once: lets others find this host's log
    log/<host>/<YYYYMMDD>/<time ns:020d> JSON {"host", "time", "manifests": [[instance key
                                        hex, manifest object name], ...], "state": [state
                                        object names]}, sealed like every object

Ingest adds one log object per group commit, once the group's manifests are
durable (so a log entry never names a manifest that is not there yet);
publishing access state (consent, record, break-the-glass: animfs.recovery)
adds one naming the state objects it wrote.

Why a log and not a listing of ``manifests/``: a decade is hundreds of millions
of manifests, and listing them all on every sync costs minutes of LIST calls
whatever was added.  Manifest names are hashes (keyed with encryption on), so
no listing of them can start "after the last one read".  Log names are
time-ordered per host and split by day, so a sync lists only the days since
the host's last read, and reads only the log objects it has not seen.

Clocks and concurrent writers: two ingest processes on one host may write
their log objects out of time order (the later name lands first).  A sync
therefore re-lists the last :data:`GRACE_NS` before its cursor and skips the
objects it already read (their names are kept in the cursor), so a late
landing is still picked up as long as it lands within that window.

:func:`sync` adds what the logs name and this index lacks, in ingest order
(:meth:`Index.merge`, which also settles names two hosts gave at once), then
the state objects the logs name.  A new host (an empty index that never
synced) or ``--full`` reads every manifest and state object instead, like a
rebuild, then starts every host's cursor at that time; ``--full`` is also how
an archive ingested before the logs existed is taken in.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from animfs import keys
from animfs.index import ROOT_INO, Index
from animfs.keys import KeyRing, SealError
from animfs.manifest import Manifest
from animfs.recovery import patient_key
from animfs.store.base import ObjectNotFound, StoreError
from animfs.store.dual import DualStore, WriteBatch

log = logging.getLogger(__name__)

HOSTS_PREFIX = "hosts/"
LOG_PREFIX = "log/"
GRACE_NS = 600 * 10**9  # a log object may land this late, relative to its name
DAY_NS = 86_400 * 10**9
MERGE_BATCH = 1024  # instances per index transaction
_CURSOR = b"sync\0"
_LAST = b"sync-last"

Step = Callable[[str], None]


class SyncError(Exception):
    """A sync cannot go on; the message says why (nothing half-done is recorded)."""


def _day(t_ns: int) -> str:
    return time.strftime("%Y%m%d", time.gmtime(t_ns // 10**9))


def log_name(host: str, t_ns: int) -> str:
    return f"{LOG_PREFIX}{host}/{_day(t_ns)}/{t_ns:020d}"


def _time_of(name: str) -> int:
    return int(name.rsplit("/", 1)[1])


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


class Log:
    """This host's log at the sites, as one process writes it.

    Touches no index: ingest appends while it holds the index's write
    transaction.  Names are time-ordered within the process, whatever the clock
    does; two processes of one host may interleave (see GRACE_NS)."""

    def __init__(self, ring: KeyRing | None, host: str) -> None:
        self.ring, self.host = ring, host
        self.last = 0
        self.announced = False

    def append(
        self, batch: WriteBatch, *, manifests: Iterable[Manifest] = (), state: Iterable[str] = ()
    ) -> str | None:
        """Add a log object naming ``manifests`` and ``state`` objects to ``batch`` (the
        caller commits it, once what it names is durable).  Returns its name."""
        entries = [[m.key.hex(), m.object_key_with(self.ring)] for m in manifests]
        names = sorted(state)
        if not entries and not names:
            return None
        self.last = t = max(time.time_ns(), self.last + 1)
        name = log_name(self.host, t)
        doc = {"host": self.host, "time": t, "manifests": entries, "state": names}
        batch.put(name, keys.seal_with(self.ring, name, _dumps(doc)))
        if not self.announced:  # once per process: cheap, and needs no shared state
            marker = f"{HOSTS_PREFIX}{self.host}"
            batch.put(marker, keys.seal_with(self.ring, marker, _dumps({"host": self.host})))
            self.announced = True
        return name


# -- reading ---------------------------------------------------------------------------


@dataclass
class Synced:
    hosts: dict[str, int] = field(default_factory=dict)  # host -> log objects read
    added: int = 0  # instances added to the index
    skipped: int = 0  # named by a log, already in the index
    missing: int = 0  # named by a log, at no site (a write that failed)
    patients: int = 0  # access states taken from the sites
    full: bool = False

    def line(self) -> str:
        logs = sum(self.hosts.values())
        how = "full listing" if self.full else f"{logs} log objects of {len(self.hosts)} hosts"
        missing = f", {self.missing} named but at no site" if self.missing else ""
        return (
            f"synced ({how}): {self.added} instances added, {self.skipped} already here"
            f"{missing}; access state of {self.patients} patients"
        )


def _list(store: DualStore, prefix: str) -> set[str]:
    """The union of what the sites list under ``prefix`` (a site down is skipped)."""
    names: set[str] = set()
    answered = 0
    for site in store.read_order():
        try:
            names.update(site.list(prefix))
            answered += 1
        except StoreError as exc:
            log.warning("sync: %s", exc)
    if not answered:
        raise SyncError(f"no site could list {prefix}")
    return names


def _load(store: DualStore, ring: KeyRing | None, name: str) -> bytes | None:
    """The plain bytes of ``name`` from the first site that has it; None if none has."""
    failed: StoreError | None = None
    for site in store.read_order():
        try:
            stored = site.get(name)
        except ObjectNotFound:
            continue
        except StoreError as exc:
            failed = exc
            continue
        try:
            return keys.open_with(ring, name, stored)
        except SealError as exc:
            failed = StoreError(site.name, name, str(exc))
    if failed is not None and not isinstance(failed, ObjectNotFound):
        log.warning("sync: %s", failed)
    return None


def _manifest(store: DualStore, ring: KeyRing | None, name: str) -> Manifest | None:
    plain = _load(store, ring, name)
    if plain is None:
        return None
    try:
        manifest = Manifest.from_bytes(plain)
        if manifest.object_key_with(ring) != name:
            raise ValueError("holds the manifest of another instance")
    except (ValueError, SealError) as exc:
        raise SyncError(f"{name}: {exc}") from None
    return manifest


def _restore_state(index: Index, store: DualStore, ring: KeyRing | None, name: str) -> bool:
    plain = _load(store, ring, name)
    if plain is None:
        return False
    doc = json.loads(plain)
    if patient_key(str(doc["patient"]), ring) != name:
        raise SyncError(f"{name}: holds another patient's state")
    return index.restore_access_state(doc)


def _merge(index: Index, manifests: list[Manifest], report: Synced) -> None:
    manifests.sort(key=lambda m: (m.ingested_ns, m.instance.sop_uid))
    for start in range(0, len(manifests), MERGE_BATCH):
        report.added += index.merge(manifests[start : start + MERGE_BATCH])


def sync(
    index: Index,
    store: DualStore,
    ring: KeyRing | None,
    host: str,
    *,
    full: bool = False,
    step: Step | None = None,
) -> Synced:
    """Bring ``index`` up to date with what other hosts wrote (see the module doc)."""
    started = time.time_ns()
    hosts = sorted(n[len(HOSTS_PREFIX) :] for n in _list(store, HOSTS_PREFIX))
    cursors = {h: index.meta(_CURSOR + h.encode()) for h in hosts if h != host}
    root = index.node(ROOT_INO)
    empty = root is None or root.files == 0
    report = Synced(full=full or (empty and index.meta(_LAST) is None))
    if report.full:  # then the logs' last GRACE_NS, to know which of them were read
        _sync_everything(index, store, ring, report, step)
        cursors = {h: _dumps({"after": started, "seen": []}) for h in cursors}
    for h, raw in cursors.items():
        cursor: dict[str, Any] = json.loads(raw) if raw is not None else {"after": 0, "seen": []}
        after, seen = int(cursor["after"]), set(cursor["seen"])
        since = after - GRACE_NS
        if after == 0:
            names = _list(store, f"{LOG_PREFIX}{h}/")
        else:
            names = set()
            for t in range(since - since % DAY_NS, started + DAY_NS, DAY_NS):
                names |= _list(store, f"{LOG_PREFIX}{h}/{_day(t)}/")
        fresh = sorted(n for n in names if n not in seen and _time_of(n) > since)
        manifests: list[Manifest] = []
        states: set[str] = set()
        for name in fresh:
            plain = _load(store, ring, name)
            if plain is None:
                raise SyncError(f"{name}: listed, but no site gives it")
            doc = json.loads(plain)
            for key_hex, object_name in doc["manifests"]:
                if index.has_instance(bytes.fromhex(key_hex)):
                    report.skipped += 1
                    continue
                manifest = _manifest(store, ring, object_name)
                if manifest is None:
                    report.missing += 1
                    log.warning("sync: %s names %s, which no site holds", name, object_name)
                    continue
                if step is not None:
                    step(object_name)
                manifests.append(manifest)
            states.update(doc["state"])
        _merge(index, manifests, report)
        for name in sorted(states):
            report.patients += _restore_state(index, store, ring, name)
        newest = max([after, *(_time_of(n) for n in fresh)])
        keep = sorted(n for n in seen | set(fresh) if _time_of(n) > newest - GRACE_NS)
        index.put_meta(_CURSOR + h.encode(), _dumps({"after": newest, "seen": keep}))
        report.hosts[h] = len(fresh)
    _finish(index, report, started)
    return report


def _sync_everything(
    index: Index, store: DualStore, ring: KeyRing | None, report: Synced, step: Step | None
) -> None:
    """Every manifest and state object at the sites that the index lacks."""
    known = {m.object_key_with(ring) for m in index.all_manifests()}
    manifests = []
    for name in sorted(_list(store, "manifests/") - known):
        manifest = _manifest(store, ring, name)
        if manifest is not None:
            if step is not None:
                step(name)
            manifests.append(manifest)
    _merge(index, manifests, report)
    for name in sorted(_list(store, "state/patients/")):
        report.patients += _restore_state(index, store, ring, name)


def _finish(index: Index, report: Synced, started: int) -> None:
    doc = {"time": started / 1e9, "added": report.added, "hosts": sorted(report.hosts)}
    index.put_meta(_LAST, _dumps(doc))


def last_sync(index: Index) -> dict[str, Any] | None:
    """When the index last synced, and what that added (``animfs status``)."""
    raw = index.meta(_LAST)
    return None if raw is None else dict(json.loads(raw))
