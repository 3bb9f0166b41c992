"""The per-instance manifest: everything the index needs, kept at every site.

Stored as ``manifests/<sha256 of SOPInstanceUID>`` (JSON, sorted keys).  It
carries the names and inode numbers the instance was given, so an index
rebuilt from manifests alone (in ingest order) has the same paths and inodes.

With a key ring the manifest is written ``keyed``: its name at the sites is
the HMAC-SHA256 of the SOPInstanceUID under the ring's id key (it would
otherwise reveal the UID to anyone who can guess it), its chunk ids are keyed,
and the object is sealed (:mod:`animfs.keys`).  The index keeps it under the
plain :func:`instance_key` either way: that key never leaves the host.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from animfs.chunks import ChunkRef
from animfs.dicom import Instance
from animfs.keys import KeyRing, SealError

VERSION = 1


def instance_key(sop_uid: str) -> bytes:
    """The 32-byte key of an instance, in the index and (as hex) at the sites."""
    return hashlib.sha256(sop_uid.encode()).digest()


def manifest_key(sop_uid: str, keys: KeyRing | None = None) -> str:
    """The object key of an instance's manifest: keyed when there is a key ring."""
    if keys is not None:
        return f"manifests/{keys.keyed_id(sop_uid.encode())}"
    return f"manifests/{instance_key(sop_uid).hex()}"


def _shallow(record: Any) -> dict[str, Any]:
    """A flat record as a dict (dataclasses.asdict deep-copies, and is 5x slower)."""
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}


@dataclass(frozen=True)
class Placement:
    """Where an instance sits in the tree: the names and inodes of its path."""

    patient_name: str
    study_name: str
    series_name: str
    file_name: str
    patient_ino: int
    study_ino: int
    series_ino: int
    file_ino: int
    link_name: str  # entry under /studies
    link_ino: int


@dataclass(frozen=True)
class Manifest:
    instance: Instance
    institution: str  # code of the institution that produced the study
    size: int
    sha256: str
    chunks: tuple[ChunkRef, ...]
    ingested_ns: int
    placement: Placement
    keyed: bool = False  # written with a key ring: keyed name and chunk ids, sealed

    @property
    def key(self) -> bytes:
        return instance_key(self.instance.sop_uid)

    @property
    def object_key(self) -> str:
        """The object key of an unkeyed manifest (see :meth:`object_key_with`)."""
        return manifest_key(self.instance.sop_uid)

    def object_key_with(self, keys: KeyRing | None) -> str:
        """Where this manifest is stored at the sites."""
        if not self.keyed:
            return manifest_key(self.instance.sop_uid)
        if keys is None:
            raise SealError("a keyed manifest, and no key is configured ([security] key_file)")
        return manifest_key(self.instance.sop_uid, keys)

    def path(self) -> str:
        p = self.placement
        return f"/patients/{p.patient_name}/{p.study_name}/{p.series_name}/{p.file_name}"

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "version": VERSION,
            "instance": _shallow(self.instance),
            "institution": self.institution,
            "size": self.size,
            "sha256": self.sha256,
            "chunks": [[c.id, c.size, c.stored] for c in self.chunks],
            "ingested_ns": self.ingested_ns,
            "placement": _shallow(self.placement),
        }
        if self.keyed:  # absent otherwise: unkeyed manifests stay as they always were
            doc["keyed"] = True
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse a manifest; raises ValueError on anything malformed."""
        try:
            doc = json.loads(data)
            if doc.get("version") != VERSION:
                raise ValueError(f"unknown manifest version {doc.get('version')!r}")
            return cls(
                instance=Instance(**doc["instance"]),
                institution=doc["institution"],
                size=int(doc["size"]),
                sha256=doc["sha256"],
                chunks=tuple(ChunkRef(c[0], int(c[1]), int(c[2])) for c in doc["chunks"]),
                ingested_ns=int(doc["ingested_ns"]),
                placement=Placement(**doc["placement"]),
                keyed=doc.get("keyed", False) is True,
            )
        except (KeyError, TypeError, IndexError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"malformed manifest: {exc}") from exc

    def with_placement(self, placement: Placement) -> Manifest:
        return dataclasses.replace(self, placement=placement)
