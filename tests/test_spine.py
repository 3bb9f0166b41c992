"""The spine end to end: ingest into two local sites, read back through a real mount."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import lmdb
import pydicom
import pytest

from animfs import index as index_mod
from animfs.dicom import NAME_MAX, NotDicom, _instance, read_header, safe_name, unique_name

import gen_dicom
from conftest import Archive, files_under, sha256_file


def mount_files(root: Path) -> dict[str, Path]:
    """Files under /patients of a mount, by their SOPInstanceUID."""
    out = {}
    for path in files_under(root / "patients"):
        out[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
    return out


def sop_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def index_snapshot(archive: Archive) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every key and value of every sub-database, to prove something changed nothing."""
    env = lmdb.open(str(archive.dir / "index"), max_dbs=32, readonly=True, lock=False)
    try:
        out = {}
        with env.begin() as txn:
            for name, _ in txn.cursor():
                db = env.open_db(name, txn=txn, create=False)
                out[name.decode()] = [(k, v) for k, v in txn.cursor(db=db)]
        return out
    finally:
        env.close()


def site_objects(archive: Archive) -> list[str]:
    return sorted(str(p.relative_to(archive.dir)) for p in archive.dir.glob("site-*/**/*")
                  if p.is_file())


def test_pydicom_test_files_and_series_come_back_byte_identical(
    archive: Archive, series_dir: Path
) -> None:
    originals = gen_dicom.pydicom_test_files(unique_sop=True) + files_under(series_dir)
    src = archive.dir / "input"
    for i, path in enumerate(originals):
        target = src / f"{i:04d}_{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    result = archive.ingest(src, check=False)
    assert f"{len(originals)} ingested" in result.stdout, result.stderr
    assert result.returncode == 0, result.stderr
    with archive.mounted() as m:
        served = mount_files(m.path)
        assert len(served) == len(originals)
        for path in originals:
            copy = served[sop_of(path)]
            assert sha256_file(copy) == sha256_file(path), path
            assert copy.stat().st_size == path.stat().st_size
        # The tools admins use agree with the originals' sizes.
        du = subprocess.run(["du", "-sb", str(m / "patients")], capture_output=True, text=True,
                            check=True)
        assert int(du.stdout.split()[0]) == sum(p.stat().st_size for p in originals)
        found = subprocess.run(["find", str(m / "patients"), "-type", "f", "-printf", "%s\n"],
                               capture_output=True, text=True, check=True)
        assert sorted(map(int, found.stdout.split())) == sorted(
            p.stat().st_size for p in originals)
        listing = subprocess.run(["ls", "-lR", str(m.path)], capture_output=True, text=True,
                                 check=True)
        assert listing.stdout.count(".dcm") == len(originals)
        for path in list(served.values())[:5]:
            st = os.stat(path)
            assert oct(st.st_mode & 0o7777) == "0o444"
            assert oct(os.stat(path.parent).st_mode & 0o7777) == "0o555"
            out = subprocess.run(["stat", "-c", "%s", str(path)], capture_output=True,
                                 text=True, check=True)
            assert int(out.stdout) == st.st_size
            dump = subprocess.run(["dcmdump", str(path)], capture_output=True)
            assert dump.returncode == 0, dump.stderr


def test_second_ingest_is_a_no_op_and_changed_bytes_are_refused(
    archive: Archive, series_dir: Path, tmp_path: Path
) -> None:
    archive.ingest(series_dir / "ct")
    objects = site_objects(archive)
    before = index_snapshot(archive)
    again = archive.ingest(series_dir / "ct")
    assert "0 ingested, 12 skipped" in again.stdout
    assert site_objects(archive) == objects
    assert index_snapshot(archive) == before

    changed = tmp_path / "changed.dcm"
    ds = pydicom.dcmread(files_under(series_dir / "ct")[0])
    ds.SeriesDescription = "edited behind the archive's back"
    ds.save_as(changed)
    refused = archive.ingest(changed, check=False)
    assert refused.returncode == 1
    assert f"refused {changed}: SOPInstanceUID {ds.SOPInstanceUID} is already archived" in (
        refused.stderr)
    assert index_snapshot(archive) == before
    with archive.mounted() as m:
        served = mount_files(m.path)[str(ds.SOPInstanceUID)]
        assert sha256_file(served) == sha256_file(files_under(series_dir / "ct")[0])


