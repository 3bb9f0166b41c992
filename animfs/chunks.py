"""Pure chunk handling: split, name, compress, and check what comes back.

A file is cut into chunks of at most :data:`CHUNK_SIZE` bytes.  Each chunk is
stored on its own as ``chunks/<id>``, where id is the SHA-256 of the plain
chunk (hex), so identical chunks are stored once and every byte read back can
be checked against its name.  The stored form is a zstd frame that records
its content size.

zstd contexts are not thread-safe, so each thread gets its own
(:func:`_compressor`, :func:`_decompressor`); both release the GIL while they work.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

import zstandard

CHUNK_SIZE = 4 << 20
ZSTD_LEVEL = 3


class CorruptChunk(Exception):
    """A stored chunk does not decompress, or does not hash to its id."""


@dataclass(frozen=True)
class ChunkRef:
    """One chunk of a file, as its manifest lists it."""

    id: str  # hex SHA-256 of the plain bytes
    size: int  # plain bytes
    stored: int  # bytes as stored (compressed)


def chunk_key(chunk_id: str) -> str:
    return f"chunks/{chunk_id}"


def chunk_id(plain: bytes | memoryview) -> str:
    return hashlib.sha256(plain).hexdigest()


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


def seal(plain: bytes | memoryview) -> tuple[str, bytes]:
    """(id, stored bytes) of one plain chunk."""
    return chunk_id(plain), _compressor().compress(plain)


def unseal(chunk_id_: str, stored: bytes, size: int) -> bytes:
    """The plain bytes of a stored chunk, checked against its id.

    ``size`` is the plain size the manifest expects; a frame that claims
    more is refused before any memory is spent on it.
    """
    try:
        plain = _decompressor().decompress(stored, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise CorruptChunk(f"chunk {chunk_id_[:16]}: does not decompress ({exc})") from exc
    if len(plain) != size or chunk_id(plain) != chunk_id_:
        raise CorruptChunk(f"chunk {chunk_id_[:16]}: content does not match its id")
    return plain
