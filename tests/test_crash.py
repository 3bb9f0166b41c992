"""Crashes: ``animfs ingest`` and the mount killed with SIGKILL at random moments.

After every kill of an ingest, while a mount serves the archive: the index is
consistent (:func:`animfs.index.check`), every chunk it references is at both
sites, the mount shows whole instances only, each byte-identical to its
original, ``animfs gc`` finds the orphans and deletes them and nothing else,
and running the same ingest again completes.  30 kills, seeded: two in three at a
uniform moment of a whole run's duration, one in three just after the run's first
group commit, so that runs cut between commits are tried too.  A killed mount is
started again
on the same mount point, reads its disk cache, and serves the same bytes.
"""

from __future__ import annotations

import errno
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from animfs import config as config_mod
from animfs import gc, keys
from animfs.chunks import chunk_key
from animfs.index import Index, check
from animfs.store.local import LocalStore

import gen_dicom
from conftest import Archive, Mount, files_under, sha256_file, tmpfs

SEED = 8_2026
ROUNDS, TRIALS = 3, 10  # a fresh archive and mount per round bounds each check's cost
UID_ROOT = gen_dicom.UID_ROOT.encode()
PATIENT_ID = b"PATIENT-ID-"  # + 0, 1, 2


# -- input: one small multi-series ingest, copied with fresh UIDs for every trial ---------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five series of three patients, 70 files: two group commits (64 files, then 6)."""
    root = tmp_path_factory.mktemp("template")
    for i in range(5):
        gen_dicom.write_series(
            root / f"s{i}", patient_id=f"{PATIENT_ID.decode()}{i % 3}",
            patient_name=f"Crash^Patient{i % 3}", n_slices=14, rows=16, cols=16,
            series_number=i + 1, modality="CT" if i % 2 else "MR",
            study_description=f"Study {i % 2}", series_description=f"Series {i}", seed=i,
        )
    return root


def variant(template: Path, dest: Path, k: int) -> dict[str, str]:
    """Copy ``template`` to ``dest`` with new UIDs and PatientIDs; returns SOPInstanceUID ->
    sha256.

    UID root and PatientID prefix are swapped for strings of the same length, so
    the files stay valid DICOM byte for byte, and their patients, UIDs and so their
    chunks are unique to ``k``.
    """
    root, patient = f"1.2.826.0.1.3680043.10.{5000 + k}.".encode(), trial_patients(k).encode()
    assert len(root) == len(UID_ROOT) and len(patient) == len(PATIENT_ID)
    expected = {}
    for path in files_under(template):
        data = path.read_bytes()
        assert data.count(PATIENT_ID) == 1, path
        data = data.replace(UID_ROOT, root).replace(PATIENT_ID, patient)
        target = dest / path.relative_to(template)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        sop = str(pydicom.dcmread(target, stop_before_pixels=True).SOPInstanceUID)
        expected[sop] = sha256_file(target)
    return expected


def trial_patients(k: int) -> str:
    """The PatientID prefix of trial ``k``'s three patients."""
    return f"TRIAL-{k:04d}-"


# -- ingests to kill: forked from a warm interpreter, so that every kill lands in the work --

