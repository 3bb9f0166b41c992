"""The /cd tree: each patient as a DICOM medium (DICOMDIR, README.TXT, DICOM/...).

Layer 1: the DICOMDIR builder alone, read back by pydicom's FileSet and
dicom3tools' ``dciodvfy``.  Layer 3: real mounts, read with pydicom, dcmtk
(``dcmdump``, ``dcmmkdir``), ``dciodvfy``, ``stat`` and ``cmp``; a new study
arriving under a mounted medium; ``animfs export-cd``; and the access matrix
of tests/test_access_mount.py through /cd.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pydicom
from pydicom.fileset import FileSet
from test_access_mount import (  # noqa: F401  (world is a fixture)
    ADMIN,
    BACKUP,
    CHL_DR,
    CHL_PATIENT,
    HRS_DR,
    HRS_PATIENT,
    NOBODY,
    World,
    audit_lines,
    list_as,
    open_as,
    world,
)

from animfs.dicom import Instance
from animfs.media import README, Entry, build_dicomdir

from conftest import Archive, files_under, gen_dicom, sha256_file

COMPONENT = re.compile(r"[A-Z0-9_]{1,8}")


def instance(**fields: object) -> Instance:
    base = Instance(
        patient_id="P9", issuer="GEN", patient_name="Müller^Jörg", study_uid="1.2.3",
        study_date="20240102", study_time="", accession="A1", study_description="Kopf",
        series_uid="1.2.3.1", series_number=None, modality="", series_description="",
        sop_uid="1.2.3.1.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", instance_number=None,
        institution_name="", transfer_syntax="1.2.840.10008.1.2.1", charset="ISO_IR 192",
    )
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


def validate(path: Path) -> str:
    """dicom3tools' verdict on a DICOMDIR: its error and warning lines ("" when clean)."""
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return "\n".join(line for line in (out.stdout + out.stderr).splitlines()
                     if line.startswith(("Error", "Warning")))


def reachable(ds: pydicom.Dataset) -> int:
    """How many records the offsets reach from the root, each reached once."""
    at = {r.seq_item_tell: r for r in ds.DirectoryRecordSequence}
    seen: set[int] = set()
    todo = [ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity]
    while todo:
        offset = todo.pop()
        while offset:
            assert offset not in seen and offset in at, offset
            seen.add(offset)
            record = at[offset]
            if record.OffsetOfReferencedLowerLevelDirectoryEntity:
                todo.append(record.OffsetOfReferencedLowerLevelDirectoryEntity)
            offset = record.OffsetOfTheNextDirectoryRecord
    return len(seen)


def test_dicomdir_builder_records_offsets_and_invented_keys(tmp_path: Path) -> None:
    entries = [
        Entry(instance(sop_uid=f"1.2.3.{r}.{i}", series_uid=f"1.2.3.{r}",
                       study_uid="1.2.3" if r < 3 else "1.2.4",
                       instance_number=i if r == 1 else None),
              1 if r < 3 else 2, r if r < 3 else 1, i)
        for r in (1, 2, 3) for i in (1, 2, 3)
    ]
    data = build_dicomdir("GEN-P9", entries)
    path = tmp_path / "DICOMDIR"
    path.write_bytes(data)
    assert build_dicomdir("GEN-P9", entries) == data  # deterministic
    assert validate(path) == ""
    ds = pydicom.dcmread(path)
    assert ds.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.1.3.10"
    kinds = [r.DirectoryRecordType for r in ds.DirectoryRecordSequence]
    assert kinds.count("PATIENT") == 1 and kinds.count("STUDY") == 2
    assert kinds.count("SERIES") == 3 and kinds.count("IMAGE") == 9
    assert reachable(ds) == len(ds.DirectoryRecordSequence)
    patient = ds.DirectoryRecordSequence[0]
    assert str(patient.PatientName) == "Müller^Jörg" and patient.PatientID == "P9"
    studies = [r for r in ds.DirectoryRecordSequence if r.DirectoryRecordType == "STUDY"]
    assert [(s.StudyDate, s.StudyTime, s.StudyID) for s in studies] == [
        ("20240102", "000000", "1"), ("20240102", "000000", "2")]
    series = [r for r in ds.DirectoryRecordSequence if r.DirectoryRecordType == "SERIES"]
    assert [(s.Modality, s.SeriesNumber) for s in series] == [("OT", 1), ("OT", 2), ("OT", 1)]
    images = [r for r in ds.DirectoryRecordSequence if r.DirectoryRecordType == "IMAGE"]
    assert list(images[4].ReferencedFileID) == ["DICOM", "ST000001", "SE000002", "IM000002"]
    assert images[4].InstanceNumber == 2  # invented from the file ID
    assert sorted(i.ReferencedSOPInstanceUIDInFile for i in images) == sorted(
        e.instance.sop_uid for e in entries)
    for image in images:
        assert all(COMPONENT.fullmatch(c) for c in image.ReferencedFileID)


