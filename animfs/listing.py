"""Pure: a series folder's files packed into one value (index format 4).

A series' instance files are not one LMDB entry each (an instance record, a name
and a /cd number, each on a page of its own among millions: a listing of a
series read a page per file) but one value per series, holding every file's
record in name order: a series is listed with one read, and its bytes sit on
full overflow pages rather than on half-split leaves::

    count n (u32 LE)
    n x end (u32 LE): where entry i ends, counted from the start of the entries
    n x (file inode u64 LE, entry number u32 LE), by inode
    n x entry number (u32 LE), by image number
    n x (CRC-32 of the file name u32 LE, entry number u32 LE), by CRC then number
    n entries, by file name (UTF-8 bytes): image number (varint; 0: not numbered
      yet) | the instance record (:mod:`animfs.record`: compact, or JSON)

An entry's file name, inode, size and time are its record's (:func:`record.peek`);
the image number is its number on the patient's medium (``IMnnnnnn`` under /cd).
:class:`View` reads a stored value in place: a search by name, inode or image
number is a binary search in a table of fixed-width items, which touches a page or
two of a listing of thousands, then the one entry.  :class:`Listing` is
the form a write transaction changes; it is encoded once, when it commits.
:class:`Cache` keeps decoded listings for reads, between transactions.
"""

from __future__ import annotations

import bisect
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import Literal, NamedTuple

from animfs import record

_U32 = struct.Struct("<I")
_BY_INO = struct.Struct("<QI")
_BY_NAME = struct.Struct("<II")


class Entry(NamedTuple):
    """One file of a series, as its record says (a tuple: made for every file listed)."""

    name: bytes
    ino: int
    image: int
    mtime_ns: int
    size: int
    sop_uid: str
    record: bytes


def entry_of(image: int, data: bytes | memoryview) -> Entry:
    """The entry of an instance record with image number ``image``."""
    ino, _series, mtime_ns, size, name, sop_uid = record.peek(data)
    return Entry(name.encode(), ino, image, mtime_ns, size, sop_uid, bytes(data))