def test_one_run_takes_files_in_order_whatever_the_workers_do(
    archive: Archive, series_dir: Path, tmp_path: Path
) -> None:
    """Small files sealed ahead by the workers, a large one streamed, a refused one, the
    same instance twice (identical: skipped; changed: refused) in one run and group."""
    src = tmp_path / "mixed"
    src.mkdir()
    ct = files_under(series_dir / "ct")
    for i, path in enumerate(ct[:3]):
        shutil.copy(path, src / f"a{i}.dcm")
    big = src / "b_big.dcm"  # over 8 MiB: parsed ahead, then streamed chunk by chunk
    gen_dicom.write_large_instance(big, size_mb=10, patient_id="P001", patient_name="Doe^Jane",
                                   seed=3)
    (src / "c_garbage.dcm").write_bytes(os.urandom(3000))
    shutil.copy(ct[0], src / "d_twin.dcm")
    ds = pydicom.dcmread(ct[1])
    ds.SeriesDescription = "same instance, other bytes"
    ds.save_as(src / "e_changed.dcm")

    result = archive.ingest(src, check=False)
    assert result.returncode == 1
    refused = [line for line in result.stderr.splitlines() if line.startswith("animfs: refused")]
    assert [Path(line.split(": ")[1].split()[-1]).name for line in refused] == [
        "c_garbage.dcm", "e_changed.dcm"], result.stderr
    assert f"SOPInstanceUID {ds.SOPInstanceUID} is already archived" in refused[1]
    assert "4 ingested, 1 skipped (already archived), 2 refused" in result.stdout
    with archive.mounted() as m:
        served = mount_files(m.path)
        assert len(served) == 4
        for original in [*ct[:3], big]:
            assert sha256_file(served[sop_of(original)]) == sha256_file(original)
    index = index_mod.Index(archive.dir / "index")
    try:
        assert index_mod.check(index) == []
    finally:
        index.close()


def test_bad_input_gets_one_line_each_and_changes_nothing(
    archive: Archive, series_dir: Path, tmp_path: Path
) -> None:
    archive.ingest(series_dir / "mr")
    before, objects = index_snapshot(archive), site_objects(archive)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "garbage.dcm").write_bytes(os.urandom(5000))
    (bad / "notes.txt").write_text("not an image\n")
    good = files_under(series_dir / "ct")[0].read_bytes()
    (bad / "truncated.dcm").write_bytes(good[: len(good) - 1000])
    ds = pydicom.dcmread(files_under(series_dir / "ct")[1])
    del ds.SOPInstanceUID
    ds.save_as(bad / "no-uid.dcm", enforce_file_format=False)
    result = archive.ingest(bad, check=False)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("animfs: refused")]
    assert len(lines) == 4, result.stderr
    reasons = {Path(line.split(": ")[1].split()[-1]).name: line for line in lines}
    assert "not a DICOM file" in reasons["garbage.dcm"]
    assert "not a DICOM file" in reasons["notes.txt"]
    assert "truncated" in reasons["truncated.dcm"]
    assert "missing SOPInstanceUID" in reasons["no-uid.dcm"]
    assert "0 ingested, 0 skipped (already archived), 4 refused" in result.stdout
    assert index_snapshot(archive) == before
    assert site_objects(archive) == objects


