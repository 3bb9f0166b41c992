"""The ObjectStore protocol: what a site must do, and the errors it may raise.

Keys are ``/``-separated strings such as ``chunks/<id>`` or ``manifests/<id>``.
Objects are immutable once written: a key is written again only with the same
bytes (content addressing) or to repair a copy.

Every implementation translates its own failures into the three errors below at
its edge (``raise ... from exc``), so nothing above a store knows botocore or
errno.  Methods block; async callers run them in a thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


class StoreError(Exception):
    """Base of the errors a store raises; ``site`` and ``key`` say where."""

    def __init__(self, site: str, key: str, reason: str) -> None:
        super().__init__(f"site {site}: {key}: {reason}")
        self.site, self.key, self.reason = site, key, reason


class ObjectNotFound(StoreError):
    """The site answered, and it has no object under that key."""


class SiteUnavailable(StoreError):
    """The site did not answer, or answered with an error: try another."""


class CorruptObject(StoreError):
    """The object exists but its bytes are wrong (short, or fail their check)."""


@dataclass(frozen=True)
class ObjectInfo:
    """One object as a listing shows it."""

    key: str
    size: int  # bytes stored
    mtime: float  # when it was last written, epoch seconds


class ObjectStore(Protocol):
    """One site.  All methods are safe to call from several threads at once."""

    name: str

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, atomically: a reader sees the old object
        (or none) or the whole new one, never a part.  Durable once :meth:`flush`
        returns."""

    def flush(self) -> None:
        """Make every ``put`` that has returned so far durable (survive power loss)."""

    def get(self, key: str) -> bytes:
        """The whole object.  Raises ObjectNotFound or SiteUnavailable."""
        ...

    def exists(self, key: str) -> bool:
        """Whether the object is there (no check of its bytes)."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; a missing one is not an error."""

    def list(self, prefix: str) -> Iterator[str]:
        """Every key that starts with ``prefix``, in no particular order."""
        ...

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        """Like :meth:`list`, with each object's size and time of last write
        (``animfs gc`` spares what was written recently)."""
        ...

    def usage(self) -> tuple[int, int]:
        """(objects, bytes) stored at the site; may walk everything, so not for hot paths."""
        ...
