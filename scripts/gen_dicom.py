#!/usr/bin/env python3
"""Deterministic synthetic DICOM for the demo, the tests and the benchmark.

    python scripts/gen_dicom.py DEST [--total-mb N] [--large-mb M] [--patients P] [--seed S]

builds ``DEST/<issuer>_<PatientID>/<study>/<series>/IMG00001.dcm`` and prints one
summary line.  From Python (``sys.path.insert(0, "scripts"); import gen_dicom``):
:func:`write_series`, :func:`write_large_instance`, :func:`make_archive` and
:func:`pydicom_test_files`.

The same arguments always give byte-identical files: every UID and every pixel is
derived from the seed and the identifying arguments.  Pixels come from a 3-D
ellipsoid phantom (a thorax-abdomen of sorts) plus noise, so that they compress
like real images (zstd about 3x) rather than like noise (1x) or zeros (100x).
Sizes in MB are MiB.

Pixel data is streamed after a header written by pydicom, so a 600 MB multi-frame
instance is never held in memory as one byte string.
"""

from __future__ import annotations

import argparse
import hashlib
import struct
import sys
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian

MIB = 2**20
UID_ROOT = "1.2.826.0.1.3680043.10.1234."
IMPLEMENTATION_UID = UID_ROOT + "0.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
MULTIFRAME_WORD_SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7.3"
SOP_CLASS_BY_MODALITY = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE}
PIXEL_DATA_TAG = 0x7FE00010
LARGE_FRAME_SIZE = 512  # rows and columns of each frame of a large instance
MAX_VALUE = 4095  # BitsStored 12


