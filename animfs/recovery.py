"""Losing the index machine loses nothing: state objects, index snapshots and rebuilds.

The sites hold every chunk and manifest; this module keeps there, too, what
else the index knows and no manifest says:

``state/patients/<name>``   one patient's consents, record state and break-the-glass
                            grants (:meth:`Index.access_state`) with the time of the
                            change, written after every change (:func:`publish`)
``state/audit-head``        the audit log's chain head and size, so a rebuilt host can
                            tell whether the log it kept was cut short
``snapshots/<id>/part-N``   a compact copy of the LMDB index (``mdb_copy -c``), zstd,
``snapshots/<id>/index``    in parts; the descriptor (sizes, SHA-256) is written last,
                            so a snapshot without one is incomplete and ignored

``<name>`` is the keyed hash of the patient key with a key ring, else its
SHA-256; every object is sealed with a key ring (:mod:`animfs.keys`).

A change to access state is committed to the index first, marked there as
not yet at the sites, and published by whoever can: the command that made it
(if it can read the key and write the sites), else the mount, which looks
for marks every few seconds.  The mark is cleared only once every site took
the object, so a site that was down gets it at a later pass.

:func:`rebuild` makes a new index from one site: from its newest snapshot (if
asked) plus every manifest the snapshot lacks, or from the manifests alone;
then the state objects.  Manifests carry the names and inodes their instance
was given, and are replayed in ingest order (``ingested_ns``), so the result
serves the same tree (see :meth:`Index.restore`).  The manifests to replay are
held in memory for that sort (about 2 KB each).
It is built in a folder beside the index and renamed into place when whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from animfs import audit, chunks, keys
from animfs.index import Index
from animfs.keys import KeyRing, SealError
from animfs.manifest import Manifest
from animfs.store.base import ObjectNotFound, ObjectStore, StoreError
from animfs.store.dual import DualStore, NotEnoughSites, WriteBatch

log = logging.getLogger(__name__)

STATE_PREFIX = "state/patients/"
AUDIT_HEAD = "state/audit-head"
SNAPSHOT_PREFIX = "snapshots/"
PART_BYTES = 8 << 20  # a snapshot part: bounds the memory a snapshot takes
KEEP_SNAPSHOTS = 2
RESTORE_BATCH = 1024  # manifests committed per index transaction in a rebuild
THREADS = 8

Step = Callable[[str], None]


class RecoveryError(Exception):
    """A rebuild or snapshot cannot go on; the message says what and where."""


def _name(keys: KeyRing | None, text: str) -> str:
    return keys.keyed_id(text.encode()) if keys is not None else keys_sha(text)


def keys_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def patient_key(patient: str, keys: KeyRing | None) -> str:
    return STATE_PREFIX + _name(keys, patient)


KEY_CHECK = "state/key-check"


def check_key(store: DualStore, ring: KeyRing | None) -> None:
    """Make sure ``ring`` is this archive's key before anything is written under it.

    The first writer with a key leaves a small sealed object; every later one
    must open it.  Raises :class:`RecoveryError` (wrong key file) or StoreError.
    """
    if ring is None:
        return
    expected = ring.keyed_id(KEY_CHECK.encode()).encode()
    answered: StoreError | None = None
    for site in store.read_order():
        try:
            stored = site.get(KEY_CHECK)
        except ObjectNotFound:
            continue
        except StoreError as exc:  # a site down: the other one decides
            answered = answered or exc
            continue
        try:
            if ring.open(KEY_CHECK, stored) != expected:
                raise SealError("another id key")
        except SealError as exc:
            raise RecoveryError(
                f"the key file is not this archive's ({KEY_CHECK} at {site.name}: {exc})"
            ) from None
        return
    if answered is not None and len(store.sites) == 1:
        raise answered
    batch = store.batch()  # no site has one: this is the archive's first key
    batch.put(KEY_CHECK, ring.seal(KEY_CHECK, expected))
    try:
        batch.commit()
    except NotEnoughSites as exc:  # the writes that follow fail the same way; a later one
        log.warning("%s: %s", KEY_CHECK, exc)  # writes the check


# -- publishing state ------------------------------------------------------------------


def publish(
    index: Index,
    store: DualStore,
    ring: KeyRing | None,
    audit_path: Path,
    log_to: Callable[[WriteBatch, list[str]], object] | None = None,
) -> int:
    """Write every patient state not yet at the sites, and the audit head if it moved.

    ``log_to(batch, names)`` adds the state objects' names to this host's log
    (animfs.sync), once they are durable, so other hosts' syncs find them.
    Returns how many objects were written.  Blocks; safe to run while the index
    changes (a change made meanwhile stays marked for the next pass).
    """
    due = index.unpublished_state()
    batch = store.batch()
    names = []
    for patient, mark in due:
        doc = index.access_state(patient)
        doc["changed"] = int(mark)
        name = patient_key(patient, ring)
        batch.put(name, keys.seal_with(ring, name, _dumps(doc)))
        names.append(name)
    if names and log_to is not None:
        batch.drain()
        log_to(batch, names)
    head = audit.head(audit_path)
    head_doc = None
    if head is not None:
        head_doc = {"head": head[0], "bytes": head[1]}
        published = index.meta(b"audit-head")
        if published is not None and _same_head(json.loads(published), head_doc):
            head_doc = None
        else:
            head_doc["time"] = time.time()
            batch.put(AUDIT_HEAD, keys.seal_with(ring, AUDIT_HEAD, _dumps(head_doc)))
    if not due and head_doc is None:
        return 0
    missed = batch.commit()  # NotEnoughSites: nothing is marked done
    if missed:  # keep the marks: the site that missed it gets it at the next pass
        return len(due) + (head_doc is not None)
    for patient, mark in due:
        index.state_published(patient, mark)
    if head_doc is not None:
        index.put_meta(b"audit-head", _dumps(head_doc))
    return len(due) + (head_doc is not None)


def _same_head(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return bool(a.get("head") == b["head"] and a.get("bytes") == b["bytes"])


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _load(site: ObjectStore, name: str, ring: KeyRing | None, allow_plain: bool) -> bytes:
    stored = site.get(name)
    if ring is not None and not keys.is_sealed(stored) and not allow_plain:
        raise RecoveryError(
            f"{site.name}: {name}: not sealed, though a key is configured (written before "
            "the key? run 'animfs key reseal', or rebuild with --allow-plain)"
        )
    try:
        return keys.open_with(ring, name, stored)
    except SealError as exc:
        raise RecoveryError(f"{site.name}: {name}: {exc}") from None


def restore_state(
    index: Index, site: ObjectStore, ring: KeyRing | None, *, allow_plain: bool = False
) -> tuple[int, dict[str, Any] | None]:
    """Put the access state kept at ``site`` into ``index`` (newer local changes win).

    Returns (patients restored, the audit head kept at the site or None)."""
    restored = 0
    for name in sorted(site.list(STATE_PREFIX)):
        doc = json.loads(_load(site, name, ring, allow_plain))
        if patient_key(str(doc["patient"]), ring) != name:
            raise RecoveryError(f"{site.name}: {name}: holds another patient's state")
        restored += index.restore_access_state(doc)
    head = None
    if site.exists(AUDIT_HEAD):
        head = json.loads(_load(site, AUDIT_HEAD, ring, allow_plain))
        index.put_meta(b"audit-head", _dumps(head))
    return restored, head


# -- snapshots -------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    id: str
    time_ns: int
    parts: int
    bytes: int  # of the LMDB copy
    sha256: str
    instances: int

    @property
    def prefix(self) -> str:
        return f"{SNAPSHOT_PREFIX}{self.id}/"


def take_snapshot(index: Index, store: DualStore, ring: KeyRing | None, workdir: Path) -> Snapshot:
    """Copy the index compactly and upload it, in parts, to every site; prune old ones.

    Raises NotEnoughSites when fewer than ``min_sites`` took it whole.
    """
    now = time.time_ns()
    snap_id = f"{now:020d}"
    tmp = workdir / f".snapshot-{snap_id}"
    tmp.mkdir(parents=True)
    try:
        instances = index.counts()["instances"]
        index.env.copy(str(tmp), compact=True)
        data = tmp / "data.mdb"
        whole = hashlib.sha256()
        parts = size = 0
        batch = store.batch()
        with open(data, "rb") as f:
            while block := f.read(PART_BYTES):
                whole.update(block)
                size += len(block)
                name = f"{SNAPSHOT_PREFIX}{snap_id}/part-{parts:06d}"
                _, packed = chunks.seal(block)  # zstd; sealed below under this name
                batch.put(name, keys.seal_with(ring, name, packed))
                parts += 1
        snap = Snapshot(snap_id, now, parts, size, whole.hexdigest(), instances)
        batch.drain()  # the parts durable before the descriptor that makes them a snapshot
        name = f"{SNAPSHOT_PREFIX}{snap_id}/index"
        doc = {**snap.__dict__}
        batch.put(name, keys.seal_with(ring, name, _dumps(doc)))
        batch.commit()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for site in store.sites:
        try:
            _prune(site, ring)
        except (StoreError, RecoveryError) as exc:
            log.warning("site %s: old snapshots not pruned: %s", site.name, exc)
    return snap


def _snapshot_ids(site: ObjectStore) -> tuple[list[str], set[str]]:
    """(ids of complete snapshots newest first, ids of every snapshot) at a site."""
    complete, every = set(), set()
    for name in site.list(SNAPSHOT_PREFIX):
        snap_id, _, leaf = name[len(SNAPSHOT_PREFIX) :].partition("/")
        every.add(snap_id)
        if leaf == "index":
            complete.add(snap_id)
    return sorted(complete, reverse=True), every


def _prune(site: ObjectStore, ring: KeyRing | None) -> None:
    complete, every = _snapshot_ids(site)
    if not complete:
        return
    keep = set(complete[:KEEP_SNAPSHOTS])
    oldest_kept = min(keep)
    # An incomplete snapshot newer than the newest kept may still be being written.
    drop = {i for i in every if i not in keep and i < oldest_kept}
    for name in list(site.list(SNAPSHOT_PREFIX)):
        if name[len(SNAPSHOT_PREFIX) :].partition("/")[0] in drop:
            site.delete(name)
    if drop:
        site.flush()


def find_snapshot(
    site: ObjectStore, ring: KeyRing | None, snap_id: str | None = None, allow_plain: bool = False
) -> Snapshot:
    complete, _ = _snapshot_ids(site)
    if snap_id is not None and snap_id not in complete:
        raise RecoveryError(f"{site.name}: no complete snapshot {snap_id}")
    if not complete:
        raise RecoveryError(f"{site.name}: no snapshot (make one with 'animfs snapshot')")
    chosen = snap_id or complete[0]
    doc = json.loads(_load(site, f"{SNAPSHOT_PREFIX}{chosen}/index", ring, allow_plain))
    return Snapshot(**doc)


def _fetch_snapshot(
    site: ObjectStore, ring: KeyRing | None, snap: Snapshot, target: Path, allow_plain: bool
) -> None:
    whole = hashlib.sha256()
    with open(target / "data.mdb", "wb") as out:
        for n in range(snap.parts):
            name = f"{snap.prefix}part-{n:06d}"
            packed = _load(site, name, ring, allow_plain)
            try:
                block = zstandard.ZstdDecompressor().decompress(packed, max_output_size=PART_BYTES)
            except zstandard.ZstdError as exc:
                raise RecoveryError(f"{site.name}: {name}: does not decompress: {exc}") from None
            whole.update(block)
            out.write(block)
    if whole.hexdigest() != snap.sha256:
        raise RecoveryError(f"{site.name}: snapshot {snap.id}: parts do not match its SHA-256")


# -- rebuild ---------------------------------------------------------------------------


@dataclass
class Rebuilt:
    site: str
    snapshot: str | None = None
    from_snapshot: int = 0  # instances the snapshot held
    replayed: int = 0  # instances added from manifests
    patients: int = 0  # patients whose access state came from the site
    audit_head: dict[str, Any] | None = None

    def line(self) -> str:
        start = (
            f"snapshot {self.snapshot} ({self.from_snapshot} instances) + " if self.snapshot else ""
        )
        head = (
            f"; audit chain head at the site: {self.audit_head['head'][:16]} "
            f"({self.audit_head['bytes']} bytes of log)"
            if self.audit_head
            else ""
        )
        return (
            f"index rebuilt from {self.site}: {start}{self.replayed} instances from manifests, "
            f"access state of {self.patients} patients{head}"
        )


def rebuild(
    index_path: Path,
    map_size: int,
    site: ObjectStore,
    ring: KeyRing | None,
    *,
    snapshot: bool = False,
    snapshot_id: str | None = None,
    allow_plain: bool = False,
    step: Step | None = None,
) -> Rebuilt:
    """Make the index at ``index_path`` from ``site`` alone (it must not exist yet)."""
    if (index_path / "data.mdb").exists():
        raise RecoveryError(f"{index_path}: an index is already there; move it away to rebuild it")
    work = index_path.with_name(index_path.name + ".rebuilding")
    shutil.rmtree(work, ignore_errors=True)  # a rebuild that was stopped: start again
    work.mkdir(parents=True)
    report = Rebuilt(site.name)
    try:
        known: set[str] = set()
        if snapshot or snapshot_id:
            snap = find_snapshot(site, ring, snapshot_id, allow_plain)
            _fetch_snapshot(site, ring, snap, work, allow_plain)
            report.snapshot, report.from_snapshot = snap.id, snap.instances
        index = Index(work, map_size=map_size)
        try:
            for data in index.manifests():
                known.add(Manifest.from_bytes(data).object_key_with(ring))
            names = [n for n in site.list("manifests/") if n not in known]
            # In ingest order: names and inodes are recorded, but what a folder's
            # first entry decides (the views' folder times) follows that order.
            found = sorted(
                _manifests(site, ring, sorted(names), allow_plain, step),
                key=lambda m: (m.ingested_ns, m.instance.sop_uid),
            )
            for start in range(0, len(found), RESTORE_BATCH):
                report.replayed += index.restore(found[start : start + RESTORE_BATCH])
            report.patients, report.audit_head = restore_state(
                index, site, ring, allow_plain=allow_plain
            )
        finally:
            index.close()
        if index_path.exists():
            shutil.rmtree(index_path)  # no data.mdb in it: checked above
        work.rename(index_path)
    except StoreError as exc:
        raise RecoveryError(f"{exc}; try the other site") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _manifests(
    site: ObjectStore,
    ring: KeyRing | None,
    names: list[str],
    allow_plain: bool,
    step: Step | None,
) -> Iterator[Manifest]:
    """The manifests called ``names`` at ``site``, checked, fetched a few at a time."""

    def fetch(name: str) -> Manifest:
        plain = _load(site, name, ring, allow_plain)
        try:
            manifest = Manifest.from_bytes(plain)
            where = manifest.object_key_with(ring)
        except (ValueError, SealError) as exc:
            raise RecoveryError(f"{site.name}: {name}: {exc}") from None
        if where != name:
            raise RecoveryError(f"{site.name}: {name}: holds the manifest of another instance")
        return manifest

    with ThreadPoolExecutor(THREADS, thread_name_prefix="animfs-rebuild") as pool:
        for start in range(0, len(names), RESTORE_BATCH):
            for name, manifest in zip(
                names[start : start + RESTORE_BATCH],
                pool.map(fetch, names[start : start + RESTORE_BATCH]),
                strict=True,
            ):
                if step is not None:
                    step(name)
                yield manifest
