#!/usr/bin/env python3
"""Fill an animfs index with N synthetic instances, fast: scale without 400 TB of storage.

    gen_index.py --config animfs.toml 1000000     # into that config's index
    gen_index.py --index /tmp/idx 10000           # into a bare LMDB folder

Patients, studies, series and instances get a realistic fan-out (1-4 studies per
patient; CT, MR, CR, DX, US, MG, PT studies with their usual series counts and
sizes; four hospitals whose PatientIDs collide), names with accents, and tags;
no chunk data is written (chunk ids are made up), so the mount lists, stats and
opens (with access control) every file, but a read fails.  Deterministic for a
given --seed; a second run adds N more (new patients) to the same index.

Instances go in through :meth:`Index.bulk_add`: placed here (names and hashed
inodes are unique by construction, as ingest would have given them), one
transaction per --batch instances, folder counts summed per batch.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from animfs import config as config_mod  # noqa: E402
from animfs.chunks import CHUNK_SIZE, ChunkRef  # noqa: E402
from animfs.dicom import Instance, safe_name  # noqa: E402
from animfs.index import Index, hashed_ino  # noqa: E402
from animfs.manifest import Manifest, Placement  # noqa: E402

ROOT_UID = "1.2.826.0.1.3680043.8.498."
HOSPITALS = [
    ("CHL", "Centre Hospitalier de Luxembourg"),
    ("HRS", "Hôpitaux Robert Schuman"),
    ("CHEM", "Centre Hospitalier Emile Mayrisch"),
    ("CHdN", "Centre Hospitalier du Nord"),
]
FAMILY = [
    "Muller",
    "Schmit",
    "Weber",
    "Wagner",
    "Hoffmann",
    "Thill",
    "Majerus",
    "Kieffer",
    "Reuter",
    "Schroeder",
    "Köhler",
    "Gonçalves",
    "Da Silva",
    "Lefèvre",
    "Ferreira",
]
GIVEN = ["Anne", "Marie", "Jean", "Paul", "Léa", "Luc", "Sophie", "Tom", "Inês", "Noémie"]
# modality: (weight, (min, max) series, (min, max) instances per series, bytes per instance,
#            descriptions)
STUDIES = {
    "CT": (20, (2, 6), (40, 400), 525_000, ["CT THORAX", "CT ABDOMEN", "CT HEAD"]),
    "MR": (12, (4, 10), (20, 200), 200_000, ["MR BRAIN", "MR KNEE", "MR SPINE"]),
    "CR": (30, (1, 2), (1, 2), 9_000_000, ["CHEST PA", "HAND", "KNEE"]),
    "DX": (15, (1, 3), (1, 2), 8_000_000, ["THORAX", "BASSIN"]),
    "US": (10, (1, 1), (5, 40), 600_000, ["ECHO ABDO", "ECHO COEUR"]),
    "MG": (8, (1, 1), (4, 4), 30_000_000, ["MAMMO DEPISTAGE"]),
    "PT": (5, (2, 3), (100, 300), 180_000, ["PET-CT FDG"]),
}
SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
}
SERIES_NAMES = ["AXIAL", "CORONAL", "SAGITTAL", "T1", "T2", "FLAIR", "DWI", "SCOUT", "DOSE"]


def _fake_hex(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def instances(n: int, seed: int, start_ns: int) -> Iterator[Manifest]:
    """``n`` placed manifests, patient by patient (a patient's last study may be cut)."""
    rng = random.Random(seed)
    kinds = list(STUDIES)
    weights = [STUDIES[k][0] for k in kinds]
    made = 0
    patient_no = 0
    t = start_ns
    while made < n:
        patient_no += 1
        code, inst_name = HOSPITALS[rng.randrange(len(HOSPITALS))]
        pid = f"{seed % 1000:03d}{patient_no:08d}"
        pname = f"{rng.choice(FAMILY)}^{rng.choice(GIVEN)}"
        p_name = safe_name(f"{code}-{pid}_{pname}")
        p_ino = hashed_ino(f"P\0{code}-{pid}".encode())
        for study_no in range(1 + min(3, int(rng.expovariate(1.2)))):
            if made >= n:
                break
            modality = rng.choices(kinds, weights)[0]
            _w, series_range, inst_range, size, descs = STUDIES[modality]
            study_uid = f"{ROOT_UID}{seed}.{patient_no}.{study_no + 1}"
            date = f"{2015 + rng.randrange(10)}{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}"
            accession = f"A{seed % 1000:03d}{patient_no:08d}{study_no}"
            desc = rng.choice(descs)
            s_name = safe_name(f"{date}_{accession}_{desc}")
            s_ino = hashed_ino(f"S\0{study_uid}".encode())
            link_name = safe_name(study_uid)
            link_ino = hashed_ino(f"L\0{study_uid}".encode())
            for series_no in range(1, rng.randint(*series_range) + 1):
                if made >= n:
                    break
                series_uid = f"{study_uid}.{series_no}"
                series_desc = rng.choice(SERIES_NAMES)
                r_name = safe_name(f"{series_no:03d}_{modality}_{series_desc}")
                r_ino = hashed_ino(f"R\0{series_uid}".encode())
                for number in range(1, rng.randint(*inst_range) + 1):
                    if made >= n:
                        break
                    sop_uid = f"{series_uid}.{number}"
                    inst = Instance(
                        patient_id=pid,
                        issuer=code,
                        patient_name=pname,
                        study_uid=study_uid,
                        study_date=date,
                        study_time="101500",
                        accession=accession,
                        study_description=desc,
                        series_uid=series_uid,
                        series_number=series_no,
                        modality=modality,
                        series_description=series_desc,
                        sop_uid=sop_uid,
                        sop_class_uid=SOP_CLASS[modality],
                        instance_number=number,
                        institution_name=inst_name,
                        transfer_syntax="1.2.840.10008.1.2.1",
                        charset="ISO_IR 192",
                        study_id=str(study_no + 1),
                    )
                    file_name = f"{number:05d}_{sop_uid}.dcm"
                    refs = []
                    left, k = size, 0
                    while left > 0:
                        part = min(left, CHUNK_SIZE)
                        refs.append(ChunkRef(_fake_hex(sop_uid, str(k)), part, part * 6 // 10))
                        left, k = left - part, k + 1
                    t += 1000
                    made += 1
                    yield Manifest(
                        instance=inst,
                        institution=code,
                        size=size,
                        sha256=_fake_hex(sop_uid),
                        chunks=tuple(refs),
                        ingested_ns=t,
                        placement=Placement(
                            p_name,
                            s_name,
                            r_name,
                            file_name,
                            p_ino,
                            s_ino,
                            r_ino,
                            hashed_ino(f"I\0{sop_uid}".encode()),
                            link_name,
                            link_ino,
                        ),
                    )


def fill(
    index: Index, n: int, *, seed: int = 1, batch: int = 20_000, progress: bool = False
) -> float:
    """Add ``n`` generated instances to ``index``; returns the seconds it took."""
    start = time.monotonic()
    pending: list[Manifest] = []
    done = 0
    for manifest in instances(n, seed, time.time_ns() - n * 1000):
        pending.append(manifest)
        if len(pending) >= batch:
            done += index.bulk_add(pending)
            pending.clear()
            if progress:
                rate = done / (time.monotonic() - start)
                print(f"\r{done:,} instances, {rate:,.0f}/s", end="", file=sys.stderr, flush=True)
    done += index.bulk_add(pending)
    if progress:
        print(file=sys.stderr)
    return time.monotonic() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("count", type=int, help="instances to add")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="fill this config's index")
    where.add_argument("--index", help="fill the LMDB index in this folder")
    ap.add_argument("--seed", type=int, default=1, help="a run with another seed adds others")
    ap.add_argument("--batch", type=int, default=20_000, help="instances per transaction")
    args = ap.parse_args()
    if args.config:
        cfg = config_mod.load(args.config)
        path, map_size = cfg.index_path, cfg.index_map_size
    else:
        path, map_size = Path(args.index), 1 << 40
    index = Index(path, map_size=map_size)
    try:
        seconds = fill(index, args.count, seed=args.seed, batch=args.batch, progress=True)
        counts = index.counts()
    finally:
        index.close()
    size = (path / "data.mdb").stat().st_size
    print(
        f"{args.count:,} instances in {seconds:.1f} s ({args.count / seconds:,.0f}/s); index "
        f"holds {counts['instances']:,} instances, {counts['patients']:,} patients; "
        f"{size:,} bytes ({size / max(1, counts['instances']):.0f} per instance)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
