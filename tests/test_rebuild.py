"""Losing the index loses nothing: rebuilt from one site alone, or from a snapshot plus
newer manifests, the mount shows the same names, inodes, sizes and mtimes, and the
consents, record states, grants and the audit chain head come back too."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from animfs import audit
from animfs.index import Index
from animfs.store.local import LocalStore

import gen_dicom
from conftest import Archive, wait_for

INSTITUTIONS = '''"Hospital A" = "CHL"
"Hospital B" = "HRS"
'''
USERS = """
[users.0]
name = "root.clinician"
institution = "CHL"
role = "clinician"
"""


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rebuild-inputs")
    for i, (pid, name, inst, modality) in enumerate([
        ("P100", "Muller^Anna", "Hospital A", "CT"),
        ("P200", "Weber^Paul", "Hospital B", "MR"),
        ("P300", "Klein^Eva", "Hospital A", "CT"),
    ]):
        gen_dicom.write_series(root / f"s{i}", patient_id=pid, patient_name=name, n_slices=4,
                               rows=32, cols=32, modality=modality, institution_name=inst,
                               study_description=f"Study {i}", study_date=f"2024010{i + 1}",
                               seed=100 + i)
    return root


def configure(archive: Archive) -> None:
    """Institution codes for the issuers, and root as a clinician (so break-glass works)."""
    text = archive.config.read_text()
    archive.config.write_text(text.replace("[institutions]", "[institutions]\n" + INSTITUTIONS, 1))
    archive.append_config(USERS)


def listing(archive: Archive) -> str:
    """``ls -liR`` of the mount with full times: names, inodes, sizes and mtimes."""
    with archive.mounted() as m:
        out = subprocess.run(["ls", "-liR", "--time-style=+%s.%N", "."], cwd=m.path,
                             capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.count(".dcm") >= 8
    # The /cd media folder's own time is the index's creation time, which no rebuild can
    # know (raised with its owner); every other line, its entries included, must match.
    return re.sub(r"(?m)^(8 dr-xr-xr-x \d+ root root 0) \S+ cd$", r"\1 - cd", out)


def access(archive: Archive) -> tuple[str, dict[str, object]]:
    """``consent list`` and every patient's stored access state."""
    consents = archive.run("consent", "list").stdout
    index = Index(archive.dir / "index")
    try:
        states = {p: index.access_state(p) for p in ("CHL-P100", "HRS-P200", "CHL-P300")}
    finally:
        index.close()
    return consents, states


def change_access(archive: Archive) -> None:
    archive.run("consent", "grant", "--patient", "HRS-P200", "--to", "CHL")
    archive.run("consent", "grant", "--patient", "CHL-P100", "--to", "all", "--until", "2999-01-01")
    archive.run("consent", "revoke", "--patient", "CHL-P100", "--to", "all")
    archive.run("record", "set", "--patient", "CHL-P300", "closed")
    archive.run("break-glass", "--patient", "HRS-P200", "--reason", "ER")


def rebuild_from_b(archive: Archive, *extra: str) -> str:
    """Remove the index and rebuild it with site-a out of reach."""
    shutil.rmtree(archive.dir / "index")
    away = archive.dir / "site-a.away"
    (archive.dir / "site-a").rename(away)
    try:
        return archive.run("rebuild-index", "--from-site", "site-b", *extra).stdout
    finally:
        away.rename(archive.dir / "site-a")


def test_rebuild_from_one_site_gives_the_same_tree_and_access_state(
    archive: Archive, studies: Path
) -> None:
    configure(archive)
    archive.ingest(studies / "s0", studies / "s1")
    archive.ingest(studies / "s2")
    change_access(archive)
    before, state_before = listing(archive), access(archive)
    head = audit.head(archive.dir / "audit.jsonl")
    assert head is not None and "HRS-P200\tCHL" in state_before[0]

    refused = archive.run("rebuild-index", "--from-site", "site-b", check=False)
    assert refused.returncode == 2 and "already there" in refused.stderr
    out = rebuild_from_b(archive)
    assert "12 instances from manifests, access state of 3 patients" in out
    assert listing(archive) == before
    assert access(archive) == state_before
    index = Index(archive.dir / "index")
    try:
        kept = json.loads(index.meta(b"audit-head") or b"{}")
    finally:
        index.close()
    assert (kept["head"], kept["bytes"]) == head


def test_rebuild_from_a_snapshot_and_newer_manifests(archive: Archive, studies: Path) -> None:
    configure(archive)
    archive.ingest(studies / "s0", studies / "s1")
    archive.run("consent", "grant", "--patient", "HRS-P200", "--to", "CHL")
    assert "8 instances" in archive.run("snapshot").stdout
    archive.ingest(studies / "s2")  # after the snapshot: only in manifests
    archive.run("record", "set", "--patient", "CHL-P300", "opted-out")
    archive.run("consent", "revoke", "--patient", "HRS-P200", "--to", "CHL")
    before, state_before = listing(archive), access(archive)

    out = rebuild_from_b(archive, "--from-snapshot")
    assert "(8 instances) + 4 instances from manifests" in out
    assert listing(archive) == before
    assert access(archive) == state_before


def test_wrong_key_never_builds_an_index(archive: Archive, studies: Path) -> None:
    from animfs import keys

    archive.ingest(studies / "s0")
    keys.save(keys.new_ring(), archive.dir / "animfs.key")
    shutil.rmtree(archive.dir / "index")
    result = archive.run("rebuild-index", "--from-site", "site-b", check=False)
    assert result.returncode == 2 and "which the key file does not hold" in result.stderr
    assert not (archive.dir / "index" / "data.mdb").exists()


def test_the_mount_publishes_state_and_takes_snapshots(archive: Archive, studies: Path) -> None:
    archive.ingest(studies / "s0")
    text = archive.config.read_text().replace("snapshot_interval = 3600", "snapshot_interval = 1")
    archive.config.write_text(text)
    site_b = LocalStore("site-b", archive.dir / "site-b")
    with archive.mounted():
        wait_for(lambda: any(k.endswith("/index") for k in site_b.list("snapshots/")), 60,
                 "a snapshot from the mount")
        # A change made by a command that could not reach the key or the sites (a
        # clinician's break-glass) is only marked in the index: the mount publishes it.
        index = Index(archive.dir / "index")
        try:
            index.set_record("X-P1", "closed")
            assert [p for p, _ in index.unpublished_state()] == ["X-P1"]
            wait_for(lambda: not index.unpublished_state(), 60, "the mount to publish")
        finally:
            index.close()
    assert len(list(site_b.list("state/patients/"))) == 1