def test_names_are_safe_unique_and_patients_stay_apart(archive: Archive, tmp_path: Path) -> None:
    src = tmp_path / "src"
    long_name = "Ünïcödé" * 60 + "^Long"
    cases = [
        # (folder, PatientID, PatientName, issuer, charset, StudyDescription)
        ("slash", "S1", "Evil/../Name^X", "HOSP-A", None, "../../etc"),
        ("control", "S2", "Bell\x07\x1b[31m^Red", "HOSP-A", None, "line\nbreak"),
        ("long", "S3", long_name, "HOSP-A", "ISO_IR 192", "x" * 300),
        ("latin1", "S4", "Müller^Jürgen", "HOSP-A", "ISO_IR 100", "Épaule"),
        ("utf8", "S5", "山田^太郎", "HOSP-A", "ISO_IR 192", "胸部"),
        ("dots", "S6", "..", "HOSP-A", None, "."),
        ("same-id-a", "100", "Same^A", "HOSP-A", None, "Same"),
        ("same-id-b", "100", "Same^B", "HOSP-B", None, "Same"),
    ]
    for folder, pid, name, issuer, charset, desc in cases:
        gen_dicom.write_series(src / folder, patient_id=pid, patient_name=name, issuer=issuer,
                               charset=charset, study_description=desc, n_slices=2, rows=16,
                               cols=16, seed=hash(folder) & 0xFFFF)
    # Two studies of one patient with the same date, accession and description collide.
    for seed in (101, 102):
        gen_dicom.write_series(src / f"twin{seed}", patient_id="T1", patient_name="Twin^T",
                               issuer="HOSP-A", study_description="Same", n_slices=1, rows=16,
                               cols=16, seed=seed)
    archive.ingest(src)
    with archive.mounted() as m:
        patients = sorted(os.listdir(m / "patients"))
        assert "HOSP-A-100_Same^A" in patients and "HOSP-B-100_Same^B" in patients
        assert "HOSP-A-S4_Müller^Jürgen" in patients
        assert "HOSP-A-S5_山田^太郎" in patients
        for _dirpath, dirs, files in os.walk(m.path):
            for name in dirs + files:
                raw = name.encode()
                assert 0 < len(raw) <= NAME_MAX
                assert name not in (".", "..") and "/" not in name
                assert not any(ord(c) < 32 for c in name), repr(name)
        long_folder = next(p for p in patients if p.startswith("HOSP-A-S3_"))
        assert len(long_folder.encode()) == NAME_MAX
        long_folder.encode().decode("utf-8")  # cut on a character boundary
        twin = os.listdir(m / "patients" / "HOSP-A-T1_Twin^T")
        assert len(twin) == 2 and len(set(twin)) == 2
        assert sum("~" in t for t in twin) == 1
        files = files_under(m / "patients")
        assert len(files) == 2 * len(cases) + 2
        for path in files:
            assert path.resolve().is_relative_to(m.path / "patients")


def test_naming_rules() -> None:
    assert safe_name("a/b\\c") == "a_b_c"
    assert safe_name("..") == "__" and safe_name(".") == "_" and safe_name("") == "_"
    assert safe_name("two words\ttab") == "two_words_tab"
    assert safe_name("rtl\u202emark\u200f") == "rtlmark"
    assert safe_name("nul\x00byte") == "nulbyte"
    cut = safe_name("é" * 200)
    assert len(cut.encode()) == 254 and cut == "é" * 127
    assert safe_name("e\u0301") == "é"  # NFC
    u = unique_name("x" * 255, "1.2.3")
    assert len(u.encode()) <= 255 and "~" in u
    assert unique_name("00001_1.2.dcm", "1.2").endswith(".dcm")


def test_header_parse_reads_what_a_full_parse_reads(series_dir: Path) -> None:
    """read_header asks pydicom for HEADER_KEYWORDS only: it must see every tag it uses."""
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    compared = charsets = 0
    for path in sorted(folder.rglob("*")) + files_under(series_dir):
        if not path.is_file():
            continue
        try:
            full = _instance(pydicom.dcmread(path, stop_before_pixels=True), "ISSUER")
        except Exception:
            continue  # not a file read_header would take either
        try:
            with open(path, "rb") as f:
                header = read_header(f, issuer_default="ISSUER")
        except NotDicom:
            continue  # refused by the walk of the whole file: cut short
        assert header == full, path
        compared += 1
        charsets += bool(header.charset)
    assert compared >= 50 and charsets >= 5, (compared, charsets)