class View:
    """A stored listing, read in place (``data`` may be a memoryview into the map,
    valid as long as its transaction).  Raises :class:`record.RecordError` on a
    malformed one."""

    __slots__ = ("_data", "_ends", "_by_ino", "_by_image", "_by_name", "_base", "n")

    def __init__(self, data: bytes | memoryview) -> None:
        if len(data) < 4:
            raise record.RecordError("truncated series listing")
        self._data = data
        self.n = n = int(_U32.unpack_from(data)[0])
        self._ends = 4
        self._by_ino = 4 + 4 * n
        self._by_image = self._by_ino + 12 * n
        self._by_name = self._by_image + 4 * n
        self._base = self._by_name + 8 * n
        if len(data) < self._base:
            raise record.RecordError("truncated series listing")

    def __len__(self) -> int:
        return self.n

    def _image_and_record(self, i: int) -> tuple[int, memoryview | bytes]:
        if not 0 <= i < self.n:
            raise record.RecordError("malformed series listing")
        start = _U32.unpack_from(self._data, self._ends + 4 * (i - 1))[0] if i else 0
        end = self._base + _U32.unpack_from(self._data, self._ends + 4 * i)[0]
        if not self._base + start < end <= len(self._data):
            raise record.RecordError("malformed series listing")
        try:
            image, pos = record.read_varint(self._data, self._base + start, end)
        except record.RecordError:
            raise record.RecordError("truncated series listing") from None
        return image, self._data[pos:end]

    def entry(self, i: int) -> Entry:
        return entry_of(*self._image_and_record(i))

    def _name(self, i: int) -> bytes:
        return record.peek(self._image_and_record(i)[1])[4].encode()

    def _bisect(self, name: bytes) -> int:
        """The first entry whose name does not sort below ``name``."""
        lo, hi = 0, self.n
        while lo < hi:
            mid = (lo + hi) // 2
            if self._name(mid) < name:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def find(self, name: bytes) -> Entry | None:
        i = self._index_of(name)
        return None if i is None else self.entry(i)

    def _index_of(self, name: bytes) -> int | None:
        """The number of the entry named ``name``, by the CRC table, or None."""
        crc = zlib.crc32(name)
        lo, hi = 0, self.n
        while lo < hi:  # the first item of the table with this CRC
            mid = (lo + hi) // 2
            if _BY_NAME.unpack_from(self._data, self._by_name + 8 * mid)[0] < crc:
                lo = mid + 1
            else:
                hi = mid
        while lo < self.n:
            found, i = _BY_NAME.unpack_from(self._data, self._by_name + 8 * lo)
            if found != crc:
                return None
            if self._name(i) == name:
                return int(i)
            lo += 1
        return None

    def by_ino(self, ino: int) -> Entry | None:
        lo, hi = 0, self.n
        while lo < hi:
            mid = (lo + hi) // 2
            found, i = _BY_INO.unpack_from(self._data, self._by_ino + 12 * mid)
            if found < ino:
                lo = mid + 1
            elif found > ino:
                hi = mid
            else:
                return self.entry(i)
        return None

    def by_image(self, after: int = 0) -> Iterator[Entry]:
        """The entries whose image number is above ``after``, by image number."""
        lo, hi = 0, self.n
        while lo < hi:
            mid = (lo + hi) // 2
            i = _U32.unpack_from(self._data, self._by_image + 4 * mid)[0]
            if self._image_and_record(i)[0] <= after:
                lo = mid + 1
            else:
                hi = mid
        for k in range(lo, self.n):
            yield self.entry(_U32.unpack_from(self._data, self._by_image + 4 * k)[0])

    def after(self, name: bytes | None) -> Iterator[Entry]:
        """The entries whose name sorts after ``name`` (all: None), in name order."""
        i = 0
        if name is not None:  # usually the last name a listing gave: found by its CRC
            found = self._index_of(name)
            i = found + 1 if found is not None else self._bisect(name)
        for j in range(i, self.n):
            yield self.entry(j)

    def __iter__(self) -> Iterator[Entry]:
        return self.after(None)


class Listing:
    """A listing being changed in a write transaction: entries by name."""

    def __init__(self, entries: list[Entry] | None = None) -> None:
        self.entries = entries or []
        self.names = [e.name for e in self.entries]
        self.inos = {e.ino: e for e in self.entries}
        self.last_image = max((e.image for e in self.entries), default=0)

    @classmethod
    def load(cls, data: bytes | memoryview | None) -> Listing:
        return cls([] if data is None else list(View(data)))

    def __len__(self) -> int:
        return len(self.entries)

    def find(self, name: bytes) -> Entry | None:
        i = bisect.bisect_left(self.names, name)
        if i < len(self.names) and self.names[i] == name:
            return self.entries[i]
        return None

    def by_ino(self, ino: int) -> Entry | None:
        return self.inos.get(ino)

    def by_image(self, after: int = 0) -> Iterator[Entry]:
        return iter(sorted((e for e in self.entries if e.image > after), key=lambda e: e.image))

    def after(self, name: bytes | None) -> Iterator[Entry]:
        i = 0 if name is None else bisect.bisect_right(self.names, name)
        return iter(self.entries[i:])

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def put(self, entry: Entry) -> None:
        """Add ``entry``, or replace the entry of its inode (renamed, numbered)."""
        old = self.inos.get(entry.ino)
        if old is not None:
            i = bisect.bisect_left(self.names, old.name)
            del self.entries[i], self.names[i]
        i = bisect.bisect_left(self.names, entry.name)
        self.entries.insert(i, entry)
        self.names.insert(i, entry.name)
        self.inos[entry.ino] = entry
        self.last_image = max(self.last_image, entry.image)

    def encode(self) -> bytes:
        ends = bytearray()
        body = bytearray()
        for e in self.entries:
            record.put_varint(body, e.image)
            body += e.record
            ends += _U32.pack(len(body))
        by_ino = sorted((e.ino, i) for i, e in enumerate(self.entries))
        by_image = sorted(range(len(self.entries)), key=lambda i: self.entries[i].image)
        by_name = sorted((zlib.crc32(e.name), i) for i, e in enumerate(self.entries))
        return b"".join([
            _U32.pack(len(self.entries)),
            bytes(ends),
            b"".join(_BY_INO.pack(ino, i) for ino, i in by_ino),
            b"".join(_U32.pack(i) for i in by_image),
            b"".join(_BY_NAME.pack(crc, i) for crc, i in by_name),
            bytes(body),
        ])


