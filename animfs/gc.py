"""Orphans at the sites: find them and, when asked, delete them (``animfs gc``).

Ingest writes a group's chunks, then its manifests, flushes the sites, and only
then commits the group to the index (see :mod:`animfs.ingest`).  A process
killed before that commit, an instance refused at commit (its SOPInstanceUID
archived meanwhile with other bytes), or a full index leaves chunks at the
sites that no instance uses: orphans.  They are harmless (content addressing
means a re-run of the same ingest simply uses them again) but they take space.

A chunk is kept when any of these uses it:

- the index (its ``chunks`` table of referenced chunks);
- a manifest at any site that the index does not hold: another mount host's
  instance, or one whose commit a crash cut off.  Such manifests are reported,
  never deleted: re-running the ingest, or ``animfs rebuild-index``, adopts them;
- nothing yet, but it was written less than ``grace`` seconds ago.  An ingest
  running right now writes its chunks before it commits them, so a fresh
  unreferenced chunk may be one it is about to commit.  The grace period (24 h
  by default) must exceed the longest time a group of an ingest takes from its
  first write to its commit; a group is at most 64 files or 256 MB.

Each orphan is checked against the index once more just before it is deleted.
What remains is a narrow race, documented rather than locked against: an
ingest that writes the very bytes of an orphan older than the grace period
(the same content, ingested again) between that last check and the delete,
and then commits.  ``animfs verify`` would report that chunk missing, and
ingesting the same file again puts it back.

Nothing is deleted while any site cannot be listed, or a manifest the index
lacks cannot be read: either could hide a chunk that is in use.  File sites
also keep the half-written temporary files of a put that was killed; those
older than the grace period are removed too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from animfs.chunks import chunk_key
from animfs.index import Index
from animfs.manifest import Manifest
from animfs.store.base import ObjectInfo, ObjectStore, StoreError
from animfs.store.local import LocalStore

log = logging.getLogger(__name__)

GRACE_SECONDS = 24 * 3600.0
CHUNKS, MANIFESTS = "chunks/", "manifests/"


@dataclass(frozen=True)
class Orphan:
    site: str
    key: str  # an object key, or a temporary file's path within a file site
    size: int
    age: float  # seconds since it was written
    temporary: bool = False


@dataclass
class GcReport:
    orphans: list[Orphan] = field(default_factory=list)  # older than the grace period
    young: int = 0  # unreferenced, but written within the grace period: kept
    unindexed: set[str] = field(default_factory=set)  # manifest keys the index lacks: kept
    referenced: int = 0  # chunk copies in use, over all sites
    deleted: int = 0
    deleted_bytes: int = 0
    blocked: list[str] = field(default_factory=list)  # why nothing may be deleted

    @property
    def orphan_bytes(self) -> int:
        return sum(o.size for o in self.orphans)

    def line(self, deleting: bool) -> str:
        text = (
            f"{len(self.orphans)} orphans ({self.orphan_bytes / 1e6:.1f} MB), "
            f"{self.young} unreferenced but too recent to judge, "
            f"{self.referenced} chunk copies in use, "
            f"{len(self.unindexed)} manifests not in this index (kept)"
        )
        if self.blocked:
            return text + "; nothing deleted: " + "; ".join(self.blocked)
        if deleting:
            return text + f"; deleted {self.deleted} ({self.deleted_bytes / 1e6:.1f} MB)"
        return text + "; dry run, nothing deleted (--delete deletes the orphans)"


def collect(
    index: Index,
    sites: Sequence[ObjectStore],
    *,
    grace: float = GRACE_SECONDS,
    delete: bool = False,
    manifest_name: Callable[[Manifest], str] = lambda m: m.object_key,
    open_manifest: Callable[[str, bytes], bytes] = lambda name, stored: stored,
    now: Callable[[], float] = time.time,
    step: Callable[[str], None] | None = None,
) -> GcReport:
    """Find the orphans at ``sites`` (all the archive's sites), and delete them if asked.

    ``manifest_name`` gives where an instance's manifest is stored, and
    ``open_manifest(name, stored)`` its plain bytes: with a key ring both are
    keyed (see :mod:`animfs.manifest`), without, the defaults.
    """
    report = GcReport()
    keep = index.chunk_ids()
    indexed = {manifest_name(Manifest.from_bytes(data)) for data in index.manifests()}
    listings: dict[str, list[ObjectInfo]] = {}
    for site in sites:
        try:
            listings[site.name] = list(site.list_info(CHUNKS))
            manifests = list(site.list(MANIFESTS))
        except StoreError as exc:
            report.blocked.append(f"site {site.name} cannot be listed: {exc.reason}")
            continue
        for key in manifests:
            if key in report.unindexed or key in indexed:
                continue
            report.unindexed.add(key)
            try:
                manifest = Manifest.from_bytes(open_manifest(key, site.get(key)))
            except (StoreError, ValueError) as exc:
                report.blocked.append(f"site {site.name}: {key}: unreadable ({exc})")
                continue
            keep.update(ref.id for ref in manifest.chunks)
    t = now()
    for name, infos in listings.items():
        for info in infos:
            if step is not None:
                step(info.key)
            if info.key[len(CHUNKS) :] in keep:
                report.referenced += 1
            elif t - info.mtime < grace:
                report.young += 1
            else:
                report.orphans.append(Orphan(name, info.key, info.size, t - info.mtime))
    for site in sites:
        if isinstance(site, LocalStore):
            for info in site.temporaries():
                if t - info.mtime >= grace:
                    report.orphans.append(
                        Orphan(site.name, info.key, info.size, t - info.mtime, temporary=True)
                    )
    if delete and not report.blocked:
        by_name = {site.name: site for site in sites}
        for orphan in report.orphans:
            _delete(index, by_name[orphan.site], orphan, report)
    return report


def _delete(index: Index, site: ObjectStore, orphan: Orphan, report: GcReport) -> None:
    try:
        if orphan.temporary:
            assert isinstance(site, LocalStore)
            site.remove_temporary(orphan.key)
        else:
            chunk_id = orphan.key[len(CHUNKS) :]
            if index.has_chunk(chunk_id):  # committed since the listing: in use now
                return
            site.delete(chunk_key(chunk_id))
    except StoreError as exc:
        log.warning("site %s: cannot delete %s: %s", site.name, orphan.key, exc.reason)
        return
    report.deleted += 1
    report.deleted_bytes += orphan.size
