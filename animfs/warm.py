"""``animfs cache prefetch PATH``: fetch a folder's chunks into the disk cache ahead of use.

It works on the archive directly, mounted or not: PATH is resolved in the
index (never through the mount, so no open is made, audited or refused), and
every chunk of every file below it is read from the sites, checked, and
written to the cache folder as stored.  A running mount of the same config
notices (``<cache dir>/changed``) and takes the new entries into its LRU
bookkeeping within seconds; it also uses an entry it does not know yet the
first time it needs it.

PATH is either a path inside a mounted animfs (``/mnt/archive/patients/...``:
the mount point is found in /proc/self/mountinfo and taken off) or a path from
the mount root (``patients/P/S``, ``/studies/<StudyInstanceUID>``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from animfs import chunks
from animfs.cache import FETCH_THREADS, check_stored
from animfs.chunks import ChunkRef
from animfs.diskcache import DiskCache
from animfs.index import DIR, FILE, LINK, ROOT_INO, Index, Node
from animfs.store.dual import DualStore

MAX_LINKS = 8


class NotInArchive(Exception):
    """PATH names nothing in the archive; the message says which part is missing."""


@dataclass
class Warmed:
    files: int = 0
    chunks: int = 0
    already: int = 0  # chunks that were cached before
    fetched_bytes: int = 0  # as stored
    failed: int = 0

    def line(self) -> str:
        return (
            f"prefetched {self.files} files: {self.chunks} chunks, {self.already} already "
            f"cached, {self.chunks - self.already - self.failed} fetched "
            f"({self.fetched_bytes / 1e6:.1f} MB as stored), {self.failed} failed"
        )


def archive_path(path: str, mountinfo: str = "/proc/self/mountinfo") -> str:
    """PATH as a path from the mount root: the mount point of an animfs mount it lies in
    is taken off; any other path is taken to be from the mount root already."""
    absolute = os.path.abspath(path)
    best = ""
    try:
        with open(mountinfo) as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
                if fields[sep + 1] == "fuse.animfs" and (
                    absolute == point or absolute.startswith(point.rstrip("/") + "/")
                ):
                    best = max(best, point, key=len)
    except (OSError, ValueError):
        pass
    if best:
        return "/" + os.path.relpath(absolute, best).removeprefix(".")
    return "/" + path.strip("/")


def resolve(index: Index, path: str) -> Node:
    """The node at ``path`` (from the mount root), following /studies links."""
    node = index.node(ROOT_INO)
    assert node is not None
    parts = [p for p in path.split("/") if p and p != "."]
    links = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            parent = index.node(node.parent)
            assert parent is not None
            node = parent
            continue
        found = index.lookup(node.ino, os.fsencode(name)) if node.kind == DIR else None
        if found is None:
            raise NotInArchive(f"{path}: no {name!r} in the archive")
        if found.kind == LINK:
            links += 1
            if links > MAX_LINKS:
                raise NotInArchive(f"{path}: too many links")
            parts = os.fsdecode(found.target).split("/") + parts
            continue
        node = found
    return node


def files_below(index: Index, node: Node) -> Iterator[Node]:
    """Every file at or below ``node``, in listing order."""
    if node.kind == FILE:
        yield node
        return
    after: bytes | None = None
    while batch := index.entries(node.ino, after, 256):
        for child in batch:
            if child.kind == DIR:
                yield from files_below(index, child)
            elif child.kind == FILE:
                yield child
        after = batch[-1].name


def prefetch(
    index: Index,
    store: DualStore,
    disk: DiskCache,
    node: Node,
    step: Callable[[str], None] = lambda _: None,
    problem: Callable[[str], None] = lambda _: None,
    check: Callable[[ChunkRef, bytes], bytes] = check_stored,
) -> Warmed:
    """Fetch every chunk of the files below ``node`` into ``disk`` (blocks).  ``check``
    opens a stored chunk, or raises CorruptObject (:func:`animfs.cache.check_stored`
    with the archive's keys)."""
    disk.load()
    done = Warmed()
    refs: dict[str, ChunkRef] = {}
    for file in files_below(index, node):
        manifest = index.manifest(file.instance)
        if manifest is None:
            problem(f"{index.path_of(file.ino)}: instance record missing from the index")
            continue
        done.files += 1
        for ref in manifest.chunks:
            refs.setdefault(ref.id, ref)
    done.chunks = len(refs)

    def fetch(ref: ChunkRef) -> tuple[ChunkRef, str | None, int]:
        """(ref, problem or None, bytes fetched); -1 bytes: it was cached already."""
        if disk.get(ref.id, lambda stored: check(ref, stored)) is not None:
            return ref, None, -1
        try:
            stored, _site = store.read(chunks.chunk_key(ref.id), _checked(ref, check))
        except Exception as exc:  # one bad chunk is reported; the others are still warmed
            return ref, f"chunk {ref.id[:16]}: {exc}", 0
        disk.put(ref.id, stored)
        return ref, None, len(stored)

    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        for ref, failure, size in pool.map(fetch, refs.values()):
            if failure is not None:
                done.failed += 1
                problem(failure)
            elif size < 0:
                done.already += 1
            else:
                done.fetched_bytes += size
            step(ref.id[:16])
    disk.touch_marker()
    return done


def _checked(ref: ChunkRef, check: Callable[[ChunkRef, bytes], bytes]) -> Callable[[bytes], bytes]:
    def checked(stored: bytes) -> bytes:
        check(ref, stored)
        return stored

    return checked