ZYGOTE = """
import json, os, sys, traceback
import animfs.cli, animfs.gc, animfs.ingest  # what an ingest imports, once
for line in sys.stdin:
    args, out = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            rc = animfs.cli.main(args)
        except BaseException:
            traceback.print_exc()
            rc = 70
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    print(pid, flush=True)
    if sys.stdin.readline().strip() == "kill":  # our child until reaped: never another's pid
        os.kill(pid, 9)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Zygote:
    """Runs ``animfs ...`` (``animfs.cli.main`` in a forked child of an interpreter that
    has imported animfs already): the child is a whole ingest process, minus the
    second of start-up that a SIGKILL at a random moment would mostly hit."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0)
        self._buffer = b""

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError(f"no answer from the zygote in {timeout} s")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"the zygote exited ({self.proc.wait(timeout=10)})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def start(self, args: list[str], out: Path) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps([args, str(out)]) + "\n").encode())
        return int(self._line(30))

    def wait(self, kill: bool = False, timeout: float = 120) -> int:
        """The exit status of the child started last; with ``kill``, SIGKILL it first."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"kill\n" if kill else b"wait\n")
        return int(self._line(timeout))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def zygote() -> Iterator[Zygote]:
    z = Zygote()
    try:
        yield z
    finally:
        z.close()


# -- what must hold after any crash ------------------------------------------------------


class World:
    """The archive as the test process sees it: its index, sites, and the running mount."""

    def __init__(self, archive: Archive, mount: Mount) -> None:
        self.archive, self.mount = archive, mount
        self.config = config_mod.load(archive.config)
        self.index = Index(self.config.index_path, map_size=self.config.index_map_size)
        self.sites = [LocalStore.from_url(s.name, s.url) for s in self.config.sites]
        self.ring = keys.for_config(self.config)
        self.verified: set[str] = set()  # SOPInstanceUIDs read byte-identical through the mount
        self.present: set[str] = set()  # referenced chunks seen at every site

    def close(self) -> None:
        self.index.close()

    def take_write_lock(self) -> None:
        """What the next command to open the index does (Index() begins a write).

        A writer killed after its commit reached the disk, but before it let go
        of LMDB's writer lock, leaves the lock region naming the transaction
        before: readers see the state without that last group until the next
        writer takes the lock, finds its owner dead and repairs the region.
        Either state is consistent; this makes the test judge the newest one.
        """
        self.index.env.begin(write=True).abort()

    def committed(self, expected: dict[str, str]) -> set[str]:
        return {sop for sop in expected if self.index.find_ino(b"I\0" + sop.encode())}

    def assert_consistent(self, k: int, expected: dict[str, str]) -> None:
        """The index, the sites and the mount agree, and every file of trial ``k`` the mount
        shows is whole (the index check covers the other trials' folders)."""
        assert check(self.index) == []
        for chunk_id in self.index.chunk_ids() - self.present:
            where = [s.name for s in self.sites if s.exists(chunk_key(chunk_id))]
            assert len(where) == len(self.sites), f"chunk {chunk_id[:16]} only at {where}"
            self.present.add(chunk_id)  # gc's deletions are checked against all, below
        shown = mount_files(self.mount.path, f"-{trial_patients(k)}")
        assert set(shown) == self.committed(expected)
        for sop in sorted(set(shown) - self.verified):
            assert sha256_file(shown[sop]) == expected[sop], sop
            self.verified.add(sop)

    def gc(self, delete: bool) -> gc.GcReport:
        return gc.collect(
            self.index, self.sites, grace=0.0, delete=delete,
            manifest_name=lambda m: m.object_key_with(self.ring),
            open_manifest=lambda name, stored: keys.open_with(self.ring, name, stored),
        )

    def chunk_files(self, site: LocalStore) -> set[str]:
        return {key[len("chunks/"):] for key in site.list("chunks/")}

    def temporaries(self) -> list[str]:
        return [t.key for site in self.sites for t in site.temporaries()]


def mount_files(root: Path, patients: str = "") -> dict[str, Path]:
    """Files in the patient folders whose name holds ``patients``, by SOPInstanceUID (from
    their names); no folder may be empty."""
    out = {}
    for patient in os.listdir(root / "patients"):
        if patients not in patient:
            continue
        for dirpath, dirs, files in os.walk(root / "patients" / patient):
            assert dirs or files, f"{dirpath} is an empty folder"
            for name in files:
                assert name.endswith(".dcm") and "~" not in name, name
                out[name[6:-4]] = Path(dirpath) / name
    return out


@pytest.fixture
def crash_disk() -> Iterator[Path]:
    """A tmpfs of its own for the archives: a SIGKILL loses no page cache, so a disk
    would add nothing but the time of syncfs on a file system shared with others."""
    with tmpfs("512m", "animfs-crash-") as top:
        yield top


def test_sigkill_during_ingest_leaves_only_whole_instances_and_gc_able_orphans(
    crash_disk: Path, template: Path, zygote: Zygote
) -> None:
    rng = random.Random(SEED)
    stats = {"nothing": 0, "part": 0, "all": 0, "orphans": 0, "unindexed": 0, "temporaries": 0}
    for r in range(ROUNDS):
        archive = Archive(crash_disk / f"round-{r}")
        try:
            with archive.mounted() as m:
                world = World(archive, m)
                try:
                    kill_ingests(world, template, zygote, rng, range(r * TRIALS, (r + 1) * TRIALS),
                                 stats)
                    # All of it, once more, through the mount and through `animfs verify`.
                    shown = mount_files(m.path)
                    assert len(shown) == len(world.verified) == (TRIALS + 1) * 70
                finally:
                    world.close()
            scrub = archive.run("verify")
            assert "index: consistent" in scrub.stdout, scrub.stdout
        finally:
            archive.close()
            shutil.rmtree(archive.dir, ignore_errors=True)
    print(f"\n{ROUNDS * TRIALS} kills: {stats}")
    # The kills must have hit every phase, or the test proved less than it claims.
    assert stats["nothing"] and stats["part"] + stats["all"] >= 3 and stats["orphans"] >= 3, stats


def kill_ingests(world: World, template: Path, zygote: Zygote, rng: random.Random,
                 trials: range, stats: dict[str, int]) -> None:
    archive = world.archive
    config = ["--config", str(archive.config)]
    out = archive.dir / "ingest.out"

    def ingest(src: Path) -> tuple[int, str]:
        zygote.start([*config, "ingest", str(src)], out)
        return zygote.wait(), out.read_text()

    first = trials[0] + 1000  # a calibration run, whole: how long a run takes
    expected = variant(template, archive.dir / "in-calibrate", first)
    start = time.monotonic()
    rc, text = ingest(archive.dir / "in-calibrate")
    duration = time.monotonic() - start
    assert rc == 0 and f"{len(expected)} ingested" in text, text
    world.assert_consistent(first, expected)
    for k in trials:
        src = archive.dir / f"in-{k}"
        expected = variant(template, src, k)
        zygote.start([*config, "ingest", str(src)], out)
        if k % 3 == 2:  # kill soon after its first group committed: a part is in
            deadline = time.monotonic() + 2 * duration + 5
            while not world.committed(expected) and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.1))
        else:
            time.sleep(rng.uniform(0, duration))
        assert zygote.wait(kill=True) in (-signal.SIGKILL, 0)  # 0: it finished first
        assert "Traceback" not in out.read_text(), out.read_text()
        world.take_write_lock()
        committed = len(world.committed(expected))
        stats["nothing" if committed == 0 else "all" if committed == len(expected) else "part"] += 1

        world.assert_consistent(k, expected)
        done = world.gc(delete=True)
        referenced = world.index.chunk_ids()
        assert not {o.key[len("chunks/"):] for o in done.orphans} & referenced
        assert done.deleted == len(done.orphans) and not done.blocked
        stats["orphans"] += bool(done.orphans)
        stats["unindexed"] += bool(done.unindexed)
        stats["temporaries"] += any(o.temporary for o in done.orphans)
        assert world.temporaries() == []
        for site in world.sites:
            left = world.chunk_files(site)
            assert referenced <= left, f"gc deleted a referenced chunk at {site.name}"
            if not done.unindexed:  # else their chunks are kept for them
                assert left == referenced, f"{site.name}: orphans survived gc"

        rc, text = ingest(src)  # the same ingest again, to its end
        assert rc == 0, text
        assert f"{len(expected) - committed} ingested, {committed} skipped" in text, text
        world.assert_consistent(k, expected)
        assert set(expected) <= world.verified
        if k % 5 == 4:
            after = world.gc(delete=False)
            assert (after.orphans, after.unindexed) == ([], set())


