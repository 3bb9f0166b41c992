"""The key file and envelope sealing: what keeps the sites and the cache unreadable.

A configured key (``[security] key_file``) turns on sealing.  Every object
written to a site (chunks, manifests, state, snapshots) is then sealed with
AES-256-GCM before it leaves the process::

    b"ANS1" | key id (4 bytes) | nonce (12 bytes) | ciphertext | tag (16 bytes)

with a fresh random nonce per object, and the header plus the object's key
(its name, e.g. ``chunks/<id>``) as associated data: a sealed object moved to
another name, or given another key id, no longer opens.

Names are keyed too: a chunk's id is the HMAC-SHA256 of its plain bytes, a
manifest's name the HMAC-SHA256 of its SOPInstanceUID, under an *id key*, so
that stored names reveal nothing about content (no "is this known image
stored here?" test).

The key file (JSON, mode 0600) is a key ring::

    {"version": 1, "id_key": hex, "current": "1a2b3c4d",
     "keys": {"1a2b3c4d": hex, ...}}

``animfs key rotate`` adds a sealing key and makes it current; objects sealed
under older keys stay readable (their header names their key), and
``animfs key reseal`` rewrites them under the current one.  The id key never
rotates: it names objects, and a new one would rename every chunk and
manifest, rewrite every manifest and break de-duplication against what is
stored, while a leaked id key exposes no content (only lets its holder test
whether a given plain chunk is stored).  A key ring opened by a long-running
process re-reads its file when it meets a key id it does not know, so a mount
keeps reading objects re-sealed under a key made after it started.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
from pathlib import Path
from typing import cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from animfs.config import Config, ConfigError

MAGIC = b"ANS1"
_KEY_ID = 4
_NONCE = 12
_TAG = 16
HEADER = len(MAGIC) + _KEY_ID + _NONCE
OVERHEAD = HEADER + _TAG


class KeyError_(ConfigError):
    """The key file is missing, unreadable or malformed; the message says which and why."""


class SealError(Exception):
    """A sealed object does not open: no key, a key the ring lacks, a wrong key, or tampering."""


def is_sealed(stored: bytes | memoryview) -> bool:
    return bytes(stored[: len(MAGIC)]) == MAGIC


def key_id_of(stored: bytes | memoryview) -> str | None:
    """The key id in a sealed object's header (hex), or None for an unsealed object."""
    if not is_sealed(stored) or len(stored) < OVERHEAD:
        return None
    return bytes(stored[len(MAGIC) : len(MAGIC) + _KEY_ID]).hex()


