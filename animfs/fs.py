"""The pyfuse3 Operations: thin handlers over the index and the chunk cache.

This is the only module that raises ``FUSEError``: domain errors from below are
turned into an errno here, and logged once, here.  Names stay ``bytes``.

The tree is immutable once written, except that folders gain entries while
ingest runs elsewhere, so: files and symlinks get long kernel entry and
attribute time-outs, folders a long entry time-out (a name never changes) but
a short attribute one (their mtime and link count grow); opened files keep
the page cache between opens.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import os
import stat
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast

import pyfuse3

from animfs import audit
from animfs.access import Decision
from animfs.cache import READ_AHEAD, ChunkCache, ChunkUnavailable
from animfs.cdtree import CdTree, Entry, is_cd
from animfs.chunks import CHUNK_SIZE, ChunkRef, chunk_key
from animfs.config import User
from animfs.guard import Guard, Study
from animfs.index import DIR, FILE, ROOT_INO, STATUS_INO, Index, Node
from animfs.manifest import Manifest

log = logging.getLogger(__name__)

IMMUTABLE_TIMEOUT = 24 * 3600.0
FOLDER_ATTR_TIMEOUT = 1.0
BLOCK = 512
SERIES_AHEAD = 8  # following files of a folder fetched when one is opened ...
SERIES_CHUNKS = 2  # ... up to this many chunks of each
SEQUENTIAL_SLACK = CHUNK_SIZE  # a read this close to where the last one ended is sequential
PREFETCHED_MEMORY = 4096  # inodes remembered as prefetched, so each is fetched once
FOLDERS_AHEAD = 256  # folders whose window of files listed ahead is kept
OPENABLE_MEMORY = 4096  # files whose node and instance record are kept for opens (~1.6 KB each)
FILE_NODES_MEMORY = 16384  # instance files' nodes kept from their lookups (~0.4 KB each)

P = ParamSpec("P")
R = TypeVar("R")
K = TypeVar("K")
V = TypeVar("V")


def handler(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Answer an unexpected exception with EIO (logged once) instead of killing the mount."""

    @functools.wraps(fn)
    async def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapped


def _sequential(off: int, next_offset: int) -> bool:
    """Does a read at ``off`` continue a sequential reader that has read up to
    ``next_offset``?  Not only at exactly that offset: the kernel's read-ahead sends
    several requests at once, and they may be handled out of order (a request for
    5 MiB before the one for 4 MiB), which must not stop the read-ahead."""
    return off == 0 or abs(off - next_offset) <= SEQUENTIAL_SLACK


@dataclass
class OpenFile:
    node: Node
    chunks: tuple[ChunkRef, ...]
    next_offset: int = 0  # the furthest end read since the last seek: where a reader goes on
    bypass: bool = False  # a backup read: streams past the caches


@dataclass
class Counters:
    """What this mount has done since it started, for ``/.animfs/status``."""

    opens: int = 0  # files opened (allowed)
    denials: int = 0  # opens refused by the access rules
    read_bytes: int = 0  # bytes returned to readers
    read_errors: int = 0  # reads answered with EIO


# Extended attributes of a file: name -> field of its Instance.
DICOM_XATTRS = {
    b"user.dicom.PatientID": "patient_id",
    b"user.dicom.PatientName": "patient_name",
    b"user.dicom.StudyInstanceUID": "study_uid",
    b"user.dicom.SeriesInstanceUID": "series_uid",
    b"user.dicom.SOPInstanceUID": "sop_uid",
    b"user.dicom.SOPClassUID": "sop_class_uid",
    b"user.dicom.Modality": "modality",
    b"user.dicom.StudyDate": "study_date",
    b"user.dicom.InstitutionName": "institution_name",
    b"user.dicom.TransferSyntaxUID": "transfer_syntax",
}
ANIMFS_FILE_XATTRS = (
    b"user.animfs.sha256",
    b"user.animfs.institution",
    b"user.animfs.chunks",
    b"user.animfs.stored_bytes",
    b"user.animfs.sites",
    b"user.animfs.cached",
)
FILE_XATTRS = (*DICOM_XATTRS, *ANIMFS_FILE_XATTRS)
DIR_XATTRS = (b"user.animfs.subdirs", b"user.animfs.files", b"user.animfs.bytes")