def test_dicomdir_of_5000_instances_is_built_from_headers(tmp_path: Path) -> None:
    entries = [Entry(instance(sop_uid=f"1.2.3.1.{i}", instance_number=i), 1, 1, i)
               for i in range(1, 5001)]
    path = tmp_path / "DICOMDIR"
    path.write_bytes(build_dicomdir("GEN-P9", entries))
    ds = pydicom.dcmread(path)
    assert len(ds.DirectoryRecordSequence) == 5003
    assert reachable(ds) == 5003
    assert ds.DirectoryRecordSequence[-1].ReferencedFileID[-1] == "IM005000"


# -- through a real mount ------------------------------------------------------------------


def medium_of(m: Path) -> Path:
    media = sorted((m / "cd").iterdir())
    assert len(media) == 1, media
    return media[0]


def sop_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def file_ids(dicomdir: Path) -> dict[str, str]:
    """SOPInstanceUID -> file ID ("DICOM/ST.../SE.../IM...") as the DICOMDIR lists them."""
    ds = pydicom.dcmread(dicomdir)
    return {str(r.ReferencedSOPInstanceUIDInFile): "/".join(r.ReferencedFileID)
            for r in ds.DirectoryRecordSequence if r.DirectoryRecordType == "IMAGE"}


def record_keys(dicomdir: Path) -> set[tuple[str, ...]]:
    """The required keys of each record, to compare with dcmmkdir's own DICOMDIR."""
    ds = pydicom.dcmread(dicomdir)
    keys = {
        "PATIENT": ("PatientID", "PatientName"),
        "STUDY": ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber"),
        "SERIES": ("SeriesInstanceUID", "Modality", "SeriesNumber"),
        "IMAGE": ("ReferencedSOPInstanceUIDInFile", "ReferencedSOPClassUIDInFile",
                  "ReferencedTransferSyntaxUIDInFile", "ReferencedFileID", "InstanceNumber"),
    }
    return {(r.DirectoryRecordType, *(str(r.get(k, "")) for k in keys[r.DirectoryRecordType]))
            for r in ds.DirectoryRecordSequence}


