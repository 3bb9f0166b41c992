"""Files -> DICOM header -> chunks -> both sites -> index.

One instance at a time, in this order, so that a crash at any point leaves
nothing half-visible: every chunk is written to the sites, then the manifest,
then the sites are flushed, and only then is the instance committed to the
index in one transaction.  Chunks written before a crash and never committed
are orphans for ``animfs gc``, never a half-listed file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from animfs import chunks
from animfs.config import Config
from animfs.dicom import Instance, NotDicom, read_header
from animfs.index import Conflict, Index, IndexError_, StalePlan
from animfs.manifest import Manifest, Placement, instance_key
from animfs.store.dual import DualStore, NotEnoughSites

COMPRESS_AHEAD = 4  # chunks being compressed at once


class Refused(Exception):
    """This file is not archived; the message is the reason, for one line of output."""


@dataclass
class Summary:
    ingested: int = 0
    skipped: int = 0
    refused: int = 0
    bytes_in: int = 0
    stored: dict[str, int] = field(default_factory=dict)  # new bytes written per site
    seconds: float = 0.0

    def line(self) -> str:
        stored = max(self.stored.values(), default=0)
        ratio = self.bytes_in / stored if stored else 0.0
        rate = self.bytes_in / self.seconds / 1e6 if self.seconds else 0.0
        per_site = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in self.stored.items())
        return (
            f"{self.ingested} ingested, {self.skipped} skipped (already archived), "
            f"{self.refused} refused; {self.bytes_in / 1e6:.1f} MB in, stored: {per_site}; "
            f"compression {ratio:.2f}x; {rate:.0f} MB/s"
        )


def institution_code(config: Config, name: str) -> str:
    """The code of an institution as the config maps it, else the name itself."""
    return config.institutions.get(name, name)


def walk(paths: Iterable[Path]) -> Iterator[Path]:
    """Every regular file under ``paths``, folders recursively, in name order."""
    for path in paths:
        if path.is_dir():
            for dirpath, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(dirpath) / name
        else:
            yield path


class Ingester:
    def __init__(
        self,
        config: Config,
        index: Index,
        store: DualStore,
        *,
        institution: str | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.config, self.index, self.store = config, index, store
        self.institution = institution_code(config, institution) if institution else None
        self.clock = clock
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="animfs-zstd")
        self.summary = Summary(stored={site.name: 0 for site in store.sites})

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def ingest_file(self, path: Path) -> str:
        """Archive one file; returns "ingested" or "skipped", raises :class:`Refused`."""
        try:
            with open(path, "rb") as f:
                return self._ingest(path, f)
        except OSError as exc:
            raise Refused(f"cannot read: {exc.strerror or exc}") from exc

    def _ingest(self, path: Path, f: BinaryIO) -> str:
        try:
            header = read_header(f, issuer_default="")
        except NotDicom as exc:
            raise Refused(str(exc)) from None
        institution = (
            self.institution or institution_code(self.config, header.institution_name) or "UNKNOWN"
        )
        if not header.issuer:
            # No IssuerOfPatientID: the ingesting institution issued the ID, unless the
            # study is already archived for this PatientID (a study that several
            # sites' modalities wrote to stays with its patient).
            issuer = self.index.study_issuer(header.study_uid, header.patient_id) or institution
            header = dataclasses.replace(header, issuer=issuer)
        inst = header

        existing = self.index.find_ino(b"I\0" + inst.sop_uid.encode())
        if existing is not None:
            return self._compare_existing(f, inst)

        f.seek(0)
        size, sha, refs = self._store_chunks(f)
        if size != os.fstat(f.fileno()).st_size:
            raise Refused("the file changed while it was read")
        manifest = Manifest(
            inst,
            institution,
            size,
            sha,
            tuple(refs),
            self.clock(),
            Placement("", "", "", "", 0, 0, 0, 0, "", 0),
        )
        self._commit(manifest)
        self.summary.bytes_in += size
        return "ingested"

    def _compare_existing(self, f: BinaryIO, inst: Instance) -> str:
        manifest = self.index.manifest(instance_key(inst.sop_uid))
        f.seek(0)
        digest = hashlib.sha256()
        while block := f.read(chunks.CHUNK_SIZE):
            digest.update(block)
        if manifest is not None and manifest.sha256 == digest.hexdigest():
            return "skipped"
        raise Refused(
            f"SOPInstanceUID {inst.sop_uid} is already archived with different content; "
            "the stored instance is kept"
        )

    def _store_chunks(self, f: BinaryIO) -> tuple[int, str, list[chunks.ChunkRef]]:
        """Read, hash, compress and start writing every chunk; returns (size, sha256, refs)."""
        self._batch = self.store.batch()
        whole = hashlib.sha256()
        refs: list[chunks.ChunkRef] = []
        sent: set[str] = set()
        pending: deque[Future[tuple[str, bytes, int]]] = deque()
        size = 0

        def finish(future: Future[tuple[str, bytes, int]]) -> None:
            chunk_id, stored, plain_size = future.result()
            refs.append(chunks.ChunkRef(chunk_id, plain_size, len(stored)))
            if chunk_id in sent or self.index.has_chunk(chunk_id):
                return  # de-duplicated: already at the sites
            sent.add(chunk_id)
            self._batch.put(chunks.chunk_key(chunk_id), stored)
            for name in self.summary.stored:
                self.summary.stored[name] += len(stored)

        while True:
            plain = f.read(chunks.CHUNK_SIZE)
            if not plain:
                break
            size += len(plain)
            whole.update(plain)
            pending.append(self.pool.submit(_seal, plain))
            while len(pending) > COMPRESS_AHEAD:
                finish(pending.popleft())
        while pending:
            finish(pending.popleft())
        return size, whole.hexdigest(), refs

    def _commit(self, manifest: Manifest) -> None:
        batch = self._batch
        for _attempt in range(5):
            try:
                placed = manifest.with_placement(self.index.plan(manifest))
                batch.put(placed.object_key, placed.to_bytes())
                missed = batch.commit()
                self.index.commit(placed, missed)
                return
            except StalePlan:
                batch = self.store.batch()  # another ingest took a name: place it again
            except (NotEnoughSites, Conflict, IndexError_) as exc:
                raise Refused(str(exc)) from exc
        raise Refused("could not place the instance: the index kept changing under it")

    def run(self, paths: Iterable[Path], report: Callable[[Path, str, str], None]) -> Summary:
        """Ingest every file under ``paths``; ``report(path, outcome, reason)`` after each."""
        start = time.monotonic()
        for path in walk(paths):
            try:
                outcome, reason = self.ingest_file(path), ""
            except Refused as exc:
                outcome, reason = "refused", str(exc)
            if outcome == "ingested":
                self.summary.ingested += 1
            elif outcome == "skipped":
                self.summary.skipped += 1
            else:
                self.summary.refused += 1
            report(path, outcome, reason)
        self.summary.seconds = time.monotonic() - start
        return self.summary


def _seal(plain: bytes) -> tuple[str, bytes, int]:
    chunk_id, stored = chunks.seal(plain)
    return chunk_id, stored, len(plain)
