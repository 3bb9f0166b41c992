"""The LMDB index: every name, size and listing the mount serves, without touching storage.

Schema (one LMDB environment, named sub-databases; integers big-endian in keys
so that keys sort numerically, little-endian in values):

``nodes``      inode (u64 BE) -> node record:
                 an instance file: 5 (u8) | its series folder's inode (u64 BE): the
                   file itself is an entry of that folder's listing in ``files``
                 any other node (see :func:`_encode_node`): kind u8 | parent u64 |
                   mtime_ns i64 | size u64 | name_len u16 | name, then by kind:
                   dir (1):  subdirs u64 | files below u64 | bytes below u64
                   file (2): nothing (the fixed /.animfs/status)
                   link (3): target (the rest)
``files``      series folder inode (u64 BE) -> the listing of its instance files
               (:mod:`animfs.listing`): one value per series with, for each file in
               name order, its /cd image number and its instance record
               (:mod:`animfs.record`, format 2, ~150 bytes: series inode (its parent),
               file inode, ingested_ns (its mtime), size, SOPInstanceUID, checksum, chunk
               list, what differs from its series; its file name only where that is not
               the default ``<InstanceNumber:05d>_<SOPInstanceUID>.dcm``; in an index
               upgraded from format 1 possibly the manifest JSON, first byte ``{``).
               A record decodes to a manifest byte-identical to ``manifests/<key hex>``
               at the sites, or with a key to what ``manifests/<keyed name>`` opens to.
               A series is listed with one read; a file is found in it by name (by a
               table of the names' CRC-32), inode or image number with a binary
               search.  A write transaction rewrites a listing once, as it commits
               (:class:`Index._WriteTxn`).  Reads keep the listings they decode
               whole, and use them while the stored value is unchanged
               (:class:`listing.Cache`).
``dirents``    parent inode (u64 BE) + name bytes -> child inode (u64 BE), for every
               node but instance files (which are in ``files``).
               Sorted by name within a folder: a listing is one cursor walk.
``ids``        identity -> inode (u64 BE).  Identities:
                 b"P\\0" issuer "-" PatientID   patient folder
                 b"S\\0" StudyInstanceUID        study folder
                 b"R\\0" SeriesInstanceUID       series folder
                 b"L\\0" StudyInstanceUID        symlink under /studies
                 b"Y\\0" YYYY | YYYY/MM | YYYY/MM/DD   folders under /by-date
                 b"D\\0" StudyInstanceUID        symlink under /by-date/YYYY/MM/DD
                 b"O\\0" MOD | MOD/YYYY | MOD/YYYY/MM  folders under /by-modality
                 b"M\\0" MOD "\\0" StudyInstanceUID  symlink under /by-modality/MOD/YYYY/MM
``instances``  instance key (sha256 of SOPInstanceUID, 32 bytes) -> the instance's file
               inode (u64 BE).  An instance file's identity (SOPInstanceUID) is found
               here, not in ``ids``.
``series``     series inode (u64 BE) -> the series record (:mod:`animfs.record`): the
               tags, institution, folder names and inodes its instances share.
``chunks``     chunk id (32 raw bytes) -> stored size varint | references varint
               (LEB128; in an index from before format 3, u64 LE each: still read).
``journal``    site name + b"\\0" + object key -> JSON {"reason", "time"}: the
               repair journal, one entry per object a site lacks a good copy of.
``consents``   patient key (issuer "-" PatientID) + b"\\0" + institution code or b"all"
               -> JSON {"to", "granted", "until", "revoked"} (epoch seconds; until and
               revoked may be null).  A revoked consent is kept, marked, for the history.
``records``    patient key -> b"in-order" | b"closed" | b"opted-out" (absent: in order).
``break_glass`` patient key + b"\\0" + uid (u32 BE) -> JSON {"uid", "granted", "until",
               "reason"}: the latest break-the-glass grant of that uid for that patient.
``media``      the /cd tree, one DICOM medium per patient (:mod:`animfs.media`); numbers
               are given once, when an instance is committed, in commit order:
                 b"e\0" + folder inode (u64 BE) + number (u32 BE) -> inode (u64 BE) of the
                   study or series with that number in that patient or study (an instance's
                   number in its series is in the series' listing, see ``files``): its file
                   ID is DICOM/ST<study>/SE<series>/IM<image> (6 digits each)
                 b"n\0" + folder inode (u64 BE) -> the last number given in it (u32 BE)
                 b"c\0" + cd inode (u64 BE) -> kind (1 byte) | inode (u64 BE) | number (u32 BE):
                   an entry of /cd: P /cd/<patient>, M its DICOMDIR, T its README.TXT, D its
                   DICOM/ (inode: the patient folder's; number 0); S a study, R a series folder
                   (inode: that folder's under /patients)
                 b"i\0" + kind + inode (u64 BE) -> cd inode (u64 BE) | number (u32 BE): the
                   reverse of b"c"
``meta``       b"format" -> b"4".  An index of format 2 (a node and a name entry per file,
                 instance records in ``instances``, b"I\\0" identities in ``ids``, b"f\\0"
                 file IDs and image numbers in ``media``), 1 (the same, records in JSON) or
                 3 (records in the files' nodes; only ever on a development branch) is
                 upgraded in place when opened, in one transaction, with a log line
                 (:meth:`Index._upgrade`); chunk values keep their old form until rewritten.
               b"sync\0" + host -> JSON {"after", "seen"}: how far ``animfs sync`` has
                 read that host's log at the sites (:mod:`animfs.sync`); b"sync-last" ->
                 JSON {"time", "added", "hosts"} of the last sync.
               b"media" -> b"1" once every instance has its file ID (older indexes are
                 numbered when opened, in ingest order).
               b"state\\0" + patient key -> time (ns, text) of the patient's last access
                 change not yet written to the sites as a state object (animfs.state).
               b"audit-head" -> JSON {"head", "bytes", "time"}: the audit log's chain head
                 as last written to (or, after a rebuild, read from) the sites.

The views ``/by-date/YYYY/MM/DD/`` and ``/by-modality/<MOD>/YYYY/MM/`` hold one
symlink per study (per study and modality), named ``<patient folder>_<study
folder>`` and pointing at ``../../../../patients/<patient>/<study>``; dates come
from StudyDate (``0000/00/00`` when it is not 8 digits), so no folder of a view
grows without bound.  They are added by :meth:`Index._commit_in` in the same
transaction as the instance, and filled in for an index made before they existed
when it is opened.  ``/.animfs/status`` is a fixed file node (no instance) whose
content the mount makes at open.

Inodes 1..65535 are reserved for the fixed and virtual entries (:data:`ROOT_INO`
and friends).  Every other inode is derived from a hash of the identity, so
it is the same on every host and after a rebuild, and it is recorded in the
manifest; a (rare) hash collision is resolved by re-hashing with a counter.
Inodes from 2**63 (:data:`CD_FIRST_INO`) are the folders and files of the /cd
tree (see ``media``); an instance file there has its /patients inode.

Concurrency: a transaction opens and closes inside one synchronous method and
never spans an ``await``.  Ingest plans a placement in a read transaction,
writes the manifest to the sites, then commits in a write transaction that
re-checks the plan (:class:`StalePlan` if another process got there first).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import re
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from animfs import listing, record
from animfs.access import IN_ORDER, BreakGlass, Consent, PatientState
from animfs.chunks import ChunkRef
from animfs.dicom import safe_name, unique_name
from animfs.manifest import Manifest, Placement, instance_key
from animfs.store.dual import Missed

DIR, FILE, LINK = 1, 2, 3
INSTANCE = 4  # stored kind of an instance file's node in format 3: its record follows
IN_SERIES = 5  # stored kind of an instance file's node: its series inode follows

ROOT_INO = 1
PATIENTS_INO = 2
STUDIES_INO = 3
BY_DATE_INO = 4
BY_MODALITY_INO = 5
CONTROL_INO = 6  # /.animfs
STATUS_INO = 7  # /.animfs/status, made by the mount at open
FIXED_DIRS = {
    ROOT_INO: (ROOT_INO, b""),
    PATIENTS_INO: (ROOT_INO, b"patients"),
    STUDIES_INO: (ROOT_INO, b"studies"),
    BY_DATE_INO: (ROOT_INO, b"by-date"),
    BY_MODALITY_INO: (ROOT_INO, b"by-modality"),
    CONTROL_INO: (ROOT_INO, b".animfs"),
}
FIXED_FILES = {STATUS_INO: (CONTROL_INO, b"status")}
VIEWS = (BY_DATE_INO, BY_MODALITY_INO)
FIRST_DYNAMIC_INO = 1 << 16

CD_INO = 8  # /cd: one DICOM medium per patient, made by _ensure_media
CD_FIRST_INO = 1 << 63  # inodes of the /cd tree, see "media" above
CD_PATIENT, CD_DICOMDIR, CD_README, CD_DICOM, CD_STUDY, CD_SERIES = b"PMTDSR"
_CD_ENTRY = struct.Struct(">cQI")
_CD_INO = struct.Struct(">QI")

_HEAD = struct.Struct("<BQqQH")
_DIR_TAIL = struct.Struct("<QQQ")
_U64 = struct.Struct(">Q")
_OLD_CHUNK = struct.Struct("<QQ")  # chunk values before format 3
_DBS = (
    "nodes",
    "dirents",
    "ids",
    "instances",
    "chunks",
    "journal",
    "meta",
    "consents",
    "records",
    "break_glass",
    "media",
    "series",
    "files",
)
_U32 = struct.Struct(">I")
_STATE = b"state\0"  # meta: access state changed, not yet at the sites
FORMAT = b"4"  # see the schema above, animfs.listing and animfs.record
UPGRADABLE_FORMATS = (b"1", b"2", b"3")
# Files of the decoded series listings an Index keeps for reads (listing.Cache),
# about 1 KB each in memory.
LISTING_CACHE_FILES = 16384

log = logging.getLogger(__name__)
R = TypeVar("R")


class IndexError_(Exception):
    """The index cannot do what was asked; the message says why."""


class IndexFull(IndexError_):
    """The index's disk or map is full; nothing was changed."""


class StalePlan(Exception):
    """The placement planned for an instance was taken meanwhile; plan again."""


class Conflict(IndexError_):
    """The instance contradicts what the archive holds (message says how)."""