def test_cd_is_a_valid_medium_of_the_same_files(
    archive: Archive, series_dir: Path, tmp_path: Path
) -> None:
    archive.ingest(series_dir / "ct")
    originals = {sop_of(p): sha256_file(p) for p in files_under(series_dir / "ct")}
    with archive.mounted() as m:
        top = sorted(os.listdir(m.path))
        assert "cd" in top
        cd = medium_of(m.path)
        assert cd.name == next((m / "patients").iterdir()).name
        assert sorted(os.listdir(cd)) == ["DICOM", "DICOMDIR", "README.TXT"]
        assert (cd / "README.TXT").read_bytes() == README
        dicomdir = cd / "DICOMDIR"
        data = dicomdir.read_bytes()
        assert os.stat(dicomdir).st_size == len(data)

        # pydicom's FileSet: every referenced file resolves and is the original, and is
        # the /patients file itself (same inode).
        fs = FileSet(dicomdir)
        assert len(fs) == len(originals) == 12
        by_sop = {sop_of(p): p for p in files_under(m / "patients")}
        for item in fs:
            path = Path(item.path)
            assert path.is_relative_to(cd / "DICOM")
            parts = path.relative_to(cd).parts
            assert len(parts) <= 8 and all(COMPONENT.fullmatch(c) for c in parts), parts
            assert sha256_file(path) == originals[item.SOPInstanceUID]
            assert os.stat(path).st_ino == os.stat(by_sop[item.SOPInstanceUID]).st_ino
            assert os.stat(path).st_size == os.stat(by_sop[item.SOPInstanceUID]).st_size
        assert os.stat(by_sop[item.SOPInstanceUID]).st_nlink == 2  # /patients and /cd
        du = subprocess.run(["du", "-sbc", str(m / "patients"), str(m / "cd")],
                            capture_output=True, text=True, timeout=60, check=True)
        total = int(du.stdout.splitlines()[-1].split()[0])  # each inode counted once
        assert total == sum(p.stat().st_size for p in files_under(series_dir / "ct")) + len(
            data) + len(README)
        found = subprocess.run(["find", str(cd / "DICOM"), "-type", "f"], capture_output=True,
                               text=True, timeout=60, check=True).stdout.split()
        assert len(found) == 12
        inodes = subprocess.run(["stat", "-c", "%i", *found], capture_output=True, text=True,
                                timeout=60, check=True).stdout.split()
        assert set(inodes) == {str(os.stat(p).st_ino) for p in by_sop.values()}
        assert subprocess.run(["cmp", found[0], str(by_sop[sop_of(Path(found[0]))])],
                              timeout=60).returncode == 0

        # dcmtk reads it; dicom3tools finds nothing to object to.
        dump = subprocess.run(["dcmdump", str(dicomdir)], capture_output=True, text=True,
                              timeout=60)
        assert dump.returncode == 0, dump.stderr
        assert dump.stdout.count("DirectoryRecordType") == 15  # patient, study, series, 12
        assert "MediaStorageDirectoryStorage" in dump.stdout
        assert validate(dicomdir) == ""
        # dcmmkdir checks each file against the profile and its file ID, and, updating
        # (without writing) our DICOMDIR, finds every file already recorded.
        update = subprocess.run(["dcmmkdir", "+U", "-nb", "-w", "+r", "DICOM"], cwd=cd,
                                capture_output=True, text=True, timeout=120)
        assert update.returncode == 0, update.stderr
        lines = update.stderr.splitlines()
        assert not [line for line in lines if line.startswith(("E:", "F:"))], update.stderr
        assert sum("record for this SOP instance already exists" in line
                   for line in lines) == 12
        # dcmmkdir's own DICOMDIR of the same files has the same records and keys.
        copy = tmp_path / "copy"
        shutil.copytree(cd, copy)
        (copy / "DICOMDIR").chmod(0o644)
        (copy / "DICOMDIR").unlink()
        made = subprocess.run(["dcmmkdir", "+r", "DICOM"], cwd=copy, capture_output=True,
                              text=True, timeout=120)
        assert made.returncode == 0, made.stderr
        assert record_keys(copy / "DICOMDIR") == record_keys(dicomdir)

        # export-cd writes the same medium to a folder.
        exported = tmp_path / "export"
        # the issuer: the file's InstitutionName, as no [institutions] entry maps it
        result = archive.run("export-cd", "--patient", "Hospital A-P001", str(exported))
        assert "12 files" in result.stdout
        ours = sorted(str(p.relative_to(cd)) for p in cd.rglob("*"))
        theirs = sorted(str(p.relative_to(exported)) for p in exported.rglob("*"))
        assert ours == theirs
        for rel in ours:
            if (cd / rel).is_file():
                assert (cd / rel).read_bytes() == (exported / rel).read_bytes(), rel
    refused = archive.run("export-cd", "--patient", "NOPE-1", str(tmp_path / "x"), check=False)
    assert refused.returncode == 2 and "no patient NOPE-1" in refused.stderr


