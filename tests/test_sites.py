"""Two sites through real mounts: a site dies, hangs, is lost, or is tampered with.

S3 sites are two moto servers (separate processes on 127.0.0.1, see conftest);
the tamper cases that are simpler on disk use the file sites ``animfs init`` makes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from animfs import chunks, keys
from animfs.config import load
from animfs.index import Index
from animfs.manifest import Manifest
from animfs.store.local import LocalStore

import gen_dicom
from conftest import Archive, MotoServer, files_under, sha256_file, wait_for

PREFIX = "archive"


# -- helpers ---------------------------------------------------------------------------


def configure(archive: Archive, *, s3: list[MotoServer] | None = None, min_sites: int = 1,
              repair_interval: int = 3600) -> dict[str, str]:
    """Point the archive's sites at the moto servers (fresh buckets); returns site -> bucket."""
    text = archive.config.read_text()
    buckets = {}
    if s3 is not None:
        for name, server in zip(("site-a", "site-b"), s3, strict=True):
            buckets[name] = server.bucket()
            text, n = re.subn(
                rf'name = "{name}"\nurl = "[^"]*"',
                f'name = "{name}"\nurl = "s3://{buckets[name]}/{PREFIX}"\n'
                f'endpoint_url = "{server.endpoint}"\nregion = "us-east-1"',
                text,
            )
            assert n == 1
    text, n = re.subn(r"min_sites = \d+", f"min_sites = {min_sites}", text)
    assert n == 1
    text, n = re.subn(r"repair_interval = \d+", f"repair_interval = {repair_interval}", text)
    assert n == 1
    archive.config.write_text(text)
    return buckets


def status(archive: Archive) -> dict[str, object]:
    result: dict[str, object] = json.loads(archive.run("status").stdout)
    return result


def journal(archive: Archive) -> set[tuple[str, str]]:
    index = Index(archive.dir / "index")
    try:
        return {(m.site, m.key) for m in index.journal()}
    finally:
        index.close()


def manifests(archive: Archive) -> list[Manifest]:
    index = Index(archive.dir / "index")
    try:
        return sorted((Manifest.from_bytes(m) for m in index.manifests()),
                      key=lambda m: m.instance.sop_uid)
    finally:
        index.close()


def bucket_objects(server: MotoServer, bucket: str) -> dict[str, bytes]:
    client = server.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):  # type: ignore[attr-defined]
        for entry in page.get("Contents", ()):
            key = entry["Key"].removeprefix(PREFIX + "/")
            out[key] = client.get_object(Bucket=bucket, Key=entry["Key"])["Body"].read()  # type: ignore[attr-defined]
    return out


def shas(paths: list[Path]) -> list[str]:
    return sorted(sha256_file(p) for p in paths)