class KeyRing:
    """The sealing keys and the id key of one key file.  Safe to use from several threads."""

    def __init__(
        self, id_key: bytes, keys: dict[str, bytes], current: str, path: Path | None = None
    ) -> None:
        if current not in keys:
            raise KeyError_(f"{path}: the current key {current} is not in the ring")
        self.id_key = id_key
        self.keys = dict(keys)
        self.current = current
        self.path = path
        self._aead = {kid: AESGCM(key) for kid, key in keys.items()}
        self._lock = threading.Lock()

    # -- names ----------------------------------------------------------------------

    def keyed_id(self, data: bytes | memoryview) -> str:
        """HMAC-SHA256 of ``data`` under the id key, hex."""
        return hmac.digest(self.id_key, data, "sha256").hex()

    # -- sealing --------------------------------------------------------------------

    def seal(self, name: str, data: bytes | memoryview) -> bytes:
        """``data`` sealed under the current key for the object called ``name``."""
        kid = self.current
        head = MAGIC + bytes.fromhex(kid) + secrets.token_bytes(_NONCE)
        out = bytearray(len(head) + len(data) + _TAG)
        out[: len(head)] = head
        # encrypt_into writes the ciphertext behind the header: no second copy of the chunk.
        self._aead[kid].encrypt_into(
            head[-_NONCE:], data, head + name.encode(), memoryview(out)[len(head) :]
        )
        # Every store takes any bytes-like value; bytes(out) would copy the chunk again.
        return cast(bytes, out)

    def open(self, name: str, stored: bytes | memoryview) -> bytes:
        """The plain bytes of an object sealed for ``name``.  Raises :class:`SealError`."""
        kid = key_id_of(stored)
        if kid is None:
            raise SealError("not a sealed object")
        aead = self._aead.get(kid) or self._reload(kid)
        view = memoryview(stored)
        try:
            return aead.decrypt(
                bytes(view[HEADER - _NONCE : HEADER]),
                view[HEADER:],
                bytes(view[:HEADER]) + name.encode(),
            )
        except InvalidTag:
            raise SealError(
                f"does not open with key {kid}: a wrong key file, or the object was tampered with"
            ) from None

    def _reload(self, kid: str) -> AESGCM:
        """The key ``kid``, after re-reading the key file (it may have been rotated since)."""
        with self._lock:
            if kid not in self._aead and self.path is not None:
                try:
                    fresh = load(self.path)
                except KeyError_:
                    fresh = self
                if fresh.id_key == self.id_key:
                    for other, key in fresh.keys.items():
                        if other not in self._aead:
                            self.keys[other] = key
                            self._aead[other] = AESGCM(key)
            aead = self._aead.get(kid)
        if aead is None:
            raise SealError(f"sealed under key {kid}, which the key file does not hold")
        return aead

    # -- the file -------------------------------------------------------------------

    def to_json(self) -> bytes:
        doc = {
            "version": 1,
            "id_key": self.id_key.hex(),
            "current": self.current,
            "keys": {kid: key.hex() for kid, key in self.keys.items()},
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"

    def rotated(self) -> KeyRing:
        """The same ring with a new sealing key, made current."""
        kid = secrets.token_bytes(_KEY_ID).hex()
        while kid in self.keys:
            kid = secrets.token_bytes(_KEY_ID).hex()
        return KeyRing(self.id_key, {**self.keys, kid: AESGCM.generate_key(256)}, kid, self.path)


def for_config(config: Config) -> KeyRing | None:
    """The config's key ring, or None when it names no key file (no sealing)."""
    return None if config.key_file is None else load(config.key_file)


def seal_with(keys: KeyRing | None, name: str, data: bytes) -> bytes:
    """``data`` as stored under ``name``: sealed if there is a key ring, else as it is."""
    return data if keys is None else keys.seal(name, data)


def open_with(keys: KeyRing | None, name: str, stored: bytes) -> bytes:
    """The plain bytes of an object as stored: opened if sealed (raises :class:`SealError`),
    else the stored bytes themselves (written before any key, or with none)."""
    if not is_sealed(stored):
        return stored
    if keys is None:
        raise SealError("sealed, and no key is configured ([security] key_file)")
    return keys.open(name, stored)


def new_ring(path: Path | None = None) -> KeyRing:
    kid = secrets.token_bytes(_KEY_ID).hex()
    return KeyRing(secrets.token_bytes(32), {kid: AESGCM.generate_key(256)}, kid, path)


def load(path: Path) -> KeyRing:
    """Read a key file.  Raises :class:`KeyError_` with the path and the reason."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise KeyError_(f"{path}: no such key file ([security] key_file)") from None
    except PermissionError:
        raise KeyError_(f"{path}: cannot read the key file: permission denied") from None
    except (OSError, ValueError) as exc:
        raise KeyError_(f"{path}: cannot read the key file: {exc}") from None
    try:
        if doc.get("version") != 1:
            raise ValueError(f"unknown version {doc.get('version')!r}")
        keys = {str(kid): bytes.fromhex(key) for kid, key in doc["keys"].items()}
        id_key = bytes.fromhex(doc["id_key"])
        if len(id_key) != 32 or any(len(k) != 32 or len(kid) != 8 for kid, k in keys.items()):
            raise ValueError("keys must be 32 bytes, key ids 4")
        return KeyRing(id_key, keys, str(doc["current"]), path)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise KeyError_(f"{path}: not a valid animfs key file: {exc}") from None


def save(ring: KeyRing, path: Path) -> None:
    """Write the key file atomically, readable by its owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, ring.to_json())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def create(path: Path) -> KeyRing:
    """Make a new key file at ``path``; refuses to replace one (its loss loses the archive)."""
    if path.exists():
        raise KeyError_(f"{path}: a key file is already there; not replacing it")
    ring = new_ring(path)
    save(ring, path)
    return ring


def sha256_name(data: bytes | str) -> str:
    """The unkeyed name of archives without a key."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()
