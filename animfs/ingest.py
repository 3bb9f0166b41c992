"""Files -> DICOM header -> chunks -> both sites -> index.

In this order, so that a crash at any point leaves nothing half-visible: every
chunk is written to the sites, then the manifest, then the sites are flushed,
and only then is the instance committed to the index, in one transaction.
Instances go through this in groups (group commit: one flush and one index
transaction for up to :data:`GROUP_FILES` instances), which is what makes
ingest of many small files fast.  Chunks written before a crash and never
committed are orphans for ``animfs gc``, never a half-listed file.

Threads: a pool of :data:`WORKERS` reads files ahead of the main thread
(:meth:`Ingester.read`: parse the header, then hash, compress and seal a small
file whole), so that pydicom's parse of one file (which holds the GIL) overlaps
the hashing and zstd of others (which do not).  The main thread takes the
files in order (:meth:`Ingester.prepare`): the issuer, the archived check, the
de-duplication of chunks, the writes to the sites and the group commit depend
on the files before, so the outcome and the order of commits are those of a
file-by-file ingest.  A large file is only parsed ahead; the main thread
streams it through the same pool, a few chunks at a time, so memory stays
bounded by :data:`AHEAD_BYTES` and :data:`COMPRESS_AHEAD` chunks, whatever the
size of a file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from animfs import chunks, keys, sync
from animfs.config import Config
from animfs.dicom import Instance, NotDicom, read_header_and_width
from animfs.index import Index, IndexError_, IndexFull
from animfs.manifest import Manifest, Placement, instance_key
from animfs.store.dual import DualStore, Missed, NotEnoughSites

WORKERS = 2  # threads that parse, hash, compress and seal (hashlib and zstd release the GIL)
AHEAD_FILES = 64  # files in the workers' hands at once: enough to go on during a group flush,
AHEAD_BYTES = 64 << 20  # ... within this much of files read whole
WHOLE_FILE = 2 * chunks.CHUNK_SIZE  # a larger file is streamed chunk by chunk, not read whole
COMPRESS_AHEAD = 4  # chunks of a streamed file being compressed at once
GROUP_FILES = 64  # instances acknowledged together: one flush and one index commit ...
GROUP_BYTES = 256 << 20  # ... or fewer, once this much data waits


class Refused(Exception):
    """This file is not archived; the message is the reason, for one line of output."""


@dataclass
class Read:
    """One file as a worker left it: open, parsed, and sealed whole if it was small."""

    file: BinaryIO  # open; whoever takes the Read closes it
    header: Instance  # issuer still empty when the file names none
    size: int
    sha256: str = ""  # of the whole file, when the worker read it whole
    sealed: list[tuple[str, bytes, int]] | None = None  # (id, stored, plain size) per chunk
    shuffle: int = 0  # sample width of its pixels, for the chunks' shuffle filter


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
        self.keys = keys.for_config(config)  # None: nothing is sealed
        self._log = sync.Log(self.keys, config.host)
        self.pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="animfs-ingest")
        self.summary = Summary(stored={site.name: 0 for site in store.sites})
        self._batch = store.batch()  # the objects of the group being ingested
        self._sent: set[str] = set()  # chunk ids in that batch
        # (StudyInstanceUID, PatientID) -> issuer, for the group not yet in the index
        self._group_issuers: dict[tuple[str, str], str] = {}

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def read_ahead(self, paths: Iterable[Path]) -> Generator[tuple[Path, Future[Read]], None, None]:
        """``paths`` in order, each with the worker's :meth:`read` of it under way.

        At most :data:`AHEAD_FILES` files (and :data:`AHEAD_BYTES` of files read
        whole) are in the workers' hands at once, which bounds memory; enough to
        keep them busy while a group is flushed and committed.  The caller closes
        each :attr:`Read.file`; files read ahead and never taken are closed here.
        """
        ahead: deque[tuple[Path, Future[Read], int]] = deque()
        in_hand = 0
        try:
            for path in walk(paths):
                try:
                    size = path.stat().st_size
                except OSError:
                    size = 0  # read() says why, in its turn
                weight = size if size <= WHOLE_FILE else 0
                while ahead and (len(ahead) >= AHEAD_FILES or in_hand + weight > AHEAD_BYTES):
                    done, future, done_weight = ahead.popleft()
                    in_hand -= done_weight
                    yield done, future
                ahead.append((path, self.pool.submit(self.read, path), weight))
                in_hand += weight
            while ahead:
                done, future, _ = ahead.popleft()
                yield done, future
        finally:
            for _, future, _ in ahead:
                if not future.cancel() and future.exception() is None:
                    future.result().file.close()

    def read(self, path: Path) -> Read:
        """Open and parse one file and, if it is small, hash, compress and seal it whole.

        Runs in a worker thread: it touches neither the batch nor the group, and
        asks the index only whether the instance is archived (to skip sealing what
        will not be stored).  Raises :class:`Refused`.
        """
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise Refused(f"cannot read: {exc.strerror or exc}") from exc
        try:
            return self._read(f)
        except OSError as exc:
            f.close()
            raise Refused(f"cannot read: {exc.strerror or exc}") from exc
        except BaseException:
            f.close()
            raise

    def _read(self, f: BinaryIO) -> Read:
        size = os.fstat(f.fileno()).st_size
        plain = b""
        if size <= WHOLE_FILE:
            # Read whole first, and parsed in memory: pydicom's parse and the walk of the
            # file's elements seek and tell about 80 times a file, each a system call
            # that hands the GIL over, which the other workers and the writer wait for.
            plain = f.read(size + 1)
            if len(plain) != size:
                raise Refused("the file changed while it was read")
        try:
            header, width = read_header_and_width(io.BytesIO(plain) if plain else f,
                                                  issuer_default="")
        except NotDicom as exc:
            raise Refused(str(exc)) from None
        if size > WHOLE_FILE:
            return Read(f, header, size, shuffle=width)  # streamed by the caller, chunk by chunk
        sha = hashlib.sha256(plain).hexdigest()
        if self.index.has_instance(instance_key(header.sop_uid)):
            return Read(f, header, size, sha, shuffle=width)  # only its checksum matters
        view = memoryview(plain)
        sealed = [
            _seal(view[at : at + chunks.CHUNK_SIZE], self.keys, width)
            for at in range(0, size, chunks.CHUNK_SIZE)
        ]
        return Read(f, header, size, sha, sealed, width)

    def prepare(self, read: Read) -> Manifest | None:
        """Take one file as a worker read it, and start writing its chunks to the sites.

        Runs in file order, on the caller's thread: the issuer, the archived check
        and the de-duplication of chunks depend on the files before it.  Returns
        its manifest (not yet placed), or None when the identical instance is
        already archived.  Raises :class:`Refused`.
        """
        try:
            return self._prepare(read)
        except OSError as exc:
            raise Refused(f"cannot read: {exc.strerror or exc}") from exc

    def _prepare(self, read: Read) -> Manifest | None:
        header = read.header
        institution = (
            self.institution
            or institution_code(self.config, header.institution_name)
            or "UNKNOWN"
        )
        if not header.issuer:
            # No IssuerOfPatientID: the ingesting institution issued the ID, unless the
            # study is already archived for this PatientID (a study that several
            # sites' modalities wrote to stays with its patient).
            issuer = (
                self._group_issuers.get((header.study_uid, header.patient_id))
                or self.index.study_issuer(header.study_uid, header.patient_id)
                or institution
            )
            header = dataclasses.replace(header, issuer=issuer)
        self._group_issuers[header.study_uid, header.patient_id] = header.issuer
        existing = self.index.manifest(instance_key(header.sop_uid))
        if existing is not None:
            if not read.sha256:
                read.file.seek(0)
            _same_or_refuse(existing, read.sha256 or _file_sha256(read.file))
            return None
        if read.sealed is not None:
            size, sha = read.size, read.sha256
            refs = [self._send(*sealed) for sealed in read.sealed]
        else:  # large, or archived when the worker looked and no longer: stream it
            read.file.seek(0)
            size, sha, refs = self._store_chunks(read.file, read.shuffle)
            if size != os.fstat(read.file.fileno()).st_size:
                raise Refused("the file changed while it was read")
        return Manifest(
            header,
            institution,
            size,
            sha,
            tuple(refs),
            self.clock(),
            _UNPLACED,
            keyed=self.keys is not None,
        )

    def _send(self, chunk_id: str, stored: bytes, plain_size: int) -> chunks.ChunkRef:
        """Start writing one sealed chunk to the sites, unless it is there or on its way."""
        if chunk_id not in self._sent and not self.index.has_chunk(chunk_id):
            self._sent.add(chunk_id)
            self._batch.put(chunks.chunk_key(chunk_id), stored)
            for name in self.summary.stored:
                self.summary.stored[name] += len(stored)
        return chunks.ChunkRef(chunk_id, plain_size, len(stored))

    def _store_chunks(self, f: BinaryIO, shuffle: int) -> tuple[int, str, list[chunks.ChunkRef]]:
        """Read, hash, compress and start writing every chunk; returns (size, sha256, refs)."""
        whole = hashlib.sha256()
        refs: list[chunks.ChunkRef] = []
        pending: deque[Future[tuple[str, bytes, int]]] = deque()
        size = 0
        while True:
            plain = f.read(chunks.CHUNK_SIZE)
            if not plain:
                break
            size += len(plain)
            whole.update(plain)
            pending.append(self.pool.submit(_seal, plain, self.keys, shuffle))
            while len(pending) > COMPRESS_AHEAD:
                refs.append(self._send(*pending.popleft().result()))
        while pending:
            refs.append(self._send(*pending.popleft().result()))
        return size, whole.hexdigest(), refs

    def _publish(self, placed: list[Manifest]) -> list[Missed]:
        """Write the group's manifests and make the whole group durable at the sites."""
        for manifest in placed:
            name = manifest.object_key_with(self.keys)
            self._batch.put(name, keys.seal_with(self.keys, name, manifest.to_bytes()))
        if placed:  # other hosts learn of the group from this host's log (animfs.sync),
            self._batch.drain()  # which must not name a manifest before it is there,
            good = len(self.store.sites) - len(self._batch.failed)
            if good >= self.store.min_sites:  # nor one of a group that is not committed
                self._log.append(self._batch, manifests=placed)
        return self._batch.commit()

    def commit_group(self, group: list[tuple[Path, Manifest]]) -> list[tuple[Path, str, str]]:
        """Commit the prepared instances; returns (path, outcome, reason) for each."""
        try:
            self._batch.drain()  # chunks durable before the index's write lock is taken
            results = self.index.commit_group([m for _, m in group], self._publish)
        except IndexFull:
            raise  # nothing of the group is in the index, and no later group would fit
        except (NotEnoughSites, IndexError_) as exc:
            return [(path, "refused", str(exc)) for path, _ in group]
        finally:
            self._batch, self._sent = self.store.batch(), set()
            self._group_issuers.clear()
        placed = {r.instance.sop_uid: r for r in results if isinstance(r, Manifest)}
        outcomes = []
        for (path, manifest), result in zip(group, results, strict=True):
            if isinstance(result, Manifest):
                self.summary.bytes_in += manifest.size
                outcomes.append((path, "ingested", ""))
                continue
            twin = placed.get(manifest.instance.sop_uid)  # the same file twice in one run?
            try:
                if twin is None:
                    raise Refused(str(result))
                _same_or_refuse(twin, manifest.sha256)
                outcomes.append((path, "skipped", ""))
            except Refused as exc:
                outcomes.append((path, "refused", str(exc)))
        return outcomes

    def run(self, paths: Iterable[Path], report: Callable[[Path, str, str], None]) -> Summary:
        """Ingest every file under ``paths``; ``report(path, outcome, reason)`` for each.

        Instances are committed in groups (group commit): their chunks go out as
        each file is read, and one flush of each site and one index transaction
        then acknowledge the whole group.  A crash before that leaves only
        orphan chunks.
        """
        start = time.monotonic()
        group: list[tuple[Path, Manifest]] = []
        group_bytes = 0

        def settle(outcomes: Iterable[tuple[Path, str, str]]) -> None:
            for path, outcome, reason in outcomes:
                if outcome == "ingested":
                    self.summary.ingested += 1
                elif outcome == "skipped":
                    self.summary.skipped += 1
                else:
                    self.summary.refused += 1
                report(path, outcome, reason)

        with contextlib.closing(self.read_ahead(paths)) as reads:  # closes what is left
            for path, future in reads:
                try:
                    read = future.result()
                except Refused as exc:
                    settle([(path, "refused", str(exc))])
                    continue
                try:
                    with read.file:
                        manifest = self.prepare(read)
                except Refused as exc:
                    settle([(path, "refused", str(exc))])
                    continue
                if manifest is None:
                    settle([(path, "skipped", "")])
                    continue
                group.append((path, manifest))
                group_bytes += manifest.size
                if len(group) >= GROUP_FILES or group_bytes >= GROUP_BYTES:
                    settle(self.commit_group(group))
                    group, group_bytes = [], 0
        if group:
            settle(self.commit_group(group))
        self.summary.seconds = time.monotonic() - start
        return self.summary


_UNPLACED = Placement("", "", "", "", 0, 0, 0, 0, "", 0)


def _file_sha256(f: BinaryIO) -> str:
    digest = hashlib.sha256()
    while block := f.read(chunks.CHUNK_SIZE):
        digest.update(block)
    return digest.hexdigest()


def _same_or_refuse(stored: Manifest, sha256: str) -> None:
    if stored.sha256 != sha256:
        raise Refused(
            f"SOPInstanceUID {stored.instance.sop_uid} is already archived with different "
            "content; the stored instance is kept"
        )


def _seal(
    plain: bytes | memoryview, ring: keys.KeyRing | None, shuffle: int
) -> tuple[str, bytes, int]:
    chunk_id, stored = chunks.seal(plain, ring, shuffle=shuffle)
    return chunk_id, stored, len(plain)