def test_new_study_joins_the_medium_and_old_file_ids_stay(
    archive: Archive, tmp_path: Path
) -> None:
    first = gen_dicom.write_series(tmp_path / "s1", patient_id="P7", patient_name="Doe^John",
                                   n_slices=3, rows=16, cols=16, study_date="20240301",
                                   institution_name="Hospital A", seed=7)
    archive.ingest(tmp_path / "s1")
    with archive.mounted() as m:
        cd = medium_of(m.path)
        before = file_ids(cd / "DICOMDIR")
        assert sorted(before.values()) == [f"DICOM/ST000001/SE000001/IM00000{i}" for i in (1, 2, 3)]
        size_before = os.stat(cd / "DICOMDIR").st_size
        # An older study arrives later: under /patients it sorts first.
        later = gen_dicom.write_series(tmp_path / "s2", patient_id="P7", patient_name="Doe^John",
                                       n_slices=2, rows=16, cols=16, study_date="20200101",
                                       institution_name="Hospital A", seed=8)
        archive.ingest(tmp_path / "s2")
        assert os.stat(cd / "DICOMDIR").st_size > size_before
        after = file_ids(cd / "DICOMDIR")
        assert {k: after[k] for k in before} == before  # old file IDs unchanged
        assert sorted(v for k, v in after.items() if k not in before) == [
            "DICOM/ST000002/SE000001/IM000001", "DICOM/ST000002/SE000001/IM000002"]
        assert len(FileSet(cd / "DICOMDIR")) == 5
        assert sorted(os.listdir(cd / "DICOM")) == ["ST000001", "ST000002"]
        for path in [*first, *later]:
            sop = sop_of(path)
            assert sha256_file(cd / after[sop]) == sha256_file(path)
        assert validate(cd / "DICOMDIR") == ""
    with archive.mounted() as m:  # a fresh mount: the same IDs, from the index
        assert file_ids(medium_of(m.path) / "DICOMDIR") == after


# -- access through /cd: the matrix of test_access_mount.py ------------------------------


def cd_of(w: World, patient: str) -> Path:
    return w.mount / "cd" / w.patient_dir(patient).name


def cd_image(w: World, patient: str) -> Path:
    return cd_of(w, patient) / "DICOM" / "ST000001" / "SE000001" / "IM000001"


def cd_opens(w: World) -> list[tuple[object, ...]]:
    return [(e["uid"], str(e["path"]).rsplit("/", 1)[-1], e["decision"], e["rule"])
            for e in audit_lines(w.archive) if e["event"] == "open"]


