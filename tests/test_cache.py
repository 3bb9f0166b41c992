"""Layer 3: the disk cache, read-ahead and backup bypass, through real mounts.

The data: one multi-chunk instance (reads across chunk boundaries) and a small
series (many one-chunk files).  The cap is set to a fraction of what is stored,
so reading everything once is several times the cap.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_access_mount import BACKUP, USERS, as_uid

from animfs import chunks, keys
from animfs.cache import _CheckSlots, _Flight
from animfs.chunks import CHUNK_SIZE, ChunkRef
from animfs.fs import _sequential

from conftest import Archive, files_under, gen_dicom, sha256_file, wait_for

CLINICIAN = 1001  # dr.muller at CHL, from test_access_mount.USERS
REF = ChunkRef("0" * 64, 1, 1)  # what a flight fetches, for the tests of _CheckSlots alone


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache-data")
    root.chmod(0o755)
    gen_dicom.write_large_instance(root / "large" / "big.dcm", size_mb=13, patient_id="P100",
                                   patient_name="Muller^Anna", institution_name="CHL", seed=5)
    gen_dicom.write_series(root / "series", patient_id="P100", patient_name="Muller^Anna",
                           n_slices=24, rows=128, cols=128, series_number=2, modality="CT",
                           study_description="CT", series_description="Axial",
                           institution_name="CHL", seed=6)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def set_cache_keys(archive: Archive, **keys: int) -> None:
    """Rewrite keys of the [cache] table written by 'animfs init'."""
    text = archive.config.read_text()
    for key, value in keys.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        if not n:
            text = text.replace("[cache]\n", f"[cache]\n{key} = {value}\n", 1)
    archive.config.write_text(text)


def stored_chunks(archive: Archive) -> list[Path]:
    return [p for p in (archive.dir / "site-a" / "chunks").rglob("*") if p.is_file()]


def cache_entries(archive: Archive) -> dict[str, bytes]:
    """Every cache entry: name -> sha256 of its content, and its mtime (so a touch shows)."""
    out = {}
    for path in (archive.dir / "cache" / "chunks").rglob("*"):
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).digest()
            out[path.name] = digest + path.stat().st_mtime_ns.to_bytes(8, "big")
    return out


def settled_cache(archive: Archive) -> dict[str, bytes]:
    """The cache entries once they stop changing (bounded wait)."""
    deadline = time.monotonic() + 20
    last = cache_entries(archive)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = cache_entries(archive)
        if now == last:
            return now
        last = now
    raise TimeoutError("the cache kept changing for 20 s")


def cache_bytes(archive: Archive) -> int:
    """Bytes under the cache folder's entries and temporary entries."""
    root = archive.dir / "cache"
    return sum(p.stat().st_size for sub in ("chunks", "tmp") for p in (root / sub).rglob("*")
               if p.is_file())


def originals_by_name(sources: Path) -> dict[int, str]:
    """sha256 of each original, by size (the generated files all differ in size or content)."""
    return {p.stat().st_size: sha256_file(p) for p in files_under(sources)}


def served(mount_root: Path) -> list[Path]:
    return files_under(mount_root / "patients")


def read_all_checked(mount_root: Path, sources: Path) -> int:
    """Read every file of the mount, checking it against its original; returns the count."""
    by_sha = {sha256_file(p) for p in files_under(sources)}
    files = served(mount_root)
    for path in files:
        assert sha256_file(path) in by_sha, path
    assert len(files) == len(by_sha)
    return len(files)


