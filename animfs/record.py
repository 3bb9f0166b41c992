"""Pure: the compact binary form of a manifest in the index (index format 2).

A manifest as JSON is about 2 KB, most of it the same for every instance of a
series (patient, study and series tags, folder names and inodes).  The index
keeps that part once per series and, per instance, only what differs:

``series record`` (``series`` sub-database, by series inode)::

    0x02 | each of SHARED: str (varint length + UTF-8) or optional int | the
    patient, study and series inodes and the /studies link inode (u64 LE each)

``instance record`` (``instances`` sub-database, by instance key)::

    0x02 | flags u8 | series inode u64 | file inode u64 | ingested_ns u64 |
    size varint | sop_uid str | instance_number optional int |
    sha256 (32 raw bytes) | chunk count varint | per chunk: id (32 raw bytes),
    size varint, stored varint | [file name str: flag NAMED] |
    [override mask varint, then the fields of SHARED that differ from the
    series record: flag OVERRIDES]

An optional int is a varint of 0 for None, else zigzag(n) + 1.  The file name
is left out when it is the one :meth:`Instance.folder_names` gives (the usual
case).  A manifest that does not fit this form (a checksum or chunk id that is
not 64 lower-case hex digits) is kept as its JSON, which starts with ``{``:
:func:`decode` tells the two apart by the first byte, so format-1 indexes (JSON
only) stay readable.

Decoding gives back a Manifest whose ``to_bytes()`` is byte-identical to the
manifest stored at the sites.  About 160 bytes per instance for a typical one
(one chunk), plus about 600 per series.
"""

from __future__ import annotations

import functools
import operator
import struct
from collections.abc import Callable
from typing import Any

from animfs.chunks import ChunkRef
from animfs.dicom import Instance, safe_name
from animfs.manifest import Manifest, Placement

TAG = 2
KEYED, NAMED, NO_NUMBER, OVERRIDES = 1, 2, 4, 8

# (owner, field, kind): what every instance of a series usually shares.
SHARED: tuple[tuple[str, str, str], ...] = (
    ("instance", "patient_id", "s"),
    ("instance", "issuer", "s"),
    ("instance", "patient_name", "s"),
    ("instance", "study_uid", "s"),
    ("instance", "study_date", "s"),
    ("instance", "study_time", "s"),
    ("instance", "accession", "s"),
    ("instance", "study_description", "s"),
    ("instance", "series_uid", "s"),
    ("instance", "series_number", "i"),
    ("instance", "modality", "s"),
    ("instance", "series_description", "s"),
    ("instance", "sop_class_uid", "s"),
    ("instance", "institution_name", "s"),
    ("instance", "transfer_syntax", "s"),
    ("instance", "charset", "s"),
    ("instance", "study_id", "s"),
    ("manifest", "institution", "s"),
    ("placement", "patient_name", "s"),
    ("placement", "study_name", "s"),
    ("placement", "series_name", "s"),
    ("placement", "link_name", "s"),
)
_INOS = ("patient_ino", "study_ino", "series_ino", "link_ino")
_SERIES_INOS = struct.Struct("<QQQQ")
_HEAD = struct.Struct("<BBQQQ")
_HEX = frozenset("0123456789abcdef")
_UID_CHARS = frozenset("0123456789.")  # a DICOM UID: a name made of it needs no care


class RecordError(ValueError):
    """A record that does not decode."""


# -- primitives ------------------------------------------------------------------------


def put_varint(out: bytearray, n: int) -> None:
    """Append ``n`` (>= 0) as an unsigned LEB128 varint, 7 bits a byte, low bits first."""
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def read_varint(data: bytes | memoryview, pos: int, end: int | None = None) -> tuple[int, int]:
    """(value, next position) of the varint at ``pos``; RecordError if it runs past
    ``end`` (default: the end of ``data``)."""
    end = len(data) if end is None else end
    if pos < end and data[pos] < 0x80:  # nearly always: sizes and lengths of a few bytes
        return data[pos], pos + 1
    n = shift = 0
    while True:
        if pos >= end:
            raise RecordError("truncated record")
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, pos
        shift += 7


def _str(out: bytearray, text: str) -> None:
    raw = text.encode("utf-8", "surrogatepass")
    put_varint(out, len(raw))
    out += raw


def _opt_int(out: bytearray, n: int | None) -> None:
    put_varint(out, 0 if n is None else (2 * n if n >= 0 else -2 * n - 1) + 1)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes | memoryview, pos: int = 0) -> None:
        self.data, self.pos = data, pos

    def varint(self) -> int:
        n, self.pos = read_varint(self.data, self.pos)
        return n

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RecordError("truncated record")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def str(self) -> str:
        return self.raw(self.varint()).decode("utf-8", "surrogatepass")

    def opt_int(self) -> int | None:
        z = self.varint()
        if z == 0:
            return None
        z -= 1
        return z // 2 if z % 2 == 0 else -(z + 1) // 2


def _is_hex(text: str) -> bool:
    return len(text) == 64 and _HEX.issuperset(text)


