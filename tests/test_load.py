"""The mount under load: 16 readers at once, while the preferred site goes away and comes back.

Every read must be byte-identical, none may fail (EIO), the mount log must show
no handler exception, and the mount's memory must stay bounded: its peak RSS
(VmHWM) is printed, and checked against the caches it was given plus a margin.
The caches are kept small, so that most reads go to the sites.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import threading
import time
from pathlib import Path

import gen_dicom
from conftest import Archive, files_under, sha256_file, wait_for

READERS = 16
SECONDS = 12.0
AWAY = (3.0, 7.0)  # site-a is gone between these seconds of the run
MEMORY_BYTES = 8 << 20
MEMORY_MARGIN = 320 << 20  # interpreter, pyfuse3, trio, boto3, reads in flight


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_sixteen_readers_while_a_site_goes_and_comes_back(
    archive: Archive, series_dir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "load"
    for i in range(3):
        gen_dicom.write_series(src / f"s{i}", patient_id=f"LOAD{i}", patient_name=f"Load^{i}",
                               n_slices=40, rows=64, cols=64, series_number=i + 1, seed=40 + i)
    for i in range(2):
        gen_dicom.write_large_instance(src / f"big{i}" / "big.dcm", size_mb=9, seed=50 + i,
                                       patient_id=f"LOAD{i}", patient_name=f"Load^{i}")
    archive.ingest(src, series_dir)
    originals = {sha256_file(p) for p in [*files_under(src), *files_under(series_dir)]}
    text = archive.config.read_text()
    text = text.replace("max_bytes = 10_000_000_000", "max_bytes = 4_000_000")
    text = text.replace("memory_bytes = 268_435_456", f"memory_bytes = {MEMORY_BYTES}")
    archive.config.write_text(text)

    site, away = archive.dir / "site-a", archive.dir / "site-a.away"
    with archive.mounted() as m:
        served = files_under(m / "patients")
        assert len(served) == len(originals)
        big = [p for p in served if p.stat().st_size > 4 << 20]
        assert len(big) == 2
        stop = threading.Event()
        errors: list[str] = []
        reads = [0] * READERS
        during_outage = [0]
        outage = threading.Event()

        def reader(n: int) -> None:
            rng = random.Random(n)
            while not stop.is_set():
                path = rng.choice(big) if rng.random() < 0.2 else rng.choice(served)
                digest = hashlib.sha256()
                try:
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # past the page cache
                        while block := os.read(fd, rng.choice((65536, 131072, 1 << 20))):
                            digest.update(block)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    errors.append(f"{path.name}: {errno.errorcode.get(exc.errno or 0)}")
                    continue
                if digest.hexdigest() not in originals:
                    errors.append(f"{path.name}: wrong bytes")
                reads[n] += 1
                if outage.is_set():
                    during_outage[0] += 1

        threads = [threading.Thread(target=reader, args=(n,)) for n in range(READERS)]
        start = time.monotonic()
        for t in threads:
            t.start()
        try:
            time.sleep(AWAY[0])
            site.rename(away)  # the preferred site is gone: reads must go to site-b
            outage.set()
            time.sleep(AWAY[1] - AWAY[0])
            outage.clear()
            away.rename(site)
            time.sleep(max(0.0, SECONDS - (time.monotonic() - start)))
        finally:
            stop.set()
            if away.exists():
                away.rename(site)
            for t in threads:
                t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
        hwm = peak_rss(m.proc.pid)
        wait_for(lambda: "site-a: answers again" in m.log_text(), 15, "site-a to come back")
        log = m.log_text()
    print(f"\n{sum(reads)} reads by {READERS} readers in {SECONDS:.0f} s "
          f"({during_outage[0]} while site-a was gone); mount peak RSS {hwm / 2**20:.0f} MiB")
    assert errors == [], errors[:20]
    assert sum(reads) >= 200 and during_outage[0] >= 20 and min(reads) > 0, reads
    assert "site site-a: marked down" in log
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    assert hwm < MEMORY_BYTES + MEMORY_MARGIN, hwm
