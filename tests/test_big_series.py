"""A series of more than a thousand files: its listing (one value in the index) is
grown across several ingests, and the mount lists, looks up, stats and reads every
file, under /patients and /cd, as ingested."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from pathlib import Path

import pydicom
import pytest

from animfs.index import Index, check
from animfs.manifest import instance_key

from conftest import Archive, gen_dicom

SLICES = 1_100


@pytest.fixture(scope="module")
def big_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("big")
    return gen_dicom.write_series(root / "ct", patient_id="B001", patient_name="Big^Series",
                                  n_slices=SLICES, rows=16, cols=16, seed=7)


def test_a_series_of_1100_files_grown_in_three_ingests(
    archive: Archive, big_series: list[Path]
) -> None:
    # Three ingests (of several commit groups each) into the same series, out of order.
    parts = [big_series[400:800], big_series[:400], big_series[800:]]
    for i, part in enumerate(parts):
        folder = archive.dir / f"part{i}"
        folder.mkdir()
        for path in part:
            os.link(path, folder / path.name)
        archive.ingest(folder)
    sops = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in big_series}
    originals = {sop: hashlib.sha256(p.read_bytes()).hexdigest() for sop, p in sops.items()}

    index = Index(archive.dir / "index")
    try:
        assert check(index) == []
        placed = {sop: index.manifest(instance_key(sop)) for sop in sops}
    finally:
        index.close()
    assert all(m is not None for m in placed.values())
    first = next(m for m in placed.values() if m is not None).placement
    series = Path("patients", first.patient_name, first.study_name, first.series_name)

    with archive.mounted() as m:
        listed = os.listdir(m / str(series))
        expected = {m_.placement.file_name: m_ for m_ in placed.values() if m_ is not None}
        assert len(listed) == SLICES and set(listed) == set(expected)
        assert [n.encode() for n in listed] == sorted(n.encode() for n in listed)  # name order
        ls = subprocess.run(["ls", "-l", str(m / str(series))], capture_output=True, text=True,
                            timeout=60, check=True).stdout
        assert len(ls.splitlines()) == SLICES + 1  # "total" and a line per file
        for name, manifest in expected.items():
            st = os.stat(m / str(series) / name)
            assert (st.st_ino, st.st_size) == (manifest.placement.file_ino, manifest.size)
            assert st.st_mtime_ns == manifest.ingested_ns and st.st_nlink == 2
            data = (m / str(series) / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == originals[manifest.instance.sop_uid]
        with pytest.raises(OSError) as missing:
            os.stat(m / str(series) / "00001_1.2.3.dcm")
        assert missing.value.errno == errno.ENOENT

        # /cd: one IM file per instance, numbered in the order they were committed,
        # each the same file (inode) as under /patients.
        cd_series = next((m / "cd").iterdir()) / "DICOM" / "ST000001" / "SE000001"
        images = sorted(os.listdir(cd_series))
        assert images == [f"IM{n:06d}" for n in range(1, SLICES + 1)]
        by_ino = {mf.placement.file_ino: mf for mf in expected.values()}
        committed = sorted(by_ino.values(), key=lambda mf: mf.ingested_ns)
        for number in (1, 400, 401, 800, 801, SLICES):
            st = os.stat(cd_series / f"IM{number:06d}")
            assert by_ino[st.st_ino] is committed[number - 1]
        with pytest.raises(OSError) as beyond:
            os.stat(cd_series / f"IM{SLICES + 1:06d}")
        assert beyond.value.errno == errno.ENOENT
        dump = subprocess.run(["dcmdump", "+P", "SOPInstanceUID", str(cd_series / "IM000401")],
                              capture_output=True, text=True, timeout=60, check=True).stdout
        assert committed[400].instance.sop_uid in dump
    verify = archive.run("verify")
    assert "index: consistent" in verify.stdout + verify.stderr


def test_a_series_grown_while_mounted_lists_its_new_files(
    archive: Archive, big_series: list[Path]
) -> None:
    # The mount keeps the listings it has read (index.Index: listing.Cache); an ingest
    # by another process into a series it has listed must show at the next listing.
    parts = [big_series[:300], big_series[300:420]]
    for i, part in enumerate(parts):
        folder = archive.dir / f"part{i}"
        folder.mkdir()
        for path in part:
            os.link(path, folder / path.name)
    archive.ingest(archive.dir / "part0")
    with archive.mounted() as m:
        patient = next((m / "patients").iterdir())
        series = next(next(patient.iterdir()).iterdir())
        before = os.listdir(series)
        assert len(before) == 300
        (series / before[0]).read_bytes()  # opened: its record is kept too
        archive.ingest(archive.dir / "part1")
        after = os.listdir(series)
        assert len(after) == 420 and set(before) < set(after)
        assert [n.encode() for n in after] == sorted(n.encode() for n in after)
        new = sorted(set(after) - set(before))
        for name in (new[0], new[-1]):
            assert os.stat(series / name).st_size > 0
            assert (series / name).read_bytes()[128:132] == b"DICM"
        ls = subprocess.run(["ls", "-l", str(series)], capture_output=True, text=True,
                            timeout=60, check=True).stdout
        assert len(ls.splitlines()) == 420 + 1