def drop_page_cache(paths: list[Path]) -> None:
    """Forget the kernel's cached pages of these files, so reads reach the mount again."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cache_stats(archive: Archive) -> dict[str, Any]:
    return dict(json.loads(archive.run("cache", "stats").stdout))


def test_cache_stays_under_its_cap_and_is_reused_after_remount(
    archive: Archive, sources: Path
) -> None:
    archive.ingest(sources)
    stored = stored_chunks(archive)
    total = sum(p.stat().st_size for p in stored)
    cap = max(total // 4, max(p.stat().st_size for p in stored))
    set_cache_keys(archive, max_bytes=cap)
    with archive.mounted() as m:
        files = served(m.path)
        for _round in range(3):  # 3 x everything = about 12 x the cap
            for path in files:
                sha256_file(path)
                assert cache_bytes(archive) <= cap
            drop_page_cache(files)
        read_all_checked(m.path, sources)
    stats = cache_stats(archive)
    assert 0 < int(stats["bytes"]) <= cap
    assert int(stats["evictions"]) > 0 and int(stats["fills"]) > 0
    assert cache_bytes(archive) <= cap

    # Raise the cap, warm everything, take the sites' chunks away: a fresh mount reads
    # every byte from the cache folder alone.
    set_cache_keys(archive, max_bytes=total * 2)
    with archive.mounted() as m:
        read_all_checked(m.path, sources)
    assert len(cache_entries(archive)) == len(stored)
    for site in ("site-a", "site-b"):
        shutil.rmtree(archive.dir / site / "chunks")
    with archive.mounted() as m:
        assert read_all_checked(m.path, sources) == len(files_under(sources))
    stats = cache_stats(archive)
    assert stats["misses"] == 0 and int(stats["hits"]) >= len(stored)


@pytest.fixture(params=["sealed", "unsealed"])
def any_archive(request: pytest.FixtureRequest, archive: Archive) -> Archive:
    """The archive of ``animfs init``, sealed (with a key) or made with ``--no-key``: a
    sealed chunk is checked by its seal, an unsealed one by hashing it."""
    if request.param == "unsealed":
        shutil.rmtree(archive.dir / "site-a")
        for name in ("animfs.toml", "animfs.key"):
            (archive.dir / name).unlink()
        for name in ("site-b", "cache", "index"):
            shutil.rmtree(archive.dir / name, ignore_errors=True)
        archive.run("init", "--no-key", str(archive.dir), config=False)
        assert "key_file" not in archive.config.read_text()
    return archive


def test_damaged_cache_entry_is_dropped_and_fetched_again(
    any_archive: Archive, sources: Path
) -> None:
    archive = any_archive
    archive.ingest(sources / "large")
    with archive.mounted() as m:
        read_all_checked(m.path, sources / "large")
    entries = sorted((archive.dir / "cache" / "chunks").rglob("*"))
    entries = [p for p in entries if p.is_file()]
    assert len(entries) == len(stored_chunks(archive)) >= 3
    flipped, truncated = entries[0], entries[1]
    good = {p.name: p.read_bytes() for p in (flipped, truncated)}
    sealed = (archive.dir / "animfs.key").exists()
    assert all(keys.is_sealed(data) == sealed for data in good.values())
    data = bytearray(good[flipped.name])
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(good[truncated.name][: len(good[truncated.name]) // 2])
    with archive.mounted() as m:
        read_all_checked(m.path, sources / "large")
    assert flipped.read_bytes() == good[flipped.name]  # fetched again and kept, whole
    assert truncated.read_bytes() == good[truncated.name]
    stats = cache_stats(archive)
    assert stats["corrupt_dropped"] == 2
    assert stats["misses"] == 2


def unpackers(archive: Archive) -> list[int]:
    """The pids of the unpacker processes (animfs.unpack) of the archive's mounts."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # not a process, or gone
            continue
        if argv[1:4] == [b"-m", b"animfs.unpack", str(archive.config).encode()]:
            found.append(int(proc.name))
    return found


def bytes_read(pid: int) -> int:
    """What a process has read with read() so far (its /proc io counter)."""
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(io["rchar"])


def test_an_unpacker_runs_on_one_thread(archive: Archive) -> None:
    """An unpacker does no BLAS, but the OpenBLAS bundled with numpy would start a thread
    per core in each one as it imports numpy, and spin it on the cores the mount's first
    requests need: animfs keeps it to one thread."""
    with archive.mounted() as m:
        m.wait_for_unpackers()
        pids = unpackers(archive)
        assert pids
        threads = {pid: os.listdir(f"/proc/{pid}/task") for pid in pids}
    assert all(len(tasks) == 1 for tasks in threads.values()), threads


