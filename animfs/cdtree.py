"""The /cd tree: each patient as a DICOM medium, from the index alone.

::

    /cd/<patient folder>/DICOMDIR
                        /README.TXT
                        /DICOM/ST000001/SE000001/IM000001

Folders, DICOMDIR and README.TXT have inodes of their own (from 2**63, kept in
the index's ``media`` sub-database); an ``IM`` file *is* the instance's file
under /patients: same inode, same attributes, same bytes, same open (so the
same access decision and audit line, whose path is the /patients one).  The
kernel accepts a non-directory inode under two names, as with hard links.

A DICOMDIR is built from the manifests in the index (headers only: no chunk
is read) by :func:`animfs.media.build_dicomdir`, in a worker thread, and kept
in memory keyed by its patient's instance count and newest mtime, so it is
rebuilt only when the patient gets new instances.  Its size must be exact at
``stat`` time, so asking for its attributes builds it when the cache lacks it.

Nothing here knows FUSE: :mod:`animfs.fs` asks, and answers the kernel.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import trio

from animfs import media
from animfs.index import (
    CD_DICOM,
    CD_DICOMDIR,
    CD_FIRST_INO,
    CD_INO,
    CD_PATIENT,
    CD_README,
    CD_SERIES,
    CD_STUDY,
    DIR,
    FILE,
    PATIENTS_INO,
    Index,
    Node,
)
from animfs.manifest import Manifest

DICOMDIR, README_TXT, DICOM = b"DICOMDIR", b"README.TXT", media.DICOM_FOLDER.encode()
_TOP = ((DICOMDIR, CD_DICOMDIR), (README_TXT, CD_README), (DICOM, CD_DICOM))
CACHE_BYTES = 64 << 20  # DICOMDIRs kept in memory (about 200 bytes per instance)
CD_ROOT, CD_FILE = ord("C"), 0  # what an Entry is, besides the index's CD_* kinds


def is_cd(ino: int) -> bool:
    """Is ``ino`` /cd or below it (instance files excepted: they are /patients inodes)?"""
    return ino == CD_INO or ino >= CD_FIRST_INO


@dataclass(frozen=True)
class Medium:
    """One build of a patient's DICOMDIR and what it describes."""

    key: tuple[int, int]  # the patient folder's (files, mtime_ns) it was built from
    data: bytes
    studies: tuple[Manifest, ...]  # the first instance of each study, for access decisions


@dataclass(frozen=True)
class Entry:
    """A node of the /cd tree, and the /patients node it stands for (access follows it)."""

    node: Node
    base: Node
    what: int  # CD_ROOT, CD_PATIENT, CD_DICOMDIR, ... or CD_FILE for an instance file
    name: bytes  # its name in /cd (an instance file's differs from its /patients name)

    @property
    def changes(self) -> bool:
        """Does its content change (a DICOMDIR grows with its patient)?"""
        return self.what == CD_DICOMDIR

    @property
    def is_readme(self) -> bool:
        return self.what == CD_README

    @property
    def is_root(self) -> bool:
        return self.what == CD_ROOT


def build(index: Index, patient: Node) -> Medium:
    """The DICOMDIR of a patient folder as the index holds it now (any thread)."""
    rows = index.media_manifests(patient.ino)
    entries = []
    studies: dict[int, Manifest] = {}
    for study, series, image, data in rows:
        manifest = Manifest.from_bytes(data)
        studies.setdefault(study, manifest)
        entries.append(media.Entry(manifest.instance, study, series, image))
    key = (patient.files, patient.mtime_ns)
    if not entries:
        return Medium(key, b"", ())
    patient_key = entries[0].instance.patient_key
    data = media.build_dicomdir(patient_key, entries, newest_ns=patient.mtime_ns)
    return Medium(key, data, tuple(studies.values()))


