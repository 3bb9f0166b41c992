"""Hostile and broken input: mutated DICOM, non-DICOM, and names built to escape a folder.

Every file is archived byte-identical or refused with one line; the run never
crashes, and leaves nothing half-done (the index is consistent, and what a
refused file wrote is an orphan for ``animfs gc``).
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import unicodedata
from pathlib import Path

import pydicom
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from animfs.dicom import _BIDI, NAME_MAX, safe_name, unique_name
from animfs.index import Index, check

import gen_dicom
from conftest import Archive, files_under, sha256_file

SEED = 0x8BAD
UID_ROOT = gen_dicom.UID_ROOT.encode()


# -- mutants ----------------------------------------------------------------------------


def fresh_uids(data: bytes, n: int) -> bytes:
    """A generated file with every UID new (same length: the file stays valid)."""
    root = f"1.2.826.0.1.3680043.10.{7000 + n}.".encode()
    assert len(root) == len(UID_ROOT)
    return data.replace(UID_ROOT, root)


def element_offsets(data: bytes, tag: tuple[int, int]) -> list[int]:
    """Offsets of an explicit-VR little-endian element header with ``tag``."""
    needle = struct.pack("<HH", *tag)
    out, start = [], 132
    while (i := data.find(needle, start)) >= 0:
        if data[i + 4 : i + 6].isalpha():
            out.append(i)
        start = i + 1
    return out


def mutate(data: bytes, kind: str, rng: random.Random) -> bytes:
    b = bytearray(data)
    if kind == "flip":  # a few bytes anywhere, most often in the header
        for _ in range(rng.randint(1, 8)):
            limit = len(b) if rng.random() < 0.3 else min(len(b), 1500)
            b[rng.randrange(limit)] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del b[rng.randrange(1, len(b)) :]
    elif kind in ("length", "huge"):
        tags = [(0x0010, 0x0010), (0x0008, 0x1030), (0x0020, 0x000D), (0x0008, 0x0018),
                (0x7FE0, 0x0010), (0x0008, 0x0005), (0x0028, 0x0010)]
        offsets = [o for t in tags for o in element_offsets(data, t)]
        if not offsets:
            return mutate(data, "flip", rng)
        at = rng.choice(offsets)
        vr = bytes(b[at + 4 : at + 6])
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"OD", b"OF", b"UC"):
            value = 0xFFFFFFF0 if kind == "huge" else rng.choice([0, 1, 3, len(b), 0xFFFFFFFF])
            b[at + 8 : at + 12] = struct.pack("<I", value)
        else:
            value = 0xFFFF if kind == "huge" else rng.choice([0, 1, 3, 7, 255])
            b[at + 6 : at + 8] = struct.pack("<H", value)
    elif kind == "charset":
        for at in element_offsets(data, (0x0010, 0x0010)):  # PatientName: bytes no charset has
            length = struct.unpack("<H", b[at + 6 : at + 8])[0]
            b[at + 8 : at + 8 + length] = bytes(rng.randrange(128, 256) for _ in range(length))
    return bytes(b)


def deep_sequence_file(path: Path, depth: int, template: Path, n: int) -> None:
    """A valid-looking file whose header nests sequences ``depth`` deep."""
    ds = pydicom.dcmread(template)
    inner = Dataset()
    inner.CodeValue = "X"
    for _ in range(depth):
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        inner = outer
    ds.ContentSequence = inner.ContentSequence
    ds.SOPInstanceUID = gen_dicom.make_uid("deep", n)
    ds.save_as(path)


def charset_file(path: Path, template: Path, charset: str, raw_name: bytes, n: int,
                 patient_id: str | None = None) -> None:
    """A file declaring ``charset`` whose PatientName is ``raw_name`` as it is (of a patient
    of its own with ``patient_id``)."""
    ds = pydicom.dcmread(template)
    ds.SpecificCharacterSet = charset
    ds.SOPInstanceUID = gen_dicom.make_uid("charset", n)
    if patient_id is not None:
        ds.PatientID = patient_id
        ds.StudyInstanceUID = gen_dicom.make_uid("charset-study", n)
        ds.SeriesInstanceUID = gen_dicom.make_uid("charset-series", n)
    ds.save_as(path)
    data = path.read_bytes()
    at = element_offsets(data, (0x0010, 0x0010))[0]
    length = struct.unpack("<H", data[at + 6 : at + 8])[0]
    padded = raw_name + b" " * (len(raw_name) % 2)
    path.write_bytes(data[: at + 6] + struct.pack("<H", len(padded)) + padded
                     + data[at + 8 + length :])


NOT_DICOM = {
    "empty.dcm": b"",
    "random.dcm": None,  # filled from the seed
    "text.txt": b"patient list\nnot an image\n",
    "png.dcm": b"\x89PNG\r\n\x1a\n" + b"\0" * 200,
    "dicm-only.dcm": b"\0" * 128 + b"DICM",
    "dicm-garbage.dcm": None,
    "zip.dcm": b"PK\x03\x04" + b"\0" * 100,
}


def test_mutated_and_non_dicom_input_is_archived_whole_or_refused_in_one_line(
    archive: Archive, series_dir: Path, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    src = tmp_path / "hostile"
    src.mkdir()
    generated = files_under(series_dir)
    bases = [p for p in gen_dicom.pydicom_test_files(unique_sop=True)
             if p.stat().st_size < 300_000]
    bases = rng.sample(bases, 12)
    n = 0
    for kind in ("flip", "truncate", "length", "huge", "charset"):
        for _ in range(14):
            n += 1
            if rng.random() < 0.5:
                data = fresh_uids(rng.choice(generated).read_bytes(), n)
            else:
                data = rng.choice(bases).read_bytes()
            (src / f"{kind}-{n:03d}.dcm").write_bytes(mutate(data, kind, rng))
    for depth in (3, 40, 200):
        n += 1
        deep_sequence_file(src / f"deep-{depth}.dcm", depth, generated[0], n)
    raw = (src / "deep-raw.dcm")
    n += 1
    data = fresh_uids(generated[1].read_bytes(), n)
    nest = (struct.pack("<HH", 0x0040, 0xA730) + b"SQ\0\0" + struct.pack("<I", 0xFFFFFFFF)
            + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)) * 5000
    at = element_offsets(data, (0x7FE0, 0x0010))[0]
    raw.write_bytes(data[:at] + nest + data[at:])
    for i, (charset, name) in enumerate([
        ("ISO_IR 192", b"\xff\xfe\xc3(Bad^UTF8"), ("ISO_IR 999", b"Unknown^Charset"),
        ("ISO 2022 IR 87", b"\x1b$B\xff\xff\x1b(B^Broken"), ("", b"\x80\x81\x82^Latin"),
        ("ISO_IR 100", b"M\xfcller^\x00\x07Nul"),
    ]):
        n += 1
        charset_file(src / f"charset-decl-{i}.dcm", generated[2], charset, name, n)
    for name, content in NOT_DICOM.items():
        if content is None:
            content = (b"\0" * 128 + b"DICM" if "dicm" in name else b"") + rng.randbytes(4000)
        (src / name).write_bytes(content)
    (src / "originals").mkdir()  # and the untouched files, so that much is archived
    for path in generated[:4]:
        (src / "originals" / path.name).write_bytes(path.read_bytes())

    inputs = files_under(src)
    # A bound on its memory: an input that made the parser allocate without limit is a
    # finding to report, not a reason to take the machine down.
    result = subprocess.run(["prlimit", f"--data={2 << 30}", *archive.command(), "ingest",
                             str(src)], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in result.stderr and result.returncode in (0, 1), result.stderr
    refused = {}
    for line in result.stderr.splitlines():
        assert line.startswith("animfs: refused "), line  # nothing but one line per file
        path, _, reason = line[len("animfs: refused "):].partition(": ")
        assert path not in refused and reason, line
        refused[path] = reason
    kept = [p for p in inputs if str(p) not in refused]
    summary = result.stdout.splitlines()[-1]
    ingested, skipped = (int(summary.split(" ingested")[0]),
                         int(summary.split(", ")[1].split(" skipped")[0]))
    assert ingested + skipped == len(kept) and len(refused) + len(kept) == len(inputs), summary
    assert all(name in "".join(refused) for name in NOT_DICOM), refused
    assert 20 <= len(refused) and ingested >= 10, (len(refused), ingested)
    print(f"\n{len(inputs)} hostile files: {ingested} ingested, {skipped} skipped, "
          f"{len(refused)} refused")

    index = Index(archive.dir / "index")
    try:
        assert check(index) == []
    finally:
        index.close()
    archive.run("gc", "--grace", "0", "--delete")  # what refused files wrote, if anything
    after = archive.run("gc", "--grace", "0").stdout
    assert "gc: 0 orphans" in after and " 0 manifests not in this index" in after, after
    assert "index: consistent" in archive.run("verify").stdout
    with archive.mounted() as m:
        served = {sha256_file(p) for p in files_under(m / "patients")}
    assert served == {sha256_file(p) for p in kept}  # every kept file, byte-identical


# -- names -----------------------------------------------------------------------------------


def test_hostile_names_are_safe_and_unique_in_their_folder(
    archive: Archive, tmp_path: Path
) -> None:
    src = tmp_path / "names"
    kilo = "Ж" * 500 + "x" * 24  # 1 KB of UTF-8
    cases = [  # (PatientName, StudyDescription, SeriesDescription, charset)
        ("Evil/../../etc^passwd", "../../..", "/", None),
        ("..", "..", "..", None),
        (".", ".", ".", None),
        ("Nul\x00Name^X", "nul\x00desc", "a\x00b", None),
        ("Line\nBreak^Y", "two\nlines\r\n", "tab\there", None),
        ("Rtl\u202egnp.exe^Z", "\u202e\u2066evil\u2069", "\u200f\u200e", "ISO_IR 192"),
        (kilo, kilo, kilo, "ISO_IR 192"),
        ("Same^Name", "same/desc", "same desc", None),
        ("Same^Name", "same\\desc", "same\tdesc", None),  # sanitise to what the one above does
        ("Same^Name", "same desc", "same/desc", None),
    ]
    n = 0
    for i, (name, study, series, charset) in enumerate(cases):
        for j in range(2):  # two series per study, with the same hostile description
            n += 1
            gen_dicom.write_series(
                src / f"{i}-{j}", patient_id="SAME" if name == "Same^Name" else f"HOSTILE{i}",
                patient_name=name, issuer="H",
                study_description=study, series_description=series, charset=charset,
                study_uid=gen_dicom.make_uid("hostile-study", i), series_number=1,
                n_slices=1, rows=8, cols=8, seed=n,
            )
    for i, raw in enumerate([b"\xff\xfe^Broken", b"\xc3\x28^Half"]):  # invalid UTF-8 names
        path = src / f"raw-{i}" / "x.dcm"
        path.parent.mkdir(parents=True)
        charset_file(path, files_under(src / "0-0")[0], "ISO_IR 192", raw, 900 + i, f"RAW{i}")
    originals = {sha256_file(p) for p in files_under(src)}
    result = archive.ingest(src)
    assert f"{len(originals)} ingested" in result.stdout, result.stdout + result.stderr

    with archive.mounted() as m:
        top = m / "patients"
        seen = []
        for dirpath, dirs, files in os.walk(top):
            assert len(set(dirs) | set(files)) == len(dirs) + len(files)  # unique in a folder
            for name in dirs + files:
                seen.append(name)
                raw = os.fsencode(name)
                assert 0 < len(raw) <= NAME_MAX, name
                raw.decode("utf-8")  # valid UTF-8: no byte the kernel or a shell would mangle
                assert name not in (".", "..") and "/" not in name and "\\" not in name
                assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in name)
                assert not set(name) & _BIDI, repr(name)
                assert (Path(dirpath) / name).resolve().is_relative_to(top.resolve())
        served = files_under(top)
        assert {sha256_file(p) for p in served} == originals
        assert len(served) == len(originals)
        patients = os.listdir(top)
        assert len(patients) == len(cases) - 2 + 2  # the three "Same^Name" are one patient...
        same = next(p for p in patients if p.startswith("H-SAME_Same^Name"))
        assert len(os.listdir(top / same)) == 3  # ... of three studies, named apart
        for study in os.listdir(top / same):
            assert len(os.listdir(top / same / study)) == 2  # two series each, named apart


# -- the naming functions themselves ----------------------------------------------------------


NAMES = st.lists(
    st.characters(codec="utf-8") | st.characters(categories=["Cs", "Cf", "Cc", "Mn"])
    | st.sampled_from(["/", "\\", ".", "..", "\x00", "\n", "\u202e", "\u200f", "\u2066", " ",
                       "e\u0301", "e\u200b\u0301", "Ж"]),
    max_size=400,
).map("".join)


def assert_safe(name: str) -> None:
    raw = name.encode("utf-8")  # no lone surrogates
    assert 0 < len(raw) <= NAME_MAX
    assert name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in name)
    assert not set(name) & _BIDI
    assert unicodedata.is_normalized("NFC", name)


@settings(max_examples=400, deadline=None)
@given(NAMES)
def test_safe_name_is_always_safe_and_stable(text: str) -> None:
    name = safe_name(text)
    assert_safe(name)
    assert safe_name(name) == name  # a safe name is left alone


@settings(max_examples=300, deadline=None)
@given(NAMES, st.text(max_size=64), st.text(max_size=64))
def test_unique_name_stays_safe_and_tells_uids_apart(text: str, uid: str, other: str) -> None:
    name = safe_name(text)
    one = unique_name(name, uid)
    assert_safe(one)
    assert one != name
    if name.endswith(".dcm"):
        assert one.endswith(".dcm")
    if uid != other:
        assert one != unique_name(name, other)