# -- the mount killed ----------------------------------------------------------------------


def test_sigkill_of_the_mount_then_mount_again_reuses_the_cache(
    archive: Archive, series_dir: Path, tmp_path: Path
) -> None:
    gen_dicom.write_large_instance(tmp_path / "big" / "big.dcm", size_mb=5, patient_id="K1",
                                   patient_name="Kill^Mount", seed=3)
    archive.ingest(series_dir, tmp_path / "big")
    originals = {sha256_file(p): p for p in [*files_under(series_dir), *files_under(tmp_path)]}
    point = Path(archive.dir / "mnt")
    point.mkdir()
    first = Mount(archive, point)
    archive.mounts.append(first)
    served = files_under(point / "patients")
    assert sorted(sha256_file(p) for p in served) == sorted(originals)  # fills the disk cache
    cached = {p.name for p in (archive.dir / "cache" / "chunks").rglob("*") if p.is_file()}

    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(seed: int) -> None:
        r = random.Random(seed)
        while not stop.is_set():
            path = r.choice(served)
            try:
                fd = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # past the page cache
                os.close(fd)
                digest = sha256_file(path)
            except OSError as exc:  # the mount died under the read: expected, but which way?
                if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED, errno.ENOENT):
                    errors.append(exc)
                continue
            if digest not in originals:
                errors.append(AssertionError(f"{path}: wrong bytes"))

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        first.proc.send_signal(signal.SIGKILL)
        assert first.proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not any(t.is_alive() for t in threads) and errors == [], errors
    with pytest.raises(OSError) as dead:
        os.listdir(point)
    assert dead.value.errno == errno.ENOTCONN

    first._log.close()
    archive.mounts.remove(first)  # reaped above; its dead mount stays for `animfs mount`

    # `animfs mount`, as an admin runs it, on the same mount point.  Without the
    # sites, every byte must come from the disk cache the killed mount filled.
    for site in ("site-a", "site-b"):
        (archive.dir / site).rename(archive.dir / f"{site}.away")
    try:
        result = archive.run("mount", str(point))
        assert "clearing a dead mount" in result.stderr and "mounted at" in result.stdout
        assert sorted(sha256_file(p) for p in files_under(point / "patients")) == sorted(originals)
        now = {p.name for p in (archive.dir / "cache" / "chunks").rglob("*") if p.is_file()}
        assert now == cached and cached
        archive.run("umount", str(point))
        assert not os.path.ismount(point)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(point)], capture_output=True, timeout=30)
        for site in ("site-a", "site-b"):
            (archive.dir / f"{site}.away").rename(archive.dir / site)