class CdTree:
    patients_folder = PATIENTS_INO  # /cd lists the names of /patients
    readme = media.README

    def __init__(self, index: Index, cache_bytes: int = CACHE_BYTES) -> None:
        self.index = index
        self.cache_bytes = cache_bytes
        self._media: OrderedDict[int, Medium] = OrderedDict()  # by patient inode
        self._bytes = 0
        self._lock = threading.Lock()  # builds may run in threads: guard the cache
        self._building: dict[int, trio.Event] = {}

    # -- the media ----------------------------------------------------------------------

    def medium(self, patient: Node) -> Medium:
        """The patient's current DICOMDIR, built here if the cache lacks it."""
        key = (patient.files, patient.mtime_ns)
        with self._lock:
            cached = self._media.get(patient.ino)
            if cached is not None and cached.key == key:
                self._media.move_to_end(patient.ino)
                return cached
        fresh = build(self.index, patient)
        self._keep(patient.ino, fresh)
        return fresh

    async def medium_async(self, patient: Node) -> Medium:
        """:meth:`medium`, with a build in a worker thread (one at a time per patient)."""
        key = (patient.files, patient.mtime_ns)
        while True:
            with self._lock:
                cached = self._media.get(patient.ino)
            if cached is not None and cached.key == key:
                return self.medium(patient)
            pending = self._building.get(patient.ino)
            if pending is None:
                break
            await pending.wait()
        done = self._building[patient.ino] = trio.Event()
        try:
            return await trio.to_thread.run_sync(self.medium, patient)
        finally:
            del self._building[patient.ino]
            done.set()

    def _keep(self, patient_ino: int, fresh: Medium) -> None:
        with self._lock:
            old = self._media.pop(patient_ino, None)
            if old is not None:
                self._bytes -= len(old.data)
            self._media[patient_ino] = fresh
            self._bytes += len(fresh.data)
            while self._bytes > self.cache_bytes and len(self._media) > 1:
                _, dropped = self._media.popitem(last=False)
                self._bytes -= len(dropped.data)

    # -- names and nodes ----------------------------------------------------------------

    def entry(self, ino: int) -> Entry | None:
        """The /cd node of ``ino``, or None."""
        if ino == CD_INO:
            root = self.index.node(CD_INO)
            return None if root is None else Entry(root, root, CD_ROOT, b"cd")
        found = self.index.cd_entry(ino)
        if found is None:
            return None
        what, base_ino, number = found
        base = self.index.node(base_ino)
        if base is None:
            return None
        return self._entry(ino, what, base, number)

    def _entry(self, ino: int, what: int, base: Node, number: int) -> Entry:
        if what == CD_PATIENT:
            node = Node(ino, DIR, CD_INO, base.name, base.mtime_ns, 0, subdirs=1)
        elif what in (CD_DICOMDIR, CD_README):
            parent = self._cd_ino(CD_PATIENT, base.ino)
            if what == CD_README:
                size = len(media.README)
            else:  # the size must be exact: build unless cached
                size = len(self.medium(base).data)
            name = DICOMDIR if what == CD_DICOMDIR else README_TXT
            node = Node(ino, FILE, parent, name, base.mtime_ns, size)
        elif what == CD_DICOM:
            parent = self._cd_ino(CD_PATIENT, base.ino)
            node = Node(ino, DIR, parent, DICOM, base.mtime_ns, 0, subdirs=base.subdirs)
        else:
            up = CD_DICOM if what == CD_STUDY else CD_STUDY
            prefix = media.STUDY_PREFIX if what == CD_STUDY else media.SERIES_PREFIX
            parent = self._cd_ino(up, base.parent)
            name = media.component(prefix, number).encode()
            subdirs = base.subdirs if what == CD_STUDY else 0
            node = Node(ino, DIR, parent, name, base.mtime_ns, 0, subdirs=subdirs)
        return Entry(node, base, what, node.name)

    def _cd_ino(self, what: int, base_ino: int) -> int:
        found = self.index.cd_ino(what, base_ino)
        return found[0] if found is not None else CD_INO

    def _entry_of(self, what: int, base: Node) -> Entry | None:
        found = self.index.cd_ino(what, base.ino)
        if found is None:
            return None
        return self._entry(found[0], what, base, found[1])

    def listed_like(self, parent: int) -> int:
        """The /patients folder whose listing rules (what is hidden) a /cd folder follows."""
        if parent == CD_INO:
            return PATIENTS_INO
        found = self.index.cd_entry(parent)
        return found[1] if found is not None else parent

    def patient(self, entry: Entry) -> Node:
        """The /patients folder of the patient an entry belongs to."""
        base = entry.base
        while base.parent != PATIENTS_INO:
            up = self.index.node(base.parent)
            if up is None:
                break
            base = up
        return base

    def lookup(self, parent: int, name: bytes) -> Entry | None:
        """The entry called ``name`` in the /cd folder ``parent``, or None."""
        if parent == CD_INO:
            patient = self.index.lookup(PATIENTS_INO, name)
            return None if patient is None else self._entry_of(CD_PATIENT, patient)
        folder = self.entry(parent)
        if folder is None:
            return None
        base = folder.base
        if folder.what == CD_PATIENT:
            what = dict(_TOP).get(name)
            return None if what is None else self._entry_of(what, base)
        prefix = {
            CD_DICOM: media.STUDY_PREFIX,
            CD_STUDY: media.SERIES_PREFIX,
            CD_SERIES: media.IMAGE_PREFIX,
        }.get(folder.what)
        number = media.parse_component(name, prefix) if prefix else None
        child_ino = self.index.cd_child(base.ino, number) if number else None
        child = self.index.node(child_ino) if child_ino is not None else None
        if child is None:
            return None
        if folder.what == CD_SERIES:
            return Entry(child, child, CD_FILE, name)
        return self._entry_of(CD_STUDY if folder.what == CD_DICOM else CD_SERIES, child)

    def children(self, parent: int, after: int) -> Iterator[tuple[int, Entry]]:
        """(offset, entry) of the folder ``parent`` after offset ``after``, in order.

        Offsets are the entries' numbers (ST/SE/IM) or 1..3 in a patient's
        folder, so a listing resumes without counting.  /cd itself is listed
        by :mod:`animfs.fs` like /patients, whose names it shares.
        """
        folder = self.entry(parent)
        if folder is None:
            return
        if folder.what == CD_PATIENT:
            for offset, (_name, what) in enumerate(_TOP, start=1):
                if offset > after:
                    found = self._entry_of(what, folder.base)
                    if found is not None:
                        yield offset, found
            return
        if folder.what not in (CD_DICOM, CD_STUDY, CD_SERIES):
            return
        while True:
            batch = self.index.cd_children(folder.base.ino, after, 256)
            if not batch:
                return
            for number, child_ino in batch:
                after = number
                child = self.index.node(child_ino)
                if child is None:
                    continue
                if folder.what == CD_SERIES:
                    name = media.component(media.IMAGE_PREFIX, number).encode()
                    yield number, Entry(child, child, CD_FILE, name)
                    continue
                what = CD_STUDY if folder.what == CD_DICOM else CD_SERIES
                found = self._entry_of(what, child)
                if found is not None:
                    yield number, found

    def patient_entry(self, patient: Node) -> Entry | None:
        """/cd/<patient> for a /patients folder (listing /cd)."""
        return self._entry_of(CD_PATIENT, patient)

    # -- the same, with a DICOMDIR built in a worker thread rather than on the trio loop --

    async def entry_async(self, ino: int) -> Entry | None:
        found = self.index.cd_entry(ino)
        if found is not None and found[0] == CD_DICOMDIR:
            await self._warm(found[1])
        return self.entry(ino)

    async def lookup_async(self, parent: int, name: bytes) -> Entry | None:
        if name == DICOMDIR and parent != CD_INO:
            found = self.index.cd_entry(parent)
            if found is not None and found[0] == CD_PATIENT:
                await self._warm(found[1])
        return self.lookup(parent, name)

    async def _warm(self, patient_ino: int) -> None:
        patient = self.index.node(patient_ino)
        if patient is not None:
            await self.medium_async(patient)

    async def warm(self, folder: Entry) -> None:
        """Build the DICOMDIR a listing of ``folder`` will show the size of, if any."""
        if folder.what == CD_PATIENT:
            await self._warm(folder.base.ino)

    def path_of(self, entry: Entry) -> str:
        """The path of a DICOMDIR or README.TXT in the mount (for the audit log)."""
        return f"/cd/{self.patient(entry).name.decode('utf-8', 'surrogateescape')}/" + (
            entry.node.name.decode()
        )
