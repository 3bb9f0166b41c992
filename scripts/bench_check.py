#!/usr/bin/env python3
"""What the index consistency check (animfs.index.check, run by 'animfs verify') costs.

    .venv/bin/python scripts/bench_check.py [--instances N] [--repeat R]

Builds an index of N synthetic instances (100 per series, 4 series per study, 2
studies per patient) in a temporary folder, then times, R times each, in the same
run: the baseline, the walk 'animfs verify' already made over the index before
this check existed (Index.manifests(), each parsed: repair.referenced), and
check() itself, which 'verify' now runs first.  Prints the medians and
their ratio, and check()'s cost per instance.  The machine is shared: medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from animfs.chunks import ChunkRef  # noqa: E402
from animfs.dicom import Instance  # noqa: E402
from animfs.index import Index, check  # noqa: E402
from animfs.manifest import Manifest, Placement  # noqa: E402

UNPLACED = Placement("", "", "", "", 0, 0, 0, 0, "", 0)


def manifest(i: int) -> Manifest:
    series, study, patient = i // 100, i // 400, i // 800
    inst = Instance(
        patient_id=f"B{patient}", issuer="BENCH", patient_name=f"Bench^{patient}",
        study_uid=f"1.2.3.{study}", study_date="20240101", study_time="080000",
        accession="", study_description="Bench", series_uid=f"1.2.3.{study}.{series}",
        series_number=series % 4 + 1, modality="CT", series_description="",
        sop_uid=f"1.2.3.{study}.{series}.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        instance_number=i % 100 + 1, institution_name="", transfer_syntax="1.2.840.10008.1.2.1",
        charset="",
    )
    chunk = ChunkRef(f"{i:064x}", 524_288, 200_000)
    return Manifest(inst, "BENCH", 524_288, f"{i:064x}", (chunk,), 1_700_000_000 + i, UNPLACED)


def timed(fn: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", type=int, default=50_000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        index = Index(Path(tmp) / "index")
        try:
            for start in range(0, args.instances, 5000):
                batch = [manifest(i) for i in range(start, min(start + 5000, args.instances))]
                index.commit_group(batch, lambda placed: [])
            assert check(index) == [], check(index)[:5]

            def baseline() -> None:
                for data in index.manifests():
                    Manifest.from_bytes(data)

            base = timed(baseline, args.repeat)
            full = timed(lambda: check(index), args.repeat)
        finally:
            index.close()
    n = args.instances
    print(f"{n} instances, medians of {args.repeat}: verify's walk of the index "
          f"{base:.2f} s, check() {full:.2f} s: {full / base:.1f}x the baseline, "
          f"{full / n * 1e6:.0f} us per instance")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
