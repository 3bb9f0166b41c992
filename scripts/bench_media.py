"""Benchmark: building the DICOMDIR of a patient with 5,000 instances.

Fills a fresh index (no chunk data: the DICOMDIR needs only the headers in
the manifests) with one patient of 5 studies x 4 series x 250 instances, then
times, as medians of several runs on this shared, noisy machine:

- the whole build as the mount does it (:func:`animfs.cdtree.build`: read the
  patient's manifests from LMDB, parse them, write the DICOMDIR),
- the encoding alone (:func:`animfs.media.build_dicomdir`),
- against baselines measured in the same run: pydicom parsing that same
  DICOMDIR (``dcmread`` and every record), and pydicom's own ``FileSet``
  writing a DICOMDIR for the first ``--fileset`` instances (default 200: it
  stages a file per instance, about a minute per thousand; 0 skips it).

Usage: .venv/bin/python scripts/bench_media.py [--instances 5000] [--repeat 7] [--fileset 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from animfs import cdtree, media  # noqa: E402
from animfs.dicom import Instance  # noqa: E402
from animfs.index import PATIENTS_INO, Index  # noqa: E402
from animfs.manifest import Manifest, Placement  # noqa: E402


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fill(index: Index, count: int) -> None:
    base = Instance(
        patient_id="BENCH", issuer="GEN", patient_name="Bench^Patient", study_uid="",
        study_date="20240101", study_time="101010", accession="ACC", study_description="Bench",
        series_uid="", series_number=1, modality="CT", series_description="Axial", sop_uid="",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", instance_number=None, institution_name="",
        transfer_syntax="1.2.840.10008.1.2.1", charset="", study_id="1",
    )
    empty = Placement("", "", "", "", 0, 0, 0, 0, "", 0)
    per_series = max(1, count // 20)
    manifests = []
    for i in range(count):
        study, series = i // (per_series * 4), (i // per_series) % 4
        inst = dataclasses.replace(
            base, study_uid=f"1.2.9.{study}", series_uid=f"1.2.9.{study}.{series}",
            series_number=series + 1, sop_uid=f"1.2.9.{study}.{series}.{i}",
            instance_number=i % per_series + 1,
        )
        manifests.append(Manifest(inst, "GEN", 1000, "0" * 64, (), 1_700_000_000 * 10**9 + i,
                                  empty))
    index.add_many(manifests)


def fileset_build(entries: list[media.Entry]) -> None:
    """pydicom's FileSet writing a DICOMDIR for the same instances (its own records)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.fileset import FileSet
    from pydicom.uid import ExplicitVRLittleEndian

    fs = FileSet()
    for e in entries:
        ds = Dataset()
        inst = e.instance
        ds.PatientID, ds.PatientName = inst.patient_id, inst.patient_name
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = inst.study_uid, "20240101", "101010"
        ds.StudyID, ds.AccessionNumber, ds.StudyDescription = "1", "ACC", "Bench"
        ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber = inst.series_uid, "CT", 1
        ds.SOPInstanceUID, ds.SOPClassUID = inst.sop_uid, inst.sop_class_uid
        ds.InstanceNumber = e.image
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = inst.sop_class_uid
        ds.file_meta.MediaStorageSOPInstanceUID = inst.sop_uid
        fs.add(ds)
    with tempfile.TemporaryDirectory() as tmp:
        fs.write(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--fileset", type=int, default=200, help="instances for FileSet (0: skip)")
    args = parser.parse_args()
    import pydicom

    with tempfile.TemporaryDirectory() as tmp:
        index = Index(Path(tmp) / "index", map_size=1 << 30)
        try:
            fill(index, args.instances)
            patient = index.entries(PATIENTS_INO, None, 1)[0]
            built = cdtree.build(index, patient)
            rows = index.media_manifests(patient.ino)
            entries = [
                media.Entry(Manifest.from_bytes(d).instance, s, r, i) for s, r, i, d in rows
            ]
            full = median_seconds(lambda: cdtree.build(index, patient), args.repeat)
            encode = median_seconds(
                lambda: media.build_dicomdir("GEN-BENCH", entries), args.repeat
            )
            def parse() -> None:
                ds = pydicom.dcmread(io.BytesIO(built.data))
                assert all(r.DirectoryRecordType for r in ds.DirectoryRecordSequence)

            read = median_seconds(parse, args.repeat)
            print(f"instances: {len(entries)}, DICOMDIR: {len(built.data) / 1e6:.2f} MB")
            print(f"build from the index (median of {args.repeat}): {full * 1000:.0f} ms "
                  f"(encoding alone {encode * 1000:.0f} ms)")
            print(f"pydicom parsing the same DICOMDIR: {read * 1000:.0f} ms; "
                  f"build / parse = {full / read:.2f}")
            if args.fileset:
                some = entries[: args.fileset]
                fileset = median_seconds(lambda: fileset_build(some), 1)
                ours = median_seconds(lambda: media.build_dicomdir("GEN-BENCH", some), 3)
                print(f"pydicom FileSet writing a DICOMDIR of the first {len(some)} (1 run): "
                      f"{fileset * 1000:.0f} ms, ours {ours * 1000:.1f} ms: "
                      f"{fileset / ours:.0f}x")
        finally:
            index.close()


if __name__ == "__main__":
    main()
