"""Sealing at rest: nothing readable at the sites or in the cache, wrong keys and tampering
never served, key rotation with a resumable re-seal, and a key added to an old archive."""

from __future__ import annotations

import errno
import os
import shutil
import threading
import warnings
from pathlib import Path

import pydicom
import pytest

from animfs import keys
from animfs.config import load
from animfs.index import Index
from animfs.reseal import reseal
from animfs.store.local import LocalStore

import gen_dicom
from conftest import Archive, files_under, sha256_file

SMALL_PYDICOM = 200_000  # bytes: "a few" of pydicom's files, the small ones


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two generated series with long, distinctive names and IDs, and pydicom test files."""
    root = tmp_path_factory.mktemp("secret-inputs")
    gen_dicom.write_series(root / "ct", patient_id="SECRET-PID-4711",
                           patient_name="Zyxwv^Quintus", n_slices=5, rows=64, cols=64,
                           modality="CT", study_description="CT Chest",
                           institution_name="Hospital A", accession="ACC-998877", seed=41)
    gen_dicom.write_series(root / "mr", patient_id="SECRET-PID-0815",
                           patient_name="Qwertzuiop^Ottilie", n_slices=3, rows=64, cols=64,
                           modality="MR", study_description="MR Knee",
                           institution_name="Hospital B", seed=42)
    small = [p for p in gen_dicom.pydicom_test_files(unique_sop=True)
             if p.stat().st_size < SMALL_PYDICOM][:6]
    (root / "pydicom").mkdir()
    for i, path in enumerate(small):
        shutil.copy(path, root / "pydicom" / f"{i:02d}_{path.name}")
    return root


def secrets_of(root: Path) -> set[bytes]:
    """What must never be readable at rest: DICM, patient names and IDs, every UID.

    Strings shorter than 6 bytes are left out: random sealed bytes hold a given short
    string by chance (a 4-byte one about once in 4 GB); DICM is the one exception."""
    found = {b"DICM"}
    for path in files_under(root):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
        values = [str(ds.get("PatientName", "")), str(ds.get("PatientID", ""))]
        values += [str(getattr(ds, k)) for k in ("StudyInstanceUID", "SeriesInstanceUID",
                                                   "SOPInstanceUID") if k in ds]
        for value in values:
            found |= {v.encode() for v in [value, *value.split("^")] if len(v.encode()) >= 6}
    return found


def stored_files(archive: Archive) -> list[Path]:
    out = []
    for folder in ("site-a", "site-b", "cache"):
        out += files_under(archive.dir / folder)
    return out


def leaks(files: list[Path], secrets: set[bytes]) -> list[tuple[str, bytes]]:
    out = []
    for path in files:
        data = path.read_bytes()
        out += [(str(path), s) for s in secrets if s in data]
    return out


def read_all(root: Path) -> list[str]:
    return sorted(sha256_file(p) for p in files_under(root / "patients"))


def ring(archive: Archive) -> keys.KeyRing:
    return keys.load(archive.dir / "animfs.key")


def site_objects(archive: Archive) -> dict[str, bytes]:
    """Every object at both file sites: 'site/key' -> bytes."""
    out = {}
    for name in ("site-a", "site-b"):
        site = LocalStore(name, archive.dir / name)
        for prefix in ("chunks/", "manifests/", "state/", "snapshots/"):
            for key in site.list(prefix):
                out[f"{name}/{key}"] = site.get(key)
    return out


# -- nothing readable at rest ---------------------------------------------------------


def test_sites_and_cache_hold_nothing_readable(archive: Archive, inputs: Path) -> None:
    key_file = archive.dir / "animfs.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert load(archive.config).key_file == key_file
    archive.ingest(inputs)
    archive.run("snapshot")
    with archive.mounted() as m:
        assert read_all(m.path) == sorted(sha256_file(p) for p in files_under(inputs))
    cached = files_under(archive.dir / "cache" / "chunks")
    assert cached, "the reads should have filled the disk cache"
    objects = site_objects(archive)
    assert sum(k.startswith("site-b/snapshots/") for k in objects) >= 2
    assert all(keys.is_sealed(data) for data in objects.values()), "every object is sealed"
    assert all(keys.is_sealed(p.read_bytes()) for p in cached)

    secrets = secrets_of(inputs)
    assert len(secrets) > 20
    assert leaks(stored_files(archive), secrets) == []
    # Names reveal nothing either: no object is named by the plain SHA-256 of its UID.
    names = " ".join(objects)
    assert not any(keys.sha256_name(s.decode()) in names for s in secrets)


def test_the_scan_finds_what_an_unsealed_archive_shows(tmp_path: Path, inputs: Path) -> None:
    """The check above can fail: without a key the same archive is readable at rest."""
    plain = Archive.__new__(Archive)
    plain.dir, plain.config, plain.mounts = tmp_path, tmp_path / "animfs.toml", []
    plain.run("init", "--no-key", str(tmp_path), config=False)
    assert not (tmp_path / "animfs.key").exists()
    plain.ingest(inputs / "ct")
    found = {s for _, s in leaks(stored_files(plain), secrets_of(inputs / "ct"))}
    assert {b"SECRET-PID-4711", b"Zyxwv^Quintus", b"Quintus"} <= found
    assert sum(s.startswith(b"1.2.") for s in found) >= 7  # study, series and 5 instance UIDs


# -- wrong or missing keys, tampering -----------------------------------------------------


def test_wrong_key_serves_nothing_and_missing_key_is_named(archive: Archive, inputs: Path) -> None:
    archive.ingest(inputs / "ct")
    key_file = archive.dir / "animfs.key"
    good = key_file.read_bytes()
    keys.save(keys.new_ring(), key_file)  # a valid key file, but another archive's
    with archive.mounted() as m:
        files = files_under(m.path / "patients")
        assert len(files) == 5
        for path in files:
            with pytest.raises(OSError) as exc:
                path.read_bytes()
            assert exc.value.errno == errno.EIO
        log = m.log_text()
    assert "which the key file does not hold" in log and "not this archive's" in log
    refused = archive.ingest(inputs / "mr", check=False)
    assert refused.returncode == 2 and "not this archive's" in refused.stderr

    key_file.unlink()
    (archive.dir / "empty").mkdir()
    mount = archive.run("mount", "--foreground", str(archive.dir / "empty"), check=False)
    assert mount.returncode == 2 and "no such key file" in mount.stderr
    key_file.write_bytes(good)
    key_file.chmod(0o600)
    with archive.mounted() as m:
        assert read_all(m.path) == sorted(sha256_file(p) for p in files_under(inputs / "ct"))


def test_tampered_sealed_copies_are_never_served(archive: Archive, inputs: Path) -> None:
    archive.ingest(inputs / "ct")
    chunk_keys = sorted(LocalStore("site-a", archive.dir / "site-a").list("chunks/"))
    first, second = chunk_keys[:2]
    for site, key in (("site-a", first), ("site-a", second), ("site-b", second)):
        path = LocalStore(site, archive.dir / site).path(key)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit, inside the ciphertext
        path.write_bytes(bytes(data))
    with archive.mounted() as m:
        results = {}
        for path in files_under(m.path / "patients"):
            try:
                results[path.name] = sha256_file(path)
            except OSError as exc:
                results[path.name] = f"errno {exc.errno}"
    expected = {sha256_file(p) for p in files_under(inputs / "ct")}
    bad = [r for r in results.values() if r not in expected]
    # ``first`` is good at site-b and was read from there; ``second`` is bad at both.
    assert bad == [f"errno {errno.EIO}"]
    index = Index(archive.dir / "index")
    try:
        journalled = {(e.site, e.key) for e in index.journal()}
    finally:
        index.close()
    assert {("site-a", first), ("site-a", second), ("site-b", second)} <= journalled


# -- rotation and re-seal ---------------------------------------------------------------


def test_rotate_and_reseal_moves_every_object_to_the_new_key(
    archive: Archive, inputs: Path
) -> None:
    archive.ingest(inputs / "ct")
    old = ring(archive).current
    rotated = archive.run("key", "rotate", "--no-reseal")
    new = ring(archive).current
    assert new != old and new in rotated.stdout
    assert set(ring(archive).keys) == {old, new}
    archive.ingest(inputs / "mr")  # sealed under the new key
    by_key = {keys.key_id_of(data) for data in site_objects(archive).values()}
    assert by_key == {old, new}

    # A pass stopped after its first batch, then resumed, rewrites each object once.
    config = load(archive.config)
    index = Index(config.index_path)
    sites = [LocalStore(n, archive.dir / n) for n in ("site-a", "site-b")]
    stop = threading.Event()
    try:
        first = reseal(index, sites, ring(archive), step=lambda _: stop.set(), stop=stop)
        second = reseal(index, sites, ring(archive))
    finally:
        index.close()
    assert first.resealed > 0 and second.resealed > 0 and not second.failed
    objects = site_objects(archive)
    assert {k for k, d in objects.items() if keys.key_id_of(d) != new} == set()
    again = archive.run("key", "reseal")
    assert "0 objects resealed" in again.stdout

    with archive.mounted() as m:
        assert read_all(m.path) == sorted(
            sha256_file(p) for p in files_under(inputs / "ct") + files_under(inputs / "mr")
        )


def test_key_added_to_an_unsealed_archive(tmp_path: Path, inputs: Path) -> None:
    """Old objects stay readable as they are; new ones are sealed; reseal seals the old."""
    plain = Archive.__new__(Archive)
    plain.dir, plain.config, plain.mounts = tmp_path, tmp_path / "animfs.toml", []
    os.chmod(tmp_path, 0o755)
    plain.run("init", "--no-key", str(tmp_path), config=False)
    plain.ingest(inputs / "ct")
    plain.append_config('[security]\nkey_file = "animfs.key"')
    assert "mode 0600" in plain.run("key", "create").stdout
    assert (tmp_path / "animfs.key").stat().st_mode & 0o777 == 0o600
    plain.ingest(inputs / "mr")
    sealed = [keys.is_sealed(d) for d in site_objects(plain).values()]
    assert any(sealed) and not all(sealed)
    with plain.mounted() as m:
        assert len(read_all(m.path)) == 8
    assert "0 failed" in plain.run("key", "reseal").stdout
    assert all(keys.is_sealed(d) for d in site_objects(plain).values())
    with plain.mounted() as m:
        assert read_all(m.path) == sorted(
            sha256_file(p) for p in files_under(inputs / "ct") + files_under(inputs / "mr")
        )