def _shared(manifest: Manifest) -> tuple[Any, ...]:
    """The values of SHARED in ``manifest``, in order."""
    return (
        _INSTANCE_SHARED(manifest.instance)
        + (manifest.institution,)
        + _PLACEMENT_SHARED(manifest.placement)
    )


_INSTANCE_SHARED = operator.attrgetter(*(n for o, n, _ in SHARED if o == "instance"))
_PLACEMENT_SHARED = operator.attrgetter(*(n for o, n, _ in SHARED if o == "placement"))
assert [o for o, _, _ in SHARED] == ["instance"] * 17 + ["manifest"] + ["placement"] * 4


def default_file_name(instance: Instance) -> str:
    """The file name an instance gets unless it is taken (as Instance.folder_names)."""
    return safe_name(f"{instance.instance_number or 0:05d}_{instance.sop_uid}.dcm")


def _put_value(out: bytearray, kind: str, value: Any) -> None:
    if kind == "s":
        _str(out, value)
    else:
        _opt_int(out, value)


def _read_value(reader: _Reader, kind: str) -> Any:
    return reader.str() if kind == "s" else reader.opt_int()


# -- records ---------------------------------------------------------------------------


def encode_series(manifest: Manifest) -> bytes:
    """The series record of ``manifest``'s series, taken from this instance."""
    out = bytearray([TAG])
    for (_owner, _name, kind), value in zip(SHARED, _shared(manifest), strict=True):
        _put_value(out, kind, value)
    p = manifest.placement
    out += _SERIES_INOS.pack(*(getattr(p, n) for n in _INOS))
    return bytes(out)


def decode_series(data: bytes | memoryview) -> tuple[list[Any], tuple[int, ...]]:
    """(values of SHARED, the four inodes) of a series record."""
    values, inos = _decode_series(bytes(data))
    return list(values), inos


@functools.lru_cache(maxsize=1024)  # the instances of a series come together
def _decode_series(data: bytes) -> tuple[tuple[Any, ...], tuple[int, ...]]:
    if not data or data[0] != TAG:
        raise RecordError("not a series record")
    reader = _Reader(data, 1)
    values = tuple(_read_value(reader, kind) for _, _, kind in SHARED)
    inos = _SERIES_INOS.unpack(reader.raw(_SERIES_INOS.size))
    return values, inos


def rename_series(data: bytes | memoryview, field: str, name: str) -> bytes:
    """A series record with one placement name (``patient_name``, ``study_name`` or
    ``series_name``) changed: the folder was renamed (:meth:`Index.merge`)."""
    values, inos = decode_series(data)
    values[[n for o, n, _ in SHARED if o == "placement"].index(field) + 18] = name
    out = bytearray([TAG])
    for (_owner, _name, kind), value in zip(SHARED, values, strict=True):
        _put_value(out, kind, value)
    out += _SERIES_INOS.pack(*inos)
    return bytes(out)


def encode_instance(manifest: Manifest, series: bytes | memoryview | None = None) -> bytes:
    """The instance record of ``manifest``, against its series record (``series``,
    else the one it would make itself); its JSON when it does not fit the form."""
    if not _is_hex(manifest.sha256) or not all(_is_hex(c.id) for c in manifest.chunks):
        return manifest.to_bytes()
    base, inos = decode_series(series if series is not None else encode_series(manifest))
    p = manifest.placement
    if inos != tuple(getattr(p, n) for n in _INOS):
        return manifest.to_bytes()  # placed elsewhere than its series record says: whole
    inst = manifest.instance
    flags = KEYED if manifest.keyed else 0
    named = p.file_name != default_file_name(inst)
    flags |= NAMED if named else 0
    flags |= NO_NUMBER if inst.instance_number is None else 0
    mask = 0
    mine = _shared(manifest)
    if mine != tuple(base):
        for i, value in enumerate(mine):
            if value != base[i]:
                mask |= 1 << i
    flags |= OVERRIDES if mask else 0
    out = bytearray(_HEAD.pack(TAG, flags, p.series_ino, p.file_ino, manifest.ingested_ns))
    put_varint(out, manifest.size)
    _str(out, inst.sop_uid)
    if inst.instance_number is not None:
        _opt_int(out, inst.instance_number)
    out += bytes.fromhex(manifest.sha256)
    put_varint(out, len(manifest.chunks))
    for ref in manifest.chunks:
        out += bytes.fromhex(ref.id)
        put_varint(out, ref.size)
        put_varint(out, ref.stored)
    if named:
        _str(out, p.file_name)
    if mask:
        put_varint(out, mask)
        for i, (_owner, _name, kind) in enumerate(SHARED):
            if mask >> i & 1:
                _put_value(out, kind, mine[i])
    return bytes(out)