def test_issuer_defaults_to_the_ingesting_institution(archive: Archive, tmp_path: Path) -> None:
    gen_dicom.write_series(tmp_path / "a", patient_id="42", patient_name="Noissuer^A",
                           institution_name="Centre Hospitalier de Luxembourg", n_slices=1,
                           rows=16, cols=16, seed=7)
    gen_dicom.write_series(tmp_path / "b", patient_id="42", patient_name="Noissuer^B",
                           n_slices=1, rows=16, cols=16, seed=8)
    text = archive.config.read_text()
    archive.config.write_text(text.replace('# "Centre Hospitalier de Luxembourg" = "CHL"',
                                           '"Centre Hospitalier de Luxembourg" = "CHL"'))
    archive.ingest(tmp_path / "a")
    archive.ingest(tmp_path / "b", extra=["--institution", "HRS"])
    with archive.mounted() as m:
        assert sorted(os.listdir(m / "patients")) == ["CHL-42_Noissuer^A", "HRS-42_Noissuer^B"]


def test_a_study_already_archived_keeps_its_issuer(archive: Archive, tmp_path: Path) -> None:
    """Files without IssuerOfPatientID that a second institution ingests for a study the
    archive already holds for that PatientID join the study, not a new patient."""
    study = "1.2.826.0.1.3680043.10.1234.77"
    gen_dicom.write_series(tmp_path / "a", patient_id="77", patient_name="Joined^A",
                           study_uid=study, series_number=1, n_slices=2, rows=16, cols=16,
                           seed=11)
    gen_dicom.write_series(tmp_path / "b", patient_id="77", patient_name="Joined^A",
                           study_uid=study, series_number=2, n_slices=2, rows=16, cols=16,
                           seed=12)
    archive.ingest(tmp_path / "a", extra=["--institution", "CHL"])
    archive.ingest(tmp_path / "b", extra=["--institution", "HRS"])
    with archive.mounted() as m:
        assert os.listdir(m / "patients") == ["CHL-77_Joined^A"]
        (study_folder,) = (m / "patients" / "CHL-77_Joined^A").iterdir()
        assert len(list(study_folder.iterdir())) == 2  # both series
        assert len(files_under(study_folder)) == 4


def test_inode_size_mtime_stable_across_remount(archive: Archive, series_dir: Path) -> None:
    archive.ingest(series_dir)

    def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
        out = {}
        for dirpath, dirs, files in os.walk(root):
            for name in dirs + files:
                st = os.lstat(os.path.join(dirpath, name))
                out[os.path.relpath(os.path.join(dirpath, name), root)] = (
                    st.st_ino, st.st_size, st.st_mtime_ns)
        return out

    with archive.mounted() as m:
        first = snapshot(m.path)
        links = {name: os.readlink(m / "studies" / name) for name in os.listdir(m / "studies")}
        for name in links:
            assert (m / "studies" / name).resolve().is_dir()
    with archive.mounted() as m:
        assert snapshot(m.path) == first
        assert {n: os.readlink(m / "studies" / n) for n in os.listdir(m / "studies")} == links
    assert len([k for k in first if k.endswith(".dcm")]) == 18
    # A folder's mtime is that of its newest entry.
    series = next(k for k in first if k.count("/") == 3 and not k.endswith(".dcm"))
    newest = max(v[2] for k, v in first.items() if k.startswith(series + "/"))
    assert first[series][2] == newest


def test_a_folder_of_100000_entries_lists_completely(archive: Archive) -> None:
    """Generated index entries: 100,000 files in one series folder, listed through the kernel."""
    idx = index_mod.Index(archive.dir / "index")
    try:
        fill_series(idx, 100_000)
    finally:
        idx.close()
    with archive.mounted() as m:
        series = next((m / "patients").glob("*/*/*"))
        names = os.listdir(series)
        assert len(names) == 100_000
        assert len(set(names)) == 100_000
        assert names == sorted(names) or sorted(names) == sorted(set(names))
        result = subprocess.run(f"ls -f '{series}' | wc -l", shell=True, capture_output=True,
                                text=True, check=True)
        assert int(result.stdout) == 100_000