@dataclass(frozen=True)
class Node:
    ino: int
    kind: int
    parent: int
    name: bytes
    mtime_ns: int
    size: int
    subdirs: int = 0  # dirs: sub-folders
    files: int = 0  # dirs: files anywhere below
    bytes_below: int = 0  # dirs: bytes of those files
    sop_uid: str = ""  # instance files: the SOPInstanceUID
    target: bytes = b""  # links

    @property
    def is_dir(self) -> bool:
        return self.kind == DIR

    @property
    def instance(self) -> bytes:
        """An instance file's instance key (b"" for any other node): hashed when asked
        for, not for every entry of a listing."""
        return instance_key(self.sop_uid) if self.sop_uid else b""


def _encode_node(n: Node) -> bytes:
    """The node value of a folder, a link or a fixed file (an instance file's is
    :meth:`Index._node_in`)."""
    assert not n.sop_uid, "an instance file is in its series' listing"
    head = _HEAD.pack(n.kind, n.parent, n.mtime_ns, n.size, len(n.name)) + n.name
    if n.kind == DIR:
        return head + _DIR_TAIL.pack(n.subdirs, n.files, n.bytes_below)
    return head + n.target


def _in_series(series: int) -> bytes:
    """The node value of an instance file of the series folder ``series``."""
    return bytes([IN_SERIES]) + _U64.pack(series)


def _file_node(series: int, entry: listing.Entry) -> Node:
    return Node(entry.ino, FILE, series, entry.name, entry.mtime_ns, entry.size,
                sop_uid=entry.sop_uid)


def _decode_node(ino: int, data: bytes | memoryview | None) -> Node:
    """A folder, link or fixed file node (an instance file's is :meth:`Index._node_in`'s)."""
    assert data is not None, f"inode {ino}: node record missing"
    assert data[0] not in (INSTANCE, IN_SERIES), f"inode {ino}: an instance file"
    kind, parent, mtime_ns, size, name_len = _HEAD.unpack_from(data)
    start = _HEAD.size
    name = bytes(data[start : start + name_len])
    tail = bytes(data[start + name_len :])
    if kind == DIR:
        subdirs, files, nbytes = _DIR_TAIL.unpack(tail)
        return Node(ino, kind, parent, name, mtime_ns, size, subdirs, files, nbytes)
    if kind == FILE:
        return Node(ino, kind, parent, name, mtime_ns, size)
    return Node(ino, kind, parent, name, mtime_ns, size, target=tail)


def _chunk_value(stored: int, refs: int) -> bytes:
    out = bytearray()
    record.put_varint(out, stored)
    record.put_varint(out, refs)
    return bytes(out)


def _chunk_fields(value: bytes | memoryview) -> tuple[int, int]:
    """(stored size, references) of a chunk value, either form."""
    if len(value) == _OLD_CHUNK.size:
        stored, refs = _OLD_CHUNK.unpack(value)
        return int(stored), int(refs)
    try:
        stored, pos = record.read_varint(value, 0)
        refs, pos = record.read_varint(value, pos)
    except record.RecordError:
        raise ValueError("malformed chunk value") from None
    if pos != len(value):
        raise ValueError("malformed chunk value")
    return stored, refs


def _ino_key(ino: int) -> bytes:
    return _U64.pack(ino)


def _dirent_key(parent: int, name: bytes) -> bytes:
    return _U64.pack(parent) + name


def hashed_ino(identity: bytes, attempt: int = 0) -> int:
    """The inode an identity gets, unless taken: 63 bits, never a reserved one."""
    while True:
        digest = hashlib.sha256(identity + b"\0" + str(attempt).encode()).digest()
        ino = int.from_bytes(digest[:8], "big") >> 1
        if ino >= FIRST_DYNAMIC_INO:
            return ino
        attempt += 1