def make_uid(*parts: object) -> str:
    """A valid DICOM UID (<= 64 characters) under :data:`UID_ROOT`, derived from ``parts``."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    digits = str(int.from_bytes(digest[:16], "big"))  # no leading zero, as UIDs require
    return UID_ROOT + digits[: 64 - len(UID_ROOT)]


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


# --- pixels ----------------------------------------------------------------------------------

# Ellipsoids in a [-1, 1]^3 volume: centre (x, y, z), half-axes (x, y, z) and the value each
# adds where it is, in stored units for CT (HU + 1024) and for MR.  Later ones sit inside
# earlier ones, as in the Shepp-Logan phantom.
ELLIPSOIDS: tuple[tuple[float, float, float, float, float, float, int, int], ...] = (
    (0.00, 0.00, 0.0, 0.85, 0.62, 1.6, 1064, 420),  # body (soft tissue, 40 HU)
    (-0.38, -0.05, 0.55, 0.28, 0.38, 0.6, -750, -330),  # right lung
    (0.38, -0.05, 0.55, 0.26, 0.36, 0.6, -750, -330),  # left lung
    (0.08, -0.08, 0.35, 0.20, 0.17, 0.3, 30, 90),  # heart
    (-0.30, 0.02, -0.40, 0.35, 0.30, 0.4, 25, 60),  # liver
    (0.00, 0.40, 0.0, 0.09, 0.09, 1.6, 700, -250),  # spine
    (0.05, 0.25, 0.1, 0.05, 0.05, 1.2, 160, 200),  # aorta (contrast)
    (-0.25, 0.30, -0.55, 0.08, 0.12, 0.15, 20, 120),  # right kidney
    (0.25, 0.30, -0.55, 0.08, 0.12, 0.15, 20, 120),  # left kidney
)
NOISE = {"CT": 12, "MR": 8}  # half-width of the uniform noise, in stored units


@dataclass(frozen=True)
class Phantom:
    """Slices of a jittered ellipsoid phantom: the costly geometry is computed once."""

    distances: tuple[np.ndarray, ...]  # per ellipsoid: normalised squared in-plane distance
    z_centres: np.ndarray
    z_radii: np.ndarray
    values: np.ndarray  # int16, one per ellipsoid
    shading: np.ndarray  # int16, a smooth field added inside the body
    noise: int

    @classmethod
    def build(cls, rows: int, cols: int, modality: str, seed: object) -> Phantom:
        """A phantom of ``rows`` x ``cols`` slices, its shapes slightly varied by ``seed``."""
        rng = _rng("phantom", seed)
        params = np.array(ELLIPSOIDS, dtype=np.float64)
        params[:, :6] *= rng.uniform(0.95, 1.05, size=(len(ELLIPSOIDS), 6))
        y, x = np.mgrid[-1 : 1 : rows * 1j, -1 : 1 : cols * 1j].astype(np.float32)
        distances = tuple(
            ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 for cx, cy, _, ax, ay, *_ in params
        )
        column = 6 if modality == "CT" else 7
        shading = (25 * np.cos(2.5 * x + rng.uniform(0, 6)) * np.cos(1.5 * y)).astype(np.int16)
        return cls(
            distances=distances,
            z_centres=params[:, 2],
            z_radii=params[:, 5],
            values=params[:, column].astype(np.int16),
            shading=shading,
            noise=NOISE.get(modality, 10),
        )

    def slice(self, z: float, rng: np.random.Generator) -> np.ndarray:
        """The uint16 slice at height ``z`` in [-1, 1], with fresh noise from ``rng``."""
        image = rng.integers(-self.noise, self.noise + 1, self.shading.shape, dtype=np.int16)
        # An ellipsoid's cross-section at z is its ellipse scaled by sqrt(1 - (dz/rz)^2).
        limits = 1.0 - ((z - self.z_centres) / self.z_radii) ** 2
        parts = zip(self.distances, limits, self.values, strict=True)
        for index, (distance, limit, value) in enumerate(parts):
            if limit > 0:
                inside = distance <= limit
                image += inside * value
                if index == 0:  # the body
                    image += inside * self.shading
        np.clip(image, 0, MAX_VALUE, out=image)
        return image.view(np.uint16)


# --- writing ---------------------------------------------------------------------------------


def _time_of_day(uid: str) -> str:
    """A plausible HHMMSS during working hours, derived from ``uid``."""
    minutes = int(hashlib.sha256(uid.encode()).hexdigest()[:8], 16) % (11 * 60)
    return f"{7 + minutes // 60:02d}{minutes % 60:02d}00"


def _base_dataset(
    *,
    sop_class_uid: str,
    patient_id: str,
    patient_name: str,
    study_uid: str,
    series_uid: str,
    series_number: int,
    modality: str,
    rows: int,
    cols: int,
    study_description: str,
    series_description: str,
    study_date: str,
    accession: str,
    institution_name: str,
    issuer: str | None,
    charset: str | None,
    extra: dict[str, Any] | None,
) -> Dataset:
    """The tags shared by every instance of a series; per-instance tags are set by the caller."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = UID(IMPLEMENTATION_UID)
    ds.file_meta.ImplementationVersionName = "ANIMFS_GEN_1"
    if charset is not None:
        ds.SpecificCharacterSet = charset  # set first: pydicom encodes text with it on write
    ds.SOPClassUID = sop_class_uid
    ds.StudyDate = ds.SeriesDate = study_date
    ds.StudyTime = ds.SeriesTime = _time_of_day(study_uid)
    ds.AccessionNumber = accession
    ds.Modality = modality
    ds.Manufacturer = "animfs synthetic"
    ds.InstitutionName = institution_name
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    if issuer is not None:
        ds.IssuerOfPatientID = issuer
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.SliceThickness = 1.0
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.FrameOfReferenceUID = make_uid("frame-of-reference", study_uid)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [round(350 / cols, 4)] * 2
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if modality == "CT":
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    return ds


def _write_file(path: Path, ds: Dataset, frames: Iterable[np.ndarray], n_bytes: int) -> None:
    """Write ``ds`` as a Part-10 file followed by PixelData streamed from ``frames``.

    pydicom writes the header; the PixelData element (always the last one here) is written
    by hand so that its value, possibly hundreds of MB, never exists as one byte string.
    """
    if any(tag >= PIXEL_DATA_TAG for tag in ds.keys()):
        raise ValueError(f"{path}: tags at or after PixelData cannot be set")
    if n_bytes >= 2**32 - 1:
        raise ValueError(f"{path}: {n_bytes} bytes of pixel data do not fit one element")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    written = 0
    with open(path, "wb") as f:
        pydicom.dcmwrite(f, ds, enforce_file_format=True)
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, n_bytes))
        for frame in frames:
            f.write(frame.astype("<u2", copy=False).data)
            written += frame.nbytes
    if written != n_bytes:
        raise AssertionError(f"{path}: wrote {written} pixel bytes, promised {n_bytes}")


def _slice_heights(n: int) -> np.ndarray:
    return np.linspace(-0.9, 0.9, n) if n > 1 else np.zeros(1)


