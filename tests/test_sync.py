"""Several mount hosts over the same two S3 sites: ``animfs sync`` through real mounts.

Host A and host B are two archives (own config, own index, own host name) whose
sites are the same two moto buckets and whose key file is the same.  What one
ingests, the other serves after a sync: the same names and inode numbers
(``ls -liR`` equal), the same bytes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import gen_dicom
from conftest import Archive, MotoServer, files_under, sha256_file

PREFIX = "archive"
TREES = ("patients", "studies", "by-date", "by-modality")


@pytest.fixture
def hosts(s3: list[MotoServer]) -> Iterator[tuple[Archive, Archive]]:
    """Two hosts, "host-a" and "host-b", sharing two fresh S3 buckets and one key."""
    made = []
    buckets = [server.bucket() for server in s3]
    try:
        for host in ("host-a", "host-b"):
            directory = Path(tempfile.mkdtemp(prefix=f"animfs-{host}-"))
            directory.chmod(0o755)
            archive = Archive(directory)
            made.append(archive)
            text = archive.config.read_text()
            for name, server, bucket in zip(("site-a", "site-b"), s3, buckets, strict=True):
                text, n = re.subn(
                    rf'name = "{name}"\nurl = "[^"]*"',
                    f'name = "{name}"\nurl = "s3://{bucket}/{PREFIX}"\n'
                    f'endpoint_url = "{server.endpoint}"\nregion = "us-east-1"',
                    text,
                )
                assert n == 1
            archive.config.write_text(text)
            archive.append_config(f'[sync]\nhost = "{host}"\ninterval = 0')
        shutil.copy(made[0].dir / "animfs.key", made[1].dir / "animfs.key")
        yield made[0], made[1]
    finally:
        for archive in made:
            archive.close()
            shutil.rmtree(archive.dir, ignore_errors=True)


def listing(mount: Path) -> dict[str, str]:
    """``ls -liR`` of each tree of the archive, as the kernel shows it."""
    out = {}
    for tree in TREES:
        result = subprocess.run(
            ["ls", "-liR", "--time-style=full-iso", str(mount / tree)],
            capture_output=True, text=True, timeout=60, check=True,
        )
        out[tree] = result.stdout.replace(str(mount), "MNT")
    return out


def series(dest: Path, patient: str, study: str, n: int, **kw: object) -> list[Path]:
    return gen_dicom.write_series(
        dest, patient_id=patient, patient_name="Müller^Anne", study_uid=study, n_slices=n,
        rows=32, cols=32, **kw,  # type: ignore[arg-type]
    )


def sync(archive: Archive) -> str:
    return archive.run("sync").stdout


def test_ingest_on_a_sync_on_b_same_tree_and_bytes(
    hosts: tuple[Archive, Archive], tmp_path: Path
) -> None:
    a, b = hosts
    files = series(tmp_path / "s1", "P1", "1.2.3.1", 4, accession="ACC1")
    files += series(tmp_path / "s2", "P2", "1.2.3.2", 3, modality="MR", accession="ACC2")
    a.ingest(tmp_path)
    first = sync(b)
    assert "7 instances added" in first, first
    again = sync(b)  # incremental: nothing new is read twice
    assert "0 instances added, 0 already here" in again, again
    # More on A: B's next sync reads only A's new log object.
    files += series(tmp_path / "s3", "P1", "1.2.3.1", 2, series_number=2, accession="ACC1")
    a.ingest(tmp_path / "s3")
    later = sync(b)
    assert "2 instances added, 0 already here" in later and "1 log objects" in later, later

    sources = {sha256_file(f) for f in files}
    with a.mounted() as ma, b.mounted() as mb:
        assert listing(ma.path) == listing(mb.path)
        on_b = files_under(mb.path / "patients")
        assert len(on_b) == 9
        assert {sha256_file(f) for f in on_b} == sources
    status = json.loads(b.run("status").stdout)
    assert status["sync"]["host"] == "host-b"
    assert status["sync"]["last"]["added"] == 2
    assert status["index"]["instances"] == 9


def test_concurrent_ingest_on_both_hosts_then_sync_both(
    hosts: tuple[Archive, Archive], tmp_path: Path
) -> None:
    a, b = hosts
    # The same patient on both hosts; two different studies with the same date,
    # accession and description: both hosts give out the same new study folder name.
    on_a = series(tmp_path / "a1", "P9", "1.2.9.1", 5, accession="SAME")
    on_a += series(tmp_path / "a2", "P7", "1.2.7.1", 3)
    on_b = series(tmp_path / "b1", "P9", "1.2.9.2", 4, accession="SAME", seed=1)
    on_b += series(tmp_path / "b2", "P8", "1.2.8.1", 3, seed=2)
    procs = [
        subprocess.Popen(
            [*host.command(), "ingest", str(tmp_path / d1), str(tmp_path / d2)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for host, d1, d2 in ((a, "a1", "a2"), (b, "b1", "b2"))
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, out + err
    assert "7 instances added" in sync(a)
    assert "8 instances added" in sync(b)

    with a.mounted() as ma, b.mounted() as mb:
        trees = listing(ma.path)
        assert trees == listing(mb.path)
        studies = sorted(p.name for p in (ma.path / "patients").glob("*P9*/*"))
        assert len(studies) == 2
        # The study whose UID sorts first keeps the plain name; the other is suffixed.
        assert studies[0] == "20240101_SAME", studies
        assert studies[1].startswith("20240101_SAME~"), studies
        assert len(list((ma.path / "patients").glob("*P9*/20240101_SAME/*/*"))) == 5
        for mount in (ma, mb):
            got = {sha256_file(f) for f in files_under(mount.path / "patients")}
            assert got == {sha256_file(f) for f in on_a + on_b}
            # Every /studies link and view link leads to its folder.
            for link in (mount.path / "studies").iterdir():
                assert link.resolve().is_dir(), link
    for host in (a, b):
        result = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; "
             "from animfs import config, index; "
             "i = index.Index(config.load(sys.argv[1]).index_path); "
             "print(index.check(i))", str(host.config)],
            capture_output=True, text=True, timeout=60, check=True,
        )
        assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_consent_given_on_a_reaches_b(hosts: tuple[Archive, Archive], tmp_path: Path) -> None:
    a, b = hosts
    series(tmp_path / "s", "P5", "1.2.5.1", 2, issuer="HOSP")
    a.ingest(tmp_path)
    sync(b)
    assert "HOSP-P5" not in b.run("consent", "list").stdout
    a.run("consent", "grant", "--patient", "HOSP-P5", "--to", "all")
    out = sync(b)
    assert "access state of 1 patients" in out, out
    assert "HOSP-P5" in b.run("consent", "list").stdout
    assert "access state of 0 patients" in sync(b)