def _keep_last(memory: OrderedDict[K, V], key: K, value: V, limit: int) -> None:
    """Set ``memory[key]``, forgetting the oldest entries beyond ``limit``."""
    memory[key] = value
    if len(memory) > limit:
        memory.popitem(last=False)


def _remember(memory: OrderedDict[tuple[int, bool], None], key: tuple[int, bool]) -> bool:
    """Add ``key`` to a memory of the last :data:`PREFETCHED_MEMORY`; False if it was there."""
    if key in memory:
        return False
    _keep_last(memory, key, None, PREFETCHED_MEMORY)
    return True


@dataclass
class OpenDir:
    ino: int
    resume_id: int = 0  # readdir offset of the last entry sent ...
    resume_name: bytes = b""  # ... and its name, so a listing resumes in one seek
    uid: int = 0  # who opened it: readdir gets no request context


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        index: Index,
        cache: ChunkCache,
        *,
        users: Mapping[int, User] | None = None,
        audit_log: audit.GroupCommit | None = None,
        series_ahead: int = SERIES_AHEAD,
    ) -> None:
        """With ``users`` (the config's [users]) access control is on and every open is
        decided and written to ``audit_log``; without, everyone may open everything.
        Opening a file prefetches the ``series_ahead`` files after it (0: none)."""
        super().__init__()
        self.index = index
        self.cache = cache
        self.guard = Guard(index, users or {})
        if self.guard.enforced and audit_log is None:
            raise ValueError("access control needs an audit log")
        self.audit_log = audit_log
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, OpenDir] = {}
        self._next_fh = 1
        self.cd = CdTree(index)  # /cd: each patient as a DICOM medium
        self._cd_files: dict[int, bytes] = {}  # open DICOMDIR or README.TXT: content at open
        self._status: dict[int, bytes] = {}  # open /.animfs/status: its content at open
        self.counters = Counters()
        self.started = time.time()
        self.series_ahead = series_ahead
        # (inode, bypass) already prefetched: backup prefetches must not stop a
        # clinician's open from warming the caches
        self._prefetched: OrderedDict[tuple[int, bool], None] = OrderedDict()
        # (folder inode, bypass) -> the name of the last file opened there, and the
        # names listed ahead of it
        self._ahead: OrderedDict[tuple[int, bool], tuple[bytes, list[bytes]]] = OrderedDict()
        self._file_nodes: OrderedDict[int, Node] = OrderedDict()  # see _node
        # Files as open needs them (node and instance record), by inode: neither ever
        # changes once committed, and reading and decoding them cost about as much
        # as the round trip of the open itself.  Filled by opens and series prefetch.
        self._openable: OrderedDict[
            int, tuple[Node, tuple[ChunkRef, ...], Manifest | None]
        ] = OrderedDict()

    # -- attributes ------------------------------------------------------------------

    def attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.ino
        attr.generation = 0
        if node.kind == DIR:
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 2 + node.subdirs
            attr.st_size = 0
            attr.entry_timeout = IMMUTABLE_TIMEOUT
            attr.attr_timeout = FOLDER_ATTR_TIMEOUT
        else:
            attr.st_mode = (stat.S_IFREG | 0o444) if node.kind == FILE else (stat.S_IFLNK | 0o777)
            # An instance file has two names: under /patients and under /cd.  Saying so
            # lets du, tar and rsync -H count and copy it once.
            attr.st_nlink = 2 if node.kind == FILE and node.sop_uid else 1
            attr.st_size = node.size
            attr.entry_timeout = IMMUTABLE_TIMEOUT
            attr.attr_timeout = IMMUTABLE_TIMEOUT
        attr.st_uid = 0
        attr.st_gid = 0
        attr.st_rdev = 0
        attr.st_blksize = CHUNK_SIZE
        attr.st_blocks = (attr.st_size + BLOCK - 1) // BLOCK
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = node.mtime_ns
        return attr

    def _node(self, ino: int) -> Node:
        """The node of ``ino``; ENOENT if there is none.

        An instance file's node never changes once committed, and the kernel asks for
        one (getattr, open) only after a lookup found it: the last looked up are kept
        by inode, so that neither reads the index again.  On an index of millions of
        instances each such read costs a page fault or two (scripts/bench_scale.py)."""
        known = self._file_nodes.get(ino)
        if known is not None:
            self._file_nodes.move_to_end(ino)
            return known
        if is_cd(ino):
            entry = self.cd.entry(ino)
            node = None if entry is None else entry.node
        else:
            node = self.index.node(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        self._keep_file_node(node)
        return node

    def _keep_file_node(self, node: Node) -> None:
        if node.sop_uid:
            _keep_last(self._file_nodes, node.ino, node, FILE_NODES_MEMORY)

    @handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if is_cd(parent_inode) and name not in (b".", b".."):
            return await self._cd_lookup(parent_inode, name, ctx)
        if name == b".":
            node = self._node(parent_inode)
        elif name == b"..":
            node = self._node(self._node(parent_inode).parent)
        else:
            found = self.index.lookup(parent_inode, name)
            if found is None:
                hidden = self.guard.conceals_missing(ctx.uid, parent_inode)
                raise pyfuse3.FUSEError(errno.EACCES if hidden else errno.ENOENT)
            node = found
            self._keep_file_node(node)
        if not self.guard.may_see(ctx.uid, node):
            await self._audit_refused_lookup(node, ctx)
            raise pyfuse3.FUSEError(errno.EACCES)
        return self.attributes(node)

    def _decision_entry(
        self,
        ctx: pyfuse3.RequestContext,
        user: User | None,
        study: Study | None,
        decision: Decision,
        path: str,
    ) -> dict[str, Any]:
        """The audit line of one access decision by the caller of ``ctx``."""
        return audit.open_entry(
            now=self.guard.clock(),
            uid=ctx.uid,
            user=user,
            pid=ctx.pid,
            path=path,
            patient=study.patient if study else "",
            study=study.uid if study else "",
            allowed=decision.allowed,
            rule=decision.rule,
        )

    async def _audit_refused_lookup(self, node: Node, ctx: pyfuse3.RequestContext) -> None:
        """Write the audit line of a name refused to a mapped user.

        The kernel caches names for everyone, so whether an attempt to open a
        patient's file is refused here or in ``open`` depends on what other users
        looked up before.  Either way it is a refused attempt at that patient's
        data, and the audit log gets exactly one line for it.  (Unmapped uids are
        refused everything, listings included, and are not about one patient.)
        """
        if self.audit_log is None or self.guard.user(ctx.uid) is None:
            return
        user, study, decision = self.guard.decide_node(ctx.uid, node)
        entry = self._decision_entry(ctx, user, study, decision, self.index.path_of(node.ino))
        entry["event"] = "lookup"
        self.counters.denials += 1
        try:
            await self.audit_log.record(entry)
        except audit.AuditUnavailable as exc:
            log.error("%s; a refused lookup of inode %d went unrecorded", exc, node.ino)

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if is_cd(inode):
            return self._cd_attributes(await self._cd_entry(inode))
        return self.attributes(self._node(inode))

    @handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if node.kind == DIR or node.kind == FILE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if not self.guard.may_see(ctx.uid, node):  # the target names the patient
            raise pyfuse3.FUSEError(errno.EACCES)
        return node.target

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        root = self._node(ROOT_INO)
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = BLOCK
        out.f_blocks = (root.bytes_below + BLOCK - 1) // BLOCK
        out.f_bfree = out.f_bavail = 0
        out.f_files = root.files + root.subdirs
        out.f_ffree = out.f_favail = 0
        out.f_namemax = 255
        return out

    # -- folders ---------------------------------------------------------------------

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    @handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if is_cd(inode):
            return await self._cd_opendir(inode, ctx)
        node = self._node(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if not self.guard.may_see(ctx.uid, node):
            raise pyfuse3.FUSEError(errno.EACCES)
        fh = self._new_fh()
        self._dirs[fh] = OpenDir(inode, uid=ctx.uid)
        return fh

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        d = self._dirs[fh]
        if is_cd(d.ino):
            return await self._cd_readdir(d, start_id, token)
        if start_id == 0:
            after = None
        elif start_id == d.resume_id:
            after = d.resume_name
        else:  # an offset we did not hand out last: count our way there
            after = self._name_at(d.ino, start_id)
        position = start_id
        # Offsets count every entry, shown or hidden, so that _name_at stays right.
        check = self.guard.filters(d.uid, d.ino)
        while True:
            batch = self.index.entries(d.ino, after, 256)
            if not batch:
                return
            for node in batch:
                after = node.name
                if check and not self.guard.may_see(d.uid, node):
                    position += 1
                    continue
                if not pyfuse3.readdir_reply(token, node.name, self.attributes(node), position + 1):
                    return
                position += 1
                d.resume_id, d.resume_name = position, node.name

    def _name_at(self, ino: int, position: int) -> bytes | None:
        """The name of the ``position``-th entry (1-based) of a folder."""
        after: bytes | None = None
        seen = 0
        while seen < position:
            batch = self.index.entries(ino, after, min(4096, position - seen))
            if not batch:
                break
            seen += len(batch)
            after = batch[-1].name
        return after

    @handler
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # -- files -----------------------------------------------------------------------

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise pyfuse3.FUSEError(errno.EROFS)
        if is_cd(inode):
            return await self._cd_open(inode, ctx)
        known = self._openable.get(inode)
        if known is not None:  # opened (or prefetched) before: nothing to read or decode
            self._openable.move_to_end(inode)
            node, chunks, manifest = known
            self.counters.opens += 1
        else:
            node = self._node(inode)
            if node.kind == DIR:
                raise pyfuse3.FUSEError(errno.EISDIR)
            if node.kind != FILE:
                raise pyfuse3.FUSEError(errno.ELOOP)
            if inode == STATUS_INO:
                return self._open_status(ctx)
            self.counters.opens += 1  # asked for; denials are counted among them
            chunks, manifest = self._instance(node)
        if self.guard.enforced:
            assert manifest is not None  # (_keep reads it whole when access is controlled)
            await self._authorize(node, manifest, ctx)
        fh = self._new_fh()
        bypass = self.guard.streams_past_cache(ctx.uid)
        self._files[fh] = OpenFile(node, chunks, bypass=bypass)
        if self.series_ahead:
            self._prefetch_following(node, bypass)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def _instance(self, node: Node) -> tuple[tuple[ChunkRef, ...], Manifest | None]:
        """What opening a file needs of its instance record (EIO if it is missing)."""
        known = self._keep(node)
        if known is None:
            log.error("inode %d: instance record missing from the index", node.ino)
            raise pyfuse3.FUSEError(errno.EIO)
        return known

    def _keep(self, node: Node) -> tuple[tuple[ChunkRef, ...], Manifest | None] | None:
        """A file's chunks, and its manifest when access is controlled (the open is
        decided on it), from its instance record; kept in memory with its node for its
        next opens.  Without access control only the chunks are read: decoding the
        whole record was a tenth of the mount's CPU in a warm read of small files."""
        if self.guard.enforced:
            manifest = self.index.file_manifest(node)
            chunks = None if manifest is None else manifest.chunks
        else:
            manifest, chunks = None, self.index.file_chunks(node)
        if chunks is None:
            return None
        _keep_last(self._openable, node.ino, (node, chunks, manifest), OPENABLE_MEMORY)
        return chunks, manifest

    def _prefetch_following(self, node: Node, bypass: bool) -> None:
        """Start fetching the next files of the folder, in listing order: viewers,
        converters and backups read a series one file after another, and each file
        of a series is typically a chunk or less, so waiting for each in turn would
        cost a site round trip per file.

        A reader going through a folder opens the files listed ahead of it one by
        one, so the window of names listed ahead is kept per folder, and an open
        lists only the entries that have come into reach since the last one (one
        per open, rather than ``series_ahead``: each entry listed is a record decoded
        on the trio thread, which serves every request).  Opening the same file again
        lists nothing."""
        key = (node.parent, bypass)
        last, ahead = self._ahead.pop(key, (b"", []))
        if node.name in ahead:  # the reader moved on within the window
            ahead = ahead[ahead.index(node.name) + 1 :]
        elif node.name != last:  # the first open in this folder, or a jump: start here
            ahead = []
        # else opened again (a toolkit reads the header, then the pixels): same window
        if len(ahead) < self.series_ahead:
            after = ahead[-1] if ahead else node.name
            for sibling in self.index.entries(node.parent, after, self.series_ahead - len(ahead)):
                ahead.append(sibling.name)
                if sibling.kind != FILE or not _remember(self._prefetched, (sibling.ino, bypass)):
                    continue
                known = self._keep(sibling)
                if known is not None:
                    self.cache.prefetch(known[0][:SERIES_CHUNKS], bypass=bypass)
        _keep_last(self._ahead, key, (node.name, ahead), FOLDERS_AHEAD)

    async def _authorize(
        self, node: Node, manifest: Manifest, ctx: pyfuse3.RequestContext, path: str = ""
    ) -> None:
        """Decide an open and write its audit line; a granted open returns once the line
        is durable.  Denials are not logged here: the audit log is where they go.
        ``path`` is what the line names (default: the node's path)."""
        assert self.audit_log is not None
        user, study, decision = self.guard.decide_open(ctx.uid, manifest)
        entry = self._decision_entry(
            ctx, user, study, decision, path or self.index.path_of(node.ino)
        )
        try:
            await self.audit_log.record(entry)
        except audit.AuditUnavailable as exc:
            log.error("%s; refusing the open of inode %d", exc, node.ino)
            raise pyfuse3.FUSEError(errno.EIO) from None
        if not decision.allowed:
            self.counters.denials += 1
            raise pyfuse3.FUSEError(errno.EACCES)

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh in self._cd_files:
            return self._cd_files[fh][off : off + size]
        if fh in self._status:
            return self._status[fh][off : off + size]
        f = self._files[fh]
        end = min(off + size, f.node.size)
        if off >= end:
            return b""
        first, last = off // CHUNK_SIZE, (end - 1) // CHUNK_SIZE
        if _sequential(off, f.next_offset):
            self.cache.prefetch(f.chunks[last + 1 : last + 1 + READ_AHEAD], bypass=f.bypass)
            f.next_offset = max(f.next_offset, end)
        else:  # a seek: a sequential reader may go on from here
            f.next_offset = end
        parts: list[memoryview] = []
        try:
            for i in range(first, last + 1):
                data = await self.cache.get(f.chunks[i], bypass=f.bypass)
                start = off - i * CHUNK_SIZE if i == first else 0
                stop = end - i * CHUNK_SIZE if i == last else len(data)
                parts.append(memoryview(data)[start:stop])
        except ChunkUnavailable as exc:
            log.error("read of inode %d at %d failed: %s", f.node.ino, off, exc)
            self.counters.read_errors += 1
            raise pyfuse3.FUSEError(errno.EIO) from None
        self.counters.read_bytes += end - off
        # pyfuse3 replies from any contiguous buffer: a view of the cached chunk saves
        # copying up to 1 MiB per request on the trio thread.
        return cast(bytes, parts[0] if len(parts) == 1 else b"".join(parts))

    @handler
    async def release(self, fh: int) -> None:
        self._files.pop(fh, None)
        self._cd_files.pop(fh, None)
        self._status.pop(fh, None)

    # -- /.animfs/status -------------------------------------------------------------

    def _open_status(self, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        """Open the status file: its content is made now and served from this handle.
        direct_io, because it changes from one open to the next while its attributes
        (size 0, like /proc, so tar and rsync copy it as empty) do not."""
        if not self.guard.may_see(ctx.uid, self._node(STATUS_INO)):
            raise pyfuse3.FUSEError(errno.EACCES)
        fh = self._new_fh()
        doc = json.dumps(self.status(), indent=2, sort_keys=True) + "\n"
        self._status[fh] = doc.encode()
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    def status(self) -> dict[str, Any]:
        """Sites, cache and counters of this mount, and the index's figures; never
        touches a site (what ``animfs status`` adds by listing each site is not here)."""
        store = self.cache.store
        pending = Counter(entry.site for entry in self.index.journal())
        sites = {
            name: {**state, "pending_repairs": pending.get(name, 0)}
            for name, state in store.states().items()
        }
        return {
            "pid": os.getpid(),
            "started": self.started,
            "time": time.time(),
            "index": self.index.counts(),
            "sites": sites,
            "cache": self.cache.stats_dict(),
            "counters": {
                **dataclasses.asdict(self.counters),
                "bytes_read_per_site": {n: s["bytes_read"] for n, s in sites.items()},
                "site_errors": sum(e for s in sites.values() if isinstance(e := s["errors"], int)),
                "open_files": len(self._files),
            },
        }

    # -- /cd: each patient as a DICOM medium (animfs/cdtree.py) ------------------------
    # lookup, getattr, opendir, readdir and open hand the inodes of /cd to these.  An
    # IM file there is the instance's /patients inode: its open is the usual one.
    # Access follows the /patients node each entry stands for (Entry.base).

    def _cd_attributes(self, entry: Entry) -> pyfuse3.EntryAttributes:
        attr = self.attributes(entry.node)
        if entry.changes:
            # A DICOMDIR grows with its patient: the kernel must ask for its size at each
            # stat, and at a read past the size it knows (then dropping its cached pages).
            attr.attr_timeout = 0
        return attr

    async def _cd_entry(self, inode: int) -> Entry:
        entry = await self.cd.entry_async(inode)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    async def _cd_lookup(
        self, parent: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        entry = await self.cd.lookup_async(parent, name)
        if entry is None:
            hidden = self.guard.conceals_missing(ctx.uid, self.cd.listed_like(parent))
            raise pyfuse3.FUSEError(errno.EACCES if hidden else errno.ENOENT)
        if not self.guard.may_see(ctx.uid, entry.base):
            await self._audit_refused_lookup(entry.base, ctx)  # as under /patients
            raise pyfuse3.FUSEError(errno.EACCES)
        return self._cd_attributes(entry)

    async def _cd_opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        entry = await self._cd_entry(inode)
        if not entry.node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if not self.guard.may_see(ctx.uid, entry.base):
            raise pyfuse3.FUSEError(errno.EACCES)
        fh = self._new_fh()
        self._dirs[fh] = OpenDir(inode, uid=ctx.uid)
        return fh

    async def _cd_readdir(self, d: OpenDir, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        folder = await self._cd_entry(d.ino)
        if folder.is_root:  # /cd itself: the names of /patients
            await self._cd_readdir_patients(d, start_id, token)
            return
        await self.cd.warm(folder)  # its DICOMDIR's size is listed
        check = self.guard.filters(d.uid, folder.base.ino)
        for offset, entry in self.cd.children(d.ino, start_id):
            if check and not self.guard.may_see(d.uid, entry.base):
                continue
            attr = self._cd_attributes(entry)
            if not pyfuse3.readdir_reply(token, entry.name, attr, offset):
                return

    async def _cd_readdir_patients(
        self, d: OpenDir, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        patients = self.cd.patients_folder
        if start_id == 0:
            after = None
        elif start_id == d.resume_id:
            after = d.resume_name
        else:
            after = self._name_at(patients, start_id)
        position = start_id
        check = self.guard.filters(d.uid, patients)
        while True:
            batch = self.index.entries(patients, after, 256)
            if not batch:
                return
            for patient in batch:
                after = patient.name
                position += 1
                if check and not self.guard.may_see(d.uid, patient):
                    continue
                entry = self.cd.patient_entry(patient)
                if entry is None:
                    continue
                attr = self._cd_attributes(entry)
                if not pyfuse3.readdir_reply(token, patient.name, attr, position):
                    return
                d.resume_id, d.resume_name = position, patient.name

    async def _cd_open(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        entry = await self._cd_entry(inode)
        if entry.node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if entry.is_readme:  # the same text for every patient: no patient data in it
            if not self.guard.may_see(ctx.uid, entry.base):
                raise pyfuse3.FUSEError(errno.EACCES)
            data = self.cd.readme
        else:
            medium = await self.cd.medium_async(entry.base)
            if self.guard.enforced:
                await self._cd_authorize(entry, medium.studies, ctx)
            data = medium.data
        fh = self._new_fh()
        self._cd_files[fh] = data
        return pyfuse3.FileInfo(fh=fh, keep_cache=False)

    async def _cd_authorize(
        self, entry: Entry, studies: Sequence[Manifest], ctx: pyfuse3.RequestContext
    ) -> None:
        """A DICOMDIR describes every study of its patient, so opening it is an open of
        each: allowed only if each is, with one audit line per study; refused with the
        line of the first study refused."""
        refused = [m for m in studies if not self.guard.decide_open(ctx.uid, m)[2].allowed]
        path = self.cd.path_of(entry)
        for manifest in refused[:1] or studies:
            await self._authorize(entry.node, manifest, ctx, path=path)

    async def flush(self, fh: int) -> None:
        # Nothing to flush on a read-only file system; ENOSYS makes the kernel stop
        # sending flush at all, which saves a round trip on every close.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    # -- everything that would write -------------------------------------------------

    async def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _read_only
    create = write = setxattr = removexattr = _read_only

    @handler
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        self._node(inode)
        return True

    # -- extended attributes: from the index only, never a fetch, never an open ---------

    def _visible(self, inode: int, ctx: pyfuse3.RequestContext) -> Node:
        node = self._node(inode)
        if not self.guard.may_see(ctx.uid, node):  # the values name the patient
            raise pyfuse3.FUSEError(errno.EACCES)
        return node

    @handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self._visible(inode, ctx)
        if node.kind == DIR:
            return list(DIR_XATTRS)
        if node.kind == FILE and node.sop_uid:
            return list(FILE_XATTRS)
        return []

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._visible(inode, ctx)
        if node.kind == DIR and name in DIR_XATTRS:
            value = {
                b"user.animfs.subdirs": node.subdirs,
                b"user.animfs.files": node.files,
                b"user.animfs.bytes": node.bytes_below,
            }[name]
            return str(value).encode()
        if node.kind != FILE or not node.sop_uid or name not in FILE_XATTRS:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        manifest = self.index.file_manifest(node)
        if manifest is None:
            log.error("inode %d: instance record missing from the index", inode)
            raise pyfuse3.FUSEError(errno.EIO)
        field = DICOM_XATTRS.get(name)
        if field is not None:
            return str(getattr(manifest.instance, field)).encode()
        return self._animfs_xattr(name, manifest).encode()

    def _animfs_xattr(self, name: bytes, manifest: Manifest) -> str:
        if name == b"user.animfs.sha256":
            return manifest.sha256
        if name == b"user.animfs.institution":
            return manifest.institution
        if name == b"user.animfs.chunks":
            return str(len(manifest.chunks))
        if name == b"user.animfs.stored_bytes":
            return str(sum(ref.stored for ref in manifest.chunks))
        if name == b"user.animfs.sites":
            # Good copies as far as the index knows: every site but those journalled
            # as lacking one of the file's objects.
            names = sorted(self.cache.store.states())
            keys = [chunk_key(ref.id) for ref in manifest.chunks] + [manifest.object_key]
            lacking = self.index.sites_lacking(names, keys)
            return ",".join(n for n in names if n not in lacking)
        assert name == b"user.animfs.cached"
        if not manifest.chunks:
            return "1"
        held = sum(1 for ref in manifest.chunks if self.cache.holds(ref.id))
        return f"{held / len(manifest.chunks):.3g}"