class Cache:
    """Decoded listings for reads, kept between read transactions.

    Decoding a listing costs about 5 us a file, and a series is read many times
    in a row: the kernel lists a folder in batches, ``ls -l`` then stats each
    file, a viewer opens them one after another.  A listing is kept with its
    stored bytes and the snapshot (LMDB transaction id) it was read in.  Until
    something commits, the snapshot is the same and the listing is used as is,
    without touching the index at all; after a commit, it is used if its stored
    value is still byte for byte the same (which reads the value's pages, but
    decodes nothing).  Only whole listings read for a listing from its start are
    kept (:meth:`fill`): a file looked up in a series of thousands reads a page or
    two of its value, far less than decoding it.  Folders found to have no listing
    are remembered for one snapshot.  At most ``max_files`` files are held (least
    recently used listings go first); the mount's threads share it, hence the lock.
    """

    def __init__(self, max_files: int) -> None:
        self.max_files = max_files
        self._held = 0
        self._lock = threading.Lock()
        # series -> (snapshot last confirmed, stored bytes, decoded)
        self._listings: OrderedDict[int, tuple[int, bytes, Listing]] = OrderedDict()
        self._none: set[int] = set()  # folders without a listing, in snapshot _none_at
        self._none_at = -1

    def known(self, folder: int, snapshot: int) -> Listing | None | Literal[False]:
        """What is known of ``folder`` in ``snapshot`` without reading it: its listing,
        None if it has none, or False if that must be read."""
        with self._lock:
            if snapshot == self._none_at and folder in self._none:
                return None
            held = self._listings.get(folder)
            if held is None or held[0] != snapshot:
                return False
            self._listings.move_to_end(folder)
            return held[2]

    def read(
        self, folder: int, snapshot: int, data: bytes | memoryview | None
    ) -> Listing | View | None:
        """The listing of ``folder`` from its stored value ``data`` as read in
        ``snapshot``: the kept one if it is still the same, else the value in place."""
        if data is None:
            with self._lock:
                if snapshot != self._none_at:
                    self._none, self._none_at = set(), snapshot
                self._none.add(folder)
            return None
        with self._lock:
            held = self._listings.pop(folder, None)
            if held is not None:
                if held[1] == bytes(data):  # unchanged by what was committed since
                    self._listings[folder] = (snapshot, held[1], held[2])
                    return held[2]
                self._held -= len(held[2])
        return View(data)

    def fill(self, folder: int, snapshot: int, data: bytes | memoryview) -> Listing:
        """Decode the stored listing ``data`` of ``folder`` read in ``snapshot``, and keep it."""
        decoded = Listing.load(data)
        if len(decoded) > self.max_files:
            return decoded
        with self._lock:
            old = self._listings.pop(folder, None)
            if old is not None:
                self._held -= len(old[2])
            self._listings[folder] = (snapshot, bytes(data), decoded)
            self._held += len(decoded)
            while self._held > self.max_files:
                _folder, (_snap, _raw, gone) = self._listings.popitem(last=False)
                self._held -= len(gone)
        return decoded
