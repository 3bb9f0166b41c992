"""The disk cache: chunks exactly as a site stores them, in files under ``[cache] dir``.

Layout::

    <dir>/chunks/<id[:2]>/<id>   one stored chunk (compressed, sealed when encryption is on)
    <dir>/tmp/                   entries being written; renamed into chunks/ when whole
    <dir>/stats.json             the counters of the running (or last) mount
    <dir>/changed                touched by ``animfs cache clear|prefetch``, so that a
                                 running mount re-reads the folder

Rules:

- Use (the sum of the entries' sizes, plus the entries being written) stays at
  or under ``max_bytes``: room is reserved, evicting the least recently used
  entries, before an entry is written; a chunk for which only entries being
  written stand in the way is not kept.
- An entry is written to ``tmp/`` and renamed, so a crashed process never
  leaves a half entry under its name.  Entries are not fsynced (a cache, not a
  copy of record): what a power cut damages fails the check on read.
- Every read is checked by the caller's ``check`` exactly like a copy from a
  site; an entry that fails is deleted and reported as a miss, never served.
- A hit sets the entry's mtime, so the LRU order survives a remount:
  :meth:`DiskCache.load` rebuilds it from the folder, oldest mtime first.
- Several processes may share the folder (a mount and ``animfs cache
  prefetch``): every entry is whole or absent, and a process that finds an
  entry gone or new takes note (:meth:`DiskCache.get` adopts an entry written
  by another, :meth:`DiskCache.load` reconciles everything).

Every method blocks on disk I/O and is safe to call from several threads at
once; the lock guards the bookkeeping only and is never held during I/O.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from animfs.store.base import CorruptObject
from animfs.store.local import TempNames, read_all, write_all

log = logging.getLogger(__name__)

T = TypeVar("T")
STALE_TMP_SECONDS = 600.0  # a temporary entry this old belongs to a process that died


class DiskCache:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.dir = directory
        self.max_bytes = max_bytes
        self.chunks = directory / "chunks"
        self.tmp = directory / "tmp"
        self.marker = directory / "changed"
        self._chunks = str(self.chunks)  # entries are looked up by string: no Path per read
        self._tmp = str(self.tmp)
        self._tmp_names = TempNames("")  # several processes may share the folder
        for folder in (self.chunks, self.tmp):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, int] = OrderedDict()  # id -> bytes, LRU first
        self._bytes = 0  # entries plus reservations of entries being written
        self._writing: dict[str, int] = {}
        self._touched_while_loading: set[str] | None = None
        self._failing: str | None = None  # why writes fail now (a full disk)
        self._loaded = False  # the folder has been read once (see may_hold)
        self.counters = {
            "hits": 0,
            "misses": 0,
            "fills": 0,
            "evictions": 0,
            "corrupt_dropped": 0,
            "bypass_hits": 0,
            "bypass_misses": 0,
        }
        self.since = time.time()

    def path(self, chunk_id: str) -> Path:
        return Path(self._entry(chunk_id))

    def _entry(self, chunk_id: str) -> str:
        """An entry's file name, as a string: the hot paths make no Path."""
        return entry_path(self._chunks, chunk_id)

    def may_hold(self, chunk_id: str) -> bool:
        """Worth looking for on disk: a known entry, or any until the folder is loaded."""
        return not self._loaded or chunk_id in self._entries

    # -- reads -----------------------------------------------------------------------------

    def get(
        self,
        chunk_id: str,
        check: Callable[[bytes], T],
        *,
        promote: bool = True,
        size: int | None = None,
    ) -> T | None:
        """``check(stored bytes)`` of the cached entry, or None on a miss.

        ``check`` raises CorruptObject for bad bytes: the entry is then deleted
        and this is a miss.  ``promote=False`` (backup reads) leaves the LRU
        order, the entry's mtime and the hit/miss counters as they were.

        ``size``, the stored size the manifest gives, lets the entry be read in one
        ``read`` (of one byte more, so that a longer entry is seen and read whole, for
        ``check`` to judge): the mount reads a chunk per small file, and each system
        call here is also a hand-over of the GIL, which the trio thread waits for.
        """
        try:
            stored = read_entry(self._entry(chunk_id), size, promote=promote)
        except FileNotFoundError:
            self.missed(chunk_id, promote=promote)
            return None
        except OSError as exc:
            self.unreadable(chunk_id, exc.strerror or str(exc), promote=promote)
            return None
        try:
            value = check(stored)
        except CorruptObject as exc:
            self.drop_damaged(chunk_id, exc.reason, promote=promote)
            return None
        self.hit(chunk_id, len(stored), promote=promote)
        return value

    # What a read found, for the bookkeeping: :meth:`get` reads and checks entries
    # itself, and the mount's unpacker processes (:mod:`animfs.unpack`) report theirs.

    def hit(self, chunk_id: str, size: int, *, promote: bool = True) -> None:
        """A good entry of ``size`` bytes was read (and, when ``promote``, its mtime set)."""
        if not promote:
            self._count("bypass_hits")
            return
        with self._lock:
            self.counters["hits"] += 1
            self._note(chunk_id)
            if chunk_id in self._entries:
                self._entries.move_to_end(chunk_id)
                victims = []
            else:  # written by another process: adopt it
                self._entries[chunk_id] = size
                self._bytes += size
                victims = self._evict()
        self._remove(victims)

    def missed(self, chunk_id: str, *, promote: bool = True) -> None:
        """There was no entry under that name."""
        self._forget(chunk_id)
        self._count("misses" if promote else "bypass_misses")

    def unreadable(self, chunk_id: str, reason: str, *, promote: bool = True) -> None:
        """The entry is there, but reading it failed: a miss, the entry left as it is."""
        log.warning("disk cache: cannot read %s: %s", self._entry(chunk_id), reason)
        self._count("misses" if promote else "bypass_misses")

    def drop_damaged(self, chunk_id: str, reason: str, *, promote: bool = True) -> None:
        """The entry failed its check: deleted, never served."""
        log.warning("disk cache: dropping damaged entry %s: %s", chunk_id[:16], reason)
        self._unlink(Path(self._entry(chunk_id)))
        self._forget(chunk_id)
        self._count("corrupt_dropped")
        self._count("misses" if promote else "bypass_misses")

    def contains(self, chunk_id: str) -> bool:
        return self.path(chunk_id).exists()

    # -- writes ----------------------------------------------------------------------------

    def put(self, chunk_id: str, stored: bytes) -> bool:
        """Keep a stored chunk (already checked by the caller); whether it was written now
        (not if it is kept already, or being written, or there is no room)."""
        if not self.reserve(chunk_id, len(stored)):
            return False
        tmp = os.path.join(self._tmp, self._tmp_names.next())
        try:
            write_entry(self._entry(chunk_id), tmp, stored)
        except OSError as exc:
            self.release(chunk_id, written=False)
            self.write_failed(exc.strerror or str(exc))
            return False
        self.release(chunk_id, written=True)
        return True

    # An entry is written under a reservation, so that use stays under the cap with what
    # is being written counted in: by :meth:`put` here, or by one of the mount's unpacker
    # processes (:mod:`animfs.unpack`), which the mount reserves for.

    def reserve(self, chunk_id: str, size: int) -> bool:
        """Room for an entry of ``size`` bytes about to be written, made by evicting; False
        when it is not to be written: already there (it is then the most recently used)
        or being written, or no room."""
        if size > self.max_bytes:
            return False
        with self._lock:
            self._note(chunk_id)
            if chunk_id in self._entries:
                self._entries.move_to_end(chunk_id)
                return False
            if chunk_id in self._writing:
                return False
            self._bytes += size
            victims = self._evict()
            if self._bytes > self.max_bytes:  # the rest is being written: no room now
                self._bytes -= size
                return False
            self._writing[chunk_id] = size
        self._remove(victims)
        return True

    def release(self, chunk_id: str, *, written: bool) -> None:
        """The end of a reservation: the entry is there (``written``), or its room is free."""
        with self._lock:
            size = self._writing.pop(chunk_id)
            if written:
                self._entries[chunk_id] = size
                self.counters["fills"] += 1
                resumed, self._failing = self._failing is not None, None
            else:
                self._bytes -= size
                resumed = False
        if resumed:
            log.info("disk cache: %s takes writes again; caching resumes", self.dir)

    def write_failed(self, reason: str) -> None:
        """Warn once while writes keep failing the same way: a full cache disk fails
        every fill, and reads are served all the same, from the sites."""
        with self._lock:
            first, self._failing = self._failing != reason, reason
        if first:
            log.warning(
                "disk cache: cannot write to %s: %s; chunks are served without caching "
                "until it takes writes again",
                self.dir,
                reason,
            )

    # -- bookkeeping -----------------------------------------------------------------------

    def _evict(self) -> list[Path]:
        """Drop LRU entries until use fits the cap (lock held); returns the files to delete."""
        victims = []
        while self._bytes > self.max_bytes and self._entries:
            chunk_id, size = self._entries.popitem(last=False)
            self._bytes -= size
            self.counters["evictions"] += 1
            victims.append(self.path(chunk_id))
        return victims

    def _remove(self, paths: list[Path]) -> None:
        for path in paths:
            self._unlink(path)

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("disk cache: cannot delete %s: %s", path, exc.strerror)

    def _forget(self, chunk_id: str) -> None:
        with self._lock:
            size = self._entries.pop(chunk_id, None)
            if size is not None:
                self._bytes -= size

    def _note(self, chunk_id: str) -> None:
        if self._touched_while_loading is not None:
            self._touched_while_loading.add(chunk_id)

    def _count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    def load(self) -> None:
        """(Re)build the LRU state from the folder, oldest mtime first, and evict down
        to the cap.  Called once at start (in a thread: it walks every entry) and
        again when another process changed the folder; entries used meanwhile
        keep their place at the recent end."""
        with self._lock:
            self._touched_while_loading = set()
        found: list[tuple[int, str, int]] = []
        for fan in _scandir(self.chunks):
            if not fan.is_dir(follow_symlinks=False):
                continue
            for entry in _scandir(Path(fan.path)):
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                found.append((st.st_mtime_ns, entry.name, st.st_size))
        found.sort()
        cutoff = time.time() - STALE_TMP_SECONDS
        for entry in _scandir(self.tmp):
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    self._unlink(Path(entry.path))
            except OSError:
                continue
        with self._lock:
            touched = self._touched_while_loading or set()
            self._touched_while_loading = None
            entries: OrderedDict[str, int] = OrderedDict((cid, size) for _, cid, size in found)
            for cid in touched:
                if cid in self._entries:
                    entries[cid] = self._entries[cid]
                    entries.move_to_end(cid)
            self._entries = entries
            self._bytes = sum(entries.values()) + sum(self._writing.values())
            self._loaded = True
            victims = self._evict()
        self._remove(victims)

    def clear(self) -> tuple[int, int]:
        """Delete every entry; returns (entries, bytes) deleted."""
        self.load()
        with self._lock:
            gone = list(self._entries.items())
            self._entries.clear()
            self._bytes = sum(self._writing.values())
        self._remove([self.path(cid) for cid, _ in gone])
        self.touch_marker()
        return len(gone), sum(size for _, size in gone)

    def touch_marker(self) -> None:
        """Tell a running mount that the folder changed under it."""
        self.marker.touch()
        os.utime(self.marker)

    def marker_mtime(self) -> int:
        try:
            return self.marker.stat().st_mtime_ns
        except OSError:
            return 0

    def stats(self) -> dict[str, Any]:
        """Use and counters of this process, for status reports."""
        with self._lock:
            reads = self.counters["hits"] + self.counters["misses"]
            return {
                "dir": str(self.dir),
                "max_bytes": self.max_bytes,
                "bytes": self._bytes,
                "entries": len(self._entries),
                "writing": len(self._writing),
                **self.counters,
                "hit_rate": round(self.counters["hits"] / reads, 4) if reads else None,
                "since": self.since,
            }


