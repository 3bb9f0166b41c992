"""The synthetic DICOM generator (scripts/gen_dicom.py) that the demo, tests and benchmark use."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import zstandard
from pydicom.uid import UID, ExplicitVRLittleEndian

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import gen_dicom  # noqa: E402

DCMDUMP = shutil.which("dcmdump")


def _assert_valid_uid(value: str) -> None:
    assert UID(value).is_valid, value
    assert value.startswith(gen_dicom.UID_ROOT)


@pytest.mark.parametrize(
    ("modality", "charset", "name", "encoded"),
    [
        ("CT", "ISO_IR 100", "Müller^Jürgen", "Müller^Jürgen".encode("latin-1")),
        ("MR", "ISO_IR 192", "山田^太郎", "山田^太郎".encode()),
    ],
)
def test_series_round_trips_through_pydicom(
    tmp_path: Path, modality: str, charset: str, name: str, encoded: bytes
) -> None:
    paths = gen_dicom.write_series(
        tmp_path / "series",
        patient_id="PAT-1",
        patient_name=name,
        series_number=7,
        modality=modality,
        n_slices=3,
        rows=32,
        cols=48,
        study_description="CT THORAX/ABDOMEN",
        series_description="Thorax 1.0",
        study_date="20230415",
        accession="ACC42",
        institution_name="Hôpital Kirchberg",
        issuer="CHL",
        charset=charset,
        extra={"PatientSex": "F"},
    )

    assert [p.name for p in paths] == ["IMG00001.dcm", "IMG00002.dcm", "IMG00003.dcm"]
    datasets = [pydicom.dcmread(p) for p in paths]
    for number, (path, ds) in enumerate(zip(paths, datasets, strict=True), start=1):
        raw = path.read_bytes()
        assert raw[:132] == bytes(128) + b"DICM"
        assert encoded in raw  # the name is stored in the charset, not just decoded back
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == gen_dicom.SOP_CLASS_BY_MODALITY[modality]
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert ds.SpecificCharacterSet == charset
        assert ds.PatientName == name
        assert ds.InstitutionName == "Hôpital Kirchberg"
        assert (ds.PatientID, ds.IssuerOfPatientID, ds.PatientSex) == ("PAT-1", "CHL", "F")
        assert (ds.Modality, ds.SeriesNumber, ds.InstanceNumber) == (modality, 7, number)
        assert (ds.StudyDate, ds.AccessionNumber) == ("20230415", "ACC42")
        assert ds.StudyDescription == "CT THORAX/ABDOMEN"
        assert ds.SeriesDescription == "Thorax 1.0"
        assert len(ds.StudyTime) == 6
        assert ds.ImagePositionPatient[2] == ds.SliceLocation
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            _assert_valid_uid(uid)
        pixels = ds.pixel_array
        assert (pixels.shape, pixels.dtype.name) == ((32, 48), "uint16")
        assert 0 < pixels.max() <= 4095
        assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 12, 0)
    assert len({ds.SOPInstanceUID for ds in datasets}) == 3
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.SliceLocation for ds in datasets}) == 3


def test_large_instance_is_multiframe_of_the_asked_size(tmp_path: Path) -> None:
    path = gen_dicom.write_large_instance(
        tmp_path / "large.dcm", size_mb=2, patient_id="PAT-2", patient_name="Big^Volume"
    )

    assert 2 * gen_dicom.MIB < path.stat().st_size < 2 * gen_dicom.MIB + 64 * 1024
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == gen_dicom.MULTIFRAME_WORD_SC_STORAGE
    assert ds.NumberOfFrames == 4
    assert ds.pixel_array.shape == (4, 512, 512)
    assert len(ds.SliceLocationVector) == 4


@pytest.mark.skipif(DCMDUMP is None, reason="dcmtk's dcmdump is not installed")
@pytest.mark.parametrize("large", [False, True])
def test_dcmdump_reads_generated_files(tmp_path: Path, large: bool) -> None:
    if large:
        path = gen_dicom.write_large_instance(
            tmp_path / "large.dcm",
            size_mb=1,
            patient_id="DUMP-77",
            patient_name="Dump^Test",
            issuer="HRS",
        )
    else:
        path = gen_dicom.write_series(
            tmp_path,
            patient_id="DUMP-77",
            patient_name="Dump^Test",
            issuer="HRS",
            n_slices=1,
            rows=16,
            cols=16,
        )[0]

    assert DCMDUMP is not None
    result = subprocess.run([DCMDUMP, str(path)], capture_output=True, text=True, check=False)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # dcmdump prints its warnings and errors here
    assert "(0010,0020) LO [DUMP-77]" in result.stdout
    assert "(0010,0021) LO [HRS]" in result.stdout


def test_archive_has_unique_uids_and_colliding_patient_ids(tmp_path: Path) -> None:
    files = gen_dicom.make_archive(tmp_path, total_mb=5, seed=0)

    total = sum(f.stat().st_size for f in files)
    assert 4.5 * gen_dicom.MIB < total <= 5 * gen_dicom.MIB
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(files)
    issuers_by_id: dict[str, set[str]] = {}
    for ds in datasets:
        issuers_by_id.setdefault(ds.PatientID, set()).add(ds.IssuerOfPatientID)
    assert issuers_by_id["100234"] == {"CHL", "HRS"}
    assert {ds.get("SpecificCharacterSet") for ds in datasets} == {None, "ISO_IR 100", "ISO_IR 192"}
    assert {str(ds.PatientName) for ds in datasets} >= {"Müller^Jürgen", "山田^太郎"}
    # A study belongs to one patient, however the patients' IDs collide.
    patients = {(ds.StudyInstanceUID, ds.IssuerOfPatientID, ds.PatientID) for ds in datasets}
    assert len(patients) == len({ds.StudyInstanceUID for ds in datasets})


def test_archive_is_deterministic(tmp_path: Path) -> None:
    first = gen_dicom.make_archive(tmp_path / "a", total_mb=1, large_mb=1, seed=5)
    again = gen_dicom.make_archive(tmp_path / "b", total_mb=1, large_mb=1, seed=5)
    other = gen_dicom.make_archive(tmp_path / "c", total_mb=1, large_mb=1, seed=6)

    assert [p.relative_to(tmp_path / "a") for p in first] == [
        p.relative_to(tmp_path / "b") for p in again
    ]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, again, strict=True))
    assert {pydicom.dcmread(p).SOPInstanceUID for p in first}.isdisjoint(
        pydicom.dcmread(p).SOPInstanceUID for p in other
    )


def test_series_compresses_like_real_imaging(tmp_path: Path) -> None:
    paths = gen_dicom.write_series(
        tmp_path, patient_id="Z", patient_name="Zstd^Ratio", n_slices=20, rows=256, cols=256
    )
    data = b"".join(p.read_bytes() for p in paths)

    ratio = len(data) / len(zstandard.ZstdCompressor(level=3).compress(data))

    assert 1.5 < ratio < 10


def test_tags_after_pixel_data_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="PixelData"):
        gen_dicom.write_series(
            tmp_path,
            patient_id="X",
            patient_name="X^Y",
            n_slices=1,
            extra={"DataSetTrailingPadding": b"\0\0"},
        )


def test_pydicom_test_files_are_readable_and_unique_by_sop(tmp_path: Path) -> None:
    every = gen_dicom.pydicom_test_files()
    unique = gen_dicom.pydicom_test_files(unique_sop=True)

    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in unique]
    assert len(unique) > 50
    assert set(unique) < set(every)  # pydicom holds some instances in several encodings
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(unique)
    for ds in datasets:
        assert all(ds.get(keyword) for keyword in gen_dicom.REQUIRED_TAGS)