class Index:
    def __init__(self, path: Path, *, map_size: int = 64 << 30) -> None:
        path.mkdir(parents=True, exist_ok=True)
        try:
            # No read-ahead: lookups land on random pages of an index far larger than
            # what they need, and read-ahead would page in (and map) 32 pages for each.
            self.env = lmdb.open(
                str(path),
                map_size=map_size,
                max_dbs=len(_DBS) + 4,
                max_readers=1024,
                readahead=False,
            )
        except lmdb.Error as exc:
            raise IndexError_(f"{path}: cannot open the index: {exc}") from exc
        self.path = path
        self._staged_txn: lmdb.Transaction | None = None  # see _WriteTxn
        self._staged: dict[int, listing.Listing] = {}
        self._listings = listing.Cache(LISTING_CACHE_FILES)
        with self.env.begin(write=True) as txn:
            self._db = {name: self.env.open_db(name.encode(), txn=txn) for name in _DBS}
        try:
            self._check_format()
        except IndexError_:
            self.env.close()
            raise
        self._ensure_roots()
        self._ensure_media()

    def close(self) -> None:
        self.env.close()

    def _check_format(self) -> None:
        """Refuse an index written by a newer animfs; upgrade one of format 1, 2 or 3."""
        with self.env.begin() as txn:
            found = txn.get(b"format", db=self._db["meta"])
        if found is None or bytes(found) == FORMAT:
            return
        if bytes(found) not in UPGRADABLE_FORMATS:
            raise IndexError_(
                f"{self.path}: index format {bytes(found).decode(errors='replace')} is not one "
                f"this animfs reads ({FORMAT.decode()}); move it away and run "
                "'animfs rebuild-index'"
            )
        self._upgrade()

    def _upgrade(self) -> None:
        """Bring an index of format 1, 2 or 3 to format 4, in one transaction.

        Folder by folder (a walk of ``dirents``), the instance files of a series
        folder become its listing in ``files``: each file's record (format 1 and 2:
        in ``instances``; 3: in its node), with its image number (from the
        b"e\\0" numbers, which go, with the series' b"n\\0" counter), and its name,
        which its dirent (gone too) gives.  A file's node becomes the inode of its
        series, ``instances`` maps its instance key to its inode, and what repeated
        the instance key (b"I\\0" identities, b"f\\0" file IDs) goes.  One series is
        held in memory at a time.
        """
        start = time.monotonic()
        dbs = self._db
        moved = 0
        try:
            with self._write() as txn:
                found = txn.get(b"format", db=dbs["meta"])
                if found is None or bytes(found) == FORMAT:
                    return  # another process upgraded it meanwhile
                log.info("%s: upgrading the index from format %s to %s, in one transaction "
                         "(about 3 minutes per million instances)", self.path,
                         bytes(found).decode(), FORMAT.decode())
                cursor = txn.cursor(db=dbs["dirents"])
                go = cursor.first()
                while go:
                    prefix = bytes(cursor.key())[:8]
                    group = []
                    while go and bytes(cursor.key()).startswith(prefix):
                        group.append((bytes(cursor.key()), _U64.unpack(cursor.value())[0]))
                        go = cursor.next()
                    resume = bytes(cursor.key()) if go else None
                    moved += self._upgrade_folder(txn, _U64.unpack(prefix)[0], group)
                    go = resume is not None and cursor.set_range(resume)
                txn.put(b"format", FORMAT, db=dbs["meta"])
        except (ValueError, struct.error) as exc:  # nothing was changed
            raise IndexError_(
                f"{self.path}: cannot upgrade this index to format {FORMAT.decode()} ({exc}); "
                "move it away and run 'animfs rebuild-index'"
            ) from exc
        log.info("%s: index upgraded from format %s to %s (%d instances) in %.1f s",
                 self.path, bytes(found).decode(), FORMAT.decode(), moved,
                 time.monotonic() - start)

    def _upgrade_folder(
        self, txn: lmdb.Transaction, folder: int, group: list[tuple[bytes, int]]
    ) -> int:
        """Move the instance files among a folder's entries (dirent key, inode) into
        its listing (see :meth:`_upgrade`); returns how many there were."""
        dbs = self._db
        files = listing.Listing()
        numbers = {
            _U64.unpack(value)[0]: _U32.unpack(key[-4:])[0]
            for key, value in _prefixed(txn, dbs["media"], b"e\0" + _U64.pack(folder))
        }
        for dirent, ino in group:
            data = txn.get(_ino_key(ino), db=dbs["nodes"])
            if data is None or ino < FIRST_DYNAMIC_INO:
                continue
            if data[0] == INSTANCE:  # format 3
                rec = bytes(data[1:])
            elif data[0] == FILE:  # format 1 or 2: the tail is the instance key
                rec = bytes(txn.get(bytes(data[-32:]), db=dbs["instances"]) or b"")
            else:
                continue
            name = dirent[8:]
            _ino, _series, _t, _size, rec_name, sop_uid = record.peek(rec)
            if rec_name.encode() != name:  # never seen: the name entry is the truth
                manifest = self._decode_in(txn, rec)
                renamed = manifest.with_placement(
                    dataclasses.replace(manifest.placement, file_name=name.decode()))
                shared = txn.get(_ino_key(folder), db=dbs["series"])
                rec = (renamed.to_bytes() if shared is None
                       else record.encode_instance(renamed, shared))
            files.put(listing.entry_of(numbers.get(ino, 0), rec))
            key = instance_key(sop_uid)
            txn.put(_ino_key(ino), _in_series(folder), db=dbs["nodes"])
            txn.put(key, _ino_key(ino), db=dbs["instances"])
            txn.delete(dirent, db=dbs["dirents"])
            txn.delete(b"I\0" + sop_uid.encode(), db=dbs["ids"])
            txn.delete(b"f\0" + key, db=dbs["media"])
        if len(files):
            for number in numbers.values():
                txn.delete(b"e\0" + _U64.pack(folder) + _U32.pack(number), db=dbs["media"])
            txn.delete(b"n\0" + _U64.pack(folder), db=dbs["media"])
            txn.put(_ino_key(folder), files.encode(), db=dbs["files"])
        return len(files)

    def _decode_in(self, txn: lmdb.Transaction, data: bytes | memoryview) -> Manifest:
        """The manifest of an instance record (compact or JSON), read in ``txn``."""
        series = self._db["series"]
        return record.decode(data, lambda ino: txn.get(_U64.pack(ino), db=series))

    def _identity_in(self, txn: lmdb.Transaction, identity: bytes) -> bytes | None:
        """The inode (u64 BE) an identity names, or None: from ``ids``, or for an
        instance file (b"I\\0" + SOPInstanceUID) from ``instances``."""
        if identity.startswith(b"I\0"):
            found = txn.get(instance_key(identity[2:].decode()), db=self._db["instances"])
        else:
            found = txn.get(identity, db=self._db["ids"])
        return None if found is None else bytes(found)

    # -- series listings (animfs.listing) ---------------------------------------------

    def _files_in(
        self, txn: lmdb.Transaction, series: int, *, whole: bool = False
    ) -> listing.View | listing.Listing | None:
        """The files of the series folder ``series`` as ``txn`` sees them; None if it
        has none (or is not a series folder).  In a read transaction, from the
        decoded listings kept between transactions where they are still right
        (:class:`listing.Cache`); ``whole``: the caller goes through the listing from
        its start, so it is decoded and kept."""
        if txn is self._staged_txn:
            if series in self._staged:
                return self._staged[series]
            data = txn.get(_ino_key(series), db=self._db["files"])
            return None if data is None else listing.View(data)
        snapshot = txn.id()
        known = self._listings.known(series, snapshot)
        if known is not False:
            return known
        data = txn.get(_ino_key(series), db=self._db["files"])
        found = self._listings.read(series, snapshot, data)
        if whole and isinstance(found, listing.View) and data is not None:
            return self._listings.fill(series, snapshot, data)
        return found

    def _staging(self, txn: lmdb.Transaction, series: int) -> listing.Listing:
        """The files of the series folder ``series``, for the write transaction ``txn``
        to change (written when it commits, see :class:`_WriteTxn`)."""
        assert txn is self._staged_txn, "series listings change in a write transaction"
        files = self._staged.get(series)
        if files is None:
            files = listing.Listing.load(txn.get(_ino_key(series), db=self._db["files"]))
            self._staged[series] = files
        return files

    def _entry_in(
        self, txn: lmdb.Transaction, ino: int, data: bytes | memoryview | None = None
    ) -> tuple[int, listing.Entry] | None:
        """(series inode, listing entry) of the instance file ``ino``, or None; ``data``:
        its value in ``nodes``, when the caller has read it already."""
        if data is None:
            data = txn.get(_ino_key(ino), db=self._db["nodes"])
        if data is None or data[0] != IN_SERIES:
            return None
        series = _U64.unpack_from(data, 1)[0]
        files = self._files_in(txn, series)
        entry = None if files is None else files.by_ino(ino)
        return None if entry is None else (series, entry)

    def _node_in(self, txn: lmdb.Transaction, ino: int) -> Node | None:
        data = txn.get(_ino_key(ino), db=self._db["nodes"])
        if data is None:
            return None
        if data[0] != IN_SERIES:
            return _decode_node(ino, data)
        found = self._entry_in(txn, ino, data)
        return None if found is None else _file_node(*found)

    def _node_at(self, txn: lmdb.Transaction, ino: int) -> Node:
        """The node ``ino``, which must exist."""
        node = self._node_in(txn, ino)
        assert node is not None, f"inode {ino}: node record missing"
        return node

    def _child_in(self, txn: lmdb.Transaction, parent: int, name: bytes) -> int | None:
        """The inode named ``name`` in folder ``parent``, or None."""
        files = self._files_in(txn, parent)
        if files is not None:
            entry = files.find(name)
            return None if entry is None else entry.ino
        found = txn.get(_dirent_key(parent, name), db=self._db["dirents"])
        return None if found is None else int(_U64.unpack(found)[0])

    def _record_in(self, txn: lmdb.Transaction, file_ino: int) -> bytes | None:
        """The instance record of the file ``file_ino``, or None (not an instance file)."""
        found = self._entry_in(txn, file_ino)
        return None if found is None else found[1].record

    def _manifest_in(self, txn: lmdb.Transaction, key: bytes) -> Manifest | None:
        """The manifest of the instance with instance key ``key``, or None."""
        found = txn.get(key, db=self._db["instances"])
        data = None if found is None else self._record_in(txn, _U64.unpack(found)[0])
        return None if data is None else self._decode_in(txn, data)

    def _manifests_in(self, txn: lmdb.Transaction) -> list[Manifest]:
        """Every instance's manifest, in ingest order (to number or link them again)."""
        out = [
            self._decode_in(txn, entry.record)
            for _key, data in txn.cursor(db=self._db["files"])
            for entry in listing.View(data)
        ]
        return sorted(out, key=lambda m: m.ingested_ns)

    def _ensure_roots(self) -> None:
        """Create the fixed entries that are missing: all of them in a new index, the
        views and /.animfs in one made before they existed (whose views are then
        filled in from its instances, in ingest order)."""
        nodes = self._db["nodes"]
        with self.env.begin() as txn:
            if txn.get(_ino_key(STATUS_INO), db=nodes) is not None:
                return
        with self._write() as txn:
            now = time.time_ns()
            fixed = [(ino, parent, name, DIR) for ino, (parent, name) in FIXED_DIRS.items()]
            fixed += [(ino, parent, name, FILE) for ino, (parent, name) in FIXED_FILES.items()]
            for ino, parent, name, kind in fixed:
                if txn.get(_ino_key(ino), db=nodes) is not None:
                    continue
                node = Node(ino, kind, parent, name, now, 0)
                txn.put(_ino_key(ino), _encode_node(node), db=nodes)
                if ino != ROOT_INO:
                    txn.put(_dirent_key(parent, name), _ino_key(ino), db=self._db["dirents"])
            root = _decode_node(ROOT_INO, txn.get(_ino_key(ROOT_INO), db=nodes))
            top = sum(1 for ino, (parent, _) in FIXED_DIRS.items() if parent == ROOT_INO != ino)
            root = dataclasses.replace(root, subdirs=top)
            txn.put(_ino_key(ROOT_INO), _encode_node(root), db=nodes)
            if txn.get(b"format", db=self._db["meta"]) is None:
                txn.put(b"format", FORMAT, db=self._db["meta"])
            for manifest in self._manifests_in(txn):
                self._add_views(txn, manifest)

    class _WriteTxn:
        """A write transaction whose LMDB errors become IndexFull / IndexError_.

        The series listings it changes are kept decoded (``Index._staged``) and
        written once each, as it commits: a group of files added to a series of
        thousands rewrites its listing once, not once per file.  LMDB lets one
        write transaction run at a time, so there is one such set of listings;
        reads in other transactions meanwhile see the listings as committed.
        """

        def __init__(self, index: Index) -> None:
            self.index = index

        def __enter__(self) -> lmdb.Transaction:
            self.txn = self.index.env.begin(write=True)
            self.index._staged_txn, self.index._staged = self.txn, {}
            return self.txn

        def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
            staged = self.index._staged
            self.index._staged_txn, self.index._staged = None, {}
            if exc_type is None:
                try:
                    for series, files in staged.items():
                        self.txn.put(_ino_key(series), files.encode(), db=self.index._db["files"])
                except BaseException as put_exc:
                    exc_type, exc = type(put_exc), put_exc
                    if not isinstance(put_exc, lmdb.Error):
                        self.txn.abort()
                        raise
            if exc_type is not None:
                self.txn.abort()
                if isinstance(exc, lmdb.MapFullError):
                    raise IndexFull(
                        f"{self.index.path}: the index map is full; raise [index] map_size"
                    ) from exc
                if isinstance(exc, lmdb.Error):
                    raise IndexError_(f"{self.index.path}: index write failed: {exc}") from exc
                return
            try:
                self.txn.commit()
            except lmdb.Error as exc:
                full = "No space left" in str(exc) or isinstance(exc, lmdb.MapFullError)
                kind = IndexFull if full else IndexError_
                raise kind(f"{self.index.path}: index write failed: {exc}") from exc

    def _write(self) -> Index._WriteTxn:
        return Index._WriteTxn(self)

    # -- reads: each opens and closes its own transaction --------------------------------

    # Reads that may meet a series listing map it without copying it (buffers=True):
    # a file's lookup or attributes touch a few pages of a listing of thousands.

    def node(self, ino: int) -> Node | None:
        with self.env.begin(buffers=True) as txn:
            return self._node_in(txn, ino)

    def lookup(self, parent: int, name: bytes) -> Node | None:
        with self.env.begin(buffers=True) as txn:
            files = self._files_in(txn, parent)
            if files is not None:
                entry = files.find(name)
                return None if entry is None else _file_node(parent, entry)
            child = txn.get(_dirent_key(parent, name), db=self._db["dirents"])
            return None if child is None else self._node_in(txn, _U64.unpack(child)[0])

    def entries(self, parent: int, after: bytes | None, limit: int) -> list[Node]:
        """Up to ``limit`` children of ``parent`` in name order, starting after ``after``."""
        prefix = _U64.pack(parent)
        out: list[Node] = []
        with self.env.begin(buffers=True) as txn:
            # From its start, and more than a peek at its first entry: decoded and kept.
            files = self._files_in(txn, parent, whole=after is None and limit > 1)
            if files is not None:
                return [_file_node(parent, e) for e in itertools.islice(files.after(after), limit)]
            cursor = txn.cursor(db=self._db["dirents"])
            start = prefix + (after or b"")
            if not cursor.set_range(start):
                return out
            for raw_key, child in cursor:
                key = bytes(raw_key)
                if not key.startswith(prefix):
                    break
                if after is not None and key == start:
                    continue
                node = self._node_in(txn, _U64.unpack(child)[0])
                if node is not None:
                    out.append(node)
                if len(out) >= limit:
                    break
        return out

    def manifest(self, key: bytes) -> Manifest | None:
        with self.env.begin(buffers=True) as txn:
            return self._manifest_in(txn, key)

    def file_manifest(self, file: Node) -> Manifest | None:
        """The manifest of the instance file ``file``, or None if it is not one.

        Found in its series' listing, which whoever asks has usually just read:
        unlike :meth:`manifest`, it reads nothing from ``instances`` nor ``nodes``,
        where a file's entry is on a page of its own among millions (every page a
        read touches is mapped into the process, with its neighbours)."""
        return self._file_record(file, self._decode_in)

    def file_chunks(self, file: Node) -> tuple[ChunkRef, ...] | None:
        """The chunks of the instance file ``file`` (None if it is not one), found as
        :meth:`file_manifest` finds its manifest, and read without the rest of it."""
        return self._file_record(file, lambda _txn, data: record.chunk_refs(data))

    def _file_record(
        self, file: Node, decode: Callable[[lmdb.Transaction, bytes], R]
    ) -> R | None:
        if not file.sop_uid:
            return None
        with self.env.begin(buffers=True) as txn:
            files = self._files_in(txn, file.parent)
            entry = None if files is None else files.by_ino(file.ino)
            return None if entry is None else decode(txn, entry.record)

    def first_manifest(self, folder: int) -> Manifest | None:
        """The manifest of the first instance below ``folder`` (first by name at each
        level), or None if it has none.

        Goes down by the first entry in ``dirents`` and then in the series' listing,
        reading neither the nodes of the folders passed nor ``instances``: a
        patient's or study's owner (access control asks for it for every folder
        it shows) costs a page of each level, not three more random ones."""
        with self.env.begin(buffers=True) as txn:
            cursor = txn.cursor(db=self._db["dirents"])
            for _level in range(4):  # patient -> study -> series -> its listing
                files = self._files_in(txn, folder)
                if files is not None:
                    first = next(iter(files), None)
                    return None if first is None else self._decode_in(txn, first.record)
                prefix = _U64.pack(folder)
                if not cursor.set_range(prefix) or not bytes(cursor.key()).startswith(prefix):
                    return None
                folder = _U64.unpack(cursor.value())[0]
        return None

    def manifest_bytes(self, key: bytes) -> bytes | None:
        """The manifest as stored at the sites (JSON), from its instance record."""
        manifest = self.manifest(key)
        return None if manifest is None else manifest.to_bytes()

    def has_instance(self, key: bytes) -> bool:
        with self.env.begin() as txn:
            return txn.get(key, db=self._db["instances"]) is not None

    def find_ino(self, identity: bytes) -> int | None:
        """The inode of an identity (see ``ids``; b"I\\0" + SOPInstanceUID: a file's)."""
        with self.env.begin() as txn:
            value = self._identity_in(txn, identity)
        return None if value is None else int(_U64.unpack(value)[0])

    def study_issuer(self, study_uid: str, patient_id: str) -> str | None:
        """The issuer under which a study is archived, if it is, for that PatientID."""
        ino = self.find_ino(b"S\0" + study_uid.encode())
        manifest = self.first_manifest(ino) if ino is not None else None
        if manifest is None or manifest.instance.patient_id != patient_id:
            return None
        return manifest.instance.issuer

    def path_of(self, ino: int) -> str:
        """The path of a node inside the mount, from its parents."""
        parts = []
        with self.env.begin() as txn:
            while ino != ROOT_INO:
                node = self._node_in(txn, ino)
                if node is None:
                    break
                parts.append(node.name.decode("utf-8", "surrogateescape"))
                ino = node.parent
        return "/" + "/".join(reversed(parts))

    def has_chunk(self, chunk_id: str) -> bool:
        with self.env.begin() as txn:
            return txn.get(bytes.fromhex(chunk_id), db=self._db["chunks"]) is not None

    def manifests(self) -> Iterator[bytes]:
        """Every manifest as JSON (as at the sites), series by series."""
        for manifest in self.all_manifests():
            yield manifest.to_bytes()
    def all_manifests(self) -> Iterator[Manifest]:
        """Every manifest, series by series (a fresh transaction per batch of series)."""
        after: bytes | None = None
        while True:
            batch: list[Manifest] = []
            with self.env.begin() as txn:
                cursor = txn.cursor(db=self._db["files"])
                found = cursor.first() if after is None else cursor.set_range(after)
                if found and after is not None and cursor.key() == after:
                    found = cursor.next()
                while found and len(batch) < 512:
                    after = bytes(cursor.key())
                    batch += [self._decode_in(txn, e.record) for e in listing.View(cursor.value())]
                    found = cursor.next()
            if not batch:
                return
            yield from batch

    def chunk_ids(self) -> set[str]:
        with self.env.begin() as txn:
            return {key.hex() for key, _ in txn.cursor(db=self._db["chunks"])}

    def counts(self) -> dict[str, int]:
        root = self.node(ROOT_INO)
        patients = self.node(PATIENTS_INO)
        assert root is not None and patients is not None
        with self.env.begin() as txn:
            stat = {name: txn.stat(self._db[name])["entries"] for name in ("chunks", "journal")}
            # A walk of every chunk: only where that is quick (the status file and
            # `animfs status` must not take minutes on a decade's index).
            chunk_bytes = (
                sum(_chunk_fields(v)[0] for _, v in txn.cursor(db=self._db["chunks"]))
                if stat["chunks"] < 100_000
                else -1
            )
        info = self.env.info()
        return {
            "instances": root.files,
            "bytes": root.bytes_below,
            "patients": patients.subdirs,
            "chunks": stat["chunks"],
            "stored_bytes": chunk_bytes,
            "pending_repairs": stat["journal"],
            "index_bytes": info["last_pgno"] * self.env.stat()["psize"],
        }

    # -- the repair journal ---------------------------------------------------------

    def journal_add(self, entries: Iterable[Missed]) -> None:
        with self._write() as txn:
            _journal_put(txn, self._db["journal"], entries)

    def journal(self, limit: int = 1 << 62) -> list[Missed]:
        out = []
        with self.env.begin() as txn:
            for key, value in txn.cursor(db=self._db["journal"]):
                site, _, obj = key.partition(b"\0")
                out.append(Missed(site.decode(), obj.decode(), json.loads(value)["reason"]))
                if len(out) >= limit:
                    break
        return out

    def sites_lacking(self, sites: Iterable[str], keys: Iterable[str]) -> set[str]:
        """Those of ``sites`` with a repair-journal entry for any of ``keys``."""
        wanted = [key.encode() for key in keys]
        out = set()
        with self.env.begin() as txn:
            for site in sites:
                prefix = site.encode() + b"\0"
                if any(txn.get(prefix + key, db=self._db["journal"]) for key in wanted):
                    out.add(site)
        return out

    def journal_remove(self, site: str, key: str) -> None:
        with self._write() as txn:
            txn.delete(site.encode() + b"\0" + key.encode(), db=self._db["journal"])

    # -- consent, record state and break-the-glass grants ----------------------------

    def patient_state(self, patient: str) -> PatientState:
        """What the access rules need to know about a patient, read in one transaction."""
        prefix = patient.encode() + b"\0"
        with self.env.begin() as txn:
            consents = tuple(
                Consent(**json.loads(v)) for _, v in _prefixed(txn, self._db["consents"], prefix)
            )
            grants = tuple(
                BreakGlass(**json.loads(v))
                for _, v in _prefixed(txn, self._db["break_glass"], prefix)
            )
            record = txn.get(patient.encode(), db=self._db["records"])
        return PatientState(consents, IN_ORDER if record is None else record.decode(), grants)

    def consents(self, patient: str | None = None) -> list[tuple[str, Consent]]:
        """Every consent (or a patient's), revoked ones included, by patient and institution."""
        prefix = b"" if patient is None else patient.encode() + b"\0"
        with self.env.begin() as txn:
            return [
                (key.partition(b"\0")[0].decode(), Consent(**json.loads(value)))
                for key, value in _prefixed(txn, self._db["consents"], prefix)
            ]

    def put_consent(self, patient: str, consent: Consent) -> None:
        with self._write() as txn:
            key = patient.encode() + b"\0" + consent.to.encode()
            txn.put(key, json.dumps(dataclasses.asdict(consent)).encode(), db=self._db["consents"])
            self._state_changed(txn, patient)

    def set_record(self, patient: str, state: str) -> None:
        with self._write() as txn:
            txn.put(patient.encode(), state.encode(), db=self._db["records"])
            self._state_changed(txn, patient)

    def put_break_glass(self, patient: str, grant: BreakGlass) -> None:
        with self._write() as txn:
            key = patient.encode() + b"\0" + _U32.pack(grant.uid)
            txn.put(key, json.dumps(dataclasses.asdict(grant)).encode(), db=self._db["break_glass"])
            self._state_changed(txn, patient)

    # -- state kept at the sites (animfs.state) and rebuilds (animfs.rebuild) ---------

    def _state_changed(self, txn: lmdb.Transaction, patient: str) -> None:
        txn.put(_STATE + patient.encode(), str(time.time_ns()).encode(), db=self._db["meta"])

    def unpublished_state(self) -> list[tuple[str, bytes]]:
        """(patient, mark) of every patient whose access state the sites do not have yet."""
        with self.env.begin() as txn:
            return [
                (key[len(_STATE) :].decode(), value)
                for key, value in _prefixed(txn, self._db["meta"], _STATE)
            ]

    def state_published(self, patient: str, mark: bytes) -> None:
        """The state of ``patient`` as of ``mark`` is at the sites (a newer change stays due)."""
        with self._write() as txn:
            key = _STATE + patient.encode()
            if txn.get(key, db=self._db["meta"]) == mark:
                txn.delete(key, db=self._db["meta"])

    def mark_all_state(self) -> None:
        """Mark every patient with any access state as due for publishing."""
        with self._write() as txn:
            patients = set()
            for name in ("consents", "break_glass", "records"):
                for key, _ in txn.cursor(db=self._db[name]):
                    patients.add(bytes(key).partition(b"\0")[0].decode())
            for patient in patients:
                self._state_changed(txn, patient)

    def access_state(self, patient: str) -> dict[str, Any]:
        """A patient's consents, record state and break-the-glass grants, as stored (JSON)."""
        prefix = patient.encode() + b"\0"
        with self.env.begin() as txn:
            record = txn.get(patient.encode(), db=self._db["records"])
            return {
                "patient": patient,
                "consents": [
                    json.loads(v) for _, v in _prefixed(txn, self._db["consents"], prefix)
                ],
                "record": None if record is None else bytes(record).decode(),
                "break_glass": [
                    json.loads(v) for _, v in _prefixed(txn, self._db["break_glass"], prefix)
                ],
            }

    def restore_access_state(self, doc: dict[str, Any]) -> bool:
        """Put a patient's state back as :meth:`access_state` gave it (with ``changed``,
        the time of the change), unless the index holds a newer change of its own not
        yet at the sites.  Returns whether it did."""
        patient = str(doc["patient"])
        prefix = patient.encode() + b"\0"
        with self._write() as txn:
            mark = txn.get(_STATE + patient.encode(), db=self._db["meta"])
            if mark is not None and int(mark) > int(doc.get("changed", 0)):
                return False
            if mark is not None:
                txn.delete(_STATE + patient.encode(), db=self._db["meta"])
            for name in ("consents", "break_glass"):
                for key, _ in list(_prefixed(txn, self._db[name], prefix)):
                    txn.delete(key, db=self._db[name])
            for c in doc["consents"]:
                key = prefix + str(c["to"]).encode()
                txn.put(key, json.dumps(c).encode(), db=self._db["consents"])
            for g in doc["break_glass"]:
                key = prefix + _U32.pack(int(g["uid"]))
                txn.put(key, json.dumps(g).encode(), db=self._db["break_glass"])
            if doc["record"] is None:
                txn.delete(patient.encode(), db=self._db["records"])
            else:
                txn.put(patient.encode(), str(doc["record"]).encode(), db=self._db["records"])
        return True

    def meta(self, key: bytes) -> bytes | None:
        with self.env.begin() as txn:
            value = txn.get(key, db=self._db["meta"])
            return None if value is None else bytes(value)

    def put_meta(self, key: bytes, value: bytes) -> None:
        with self._write() as txn:
            txn.put(key, value, db=self._db["meta"])

    def restore(self, manifests: Iterable[Manifest]) -> int:
        """Commit instances at the placement their manifests record (a rebuild), in one
        transaction; instances already in the index are skipped.  Returns how many
        were added.

        Placements were planned against the index as it stood at ingest and are
        recorded whole; give the manifests in ingest order (``ingested_ns``) so that
        what depends on which instance came first (a view folder's time) comes out
        as it did.  A fresh
        index's fixed folders start at mtime 0 here, so that they end, like the
        original's, at the time of their newest entry.
        """
        added = 0
        with self._write() as txn:
            root = _decode_node(ROOT_INO, txn.get(_ino_key(ROOT_INO), db=self._db["nodes"]))
            if root.files == 0:
                for ino in FIXED_DIRS:
                    node = _decode_node(ino, txn.get(_ino_key(ino), db=self._db["nodes"]))
                    fresh = dataclasses.replace(node, mtime_ns=0)
                    txn.put(_ino_key(ino), _encode_node(fresh), db=self._db["nodes"])
            for manifest in manifests:
                if txn.get(manifest.key, db=self._db["instances"]) is not None:
                    continue
                self._commit_in(txn, manifest, ())
                added += 1
        return added

    # -- instances placed by other hosts (animfs.sync) -----------------------------------

    def merge(self, manifests: Iterable[Manifest]) -> int:
        """Commit instances that other hosts placed, in one transaction; instances
        already here are skipped.  Returns how many were added.

        Where a folder or file already exists here (same identity), the manifest
        takes this index's name and inode for it.  A NEW folder may claim a name
        that, here, another identity holds: two hosts that ingested different
        studies (or series) with the same preferred name between two syncs both
        gave it out.  Every host resolves that the same way, whatever the order
        it learns of them in: the identity (PatientID key or UID) that sorts first
        keeps the name; the other takes :func:`unique_name` of it (the name a
        single host would have given it).  So a folder made in that window may be
        renamed, once, on the host that made it.
        """
        added = 0
        with self._write() as txn:
            for manifest in manifests:
                if txn.get(manifest.key, db=self._db["instances"]) is not None:
                    continue
                self._commit_in(txn, self._merged(txn, manifest), ())
                added += 1
        return added

    def _merged(self, txn: lmdb.Transaction, manifest: Manifest) -> Manifest:
        """``manifest`` with its placement agreed with this index (see :meth:`merge`)."""
        inst, p = manifest.instance, manifest.placement
        levels = [
            (b"P\0" + inst.patient_key.encode(), inst.patient_key),
            (b"S\0" + inst.study_uid.encode(), inst.study_uid),
            (b"R\0" + inst.series_uid.encode(), inst.series_uid),
            (b"I\0" + inst.sop_uid.encode(), inst.sop_uid),
        ]
        names = [p.patient_name, p.study_name, p.series_name, p.file_name]
        inos = [p.patient_ino, p.study_ino, p.series_ino, p.file_ino]
        parent = PATIENTS_INO
        for level, (identity, uid) in enumerate(levels):
            found = self._identity_in(txn, identity)
            if found is not None:
                inos[level] = _U64.unpack(found)[0]
                names[level] = self._node_at(txn, inos[level]).name.decode()
            else:
                occupant = self._child_in(txn, parent, names[level].encode())
                if occupant is not None:
                    other = self._uid_below(txn, occupant, level)
                    if other is not None and uid < other:
                        new = self._free_name(txn, parent, names[level], other)
                        self._rename_in(txn, occupant, new, level)
                    else:
                        names[level] = self._free_name(txn, parent, names[level], uid)
            parent = inos[level]
        link_ino, link_name = p.link_ino, p.link_name
        found = self._identity_in(txn, b"L\0" + inst.study_uid.encode())
        if found is not None:
            link_ino = _U64.unpack(found)[0]
            link_name = self._node_at(txn, link_ino).name.decode()
        return manifest.with_placement(
            Placement(
                names[0], names[1], names[2], names[3], inos[0], inos[1], inos[2], inos[3],
                link_name, link_ino,
            )
        )

    def _free_name(self, txn: lmdb.Transaction, parent: int, name: str, uid: str) -> str:
        """The first of ``name``'s de-duplicated forms for ``uid`` that is free in ``parent``."""
        for n in range(100):
            candidate = unique_name(name, uid if n == 0 else f"{uid}\0{n}")
            if self._child_in(txn, parent, candidate.encode()) is None:
                return candidate
        raise IndexError_(f"no free name for {name!r} in folder {parent}")

    def _first_file(self, txn: lmdb.Transaction, ino: int) -> Node | None:
        node = self._node_at(txn, ino)
        cursor = txn.cursor(db=self._db["dirents"])
        while node.kind == DIR:
            files = self._files_in(txn, node.ino)
            if files is not None:
                first = next(iter(files), None)
                return None if first is None else _file_node(node.ino, first)
            prefix = _U64.pack(node.ino)
            if not cursor.set_range(prefix) or not bytes(cursor.key()).startswith(prefix):
                return None
            node = self._node_at(txn, _U64.unpack(cursor.value())[0])
        return node if node.kind == FILE else None

    def _uid_below(self, txn: lmdb.Transaction, ino: int, level: int) -> str | None:
        """The identity (patient key, study, series or SOP instance UID at ``level``
        0..3) of the folder or file ``ino``, from the first instance below it."""
        node = self._first_file(txn, ino)
        data = None if node is None else self._record_in(txn, node.ino)
        if data is None:
            return None
        inst = self._decode_in(txn, data).instance
        return (inst.patient_key, inst.study_uid, inst.series_uid, inst.sop_uid)[level]

    def _children(self, txn: lmdb.Transaction, ino: int) -> list[int]:
        return [_U64.unpack(v)[0] for _, v in _prefixed(txn, self._db["dirents"], _U64.pack(ino))]

    def _rename_in(self, txn: lmdb.Transaction, ino: int, new: str, level: int) -> None:
        """Give folder or file ``ino`` (at ``level`` 0..3 under /patients) the name
        ``new``, with everything that repeats the name: series records, instance
        records, and the study links under /studies and the views."""
        dbs = self._db
        node = self._node_at(txn, ino)
        if level == 3:  # a file's name is in its record, in its series' listing
            files = self._staging(txn, node.parent)
            entry = files.by_ino(ino)
            assert entry is not None, f"inode {ino}: not in its series' listing"
            manifest = self._decode_in(txn, entry.record)
            moved = manifest.with_placement(dataclasses.replace(manifest.placement, file_name=new))
            shared = txn.get(_ino_key(node.parent), db=dbs["series"])
            files.put(listing.entry_of(entry.image, record.encode_instance(moved, shared)))
            return
        txn.delete(_dirent_key(node.parent, node.name), db=dbs["dirents"])
        txn.put(_dirent_key(node.parent, new.encode()), _ino_key(ino), db=dbs["dirents"])
        txn.put(_ino_key(ino), _encode_node(dataclasses.replace(node, name=new.encode())),
                db=dbs["nodes"])
        studies = [ino] if level == 1 else self._children(txn, ino) if level == 0 else []
        series = [ino] if level == 2 else [r for s in studies for r in self._children(txn, s)]
        field = ("patient_name", "study_name", "series_name")[level]
        for r in series:
            shared = txn.get(_ino_key(r), db=dbs["series"])
            if shared is not None:
                txn.put(_ino_key(r), record.rename_series(shared, field, new), db=dbs["series"])
        for study in studies:
            self._relink_study(txn, study)

    def _relink_study(self, txn: lmdb.Transaction, study: int) -> None:
        """Point a study's links (/studies, /by-date, /by-modality) at its current path."""
        dbs = self._db
        node = self._first_file(txn, study)
        data = None if node is None else self._record_in(txn, node.ino)
        if data is None:
            return
        uid = self._decode_in(txn, data).instance.study_uid
        study_node = self._node_at(txn, study)
        patient = self._node_at(txn, study_node.parent)
        path = f"patients/{patient.name.decode()}/{study_node.name.decode()}"
        modalities = set()
        for r in self._children(txn, study):
            shared = txn.get(_ino_key(r), db=dbs["series"])
            if shared is not None:
                modalities.add(safe_name(record.decode_series(shared)[0][10] or "OT"))
        links = [(b"L\0" + uid.encode(), "../" + path, False)]
        links.append((b"D\0" + uid.encode(), "../../../../" + path, True))
        links += [(b"M\0" + m.encode() + b"\0" + uid.encode(), "../../../../" + path, True)
                  for m in sorted(modalities)]
        view_name = safe_name(f"{patient.name.decode()}_{study_node.name.decode()}")
        for identity, target, named in links:
            found = txn.get(identity, db=dbs["ids"])
            if found is None:
                continue
            link_ino = _U64.unpack(found)[0]
            link = _decode_node(link_ino, txn.get(found, db=dbs["nodes"]))
            name = link.name
            if named and view_name.encode() != link.name:
                txn.delete(_dirent_key(link.parent, link.name), db=dbs["dirents"])
                name = view_name.encode()
                if txn.get(_dirent_key(link.parent, name), db=dbs["dirents"]) is not None:
                    name = self._free_name(txn, link.parent, view_name, uid).encode()
                txn.put(_dirent_key(link.parent, name), found, db=dbs["dirents"])
            moved = dataclasses.replace(
                link, name=name, target=target.encode(), size=len(target.encode())
            )
            txn.put(found, _encode_node(moved), db=dbs["nodes"])

    # -- ingest ---------------------------------------------------------------------

    def plan(self, manifest: Manifest) -> Placement:
        """Names and inodes for a new instance, as the index stands now.

        Existing folders are reused; new ones get a hashed inode and a name made
        unique in their folder.  Raises :class:`Conflict` when the study or
        series already sits under another patient or study.
        """
        with self.env.begin() as txn:
            return self._plan_in(txn, manifest)

    def _plan_in(self, txn: lmdb.Transaction, manifest: Manifest) -> Placement:
        inst = manifest.instance
        preferred = inst.folder_names()
        taken: set[int] = set()

        def place(identity: bytes, parent: int, name: str, uid: str) -> tuple[int, str, bool]:
            found = self._identity_in(txn, identity)
            if found is not None:
                node = self._node_at(txn, _U64.unpack(found)[0])
                if node.parent != parent:
                    raise Conflict(_conflict_message(identity))
                return node.ino, node.name.decode(), False
            attempt = 0
            ino = hashed_ino(identity)
            while ino in taken or txn.get(_ino_key(ino), db=self._db["nodes"]) is not None:
                attempt += 1
                ino = hashed_ino(identity, attempt)
            taken.add(ino)
            final = name
            for n in range(100):
                if self._child_in(txn, parent, final.encode()) is None:
                    break
                final = unique_name(name, uid if n == 0 else f"{uid}\0{n}")
            return ino, final, True

        p_ino, p_name, _ = place(
            b"P\0" + inst.patient_key.encode(), PATIENTS_INO, preferred[0], inst.patient_key
        )
        s_ino, s_name, _ = place(
            b"S\0" + inst.study_uid.encode(), p_ino, preferred[1], inst.study_uid
        )
        r_ino, r_name, _ = place(
            b"R\0" + inst.series_uid.encode(), s_ino, preferred[2], inst.series_uid
        )
        f_ino, f_name, _ = place(b"I\0" + inst.sop_uid.encode(), r_ino, preferred[3], inst.sop_uid)
        l_ino, l_name, _ = place(
            b"L\0" + inst.study_uid.encode(),
            STUDIES_INO,
            safe_name(inst.study_uid),
            inst.study_uid,
        )
        return Placement(p_name, s_name, r_name, f_name, p_ino, s_ino, r_ino, f_ino, l_name, l_ino)

    def commit(self, manifest: Manifest, missed: Iterable[Missed] = ()) -> None:
        """Add an instance, its folders, chunk references and repair entries atomically.

        Raises :class:`StalePlan` if the placement is no longer free (plan
        again), :class:`Conflict` if the instance is already there.
        """
        with self._write() as txn:
            self._commit_in(txn, manifest, missed)

    def commit_group(
        self,
        manifests: Sequence[Manifest],
        publish: Callable[[list[Manifest]], list[Missed]],
    ) -> list[Manifest | Conflict]:
        """Place and commit several instances in one transaction (ingest's group commit).

        Each instance is planned with the index's write lock held, so the group's
        names and inodes cannot race another ingest.  ``publish(placed)`` then
        writes their manifests to the sites and makes everything durable; only if
        it returns is the transaction committed, with the repair entries it
        returns.  If it raises, nothing is committed.  Returns, per instance, the
        placed manifest or the :class:`Conflict` that kept it out (nothing of a
        refused instance is written).
        """
        results: list[Manifest | Conflict] = []
        with self._write() as txn:
            placed = []
            for manifest in manifests:
                try:
                    ready = manifest.with_placement(self._plan_in(txn, manifest))
                    self._commit_in(txn, ready, ())
                except Conflict as exc:
                    results.append(exc)
                    continue
                placed.append(ready)
                results.append(ready)
            _journal_put(txn, self._db["journal"], publish(placed))
        return results

    def bulk_add(self, manifests: Iterable[Manifest]) -> int:
        """Commit many placed instances in one transaction, fast (``scripts/gen_index.py``).

        Like :meth:`restore` without its skipping, but a folder's counts and time
        are summed over the batch and written once, not once per instance (the
        folders near the root are in every instance's path).  Raises
        :class:`StalePlan` or :class:`Conflict` (nothing written) when a placement
        is taken.  Returns how many were added.
        """
        added = 0
        grown: dict[int, list[int]] = {}
        with self._write() as txn:
            for manifest in manifests:
                self._commit_in(txn, manifest, (), grown)
                added += 1
            for ino, (files, nbytes, subdirs, t) in grown.items():
                self._grow(txn, ino, t, files=files, nbytes=nbytes, subdirs=subdirs)
        return added

    def add_many(self, manifests: Iterable[Manifest]) -> list[Manifest]:
        """Plan and commit many instances in one transaction (generated or rebuilt indexes).

        Returns them as placed.  All or nothing, like :meth:`commit`.
        """
        placed = []
        with self._write() as txn:
            for manifest in manifests:
                manifest = manifest.with_placement(self._plan_in(txn, manifest))
                self._commit_in(txn, manifest, ())
                placed.append(manifest)
        return placed

    def _commit_in(
        self,
        txn: lmdb.Transaction,
        manifest: Manifest,
        missed: Iterable[Missed],
        grown: dict[int, list[int]] | None = None,
    ) -> None:
        inst, place = manifest.instance, manifest.placement
        dbs = self._db
        if txn.get(manifest.key, db=dbs["instances"]) is not None:
            raise Conflict(f"SOPInstanceUID {inst.sop_uid} is already in the archive")
        t = manifest.ingested_ns
        series_key = _ino_key(place.series_ino)
        shared = txn.get(series_key, db=dbs["series"])
        if shared is None:
            shared = record.encode_series(manifest)
            txn.put(series_key, shared, db=dbs["series"])
        chain = [
            (
                b"P\0" + inst.patient_key.encode(),
                PATIENTS_INO,
                place.patient_ino,
                place.patient_name,
                DIR,
            ),
            (
                b"S\0" + inst.study_uid.encode(),
                place.patient_ino,
                place.study_ino,
                place.study_name,
                DIR,
            ),
            (
                b"R\0" + inst.series_uid.encode(),
                place.study_ino,
                place.series_ino,
                place.series_name,
                DIR,
            ),
            (
                b"I\0" + inst.sop_uid.encode(),
                place.series_ino,
                place.file_ino,
                place.file_name,
                FILE,
            ),
            (
                b"L\0" + inst.study_uid.encode(),
                STUDIES_INO,
                place.link_ino,
                place.link_name,
                LINK,
            ),
        ]
        new_dirs: set[int] = set()
        for identity, parent, ino, name, kind in chain:
            found = self._identity_in(txn, identity)
            if found is not None:
                if _U64.unpack(found)[0] != ino:
                    raise StalePlan(identity.decode(errors="replace"))
                continue
            name_b = name.encode()
            if (
                txn.get(_ino_key(ino), db=dbs["nodes"]) is not None
                or self._child_in(txn, parent, name_b) is not None
            ):
                raise StalePlan(identity.decode(errors="replace"))
            if kind == FILE:  # in its series' listing; its identity is its instance key
                data = record.encode_instance(manifest, shared)
                self._staging(txn, parent).put(listing.entry_of(0, data))
                txn.put(_ino_key(ino), _in_series(parent), db=dbs["nodes"])
                txn.put(manifest.key, _ino_key(ino), db=dbs["instances"])
                continue
            txn.put(_dirent_key(parent, name_b), _ino_key(ino), db=dbs["dirents"])
            if kind == DIR:
                node = Node(ino, DIR, parent, name_b, t, 0)
                new_dirs.add(ino)
            else:
                target = f"../patients/{place.patient_name}/{place.study_name}".encode()
                node = Node(ino, LINK, parent, name_b, t, len(target), target=target)
                new_dirs.add(ino)  # counts as a new entry of /studies
            txn.put(_ino_key(ino), _encode_node(node), db=dbs["nodes"])
            txn.put(identity, _ino_key(ino), db=dbs["ids"])
        # Every folder above the file: newest-entry mtime, counts and bytes below.
        ancestors = [
            (place.series_ino, None),
            (place.study_ino, place.series_ino),
            (place.patient_ino, place.study_ino),
            (PATIENTS_INO, place.patient_ino),
            (ROOT_INO, None),
        ]
        if place.link_ino in new_dirs:
            ancestors.append((STUDIES_INO, None))
        for ino, child in ancestors:
            counts = (0, 0) if ino == STUDIES_INO else (1, manifest.size)
            if grown is None:
                self._grow(
                    txn, ino, t, files=counts[0], nbytes=counts[1], subdirs=int(child in new_dirs)
                )
            else:  # bulk_add: summed, and written once per folder at the end
                acc = grown.setdefault(ino, [0, 0, 0, 0])
                acc[0], acc[1] = acc[0] + counts[0], acc[1] + counts[1]
                acc[2], acc[3] = acc[2] + int(child in new_dirs), max(acc[3], t)
        self._add_views(txn, manifest)
        self._assign_media(txn, manifest)
        for ref in manifest.chunks:
            key = bytes.fromhex(ref.id)
            old = txn.get(key, db=dbs["chunks"])
            refs = _chunk_fields(old)[1] if old is not None else 0
            txn.put(key, _chunk_value(ref.stored, refs + 1), db=dbs["chunks"])
        _journal_put(txn, dbs["journal"], missed)

    def _add_views(self, txn: lmdb.Transaction, manifest: Manifest) -> None:
        """The study's symlinks under /by-date and /by-modality, unless it has them."""
        inst, place = manifest.instance, manifest.placement
        by_modality = b"M\0" + safe_name(inst.modality or "OT").encode() + b"\0"
        ids = self._db["ids"]
        if (
            txn.get(b"D\0" + inst.study_uid.encode(), db=ids) is not None
            and txn.get(by_modality + inst.study_uid.encode(), db=ids) is not None
        ):
            return  # the usual case, a study already in both views: no names to make
        date = inst.study_date if re.fullmatch(r"[0-9]{8}", inst.study_date) else "00000000"
        year, month, day = date[:4], date[4:6], date[6:]
        modality = safe_name(inst.modality or "OT")
        name = safe_name(f"{place.patient_name}_{place.study_name}")
        target = f"../../../../patients/{place.patient_name}/{place.study_name}".encode()
        uid = inst.study_uid
        views = [
            (BY_DATE_INO, b"Y", [year, month, day], b"D\0" + uid.encode()),
            (
                BY_MODALITY_INO,
                b"O",
                [modality, year, month],
                b"M\0" + modality.encode() + b"\0" + uid.encode(),
            ),
        ]
        t = manifest.ingested_ns
        for root, kind, parts, link_id in views:
            if txn.get(link_id, db=self._db["ids"]) is not None:
                continue
            chain, parent = [root], root
            for depth in range(len(parts)):
                identity = kind + b"\0" + "/".join(parts[: depth + 1]).encode()
                parent = self._view_node(txn, identity, parent, parts[depth].encode(), t)
                chain.append(parent)
            self._view_node(txn, link_id, parent, name.encode(), t, target=target, uid=uid)
            for ino in chain:
                self._grow(txn, ino, t, files=0, nbytes=0, subdirs=0)

    def _view_node(
        self,
        txn: lmdb.Transaction,
        identity: bytes,
        parent: int,
        name: bytes,
        t: int,
        *,
        target: bytes = b"",
        uid: str = "",
    ) -> int:
        """The inode of a view folder (found or made), or a new view link."""
        dbs = self._db
        found = txn.get(identity, db=dbs["ids"])
        if found is not None:
            return int(_U64.unpack(found)[0])
        attempt, ino = 0, hashed_ino(identity)
        while txn.get(_ino_key(ino), db=dbs["nodes"]) is not None:
            attempt += 1
            ino = hashed_ino(identity, attempt)
        final = name
        for n in range(100):  # only link names can collide: folder names are their identity
            if txn.get(_dirent_key(parent, final), db=dbs["dirents"]) is None:
                break
            final = unique_name(name.decode(), uid if n == 0 else f"{uid}\0{n}").encode()
        if target:
            node = Node(ino, LINK, parent, final, t, len(target), target=target)
        else:
            node = Node(ino, DIR, parent, final, t, 0)
            self._grow(txn, parent, t, files=0, nbytes=0, subdirs=1)
        txn.put(_ino_key(ino), _encode_node(node), db=dbs["nodes"])
        txn.put(_dirent_key(parent, final), _ino_key(ino), db=dbs["dirents"])
        txn.put(identity, _ino_key(ino), db=dbs["ids"])
        return ino

    # -- the /cd tree ------------------------------------------------------------------

    def _ensure_media(self) -> None:
        """Add /cd to an index made before it existed, and number its instances."""
        with self.env.begin() as txn:
            if txn.get(b"media", db=self._db["meta"]) == b"1":
                return
        with self._write() as txn:
            nodes = self._db["nodes"]
            if txn.get(_ino_key(CD_INO), db=nodes) is None:
                root = _decode_node(ROOT_INO, txn.get(_ino_key(ROOT_INO), db=nodes))
                cd = Node(CD_INO, DIR, ROOT_INO, b"cd", root.mtime_ns, 0)
                txn.put(_ino_key(CD_INO), _encode_node(cd), db=nodes)
                txn.put(_dirent_key(ROOT_INO, b"cd"), _ino_key(CD_INO), db=self._db["dirents"])
                root = dataclasses.replace(root, subdirs=root.subdirs + 1)
                txn.put(_ino_key(ROOT_INO), _encode_node(root), db=nodes)
            for manifest in self._manifests_in(txn):
                self._assign_media(txn, manifest)
            txn.put(b"media", b"1", db=self._db["meta"])

    def _assign_media(self, txn: lmdb.Transaction, manifest: Manifest) -> None:
        """Give a new instance its file ID on its patient's medium (once: only when it
        is committed, or when an index from before /cd is opened)."""
        db = self._db["media"]
        p = manifest.placement
        if txn.get(b"i\0" + CD_PATIENT.to_bytes() + _U64.pack(p.patient_ino), db=db) is None:
            for kind in (CD_PATIENT, CD_DICOMDIR, CD_README, CD_DICOM):
                self._new_cd_ino(txn, kind, p.patient_ino, 0)
        self._media_number(txn, CD_STUDY, p.patient_ino, p.study_ino)
        self._media_number(txn, CD_SERIES, p.study_ino, p.series_ino)
        files = self._staging(txn, p.series_ino)  # an image's number is in the listing
        entry = files.by_ino(p.file_ino)
        if entry is not None and entry.image == 0:
            files.put(entry._replace(image=files.last_image + 1))

    def _media_number(self, txn: lmdb.Transaction, kind: int, parent: int, child: int) -> int:
        """The number of the study or series ``child`` in ``parent`` (given now if it has
        none, with its /cd inode); an image's number is in its series' listing."""
        db = self._db["media"]
        if kind:
            found = txn.get(b"i\0" + kind.to_bytes() + _U64.pack(child), db=db)
            if found is not None:
                return int(_CD_INO.unpack(found)[1])
        counter = b"n\0" + _U64.pack(parent)
        last = txn.get(counter, db=db)
        number = (_U32.unpack(last)[0] if last is not None else 0) + 1
        txn.put(counter, _U32.pack(number), db=db)
        txn.put(b"e\0" + _U64.pack(parent) + _U32.pack(number), _U64.pack(child), db=db)
        if kind:
            self._new_cd_ino(txn, kind, child, number)
        return number

    def _new_cd_ino(self, txn: lmdb.Transaction, kind: int, ino: int, number: int) -> None:
        db = self._db["media"]
        attempt = 0
        while True:
            seed = b"cd\0" + kind.to_bytes() + _U64.pack(ino) + str(attempt).encode()
            cd_ino = CD_FIRST_INO | int.from_bytes(hashlib.sha256(seed).digest()[:8], "big") >> 2
            if txn.get(b"c\0" + _U64.pack(cd_ino), db=db) is None:
                break
            attempt += 1
        txn.put(b"c\0" + _U64.pack(cd_ino), _CD_ENTRY.pack(kind.to_bytes(), ino, number), db=db)
        txn.put(b"i\0" + kind.to_bytes() + _U64.pack(ino), _CD_INO.pack(cd_ino, number), db=db)

    def cd_entry(self, cd_ino: int) -> tuple[int, int, int] | None:
        """(kind, inode under /patients, number) of a /cd inode, or None."""
        with self.env.begin() as txn:
            value = txn.get(b"c\0" + _U64.pack(cd_ino), db=self._db["media"])
        if value is None:
            return None
        kind, ino, number = _CD_ENTRY.unpack(value)
        return kind[0], ino, number

    def cd_ino(self, kind: int, ino: int) -> tuple[int, int] | None:
        """(cd inode, number) of a /cd entry, by kind and its inode under /patients."""
        with self.env.begin() as txn:
            value = txn.get(b"i\0" + kind.to_bytes() + _U64.pack(ino), db=self._db["media"])
        return None if value is None else _CD_INO.unpack(value)

    def cd_children(self, parent: int, after: int, limit: int) -> list[tuple[int, int]]:
        """Up to ``limit`` (number, inode) numbered in ``parent``, numbers above ``after``."""
        prefix = b"e\0" + _U64.pack(parent)
        out: list[tuple[int, int]] = []
        with self.env.begin(buffers=True) as txn:
            files = self._files_in(txn, parent)
            if files is not None:
                return [(e.image, e.ino) for e in itertools.islice(files.by_image(after), limit)]
            cursor = txn.cursor(db=self._db["media"])
            if not cursor.set_range(prefix + _U32.pack(after + 1)):
                return out
            for key, value in cursor:
                if not bytes(key).startswith(prefix) or len(out) >= limit:
                    break
                out.append((_U32.unpack(key[-4:])[0], _U64.unpack(value)[0]))
        return out

    def cd_child(self, parent: int, number: int) -> int | None:
        """The inode numbered ``number`` in ``parent``, or None."""
        with self.env.begin(buffers=True) as txn:
            files = self._files_in(txn, parent)
            if files is not None:
                entry = next(files.by_image(number - 1), None)
                return entry.ino if entry is not None and entry.image == number else None
            key = b"e\0" + _U64.pack(parent) + _U32.pack(number)
            value = txn.get(key, db=self._db["media"])
        return None if value is None else int(_U64.unpack(value)[0])

    def media_manifests(self, patient: int) -> list[tuple[int, int, int, bytes]]:
        """(study, series, image number, manifest JSON) of every instance of a patient
        folder, in file ID order, read in one transaction."""
        db = self._db["media"]
        out: list[tuple[int, int, int, bytes]] = []
        with self.env.begin() as txn:
            cursor = txn.cursor(db=db)

            def numbered(parent: int) -> list[tuple[int, int]]:
                prefix = b"e\0" + _U64.pack(parent)
                if not cursor.set_range(prefix):
                    return []
                found = []
                for key, value in cursor:
                    if not key.startswith(prefix):
                        break
                    found.append((_U32.unpack(key[-4:])[0], _U64.unpack(value)[0]))
                return found

            for study, study_ino in numbered(patient):
                for series, series_ino in numbered(study_ino):
                    files = self._files_in(txn, series_ino)
                    for entry in files.by_image() if files is not None else ():
                        json_ = self._decode_in(txn, entry.record).to_bytes()
                        out.append((study, series, entry.image, json_))
        return out

    def _grow(
        self,
        txn: lmdb.Transaction,
        ino: int,
        mtime_ns: int,
        *,
        files: int,
        nbytes: int,
        subdirs: int,
    ) -> None:
        data = txn.get(_ino_key(ino), db=self._db["nodes"])
        node = _decode_node(ino, data)
        grown = Node(
            ino,
            DIR,
            node.parent,
            node.name,
            max(node.mtime_ns, mtime_ns),
            node.size,
            node.subdirs + subdirs,
            node.files + files,
            node.bytes_below + nbytes,
        )
        txn.put(_ino_key(ino), _encode_node(grown), db=self._db["nodes"])