def test_unpackers_open_cache_hits_and_reads_go_on_when_they_die(
    archive: Archive, sources: Path
) -> None:
    """Disk-cache hits are read and opened by the mount's unpacker processes, and an entry
    gone from the folder is fetched from the sites again; killed, the fetch threads
    take their chunks and say so once each; none outlives its mount."""
    archive.ingest(sources)
    with archive.mounted() as m:
        read_all_checked(m.path, sources)  # fills the disk cache
    entries = sorted(p for p in (archive.dir / "cache" / "chunks").rglob("*") if p.is_file())
    gone, kept = entries[0], entries[1:]
    good = gone.read_bytes()
    assert unpackers(archive) == []
    with archive.mounted() as m:
        m.wait_for_unpackers()
        pids = unpackers(archive)
        assert 1 <= len(pids) <= 4
        before = {pid: bytes_read(pid) for pid in pids}
        gone.unlink()
        read_all_checked(m.path, sources)
        read = sum(bytes_read(pid) - before[pid] for pid in pids)
        assert read >= sum(p.stat().st_size for p in kept)
    assert unpackers(archive) == []
    assert gone.read_bytes() == good  # fetched from a site and cached again
    stats = cache_stats(archive)
    assert stats["misses"] == 1 and stats["hits"] == len(kept), stats
    with archive.mounted() as m:
        m.wait_for_unpackers()
        pids = unpackers(archive)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        read_all_checked(m.path, sources)
    assert unpackers(archive) == []
    log = m.log_text()
    assert sum(f"chunk unpacker {pid} exited" in log for pid in pids) == len(pids), log
    stats = cache_stats(archive)
    assert stats["misses"] == 0 and stats["hits"] >= len(entries)