def peek(data: bytes | memoryview) -> tuple[int, int, int, int, str, str]:
    """(file inode, series inode, ingested_ns, size, file name, SOPInstanceUID) of an
    instance record, compact or JSON, without its series record: what a file's
    attributes and listing need, read on every lookup and listing, so kept lean.
    Raises ValueError (:class:`RecordError`)."""
    if not data or data[0] != TAG:
        if data and data[0] == ord("{"):
            m = Manifest.from_bytes(bytes(data))
            p = m.placement
            return (p.file_ino, p.series_ino, m.ingested_ns, m.size, p.file_name,
                    m.instance.sop_uid)
        raise RecordError("unknown instance record")
    try:
        _tag, flags, series_ino, file_ino, ingested_ns = _HEAD.unpack_from(data)
        size, pos = read_varint(data, _HEAD.size)
        n, pos = read_varint(data, pos)
        sop_uid = bytes(data[pos : pos + n]).decode("utf-8", "surrogatepass")
        pos += n
        if flags & NAMED:
            reader = _Reader(data, pos)
            if not flags & NO_NUMBER:
                reader.opt_int()
            reader.raw(32)
            for _ in range(reader.varint()):
                reader.raw(32)
                reader.varint()
                reader.varint()
            return file_ino, series_ino, ingested_ns, size, reader.str(), sop_uid
        z = 0 if flags & NO_NUMBER else read_varint(data, pos)[0]
        number = 0 if z == 0 else (z - 1) // 2 if z % 2 else -z // 2
    except (IndexError, struct.error, UnicodeDecodeError, RecordError) as exc:
        raise RecordError(f"truncated instance record ({exc})") from exc
    name = f"{number:05d}_{sop_uid}.dcm"
    if not (len(name) <= 255 and _UID_CHARS.issuperset(sop_uid)):  # else: safe already
        name = safe_name(name)
    return file_ino, series_ino, ingested_ns, size, name, sop_uid


def series_ino_of(data: bytes | memoryview) -> int | None:
    """The series inode an instance record refers to; None for a JSON record."""
    if not data or data[0] != TAG:
        return None
    return int(_HEAD.unpack_from(data)[2])


def chunk_refs(data: bytes | memoryview) -> tuple[ChunkRef, ...]:
    """The chunks of an instance record, read without the rest of its manifest: what
    opening the file and fetching it ahead need (a whole :func:`decode` costs about
    five times as much, most of it in making the manifest's objects).

    Raises ValueError (:class:`RecordError`) on what it reads that is malformed."""
    if data and data[0] == ord("{"):
        return Manifest.from_bytes(bytes(data)).chunks
    if not data or data[0] != TAG or len(data) < _HEAD.size:
        raise RecordError("unknown instance record")
    flags = data[1]
    reader = _Reader(data, _HEAD.size)
    reader.varint()  # size
    reader.raw(reader.varint())  # SOP Instance UID
    if not flags & NO_NUMBER:
        reader.varint()  # instance number
    reader.raw(32)  # SHA-256 of the file
    return _read_refs(reader)


def _read_refs(reader: _Reader) -> tuple[ChunkRef, ...]:
    return tuple(
        ChunkRef(reader.raw(32).hex(), reader.varint(), reader.varint())
        for _ in range(reader.varint())
    )


def decode(
    data: bytes | memoryview, series: Callable[[int], bytes | memoryview | None]
) -> Manifest:
    """The manifest of an instance record; ``series(ino)`` gives a series record.

    Raises ValueError (:class:`RecordError`) on anything malformed."""
    if data and data[0] == ord("{"):
        return Manifest.from_bytes(bytes(data))
    if not data or data[0] != TAG or len(data) < _HEAD.size:
        raise RecordError("unknown instance record")
    _tag, flags, series_ino, file_ino, ingested_ns = _HEAD.unpack_from(data)
    shared = series(series_ino)
    if shared is None:
        raise RecordError(f"series record {series_ino} missing")
    values, inos = decode_series(shared)
    reader = _Reader(data, _HEAD.size)
    size = reader.varint()
    sop_uid = reader.str()
    number = None if flags & NO_NUMBER else reader.opt_int()
    sha256 = reader.raw(32).hex()
    refs = _read_refs(reader)
    file_name = reader.str() if flags & NAMED else None
    if flags & OVERRIDES:
        mask = reader.varint()
        for i, (_owner, _name, kind) in enumerate(SHARED):
            if mask >> i & 1:
                values[i] = _read_value(reader, kind)
    if reader.pos != len(data):
        raise RecordError("trailing bytes in instance record")
    fields: dict[str, dict[str, Any]] = {"instance": {}, "manifest": {}, "placement": {}}
    for (owner, name, _kind), value in zip(SHARED, values, strict=True):
        fields[owner][name] = value
    instance = Instance(sop_uid=sop_uid, instance_number=number, **fields["instance"])
    where: dict[str, Any] = dict(zip(_INOS, inos, strict=True))
    where.update(fields["placement"])
    where["file_name"] = file_name if file_name is not None else default_file_name(instance)
    placement = Placement(file_ino=file_ino, **where)
    return Manifest(
        instance=instance,
        institution=fields["manifest"]["institution"],
        size=size,
        sha256=sha256,
        chunks=refs,
        ingested_ns=ingested_ns,
        placement=placement,
        keyed=bool(flags & KEYED),
    )
