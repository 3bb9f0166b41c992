"""``animfs export-cd``: a patient's medium written to a folder, for a physical CD.

The folder holds exactly what ``/cd/<patient>/`` shows in the mount: the same
DICOMDIR bytes (both are built from the index by :func:`animfs.cdtree.build`),
README.TXT, and each instance under its file ID, read from the sites and
checked against the whole-file SHA-256 of its manifest.

With access control on (the config maps uids), the export is an open of each
study of the patient by the calling uid: decided by the same rules as the
mount, with one audit line per study; refused if any study is refused.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from animfs import audit, cdtree, chunks, media
from animfs.cache import check_stored
from animfs.config import Config
from animfs.guard import Guard
from animfs.index import PATIENTS_INO, Index
from animfs.keys import KeyRing
from animfs.manifest import Manifest
from animfs.store.dual import DualStore, NoGoodCopy


class ExportError(Exception):
    """The medium cannot be written; the message says why."""


@dataclass(frozen=True)
class Exported:
    instances: int
    bytes: int


def read_instance(store: DualStore, manifest: Manifest, ring: KeyRing | None) -> bytes:
    """The original bytes of an instance, from whichever site has good copies (each
    chunk checked as the mount checks it)."""
    parts = []
    for ref in manifest.chunks:

        def check(stored: bytes, ref: chunks.ChunkRef = ref) -> bytes:
            return check_stored(ref, stored, ring)

        try:
            plain, _site = store.read(chunks.chunk_key(ref.id), check)
        except NoGoodCopy as exc:
            raise ExportError(f"{manifest.path()}: {exc}") from None
        parts.append(plain)
    data = b"".join(parts)
    if hashlib.sha256(data).hexdigest() != manifest.sha256:
        raise ExportError(f"{manifest.path()}: content does not match its manifest")
    return data


def export_cd(
    config: Config,
    index: Index,
    store: DualStore,
    ring: KeyRing | None,
    patient_key: str,
    dest: Path,
    *,
    uid: int,
    step: Callable[[str], None] = lambda name: None,
) -> Exported:
    """Write the medium of ``patient_key`` (issuer "-" PatientID) into ``dest``, a new
    or empty folder."""
    ino = index.find_ino(b"P\0" + patient_key.encode())
    patient = index.node(ino) if ino is not None else None
    if patient is None or patient.parent != PATIENTS_INO:
        raise ExportError(f"no patient {patient_key} in the archive")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ExportError(f"{dest}: not an empty folder")
    medium = cdtree.build(index, patient)
    if config.users:
        _authorize(config, index, medium.studies, uid, patient.name, dest)
    dest.mkdir(parents=True, exist_ok=True)
    _write(dest / "DICOMDIR", medium.data)
    _write(dest / "README.TXT", media.README)
    total = count = 0
    for study, series, image, data in index.media_manifests(patient.ino):
        manifest = Manifest.from_bytes(data)
        entry = media.Entry(manifest.instance, study, series, image)
        path = dest.joinpath(*entry.file_id())
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, read_instance(store, manifest, ring))
        total += manifest.size
        count += 1
        step("/".join(entry.file_id()))
    return Exported(count, total)


def _authorize(
    config: Config,
    index: Index,
    studies: tuple[Manifest, ...],
    uid: int,
    patient_name: bytes,
    dest: Path,
) -> None:
    guard = Guard(index, config.users)
    decisions = [(m, *guard.decide_open(uid, m)) for m in studies]
    refused = [d for d in decisions if not d[3].allowed]
    path = f"/cd/{patient_name.decode('utf-8', 'surrogateescape')} (export-cd to {dest})"
    for manifest, user, study, decision in refused[:1] or decisions:
        entry = audit.open_entry(
            now=guard.clock(),
            uid=uid,
            user=user,
            pid=os.getpid(),
            path=path,
            patient=study.patient,
            study=study.uid,
            allowed=decision.allowed,
            rule=decision.rule,
        )
        audit.append(config.audit_path, entry)
        if not decision.allowed:
            raise ExportError(
                f"{study.patient}: study {manifest.instance.study_uid} may not be opened "
                f"by uid {uid} ({decision.rule})"
            )


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o444)
    tmp.rename(path)