def anonymous_rss(pid: int) -> int:
    """Bytes of a process's resident anonymous memory (its heap among them)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no RssAnon for {pid}")


def test_the_memory_lru_is_faulted_in_after_mounting(archive: Archive, sources: Path) -> None:
    """Right after mounting, the mount faults in its memory LRU's pages while idle (so that
    its first reads do not), and keeps them; the reads are unchanged."""
    archive.ingest(sources)
    lru = 96 << 20
    archive.set_config("cache", "memory_bytes", "1")
    with archive.mounted() as m:
        m.wait_for_unpackers()
        time.sleep(1)
        without = anonymous_rss(m.proc.pid)
    archive.set_config("cache", "memory_bytes", str(lru))
    with archive.mounted() as m:
        wait_for(lambda: anonymous_rss(m.proc.pid) >= without + lru * 0.95, 20, "LRU pages")
        read_all_checked(m.path, sources)
        assert anonymous_rss(m.proc.pid) >= without + lru * 0.95  # kept, not handed back


def test_unpackers_fetch_what_the_disk_cache_lacks_from_a_local_site_and_keep_it(
    archive: Archive, sources: Path
) -> None:
    """A chunk not in the disk cache, the first site a local folder: an unpacker reads it
    there, checks it and writes the cache entry; the mount reads none of it itself, and
    keeps the books: one miss and one fill per chunk, every read counted for the site."""
    archive.ingest(sources)
    stored = {p.name: p.stat().st_size for p in stored_chunks(archive)}
    with archive.mounted() as m:
        m.wait_for_unpackers()
        pids = unpackers(archive)
        children_before = {pid: bytes_read(pid) for pid in pids}
        mount_before = bytes_read(m.proc.pid)
        read_all_checked(m.path, sources)
        children = sum(bytes_read(pid) - children_before[pid] for pid in pids)
        mount = bytes_read(m.proc.pid) - mount_before
        site_a = m.status()["sites"]["site-a"]
    assert children >= sum(stored.values())
    assert mount < sum(stored.values()) // 4  # its FUSE requests and the children's replies
    assert site_a["reads"] == len(stored) and site_a["bytes_read"] == sum(stored.values())
    entries = {p.name: p.read_bytes() for p in (archive.dir / "cache" / "chunks").rglob("*")
               if p.is_file()}
    site = {p.name: p.read_bytes() for p in stored_chunks(archive)}
    assert entries == site  # every chunk kept, exactly as stored
    assert list((archive.dir / "cache" / "tmp").iterdir()) == []
    stats = cache_stats(archive)
    assert (stats["misses"], stats["fills"], stats["hits"]) == (len(stored), len(stored), 0)
    assert stats["bytes"] == sum(stored.values())


def test_reads_go_on_when_the_unpackers_stop_answering(archive: Archive, sources: Path) -> None:
    """Unpackers that stop answering (stopped here, as a hung cache disk or site folder
    would leave them): after the hedge time, the fetch threads read what they hold, what
    waits for them, and what comes after; byte-identical, and the log says so."""
    archive.ingest(sources)
    with archive.mounted() as m:
        for path in served(m.path):
            if path.stat().st_size < CHUNK_SIZE:  # the series in the disk cache, not the rest
                sha256_file(path)
    with archive.mounted() as m:
        m.wait_for_unpackers()
        pids = unpackers(archive)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        done: list[int] = []  # in a thread: if reads hang, the teardown's kill ends them
        reader = threading.Thread(target=lambda: done.append(read_all_checked(m.path, sources)),
                                  daemon=True)
        reader.start()
        reader.join(120)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        assert done == [len(files_under(sources))], "reads hung behind the stopped unpackers"
        log = m.log_text()
    assert any(f"chunk unpacker {pid} silent for 1 s" in log for pid in pids), log
    assert "Traceback" not in log


# Runs as another uid: the files below a folder (only the first LIMIT of folders named
# PREFIX*, if given), each read with the page cache dropped first, so every read reaches
# the mount; prints "sha256 relative-path" lines.
_READ_COLD = """
import hashlib, os, sys
root, prefix, limit = sys.argv[1], *sys.argv[2:4]
for top, dirs, files in os.walk(root):
    dirs.sort()
    if prefix and not os.path.basename(top).startswith(prefix):
        continue
    for name in sorted(files)[: int(limit) if limit else None]:
        path = os.path.join(top, name)
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with os.fdopen(fd, "rb") as f:
            print(hashlib.sha256(f.read()).hexdigest(), os.path.relpath(path, root))