def test_cd_access_matrix(world: World) -> None:  # noqa: F811
    a = world.archive
    first_sha = {}
    for patient in (CHL_PATIENT, HRS_PATIENT):  # the /patients file, as backup reads it
        got = open_as(BACKUP, world.file_of(patient))
        assert got["sha"] in world.sources
        first_sha[patient] = got["sha"]
    skipped = len(cd_opens(world))

    # backup: everything, DICOMDIR included, byte-identical.
    for patient in (CHL_PATIENT, HRS_PATIENT):
        assert open_as(BACKUP, cd_image(world, patient)) == {"sha": first_sha[patient]}
        got = open_as(BACKUP, cd_of(world, patient) / "DICOMDIR")
        assert "sha" in got
    assert len(list_as(BACKUP, world.mount / "cd")["names"]) == 2  # type: ignore[arg-type]

    # a clinician: own patient only, the other hidden as under /patients.
    assert list_as(CHL_DR, world.mount / "cd") == {"names": [world.patient_dir(CHL_PATIENT).name]}
    assert open_as(CHL_DR, cd_image(world, CHL_PATIENT)) == {"sha": first_sha[CHL_PATIENT]}
    assert "sha" in open_as(CHL_DR, cd_of(world, CHL_PATIENT) / "DICOMDIR")
    assert open_as(CHL_DR, cd_image(world, HRS_PATIENT)) == {"errno": 13}
    assert open_as(CHL_DR, cd_of(world, HRS_PATIENT) / "DICOMDIR") == {"errno": 13}
    assert list_as(CHL_DR, cd_of(world, HRS_PATIENT)) == {"errno": 13}
    assert open_as(CHL_DR, world.mount / "cd" / "HRS-P999_X") == {"errno": 13}
    assert open_as(BACKUP, world.mount / "cd" / "HRS-P999_X") == {"errno": 2}

    a.run("consent", "grant", "--patient", HRS_PATIENT, "--to", "CHL")
    assert len(list_as(CHL_DR, world.mount / "cd")["names"]) == 2  # type: ignore[arg-type]
    assert open_as(CHL_DR, cd_image(world, HRS_PATIENT)) == {"sha": first_sha[HRS_PATIENT]}
    assert "sha" in open_as(CHL_DR, cd_of(world, HRS_PATIENT) / "DICOMDIR")
    assert open_as(HRS_DR, cd_of(world, CHL_PATIENT) / "DICOMDIR") == {"errno": 13}
    a.run("consent", "revoke", "--patient", HRS_PATIENT, "--to", "CHL")
    assert open_as(CHL_DR, cd_of(world, HRS_PATIENT) / "DICOMDIR") == {"errno": 13}

    # admin lists, opens nothing; unmapped uids and root get nothing at all.
    assert len(list_as(ADMIN, world.mount / "cd")["names"]) == 2  # type: ignore[arg-type]
    assert open_as(ADMIN, cd_of(world, CHL_PATIENT) / "DICOMDIR") == {"errno": 13}
    assert open_as(ADMIN, cd_image(world, CHL_PATIENT)) == {"errno": 13}
    for uid in (NOBODY, 0):
        assert list_as(uid, world.mount / "cd") == {"errno": 13}
        assert open_as(uid, cd_of(world, CHL_PATIENT) / "DICOMDIR") == {"errno": 13}
    # README.TXT names no patient: anyone who may see the folder may read it.
    assert open_as(ADMIN, cd_of(world, CHL_PATIENT) / "README.TXT") == {
        "sha": hashlib.sha256(README).hexdigest()}

    # Every open of a CD file or DICOMDIR is in the audit log, decided by the same rules.
    log = cd_opens(world)[skipped:]
    dicomdir_lines = [line for line in log if line[1] == "DICOMDIR"]
    assert [line for line in dicomdir_lines if line[2] == "allow"] == [
        (BACKUP, "DICOMDIR", "allow", "backup"),
        (BACKUP, "DICOMDIR", "allow", "backup"),
        (CHL_DR, "DICOMDIR", "allow", "own-institution"),
        (CHL_DR, "DICOMDIR", "allow", "consent"),
    ]
    assert (ADMIN, "DICOMDIR", "deny", "admin") in dicomdir_lines
    # A refused name may be stopped at lookup (no line) or, when the kernel still has
    # it from another uid's walk, at the open: then with its rule.
    rules = {CHL_DR: "no-consent", HRS_DR: "no-consent", ADMIN: "admin", NOBODY: "unmapped",
             0: "unmapped"}
    for uid, _name, decision, rule in dicomdir_lines:
        assert decision == "allow" or rule == rules[uid], (uid, rule)  # type: ignore[index]
    image_lines = [line for line in log if line[1] != "DICOMDIR"]
    assert (CHL_DR, world.file_of(HRS_PATIENT).name, "allow", "consent") in image_lines
    assert (ADMIN, world.file_of(CHL_PATIENT).name, "deny", "admin") in image_lines
    paths = [e["path"] for e in audit_lines(a) if e["event"] == "open"
             and str(e["path"]).endswith("/DICOMDIR")]
    assert paths and all(str(p).startswith("/cd/") for p in paths)