def write_series(
    dest: Path,
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str | None = None,
    series_number: int = 1,
    modality: str = "CT",
    n_slices: int = 20,
    rows: int = 256,
    cols: int = 256,
    study_description: str = "",
    series_description: str = "",
    study_date: str = "20240101",
    accession: str = "",
    institution_name: str = "",
    issuer: str | None = None,
    charset: str | None = None,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> list[Path]:
    """Write one series of ``n_slices`` CT or MR Image Storage files into the folder ``dest``.

    Files are ``dest/IMG00001.dcm``...; the paths are returned in instance order.  Without
    ``study_uid`` one is derived from the seed and the patient, date and accession.  Names
    and other text are encoded with ``charset`` (a SpecificCharacterSet such as
    ``"ISO_IR 100"`` or ``"ISO_IR 192"``) when given; ``extra`` sets further tags by keyword.
    """
    if modality not in SOP_CLASS_BY_MODALITY:
        raise ValueError(f"modality {modality!r} is not one of {sorted(SOP_CLASS_BY_MODALITY)}")
    if study_uid is None:
        study_uid = make_uid("study", seed, issuer, patient_id, study_date, accession)
    series_uid = make_uid("series", seed, study_uid, series_number, modality, series_description)
    ds = _base_dataset(
        sop_class_uid=SOP_CLASS_BY_MODALITY[modality],
        patient_id=patient_id,
        patient_name=patient_name,
        study_uid=study_uid,
        series_uid=series_uid,
        series_number=series_number,
        modality=modality,
        rows=rows,
        cols=cols,
        study_description=study_description,
        series_description=series_description,
        study_date=study_date,
        accession=accession,
        institution_name=institution_name,
        issuer=issuer,
        charset=charset,
        extra=extra,
    )
    phantom = Phantom.build(rows, cols, modality, series_uid)
    rng = _rng("pixels", series_uid)
    thickness = 300 / max(n_slices, 1)  # the phantom spans about 300 mm
    ds.SliceThickness = round(thickness, 3)
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, z in enumerate(_slice_heights(n_slices), start=1):
        ds.SOPInstanceUID = make_uid("instance", series_uid, number)
        ds.InstanceNumber = number
        location = round(float(z) * 150, 3)
        ds.SliceLocation = location
        ds.ImagePositionPatient = [-175, -175, location]
        path = dest / f"IMG{number:05d}.dcm"
        _write_file(path, ds, [phantom.slice(float(z), rng)], rows * cols * 2)
        paths.append(path)
    return paths


def write_large_instance(
    path: Path,
    *,
    size_mb: int,
    patient_id: str,
    patient_name: str,
    seed: int = 0,
    study_uid: str | None = None,
    series_number: int = 1,
    modality: str = "CT",
    study_description: str = "",
    series_description: str = "",
    study_date: str = "20240101",
    accession: str = "",
    institution_name: str = "",
    issuer: str | None = None,
    charset: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write one Multi-frame Grayscale Word Secondary Capture instance of about ``size_mb`` MiB.

    It holds ``2 * size_mb`` frames of 512 x 512 uint16 (a phantom volume), streamed to
    ``path`` one frame at a time.  The other arguments mean what they mean for
    :func:`write_series`.
    """
    n_frames = max(1, size_mb * MIB // (LARGE_FRAME_SIZE * LARGE_FRAME_SIZE * 2))
    if study_uid is None:
        study_uid = make_uid("study", seed, issuer, patient_id, study_date, accession)
    series_uid = make_uid("series", seed, study_uid, series_number, "large", series_description)
    ds = _base_dataset(
        sop_class_uid=MULTIFRAME_WORD_SC_STORAGE,
        patient_id=patient_id,
        patient_name=patient_name,
        study_uid=study_uid,
        series_uid=series_uid,
        series_number=series_number,
        modality=modality,
        rows=LARGE_FRAME_SIZE,
        cols=LARGE_FRAME_SIZE,
        study_description=study_description,
        series_description=series_description,
        study_date=study_date,
        accession=accession,
        institution_name=institution_name,
        issuer=issuer,
        charset=charset,
        extra=extra,
    )
    heights = _slice_heights(n_frames)
    ds.SOPInstanceUID = make_uid("instance", series_uid, 1)
    ds.InstanceNumber = 1
    ds.ConversionType = "WSD"
    ds.NumberOfFrames = n_frames
    ds.FrameIncrementPointer = Tag("SliceLocationVector")
    ds.SliceLocationVector = [round(float(z) * 150, 3) for z in heights]
    ds.SliceThickness = round(300 / n_frames, 4)
    phantom = Phantom.build(LARGE_FRAME_SIZE, LARGE_FRAME_SIZE, modality, series_uid)
    rng = _rng("pixels", series_uid)
    frames = (phantom.slice(float(z), rng) for z in heights)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_file(path, ds, frames, n_frames * LARGE_FRAME_SIZE * LARGE_FRAME_SIZE * 2)
    return path


# --- a whole archive -------------------------------------------------------------------------


@dataclass(frozen=True)
class PatientTemplate:
    """Who a synthetic patient is; see :data:`PATIENTS`."""

    patient_id: str
    issuer: str
    name: str
    charset: str | None
    institution: str


# The first two share a PatientID, as the four hospitals' local IDs do; the next two need a
# SpecificCharacterSet.  Beyond this list, patients get plain generated names.
PATIENTS = (
    PatientTemplate("100234", "CHL", "Schmit^Marie", None, "Centre Hospitalier de Luxembourg"),
    PatientTemplate("100234", "HRS", "Weber^Paul", None, "Hopitaux Robert Schuman"),
    PatientTemplate(
        "A-77812", "CHEM", "Müller^Jürgen", "ISO_IR 100", "Centre Hospitalier Émile Mayrisch"
    ),
    PatientTemplate("0045521", "CHdN", "山田^太郎", "ISO_IR 192", "Centre Hospitalier du Nord"),
    PatientTemplate(
        "556102", "CHL", "Παπαδόπουλος^Νίκος", "ISO_IR 192", "Centre Hospitalier de Luxembourg"
    ),
)
INSTITUTIONS = tuple(dict.fromkeys((p.issuer, p.institution) for p in PATIENTS[:4]))
STUDY_KINDS = {
    "CT": ("CT THORAX/ABDOMEN", ("Thorax 1.0 B30f", "Abdomen 3.0 B31f", "Thorax 5.0 B70f")),
    "MR": ("MR KNIE LINKS", ("T1 SE sag", "T2 TSE cor", "PD FS tra")),
}
PREFERRED_SIZE = {"CT": 512, "MR": 256}
MIN_SLICES = 8  # below this many slices per series, smaller images are used


def _patient(index: int) -> PatientTemplate:
    if index < len(PATIENTS):
        return PATIENTS[index]
    issuer, institution = INSTITUTIONS[index % len(INSTITUTIONS)]
    return PatientTemplate(f"9{index:05d}", issuer, f"Test^Patient{index:03d}", None, institution)


@dataclass(frozen=True)
class _SeriesPlan:
    folder: Path
    patient: PatientTemplate
    study_index: int
    series_number: int
    modality: str
    study_description: str
    series_description: str
    study_date: str
    accession: str


def _plan(dest: Path, patients: int, seed: int) -> list[_SeriesPlan]:
    """Decide every series of the archive (but not its size) from the seed."""
    rng = _rng("archive", seed)
    plans: list[_SeriesPlan] = []
    for index in range(patients):
        patient = _patient(index)
        for study_index in range(1, int(rng.integers(1, 3)) + 1):
            modality = "CT" if rng.random() < 0.6 else "MR"
            study_description, series_descriptions = STUDY_KINDS[modality]
            day = np.datetime64("2018-01-01") + rng.integers(0, 7 * 365)
            study_date = str(day).replace("-", "")
            # Every third study has no accession number, as happens with outside studies.
            accession = "" if len(plans) % 3 == 2 else f"ACC{rng.integers(10**6, 10**7)}"
            study_folder = dest / f"{patient.issuer}_{patient.patient_id}" / f"study{study_index}"
            for series_number in range(1, int(rng.integers(1, 4)) + 1):
                plans.append(
                    _SeriesPlan(
                        folder=study_folder / f"{series_number:03d}_{modality}",
                        patient=patient,
                        study_index=study_index,
                        series_number=series_number,
                        modality=modality,
                        study_description=study_description,
                        series_description=series_descriptions[series_number - 1],
                        study_date=study_date,
                        accession=accession,
                    )
                )
    return plans


def _image_size(modality: str, budget: int) -> int:
    """The largest square size (512, 256, 128 or 64) that fits MIN_SLICES in ``budget``."""
    size = PREFERRED_SIZE[modality]
    while size > 64 and budget < MIN_SLICES * size * size * 2:
        size //= 2
    return size


def make_archive(
    dest: Path, *, total_mb: int = 100, large_mb: int = 0, patients: int = 4, seed: int = 0
) -> list[Path]:
    """Build a realistic archive of about ``total_mb`` MiB under ``dest``; return its files.

    ``patients`` patients (the first two share a PatientID under different issuers; the
    third and fourth have accented and UTF-8 names) each have 1-2 studies of 1-3 CT or MR
    series.  With ``large_mb`` > 0 the first patient also gets a study holding one
    multi-frame instance of that size, counted in the total.
    """
    files: list[Path] = []
    if large_mb > 0:
        patient = _patient(0)
        files.append(
            write_large_instance(
                dest / f"{patient.issuer}_{patient.patient_id}" / "large" / "IMG00001.dcm",
                size_mb=large_mb,
                patient_id=patient.patient_id,
                patient_name=patient.name,
                seed=seed,
                study_description="CT ANGIO VOLUME",
                series_description="Volume 0.5 mm",
                study_date="20240305",
                accession="ACC9000001",
                institution_name=patient.institution,
                issuer=patient.issuer,
                charset=patient.charset,
            )
        )
    remaining = max(0, total_mb * MIB - sum(f.stat().st_size for f in files))
    plans = _plan(dest, patients, seed)
    for left, plan in zip(range(len(plans), 0, -1), plans, strict=True):
        budget = remaining // left  # what earlier series left over is spread over the rest
        size = _image_size(plan.modality, budget)
        patient = plan.patient
        series = write_series(
            plan.folder,
            patient_id=patient.patient_id,
            patient_name=patient.name,
            study_uid=make_uid("study", seed, patient.issuer, patient.patient_id, plan.study_index),
            series_number=plan.series_number,
            modality=plan.modality,
            n_slices=max(1, budget // (size * size * 2 + 1500)),  # ~1.5 kB of header each
            rows=size,
            cols=size,
            study_description=plan.study_description,
            series_description=plan.series_description,
            study_date=plan.study_date,
            accession=plan.accession,
            institution_name=patient.institution,
            issuer=patient.issuer,
            charset=patient.charset,
            seed=seed,
        )
        remaining -= sum(f.stat().st_size for f in series)
        files.extend(series)
    return files


# --- pydicom's own test files ----------------------------------------------------------------

REQUIRED_TAGS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID")


def _readable_with_ids(path: Path) -> str | None:
    """The SOPInstanceUID of ``path`` if pydicom reads it and it has REQUIRED_TAGS, else None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about many deliberately odd files
            ds = pydicom.dcmread(path)
    except Exception:  # whatever pydicom fails on, the file is not usable here
        return None
    if not all(ds.get(keyword) for keyword in REQUIRED_TAGS):
        return None
    return str(ds.SOPInstanceUID)


def pydicom_test_files(unique_sop: bool = False) -> list[Path]:
    """pydicom's bundled test files that read cleanly and have non-empty REQUIRED_TAGS.

    The package folder ``pydicom/data/test_files`` is walked directly: pydicom's own
    ``get_testdata_files`` may try to download further files.  Several files hold the same
    instance (one SOPInstanceUID) in different transfer syntaxes; with ``unique_sop`` only
    the first of each, in path order, is kept, so that all can be ingested side by side.
    """
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    found: list[Path] = []
    seen: set[str] = set()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        sop_uid = _readable_with_ids(path)
        if sop_uid is None or (unique_sop and sop_uid in seen):
            continue
        seen.add(sop_uid)
        found.append(path)
    return found


# --- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Build an archive under DEST and print one summary line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, metavar="DEST")
    parser.add_argument("--total-mb", type=int, default=100, help="about this many MiB in all")
    parser.add_argument("--large-mb", type=int, default=0, help="one multi-frame instance")
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    files = make_archive(
        args.dest,
        total_mb=args.total_mb,
        large_mb=args.large_mb,
        patients=args.patients,
        seed=args.seed,
    )
    seconds = time.perf_counter() - start
    total = sum(f.stat().st_size for f in files)
    print(
        f"gen_dicom: {len(files)} files, {total} bytes ({total / MIB:.1f} MiB) "
        f"under {args.dest} in {seconds:.1f} s ({total / MIB / seconds:.0f} MiB/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
