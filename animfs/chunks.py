"""Pure chunk handling: split, name, compress, and check what comes back.

A file is cut into chunks of at most :data:`CHUNK_SIZE` bytes.  Each chunk is
stored on its own as ``chunks/<id>``, where id is the SHA-256 of the plain
chunk (hex), or with a key ring its HMAC-SHA256 under the ring's id key
(:mod:`animfs.keys`), so identical chunks are stored once and every byte read
back can be checked against its name.  The stored form is a zstd frame that
records its content size, sealed with AES-256-GCM when there is a key ring.

A chunk written before a key was configured keeps its SHA-256 id, and may be
sealed later in place (``animfs key reseal``): a sealed chunk is accepted when
its id is the keyed hash or the plain SHA-256 of its content (the seal itself
already proves a key holder wrote it under that name); an unsealed one only
when its id is the plain SHA-256, which no one can forge for a keyed id.

zstd contexts are not thread-safe, so each thread gets its own
(:func:`_compressor`, :func:`_decompressor`); both release the GIL while they work.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

import zstandard

from animfs.keys import KeyRing, SealError, is_sealed

CHUNK_SIZE = 4 << 20
ZSTD_LEVEL = 1  # 1.6x the compression speed of level 3 on CT data, for 5% more bytes


class CorruptChunk(Exception):
    """A stored chunk does not decompress, or does not hash to its id."""


@dataclass(frozen=True)
class ChunkRef:
    """One chunk of a file, as its manifest lists it."""

    id: str  # hex SHA-256 (or keyed HMAC-SHA256) of the plain bytes
    size: int  # plain bytes
    stored: int  # bytes as stored (compressed, sealed)


def chunk_key(chunk_id: str) -> str:
    return f"chunks/{chunk_id}"


def chunk_id(plain: bytes | memoryview, keys: KeyRing | None = None) -> str:
    return keys.keyed_id(plain) if keys is not None else hashlib.sha256(plain).hexdigest()


_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    c: zstandard.ZstdCompressor | None = getattr(_local, "compressor", None)
    if c is None:
        c = _local.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


def seal(plain: bytes | memoryview, keys: KeyRing | None = None) -> tuple[str, bytes]:
    """(id, stored bytes) of one plain chunk: compressed, and sealed if there is a key ring."""
    id_ = chunk_id(plain, keys)
    stored = _compressor().compress(plain)
    return id_, stored if keys is None else keys.seal(chunk_key(id_), stored)


def opened(chunk_id_: str, stored: bytes, keys: KeyRing | None = None) -> bytes:
    """The zstd frame inside a stored chunk (the stored bytes themselves if unsealed)."""
    if not is_sealed(stored):
        return stored
    if keys is None:
        raise CorruptChunk(
            f"chunk {chunk_id_[:16]}: sealed, and no key is configured ([security] key_file)"
        )
    try:
        return keys.open(chunk_key(chunk_id_), stored)
    except SealError as exc:
        raise CorruptChunk(f"chunk {chunk_id_[:16]}: {exc}") from exc


def unseal(
    chunk_id_: str,
    stored: bytes,
    size: int,
    keys: KeyRing | None = None,
    *,
    rehash: bool = True,
) -> bytes:
    """The plain bytes of a stored chunk, checked against its id.

    ``size`` is the plain size the manifest expects; a frame that claims
    more is refused before any memory is spent on it.  Raises
    :class:`CorruptChunk` for a copy that is wrong, or sealed under a key the
    ring does not hold, or sealed with no ring at all: never served.

    A sealed chunk is already checked, every byte, by its AES-GCM tag, which
    binds the frame to its name ``chunks/<id>``: only a key holder could have
    written it there, and it is accepted whatever its content hashes to (see
    the module docstring).  Hashing its plain bytes again proves nothing more
    to a reader, so ``rehash=False`` (the mount's read path) skips that hash
    for sealed chunks; ``animfs verify --deep`` keeps it, to find chunks a
    faulty writer sealed under the wrong name.  An unsealed chunk is always
    hashed: nothing else vouches for it.
    """
    frame = opened(chunk_id_, stored, keys)
    try:
        plain = _decompressor().decompress(frame, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise CorruptChunk(f"chunk {chunk_id_[:16]}: does not decompress ({exc})") from exc
    sealed = frame is not stored
    if len(plain) != size or (
        (rehash or not sealed) and not _matches(chunk_id_, plain, keys if sealed else None)
    ):
        raise CorruptChunk(f"chunk {chunk_id_[:16]}: content does not match its id")
    return plain


def _matches(chunk_id_: str, plain: bytes, keys: KeyRing | None) -> bool:
    """Whether ``plain`` hashes to its id: keyed (sealed chunks only), else plain SHA-256."""
    if keys is not None and keys.keyed_id(plain) == chunk_id_:
        return True
    return hashlib.sha256(plain).hexdigest() == chunk_id_