@pytest.fixture(scope="module")
def big_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight 512x512 CT slices (one chunk each) and one 30 MB instance (eight chunks)."""
    root = tmp_path_factory.mktemp("big")
    gen_dicom.write_series(root / "ct", patient_id="P100", patient_name="Big^Series",
                           n_slices=8, rows=512, cols=512, modality="CT",
                           study_description="CT Abdomen", series_description="Axial",
                           institution_name="Hospital A", seed=11)
    gen_dicom.write_large_instance(root / "ct" / "IMG09999.dcm", size_mb=30,
                                   patient_id="P100", patient_name="Big^Series",
                                   institution_name="Hospital A", seed=11)
    return root


@pytest.fixture
def ct_files(series_dir: Path) -> list[Path]:
    return sorted((series_dir / "ct").iterdir())


# -- a site dies or hangs while a series is read -----------------------------------------


@pytest.mark.parametrize("failure", ["killed", "hung"])
def test_read_survives_preferred_site_failing_midway(
    archive: Archive, s3: list[MotoServer], big_series: Path, failure: str
) -> None:
    configure(archive, s3=s3)
    archive.ingest(big_series)
    originals = files_under(big_series)
    expected = shas(originals)
    with archive.mounted() as m:
        files = files_under(m.path / "patients")
        assert len(files) == len(originals)
        files.sort(key=lambda p: -p.stat().st_size)  # the 30 MB instance first
        got = []
        with open(files[0], "rb") as f:
            digest = hashlib.sha256(f.read(1 << 20))
            # Mid-way through the big file (read-ahead holds 4 of its 8 chunks):
            if failure == "killed":
                s3[0].kill()
            else:
                s3[0].pause()
            while block := f.read(1 << 20):
                digest.update(block)
        got.append(digest.hexdigest())
        got += [sha256_file(p) for p in files[1:]]  # an OSError (EIO) would fail here
        assert sorted(got) == expected
        if failure == "killed":  # (status would wait out the hung site's time-outs)
            report = status(archive)
            site_a = report["sites"]["site-a"]  # type: ignore[index]
            assert site_a["state"] == "down" and site_a["last_error"]
            assert report["sites"]["site-b"]["state"] == "up"  # type: ignore[index]
        s3[0].resume()  # let reads stuck on the hung server end before unmounting
    assert "site site-a: marked down" in m.log_text()
    assert journal(archive) == set()  # an unreachable site lacks nothing: nothing to repair


# -- a site is down while we ingest, then comes back empty (a lost site) ------------------


def test_ingest_with_site_down_then_repair_a_lost_site(
    archive: Archive, s3: list[MotoServer], series_dir: Path
) -> None:
    buckets = configure(archive, s3=s3, min_sites=1)
    archive.ingest(series_dir / "ct")
    # state/ (the key check, access state) and the hosts' logs (log/, hosts/) are kept by
    # their writers, not by verify (a log object a site missed is journalled and repaired).
    kept = ("state/", "log/", "hosts/")
    before = {k for k in bucket_objects(s3[0], buckets["site-a"]) if not k.startswith(kept)}
    assert before <= set(bucket_objects(s3[1], buckets["site-b"]))

    s3[1].kill()
    result = archive.ingest(series_dir / "mr")
    assert "6 ingested" in result.stdout
    after = bucket_objects(s3[0], buckets["site-a"])
    written_while_down = {k for k in after if not k.startswith(kept)} - before
    assert len(written_while_down) == 12  # 6 manifests, 6 chunks
    logged = {k for _site, k in journal(archive) if k.startswith(("log/", "hosts/"))}
    assert len(logged) == 2  # the group's entry in this host's log, its hosts/ marker
    written_while_down |= logged
    assert journal(archive) == {("site-b", key) for key in written_while_down}
    report = status(archive)
    assert report["sites"]["site-b"]["state"] == "down"  # type: ignore[index]
    assert report["sites"]["site-b"]["pending_repairs"] == 14  # type: ignore[index]
    assert report["index"]["instances"] == 18  # type: ignore[index]

    failed = archive.run("repair", check=False)  # site-b still down: nothing lost, nothing done
    assert failed.returncode == 1
    assert "unreachable: site-b" in failed.stdout
    assert len(journal(archive)) == 14

    # The site comes back with nothing (moto keeps objects in memory): a lost site.
    s3[1].start()
    s3[1].bucket(buckets["site-b"])
    result = archive.run("repair")
    assert "14 repaired, 0 not repaired" in result.stdout
    assert journal(archive) == set()
    assert set(bucket_objects(s3[1], buckets["site-b"])) == written_while_down

    # What was written before the loss is found by verify, journalled, and repaired too.
    scrub = archive.run("verify", "--deep", check=False)
    assert scrub.returncode == 1, scrub.stdout
    assert "site-a: complete" in scrub.stdout
    assert f"site-b: INCOMPLETE, {len(before)} missing, 0 corrupt" in scrub.stdout
    assert journal(archive) == {("site-b", key) for key in before}
    archive.run("repair")
    scrub = archive.run("verify", "--deep")
    assert "site-a: complete, 36 objects read and checked" in scrub.stdout
    assert "site-b: complete, 36 objects read and checked" in scrub.stdout
    data_b, data_a = (
        {k: v for k, v in bucket_objects(s3[i], buckets[s]).items() if not k.startswith(kept)}
        for i, s in ((1, "site-b"), (0, "site-a"))
    )
    assert data_b == data_a

    # Site-b alone now serves the whole archive.
    s3[0].kill()
    with archive.mounted() as m:
        assert shas(files_under(m.path / "patients")) == shas(files_under(series_dir))


def test_min_sites_2_refuses_ingest_with_a_site_down(
    archive: Archive, s3: list[MotoServer], series_dir: Path
) -> None:
    configure(archive, s3=s3, min_sites=2)
    s3[1].kill()
    result = archive.ingest(series_dir / "mr", check=False)
    assert result.returncode == 1
    refusals = [line for line in result.stderr.splitlines() if line.startswith("animfs: refused")]
    assert len(refusals) == 6
    assert all("min_sites = 2" in line and "site-b" in line for line in refusals), refusals
    assert "0 ingested" in result.stdout
    report = status(archive)
    assert report["index"]["instances"] == 0  # type: ignore[index]
    assert journal(archive) == set()


# -- copies changed or removed behind animfs's back ----------------------------------------


@pytest.mark.parametrize("unpackers", [0, 2], ids=["fetch-threads", "unpackers"])
def test_tampered_copies_on_file_sites(archive: Archive, series_dir: Path, unpackers: int) -> None:
    """Whoever reads the site first, the mount's fetch threads or its unpackers (which
    hand a bad copy to the fetch threads), a bad copy is journalled and never served."""
    configure(archive)
    archive.set_config("cache", "unpackers", str(unpackers))
    archive.ingest(series_dir / "ct")
    site_a = LocalStore("site-a", archive.dir / "site-a")
    site_b = LocalStore("site-b", archive.dir / "site-b")
    found = manifests(archive)
    x, y, w, z = (chunks.chunk_key(m.chunks[0].id) for m in found[:4])
    manifest = found[4].object_key_with(keys.for_config(load(archive.config)))
    good = {key: site_b.get(key) for key in (x, y, w)} | {
        key: site_a.get(key) for key in (z, manifest)}

    site_a.path(x).write_bytes(b"garbage " * 100)  # does not decompress
    site_a.path(y).unlink()  # gone
    site_a.path(w).write_bytes(chunks.seal(b"other plain bytes")[1])  # decompresses, wrong hash
    site_b.path(z).write_bytes(good[z][:-10])  # truncated, at the site we do not read from
    edited = bytearray(good[manifest])  # sealed: one flipped bit inside (else one edited key)
    if keys.is_sealed(edited):
        edited[-20] ^= 1
    else:
        edited[:] = edited.replace(b'"size"', b'"sise"')
    site_b.path(manifest).write_bytes(bytes(edited))

    with archive.mounted() as m:
        if unpackers:
            m.wait_for_unpackers()
        assert shas(files_under(m.path / "patients")) == shas(files_under(series_dir / "ct"))
    # Reads come from site-a first: its bad copies were noticed and journalled.
    assert journal(archive) == {("site-a", x), ("site-a", y), ("site-a", w)}

    shallow = archive.run("verify", check=False)
    assert shallow.returncode == 1
    assert f"site-a: {y}: missing" in shallow.stdout
    assert "site-b: complete, 24 objects present" in shallow.stdout

    deep = archive.run("verify", "--deep", check=False)
    assert deep.returncode == 1
    for site, key in [("site-a", x), ("site-a", w), ("site-b", z), ("site-b", manifest)]:
        assert f"{site}: {key}: corrupt" in deep.stdout
    assert "site-a: INCOMPLETE, 1 missing, 2 corrupt of 24 objects" in deep.stdout
    assert "site-b: INCOMPLETE, 0 missing, 2 corrupt of 24 objects" in deep.stdout
    only_b = archive.run("verify", "--deep", "--site", "site-b", check=False)
    assert only_b.returncode == 1 and "site-a" not in only_b.stdout

    result = archive.run("repair")
    assert "5 repaired, 0 not repaired" in result.stdout
    assert journal(archive) == set()
    for key in (x, y, w):
        assert site_a.get(key) == good[key]
    for key in (z, manifest):
        assert site_b.get(key) == good[key]
    archive.run("verify", "--deep")
    assert archive.run("repair").stdout.startswith("0 repaired")  # rerun: nothing to do


def test_tampered_copies_on_s3_sites(
    archive: Archive, s3: list[MotoServer], series_dir: Path
) -> None:
    buckets = configure(archive, s3=s3)
    archive.ingest(series_dir / "mr")
    found = manifests(archive)
    corrupt, deleted = (chunks.chunk_key(m.chunks[0].id) for m in found[:2])
    client, bucket = s3[0].client(), buckets["site-a"]
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/{corrupt}", Body=os.urandom(5000))  # type: ignore[attr-defined]
    client.delete_object(Bucket=bucket, Key=f"{PREFIX}/{deleted}")  # type: ignore[attr-defined]

    with archive.mounted() as m:
        assert shas(files_under(m.path / "patients")) == shas(files_under(series_dir / "mr"))
    assert journal(archive) == {("site-a", corrupt), ("site-a", deleted)}
    assert archive.run("verify", "--deep", check=False).returncode == 1
    assert "2 repaired" in archive.run("repair").stdout
    archive.run("verify", "--deep")
    assert bucket_objects(s3[0], bucket) == bucket_objects(s3[1], buckets["site-b"])


def test_mount_repairs_in_the_background(archive: Archive, series_dir: Path) -> None:
    configure(archive, repair_interval=1)
    archive.ingest(series_dir / "mr")
    site_b = LocalStore("site-b", archive.dir / "site-b")
    key = chunks.chunk_key(manifests(archive)[0].chunks[0].id)
    good = site_b.get(key)
    site_b.path(key).unlink()
    assert archive.run("verify", check=False).returncode == 1
    assert journal(archive) == {("site-b", key)}
    with archive.mounted() as m:
        wait_for(lambda: not journal(archive), 30, "the background repair")
    assert "background repair: 1 repaired" in m.log_text()
    assert site_b.get(key) == good