"""


def read_cold_as(uid: int, root: Path, prefix: str = "", limit: int = 0) -> dict[str, str]:
    result = as_uid(uid, sys.executable, "-c", _READ_COLD, str(root), prefix, str(limit or ""))
    assert result.returncode == 0, result.stderr
    lines = (line.split(" ", 1) for line in result.stdout.splitlines())
    return {rel: digest for digest, rel in lines}


def test_backup_reads_leave_the_cache_unchanged(archive: Archive, sources: Path) -> None:
    archive.append_config(USERS)
    archive.ingest(sources, extra=["--institution", "CHL"])
    total = sum(p.stat().st_size for p in stored_chunks(archive))
    # No memory LRU to speak of, so that backup reads of the hot set reach the disk cache.
    set_cache_keys(archive, max_bytes=total // 2, memory_bytes=1)
    originals = {sha256_file(p) for p in files_under(sources)}
    with archive.mounted() as m:
        # The hot set: a clinician reads half of the series.
        hot = read_cold_as(CLINICIAN, m.path / "patients", "002_", 12)
        assert len(hot) == 12 and set(hot.values()) <= originals
        before = settled_cache(archive)  # the series prefetch of the last opens lands
        assert before
        # The backup reads everything, twice (the cache could hold only half of it).
        for _round in range(2):
            seen = read_cold_as(BACKUP, m.path / "patients")
            assert sorted(seen.values()) == sorted(originals)
        assert cache_entries(archive) == before
    stats = cache_stats(archive)
    assert int(stats["bypass_hits"]) > 0 and int(stats["bypass_misses"]) > 0
    assert stats["evictions"] == 0


def test_cache_prefetch_warms_a_study_with_and_without_a_mount(
    archive: Archive, sources: Path
) -> None:
    archive.ingest(sources)
    with archive.mounted() as m:
        series = next(p for p in (m.path / "patients").glob("*/*/002_*"))
        large = next(p for p in (m.path / "patients").glob("*/*/001_*"))
        # Inside a mount: the mount point is taken off.
        out = archive.run("cache", "prefetch", str(series)).stdout
        assert "24 files" in out and "0 failed" in out, out
        relative_large = "/" + str(large.relative_to(m.path))
    assert len(cache_entries(archive)) == 24
    # No mount: a path from the mount root; an unknown one is one clear line.
    out = archive.run("cache", "prefetch", relative_large).stdout
    assert "1 files" in out, out
    bad = archive.run("cache", "prefetch", "patients/nobody", check=False)
    assert bad.returncode == 2 and "no 'nobody' in the archive" in bad.stderr
    n = len(stored_chunks(archive))
    assert len(cache_entries(archive)) == n
    for site in ("site-a", "site-b"):
        shutil.rmtree(archive.dir / site / "chunks")
    with archive.mounted() as m:
        read_all_checked(m.path, sources)
    cleared = archive.run("cache", "clear").stdout
    assert f"deleted {n} entries" in cleared, cleared
    assert cache_entries(archive) == {}
    status = json.loads(archive.run("status").stdout)
    assert status["cache"]["entries"] == 0 and status["cache"]["bytes"] == 0


def test_opening_a_series_in_order_prefetches_the_files_ahead(
    archive: Archive, sources: Path
) -> None:
    """Each open fetches the files listed after it, ``series_prefetch`` of them, also when
    the reader skips one, starts again, opens a file again, or leaves the folder and comes
    back; nothing further ahead, and never the file opened (opening reads nothing)."""
    archive.ingest(sources)
    set_cache_keys(archive, series_prefetch=3)
    with archive.mounted() as m:
        series = sorted(next((m.path / "patients").glob("*/*/002_*")).iterdir())
        large = next((m.path / "patients").glob("*/*/001_*/*"))
        assert len(series) == 24

        def open_close(path: Path) -> None:
            os.close(os.open(path, os.O_RDONLY))

        def cached() -> list[int]:
            settled_cache(archive)
            return [i for i, path in enumerate(series)
                    if os.getxattr(path, "user.animfs.cached") == b"1"]

        for i in range(5):  # in order
            open_close(series[i])
        assert cached() == list(range(1, 8))
        open_close(series[6])  # skips 5
        assert cached() == list(range(1, 10))
        open_close(large)  # another folder, then back
        open_close(series[7])
        assert cached() == list(range(1, 11))
        open_close(series[15])  # a jump forward
        assert cached() == [*range(1, 11), 16, 17, 18]
        open_close(series[16])
        assert cached() == [*range(1, 11), 16, 17, 18, 19]
        open_close(series[16])  # opened again: the same window
        open_close(series[17])
        assert cached() == [*range(1, 11), *range(16, 21)]
        for i in range(19, 24):  # up to the end of the folder
            open_close(series[i])
        assert cached() == [*range(1, 11), *range(16, 24)]


def test_reads_of_any_size_and_offset_match_the_original(archive: Archive, sources: Path) -> None:
    archive.ingest(sources / "large")
    original = (sources / "large" / "big.dcm").read_bytes()
    size = len(original)
    assert size > 3 * CHUNK_SIZE
    with archive.mounted() as m:
        (path,) = served(m.path)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            def check(offset: int, length: int) -> None:
                assert os.pread(fd, length, offset) == original[offset : offset + length]

            for boundary in (CHUNK_SIZE, 2 * CHUNK_SIZE, 3 * CHUNK_SIZE):
                for offset, length in ((boundary - 1, 1), (boundary, 1), (boundary - 1, 2),
                                       (boundary - 5000, 9000),
                                       (boundary - CHUNK_SIZE, CHUNK_SIZE + 1)):
                    check(offset, length)
            for offset, length in ((0, 1), (0, size), (size - 1, 1), (size - 1, 10), (size, 1),
                                   (size + 12345, 100), (1, 3 * CHUNK_SIZE)):
                check(offset, length)

            @settings(max_examples=150, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])
            @given(st.integers(0, size + 100), st.integers(1, 2 * CHUNK_SIZE + 3))
            def any_read(offset: int, length: int) -> None:
                check(offset, length)

            any_read()
        finally:
            os.close(fd)


# -- layer 1: what the read path checks, and in which order it decompresses ----------------


def test_every_copy_is_checked_also_without_rehashing() -> None:
    """The mount's read path does not hash a sealed chunk again (its AES-GCM tag checks
    every byte), but still refuses any damaged copy, and always hashes unsealed ones."""
    ring = keys.new_ring()
    plain = bytes(range(256)) * 300
    for key_ring in (ring, None):
        chunk_id, stored = chunks.seal(plain, key_ring)
        for rehash in (True, False):
            assert chunks.unseal(chunk_id, stored, len(plain), key_ring, rehash=rehash) == plain
            damaged = bytearray(stored)
            damaged[len(damaged) // 2] ^= 0x01
            with pytest.raises(chunks.CorruptChunk):
                chunks.unseal(chunk_id, bytes(damaged), len(plain), key_ring, rehash=rehash)
            # An unsealed copy that decompresses to other bytes under this name.
            other = chunks.seal(b"x" * len(plain))[1]
            with pytest.raises(chunks.CorruptChunk, match="does not match its id"):
                chunks.unseal(chunk_id, other, len(plain), key_ring, rehash=rehash)
    # A sealed copy moved to another chunk's name does not open.
    chunk_id, stored = chunks.seal(plain, ring)
    other_id = chunks.seal(b"y" * 100, ring)[0]
    with pytest.raises(chunks.CorruptChunk):
        chunks.unseal(other_id, stored, len(plain), ring, rehash=False)


def test_out_of_order_reads_stay_sequential() -> None:
    assert _sequential(0, 0) and _sequential(0, 5 * CHUNK_SIZE)
    mib = 1 << 20
    assert _sequential(4 * mib, 4 * mib)
    assert _sequential(5 * mib, 4 * mib)  # the next request handled first ...
    assert _sequential(4 * mib, 6 * mib)  # ... then the one before it
    assert not _sequential(40 * mib, 4 * mib)
    assert not _sequential(4 * mib, 40 * mib)


def test_a_chunk_a_reader_waits_for_is_decompressed_before_read_ahead() -> None:
    slots = _CheckSlots(1)
    order: list[str] = []

    def take(name: str, flight: _Flight) -> None:
        with slots.slot(flight):
            order.append(name)

    def queue(name: str, flight: _Flight) -> threading.Thread:
        thread = threading.Thread(target=take, args=(name, flight))
        thread.start()
        return thread

    def wait_for_queue(n: int) -> None:
        deadline = time.monotonic() + 10
        while slots.waiting() < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert slots.waiting() == n

    def join(threads: list[threading.Thread]) -> None:
        for thread in threads:
            thread.join(timeout=10)
            assert not thread.is_alive()

    # Read-ahead queued first; then a chunk a reader waits for: it goes first.
    with slots.slot(_Flight(REF)):  # the one slot is busy
        threads = [queue("ahead", _Flight(REF))]
        wait_for_queue(1)
        threads.append(queue("wanted", _Flight(REF, wanted=True)))
        wait_for_queue(2)
    join(threads)
    assert order == ["wanted", "ahead"]
    # A read-ahead chunk that a reader starts waiting for while it queues moves up too.
    late = _Flight(REF)
    with slots.slot(_Flight(REF)):
        threads = [queue("other", _Flight(REF))]
        wait_for_queue(1)
        threads.append(queue("late", late))
        wait_for_queue(2)
        late.wanted = True
    join(threads)
    assert order == ["wanted", "ahead", "late", "other"]
