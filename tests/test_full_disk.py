"""Full disks: the cache's (reads go on, uncached, with one warning) and the index's (ingest
stops with one clear line and leaves the index as it was).

Each disk is a small tmpfs mounted by the test and always unmounted in teardown.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from animfs.index import Index, check

from conftest import Archive, files_under, sha256_file, tmpfs


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 2 MiB tmpfs."""
    with tmpfs("2m", "animfs-fulldisk-") as top:
        yield top


def fill(disk: Path) -> Path:
    """Write a file until the disk is full; returns it (delete it to make room again)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def read_uncached(path: Path) -> str:
    """sha256 of a file through the mount, after dropping its pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return sha256_file(path)


def index_snapshot(path: Path) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every key and value of every sub-database, to prove something changed nothing."""
    env = lmdb.open(str(path), max_dbs=64, readonly=True, lock=False)
    try:
        out = {}
        with env.begin() as txn:
            for name, _ in txn.cursor():
                db = env.open_db(name, txn=txn, create=False)
                out[name.decode()] = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]
        return out
    finally:
        env.close()


def cache_entries(cache: Path) -> set[str]:
    return {p.name for p in (cache / "chunks").rglob("*") if p.is_file()}


@pytest.mark.parametrize("unpackers", [0, 2], ids=["fetch-threads", "unpackers"])
def test_reads_go_on_uncached_when_the_cache_disk_is_full(
    archive: Archive, series_dir: Path, small_disk: Path, unpackers: int
) -> None:
    """Whoever writes the cache entries: the mount's fetch threads, or its unpackers."""
    archive.ingest(series_dir)
    originals = sorted(sha256_file(p) for p in files_under(series_dir))
    cache = small_disk / "cache"
    archive.set_config("cache", "dir", f'"{cache}"')
    archive.set_config("cache", "memory_bytes", "1")  # every read asks the disk cache
    archive.set_config("cache", "unpackers", str(unpackers))
    with archive.mounted() as m:
        if unpackers:
            m.wait_for_unpackers()
        served = files_under(m / "patients")
        half = served[: len(served) // 2]
        for path in half:
            read_uncached(path)
        cached = cache_entries(cache)
        assert len(cached) >= len(half)  # the cache works while there is room
        filler = fill(small_disk)
        for _ in range(2):
            assert sorted(read_uncached(p) for p in served) == originals
        assert cache_entries(cache) == cached  # nothing more was kept
        warnings = [line for line in m.log_text().splitlines() if "disk cache" in line
                    and "WARNING" in line]
        assert len(warnings) == 1, warnings
        assert "No space left on device" in warnings[0]
        assert "served without caching" in warnings[0]

        filler.unlink()  # room again: the next reads are kept
        assert sorted(read_uncached(p) for p in served) == originals
        assert len(cache_entries(cache)) > len(cached)
        assert "caching resumes" in m.log_text()
    assert "Traceback" not in m.log_text()


def test_ingest_stops_at_a_full_index_disk_and_changes_nothing(
    archive: Archive, series_dir: Path, small_disk: Path
) -> None:
    archive.set_config("index", "path", f'"{small_disk / "index"}"')
    archive.ingest(series_dir / "mr")
    before = index_snapshot(small_disk / "index")
    filler = fill(small_disk)
    assert_stops_and_changes_nothing(archive, series_dir, small_disk / "index", before,
                                     "No space left on device")
    filler.unlink()
    finish_and_read(archive, series_dir, small_disk / "index")


def test_ingest_stops_at_a_full_index_map_and_changes_nothing(
    archive: Archive, series_dir: Path
) -> None:
    archive.ingest(series_dir / "mr")
    index = Index(archive.dir / "index")
    used = index.counts()["index_bytes"]
    index.close()
    archive.set_config("index", "map_size", str(used + 8192))  # no room for 12 more
    before = index_snapshot(archive.dir / "index")
    assert_stops_and_changes_nothing(archive, series_dir, archive.dir / "index", before,
                                     "the index map is full; raise [index] map_size")
    archive.set_config("index", "map_size", str(64 << 20))
    finish_and_read(archive, series_dir, archive.dir / "index")


def assert_stops_and_changes_nothing(archive: Archive, series_dir: Path, index_path: Path,
                                     before: dict[str, list[tuple[bytes, bytes]]],
                                     reason: str) -> None:
    result = archive.ingest(series_dir / "ct", check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("animfs: ")]
    assert len(lines) == 1 and reason in lines[0] and "ingest stopped" in lines[0], lines
    assert "0 ingested" in result.stdout
    assert index_snapshot(index_path) == before
    index = Index(index_path)
    try:
        assert check(index) == []
    finally:
        index.close()
    # What the stopped ingest wrote is for gc: orphan chunks, or the manifests of the
    # group whose commit failed (kept, and their chunks with them: the re-run adopts them).
    dry = archive.run("gc", "--grace", "0")
    assert re.search(r"gc: (?!0 orphans)\d+ orphans|[1-9]\d* manifests not in this index",
                     dry.stdout), dry.stdout
    assert "dry run, nothing deleted" in dry.stdout
    assert index_snapshot(index_path) == before


def finish_and_read(archive: Archive, series_dir: Path, index_path: Path) -> None:
    archive.run("gc", "--grace", "0", "--delete")
    again = archive.ingest(series_dir / "ct")
    assert "12 ingested, 0 skipped" in again.stdout
    clean = archive.run("gc", "--grace", "0")
    assert "gc: 0 orphans" in clean.stdout and " 0 manifests not in this index" in clean.stdout
    assert "index: consistent, 18 instances" in archive.run("verify").stdout
    with archive.mounted() as m:
        assert sorted(sha256_file(p) for p in files_under(m / "patients")) == sorted(
            sha256_file(p) for p in files_under(series_dir))