def _journal_put(txn: lmdb.Transaction, db: Any, entries: Iterable[Missed]) -> None:
    now = time.time()
    for entry in entries:
        txn.put(
            entry.site.encode() + b"\0" + entry.key.encode(),
            json.dumps({"reason": entry.reason, "time": now}).encode(),
            db=db,
        )


def _prefixed(txn: lmdb.Transaction, db: Any, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The (key, value) pairs of ``db`` whose key starts with ``prefix``, in key order."""
    cursor = txn.cursor(db=db)
    if not cursor.set_range(prefix):
        return
    for key, value in cursor:
        if not bytes(key).startswith(prefix):
            return
        yield bytes(key), bytes(value)


def _conflict_message(identity: bytes) -> str:
    kind, _, uid = identity.partition(b"\0")
    what = {b"S": "StudyInstanceUID", b"R": "SeriesInstanceUID"}.get(kind, "identity")
    parent = {b"S": "patient", b"R": "study"}.get(kind, "folder")
    return f"{what} {uid.decode(errors='replace')} already belongs to another {parent}"


# -- consistency ---------------------------------------------------------------------

_IDENTITY_KINDS = {b"P": DIR, b"S": DIR, b"R": DIR, b"I": FILE, b"L": LINK}


def check(index: Index, limit: int = 100) -> list[str]:
    """Every way the index contradicts itself, one line each (at most ``limit``); [] if none.

    Read in one transaction, so it can run while an ingest or a mount uses the
    index, and judges one committed state.  It holds that: every name leads to a
    whole node and every node has its one name and one identity; a file, its
    instance record, its placement and its chunk references agree; a chunk's
    reference count is the number of instances that use it; a folder's counts
    are those of what is below it, and no folder is empty (so a crash can never
    show a study or series without its instances); every symlink resolves to a
    folder, and every study has its /studies link; the repair journal names only
    chunks and manifests the index references.  It walks everything, holding one
    record per node in memory: an offline check, not for the mount's hot path.
    """
    problems: list[str] = []

    def bad(text: str) -> None:
        if len(problems) < limit:
            problems.append(text)

    dbs = index._db
    with index.env.begin() as txn:
        nodes: dict[int, Node] = {}
        in_series: dict[int, int] = {}  # instance file -> the series its node names
        for key, value in txn.cursor(db=dbs["nodes"]):
            ino = _U64.unpack(key)[0]
            if value[:1] == bytes([IN_SERIES]) and len(value) == 9:
                in_series[ino] = _U64.unpack_from(value, 1)[0]
                continue
            try:
                nodes[ino] = _decode_node(ino, bytes(value))
            except (struct.error, AssertionError, ValueError) as exc:
                bad(f"inode {ino}: unreadable node record ({exc})")

        def path(ino: int) -> str:
            parts: list[str] = []
            while ino != ROOT_INO and ino in nodes and len(parts) < 64:
                parts.append(nodes[ino].name.decode("utf-8", "surrogateescape"))
                ino = nodes[ino].parent
            return "/" + "/".join(reversed(parts))

        # Series listings: each file once, in name order, numbered 1..n, its node
        # naming its series.
        children: dict[int, list[int]] = {}
        named: set[int] = set()
        records: dict[int, bytes] = {}  # instance files' records
        for key, value in txn.cursor(db=dbs["files"]):
            series = _U64.unpack(key)[0]
            try:
                view = listing.View(bytes(value))
                entries = list(view)
                by_ino = [view.by_ino(e.ino) for e in entries]
                by_name = [view.find(e.name) for e in entries]
                images = [e.image for e in view.by_image()]
            except ValueError as exc:
                bad(f"{path(series)}: unreadable listing of its files ({exc})")
                continue
            names = [e.name for e in entries]
            if names != sorted(set(names)):
                bad(f"{path(series)}: its listing is not in name order, or names a file twice")
            if by_ino != entries or by_name != entries:
                bad(f"{path(series)}: its listing's tables by inode or name do not match it")
            if images != list(range(1, len(entries) + 1)):
                bad(f"{path(series)}: its files are not numbered 1..{len(entries)} on /cd")
            for entry in entries:
                if entry.ino in nodes or entry.ino in records:
                    bad(f"{path(series)}/{entry.name!r}: inode {entry.ino} is taken twice")
                elif in_series.get(entry.ino) != series:
                    bad(f"{path(series)}/{entry.name!r}: its node does not name its folder")
                else:
                    nodes[entry.ino] = _file_node(series, entry)
                    records[entry.ino] = entry.record
                    named.add(entry.ino)
                    children.setdefault(series, []).append(entry.ino)
        for ino, series in in_series.items():
            if ino not in records:
                bad(f"inode {ino}: names series folder {path(series)}, which does not list it")

        # Names: dirents <-> nodes.
        for key, value in txn.cursor(db=dbs["dirents"]):
            parent, name, child = _U64.unpack(key[:8])[0], bytes(key[8:]), _U64.unpack(value)[0]
            node = nodes.get(child)
            if node is None:
                bad(f"{path(parent)}/{name!r}: names inode {child}, which does not exist")
            elif (node.parent, node.name) != (parent, name):
                bad(f"{path(parent)}/{name!r}: names inode {child}, recorded as {path(child)}")
            elif child in named:
                bad(f"{path(child)}: inode {child} has more than one name")
            else:
                named.add(child)
                children.setdefault(parent, []).append(child)
        for ino, node in nodes.items():
            if ino == ROOT_INO:
                continue
            if ino not in named:
                bad(f"inode {ino} ({node.name!r} in folder {node.parent}) has no folder entry")
            parent_node = nodes.get(node.parent)
            if parent_node is None or parent_node.kind != DIR:
                bad(f"{path(ino)}: its parent {node.parent} is not a folder")

        # Identities: each dynamic node has exactly one, of its kind.
        identified: dict[int, bytes] = {}
        for key, value in txn.cursor(db=dbs["ids"]):
            identity, ino = bytes(key), _U64.unpack(value)[0]
            node = nodes.get(ino)
            kind = _IDENTITY_KINDS.get(identity.partition(b"\0")[0])
            if node is None:
                bad(f"identity {identity!r}: names inode {ino}, which does not exist")
            elif kind is not None and node.kind != kind:
                bad(f"identity {identity!r}: names {path(ino)}, a node of the wrong kind")
            elif ino in identified:
                bad(f"{path(ino)}: has two identities, {identified[ino]!r} and {identity!r}")
            identified[ino] = identity
        instance_files: dict[bytes, int] = {}  # instance key -> file inode
        for key, value in txn.cursor(db=dbs["instances"]):
            ino = _U64.unpack(value)[0]
            what = f"instance {bytes(key).hex()[:16]}"
            if ino not in records:
                bad(f"{what}: names inode {ino}, which is not an instance file")
            elif ino in identified:
                bad(f"{path(ino)}: has two identities, {identified[ino]!r} and {what}")
            else:
                identified[ino] = bytes(key)
                instance_files[bytes(key)] = ino
        for ino in nodes:
            if ino >= FIRST_DYNAMIC_INO and ino not in identified:
                bad(f"{path(ino)}: inode {ino} has no identity")

        # Instances: file <-> instance record <-> placement <-> chunk references.
        uses: dict[str, int] = {}
        stored: dict[str, int] = {}
        for key, ino in instance_files.items():
            try:
                manifest = index._decode_in(txn, records[ino])
            except ValueError as exc:
                bad(f"{path(ino)}: its instance record does not decode: {exc}")
                continue
            what = f"instance {manifest.instance.sop_uid}"
            p = manifest.placement
            if manifest.key != key:
                bad(f"{what}: recorded under the key of another SOPInstanceUID")
            elif ino != p.file_ino:
                bad(f"{what}: placed at inode {p.file_ino}, shown as {path(ino)} (inode {ino})")
            else:
                chain = [
                    (p.file_ino, p.series_ino, p.file_name),
                    (p.series_ino, p.study_ino, p.series_name),
                    (p.study_ino, p.patient_ino, p.study_name),
                    (p.patient_ino, PATIENTS_INO, p.patient_name),
                ]
                for node_ino, parent, leaf in chain:
                    node = nodes.get(node_ino)
                    if node is None or (node.parent, node.name) != (parent, leaf.encode()):
                        bad(f"{what}: {path(node_ino)} is not where its placement puts it")
                        break
            if sum(ref.size for ref in manifest.chunks) != manifest.size:
                bad(f"{what}: its chunks do not add up to its {manifest.size} bytes")
            for ref in manifest.chunks:
                uses[ref.id] = uses.get(ref.id, 0) + 1
                stored[ref.id] = ref.stored
        for ino in records.keys() - instance_files.values():
            bad(f"{path(ino)}: a file no instance key names (half-listed)")
        for key, value in txn.cursor(db=dbs["chunks"]):
            chunk = bytes(key).hex()
            try:
                size, refs = _chunk_fields(value)
            except ValueError:
                bad(f"chunk {chunk[:16]}: unreadable value")
                continue
            used = uses.pop(chunk, 0)
            if refs != used:
                bad(f"chunk {chunk[:16]}: {refs} references recorded, {used} instances use it")
            elif size != stored.get(chunk):
                bad(f"chunk {chunk[:16]}: recorded as {size} bytes stored, instances say otherwise")
        for chunk, used in uses.items():
            bad(f"chunk {chunk[:16]}: used by {used} instances, not recorded")

        # Folders: counts, emptiness, newest-entry mtime (under /patients).
        totals: dict[int, tuple[int, int]] = {}

        def below(ino: int, depth: int = 0) -> tuple[int, int]:
            if ino in totals or depth > 64:
                return totals.get(ino, (0, 0))
            n = size = 0
            for child in children.get(ino, ()):
                node = nodes[child]
                if node.kind == DIR:
                    more = below(child, depth + 1)
                    n, size = n + more[0], size + more[1]
                elif node.kind == FILE and node.sop_uid:
                    n, size = n + 1, size + node.size
            totals[ino] = (n, size)
            return n, size

        for ino, node in nodes.items():
            if node.kind != DIR:
                continue
            kids = [nodes[c] for c in children.get(ino, ())]
            subdirs = sum(k.kind == DIR for k in kids)
            if node.subdirs != subdirs:
                bad(f"{path(ino)}: records {node.subdirs} sub-folders, holds {subdirs}")
            n, size = below(ino)
            if (node.files, node.bytes_below) != (n, size):
                bad(f"{path(ino)}: records {node.files} files of {node.bytes_below} bytes "
                    f"below it, holds {n} of {size}")
            if ino >= FIRST_DYNAMIC_INO and not kids:
                bad(f"{path(ino)}: an empty folder")
            if ino >= FIRST_DYNAMIC_INO and kids and path(ino).startswith("/patients/"):
                newest = max(k.mtime_ns for k in kids)
                if node.mtime_ns != newest:
                    bad(f"{path(ino)}: mtime {node.mtime_ns} is not its newest entry's {newest}")

        # Symlinks resolve to folders; every study has its /studies link.
        def resolve(start: int, target: bytes) -> int | None:
            ino: int | None = start
            for part in target.split(b"/"):
                if ino is None or part in (b"", b"."):
                    continue
                if part == b"..":
                    ino = nodes[ino].parent if ino in nodes else None
                    continue
                found = txn.get(_dirent_key(ino, part), db=dbs["dirents"])
                ino = None if found is None else _U64.unpack(found)[0]
            return ino

        for ino, node in nodes.items():
            if node.kind != LINK:
                continue
            target = resolve(node.parent, node.target)
            if target is None or target not in nodes or nodes[target].kind != DIR:
                bad(f"{path(ino)}: symlink to {node.target!r} leads nowhere")
            elif node.size != len(node.target):
                bad(f"{path(ino)}: symlink size {node.size} is not its target's length")
        for identity, value in _prefixed(txn, dbs["ids"], b"S\0"):
            study = _U64.unpack(value)[0]
            link = txn.get(b"L\0" + identity[2:], db=dbs["ids"])
            link_node = None if link is None else nodes.get(_U64.unpack(link)[0])
            if link_node is None or resolve(STUDIES_INO, link_node.target) != study:
                bad(f"{path(study)}: no /studies link leads to it")

        # The repair journal names only what the index references.
        for key, _value in txn.cursor(db=dbs["journal"]):
            site, _, obj = bytes(key).decode(errors="replace").partition("\0")
            prefix, _, hex_name = obj.partition("/")
            try:
                raw = bytes.fromhex(hex_name)
            except ValueError:
                raw = b""
            if prefix == "chunks" and txn.get(raw, db=dbs["chunks"]) is None:
                bad(f"journal: {site}: {obj}: not referenced")
            elif prefix == "manifests" and txn.get(raw, db=dbs["instances"]) is None:
                bad(f"journal: {site}: {obj}: no such instance")
    return problems