def fill_series(idx: index_mod.Index, count: int) -> None:
    """Commit ``count`` instances of one series straight into the index (no chunk data)."""
    from animfs.dicom import Instance
    from animfs.manifest import Manifest, Placement

    base = Instance(patient_id="BIG", issuer="GEN", patient_name="Big^Series",
                    study_uid="1.2.3.4", study_date="20240101", study_time="",
                    accession="", study_description="Huge", series_uid="1.2.3.4.5",
                    series_number=1, modality="CT", series_description="Many", sop_uid="",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2", instance_number=None,
                    institution_name="", transfer_syntax="", charset="")
    empty = Placement("", "", "", "", 0, 0, 0, 0, "", 0)
    import dataclasses

    idx.add_many(
        Manifest(dataclasses.replace(base, sop_uid=f"1.2.3.4.5.{i}", instance_number=i), "GEN",
                 0, "0" * 64, (), 1_700_000_000_000_000_000 + i, empty)
        for i in range(count)
    )


def test_writes_answer_erofs(archive: Archive, series_dir: Path) -> None:
    archive.ingest(series_dir / "mr")
    with archive.mounted() as m:
        some_file = files_under(m / "patients")[0]
        cases = [
            lambda: open(some_file, "r+b"),
            lambda: open(some_file.parent / "new.dcm", "wb"),
            lambda: os.mkdir(m / "patients" / "x"),
            lambda: os.unlink(some_file),
            lambda: os.rename(some_file, some_file.parent / "moved"),
            lambda: os.chmod(some_file, 0o644),
            lambda: os.symlink("x", m / "studies" / "y"),
            lambda: os.truncate(some_file, 0),
        ]
        for case in cases:
            with pytest.raises(OSError) as info:
                case()
            assert info.value.errno == errno.EROFS, case
        assert sha256_file(some_file)  # still readable after all that
        st = os.statvfs(m.path)
        assert st.f_blocks * st.f_frsize >= sum(p.stat().st_size for p in files_under(
            series_dir / "mr"))


def test_reads_at_every_offset_match(archive: Archive, tmp_path: Path) -> None:
    """A multi-chunk instance read at odd offsets and sizes, across chunk boundaries."""
    big = gen_dicom.write_large_instance(tmp_path / "big.dcm", size_mb=10, patient_id="L1",
                                         patient_name="Large^One", seed=3)
    original = big.read_bytes()
    archive.ingest(big)
    with archive.mounted() as m:
        served = files_under(m / "patients")[0]
        with open(served, "rb", buffering=0) as f:
            chunk = 4 << 20
            for off, size in [(0, 1), (chunk - 1, 2), (chunk - 10, 20), (2 * chunk - 5, chunk + 10),
                              (len(original) - 3, 100), (len(original), 10), (12345, 777777)]:
                f.seek(off)
                assert f.read(size) == original[off:off + size], (off, size)
        assert sha256_file(served) == sha256_file(big)


def test_status_reports_the_archive(archive: Archive, series_dir: Path) -> None:
    archive.ingest(series_dir)
    status = json.loads(archive.run("status").stdout)
    assert status["index"]["instances"] == 18
    assert status["index"]["bytes"] == sum(p.stat().st_size for p in files_under(series_dir))
    assert set(status["sites"]) == {"site-a", "site-b"}


def test_config_errors_name_the_key(archive: Archive) -> None:
    text = archive.config.read_text()
    archive.config.write_text(text.replace('path = "' + str(archive.dir) + '/index"', ""))
    result = archive.run("status", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == f"animfs: {archive.config}: [index.path] is missing"
    archive.config.write_text(text.replace("min_sites = 1", 'min_sites = "one"'))
    result = archive.run("status", check=False)
    assert "[replication.min_sites] must be a int" in result.stderr
    missing = archive.run("--config", "/nonexistent/animfs.toml", "status", check=False,
                          config=False)
    assert missing.returncode == 2 and "no such config file" in missing.stderr


def test_mount_refuses_a_busy_or_non_empty_mountpoint(archive: Archive, tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    result = archive.run("mount", str(tmp_path / "full"), check=False)
    assert result.returncode == 2 and "not empty" in result.stderr
    with archive.mounted() as m:
        result = archive.run("mount", str(m.path), check=False)
        assert result.returncode == 2 and "already a mount point" in result.stderr