def entry_path(chunks_dir: str, chunk_id: str) -> str:
    """The file of an entry, ``<dir>/chunks/<id[:2]>/<id>``, given ``<dir>/chunks``."""
    return os.path.join(chunks_dir, chunk_id[:2], chunk_id)


def read_entry(path: str, size: int | None, *, promote: bool) -> bytes:
    """The bytes of the entry at ``path`` (in one read when ``size`` is right), and when
    ``promote`` its mtime set: the LRU order the next :meth:`DiskCache.load` rebuilds.
    Raises FileNotFoundError for no entry, OSError for one that cannot be read.  Used
    by :meth:`DiskCache.get` and by the mount's unpacker processes."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        stored = read_all(fd, size)
        if promote:
            with contextlib.suppress(OSError):
                os.utime(fd)
        return stored
    finally:
        os.close(fd)


def write_entry(path: str, tmp: str, stored: bytes) -> None:
    """Write the entry at ``path`` through the temporary file ``tmp`` and a rename, so that
    a crash never leaves half an entry under its name.  With os calls on strings: a
    buffered ``open`` of a Path costs a third more CPU, and every cold read of a small file
    writes one.  Raises OSError, the temporary file removed.  Used by :meth:`DiskCache.put`
    and by the mount's unpacker processes."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, stored)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, path)
        except FileNotFoundError:  # first entry of its fan-out folder
            with contextlib.suppress(FileExistsError):  # another writer's first
                os.mkdir(os.path.dirname(path), mode=0o700)
            os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _scandir(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError:
        return []


STATS_FILE = "stats.json"


def save_stats(cache: DiskCache, extra: dict[str, Any] | None = None) -> None:
    """Write the counters of this process to ``<dir>/stats.json`` (temp and rename), for
    ``animfs status`` and ``animfs cache stats``, which run in other processes."""
    doc = {**cache.stats(), **(extra or {}), "updated": time.time(), "pid": os.getpid()}
    tmp = cache.tmp / f"stats-{uuid.uuid4().hex}"
    try:
        tmp.write_text(json.dumps(doc, sort_keys=True))
        os.replace(tmp, cache.dir / STATS_FILE)
    except OSError as exc:
        DiskCache._unlink(tmp)
        cache.write_failed(exc.strerror or str(exc))


def report(directory: Path, max_bytes: int) -> dict[str, Any]:
    """What ``animfs status`` shows of the cache: use as found in the folder now, and the
    counters of the running (or last) mount as it last saved them."""
    cache = DiskCache(directory, max_bytes)
    cache.load()
    now = cache.stats()
    out: dict[str, Any] = {k: now[k] for k in ("dir", "max_bytes", "bytes", "entries")}
    try:
        saved = json.loads((directory / STATS_FILE).read_text())
    except (OSError, ValueError):
        saved = {}
    for key in (*cache.counters, "hit_rate", "since", "updated"):
        out[key] = saved.get(key, 0 if key in cache.counters else None)
    return out
