"""Index formats: an index written by the animfs before format 3 is upgraded in place.

The old index is made by the old code itself (kept in tests/data as of the last
commit that wrote format 2), ingesting real DICOM; the mount of each code shows the same
tree, and the upgraded one serves the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lmdb
import pytest

from animfs.index import FORMAT, Index, IndexError_, check

from conftest import ROOT, Archive, files_under, sha256_file

# animfs and scripts/gen_index.py as of commit 925779b, the last that wrote index
# format 2 (`git archive 925779b animfs scripts/gen_index.py | gzip -9n`): kept as a
# file so that the test needs no git history.
OLD_CODE = ROOT / "tests" / "data" / "animfs-format2.tar.gz"


@pytest.fixture(scope="module")
def old_code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("old-animfs")
    subprocess.run(["tar", "-xzf", str(OLD_CODE), "-C", str(where)], check=True, timeout=60)
    assert (where / "animfs" / "index.py").read_text().count('FORMAT = b"2"') == 1
    return where


def manifests_by(code_env: dict[str, str], index_dir: Path) -> list[bytes]:
    """Every manifest (JSON, as at the sites) that an index gives, read by some code."""
    out = subprocess.run(
        [sys.executable, "-c", "import sys, pathlib; from animfs.index import Index; "
         "ix = Index(pathlib.Path(sys.argv[1])); "
         "print('\\n'.join(sorted(m.hex() for m in ix.manifests()))); ix.close()",
         str(index_dir)],
        capture_output=True, text=True, timeout=120, env=code_env, check=True,
    ).stdout
    return [bytes.fromhex(line) for line in out.split()]


def tree(top: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under a mount: (kind, inode, size, mtime, links, target) by path."""
    out: dict[str, tuple[Any, ...]] = {}
    for folder, dirs, files in os.walk(top):
        for name in dirs + files:
            path = Path(folder) / name
            st = path.lstat()
            target = os.readlink(path) if path.is_symlink() else ""
            out[str(path.relative_to(top))] = (st.st_mode, st.st_ino, st.st_size,
                                               st.st_mtime_ns, st.st_nlink, target)
    return out


def test_a_format_2_index_is_upgraded_in_place(
    archive: Archive, series_dir: Path, old_code: Path
) -> None:
    # PYTHONSAFEPATH: ``python -m`` would put the current folder (maybe a checkout of
    # this code) before PYTHONPATH.
    old = {"PYTHONPATH": str(old_code), "PYTHONSAFEPATH": "1"}
    old_env = {**os.environ, **old}
    ingest = subprocess.run(
        [sys.executable, "-m", "animfs", "--config", str(archive.config), "ingest",
         str(series_dir)],
        capture_output=True, text=True, timeout=600, env=old_env,
    )
    assert ingest.returncode == 0, ingest.stderr
    with archive.mounted(env=old) as m:
        before = tree(m.path)
        cd_dir = next((m.path / "cd").iterdir())
        dicomdir = (cd_dir / "DICOMDIR").read_bytes()
    old_manifests = manifests_by(old_env, archive.dir / "index")
    env = lmdb.open(str(archive.dir / "index"), max_dbs=16, readonly=True, lock=False)
    with env.begin() as txn:
        meta, ids = env.open_db(b"meta", txn=txn), env.open_db(b"ids", txn=txn)
        assert txn.get(b"format", db=meta) == b"2"
        old_files = sum(1 for key, _ in txn.cursor(db=ids) if bytes(key).startswith(b"I\0"))
    env.close()
    originals = {sha256_file(p) for p in files_under(series_dir)}
    assert old_files == len(originals) > 10

    with archive.mounted() as m:  # this code: upgrades the index as it opens it
        assert "index upgraded from format 2 to 4" in m.log_text()
        after = tree(m.path)
        assert (next((m.path / "cd").iterdir()) / "DICOMDIR").read_bytes() == dicomdir
        served = {
            hashlib.sha256(Path(m.path, path).read_bytes()).hexdigest()
            for path, (mode, *_rest) in after.items()
            if path.startswith("patients/") and mode & 0o170000 == 0o100000
        }
    assert after == before  # names, inodes, sizes, mtimes, link counts, link targets
    assert served == originals

    index = Index(archive.dir / "index")
    try:
        assert index.meta(b"format") == FORMAT == b"4"
        assert check(index) == []
        with index.env.begin() as txn:
            left = [bytes(k) for k, _ in txn.cursor(db=index._db["ids"])
                    if bytes(k).startswith(b"I\0")]
            left += [bytes(k) for k, _ in txn.cursor(db=index._db["media"])
                     if bytes(k).startswith(b"f\0")]
            files = {bytes(k) for k, v in txn.cursor(db=index._db["nodes"]) if v[0] == 5}
            left += [bytes(k) for k, v in txn.cursor(db=index._db["dirents"])
                     if bytes(v) in files]  # a file's name is in its series' listing
            listed = sum(1 for _ in txn.cursor(db=index._db["files"]))
        assert left == [] and len(files) == len(originals) and listed == 2
    finally:
        index.close()
    # The records decode to the same manifests (as at the sites), byte for byte.
    assert manifests_by(dict(os.environ), archive.dir / "index") == old_manifests
    assert len(old_manifests) == len(originals)
    verify = archive.run("verify")
    assert "index: consistent" in verify.stdout + verify.stderr


def test_an_old_index_that_does_not_upgrade_is_refused_unchanged(
    tmp_path: Path, old_code: Path
) -> None:
    where = tmp_path / "idx"
    made = subprocess.run(
        [sys.executable, str(old_code / "scripts" / "gen_index.py"), "300", "--index", str(where)],
        capture_output=True, text=True, timeout=300, cwd=old_code,
        env={**os.environ, "PYTHONPATH": str(old_code), "PYTHONSAFEPATH": "1"},
    )
    assert made.returncode == 0, made.stderr

    def content() -> dict[bytes, list[tuple[bytes, bytes]]]:
        env = lmdb.open(str(where), max_dbs=16, readonly=True, lock=False)
        with env.begin() as txn:
            names = [bytes(k) for k, _ in txn.cursor()]
            out = {name: [(bytes(k), bytes(v)) for k, v in
                          txn.cursor(db=env.open_db(name, txn=txn, create=False))]
                   for name in names if name != b"files"}
        env.close()
        return out

    env = lmdb.open(str(where), max_dbs=16, map_size=1 << 30)
    with env.begin(write=True) as txn:  # one file's record lost
        instances = env.open_db(b"instances", txn=txn)
        cursor = txn.cursor(db=instances)
        assert cursor.first()
        cursor.delete()
    env.close()
    before = content()
    assert len(before[b"instances"]) == 299 and before[b"meta"][0] == (b"format", b"2")
    with pytest.raises(IndexError_, match="cannot upgrade this index to format 4 .*rebuild-index"):
        Index(where, map_size=1 << 30)
    assert content() == before


def test_an_index_of_an_unknown_format_is_refused(tmp_path: Path) -> None:
    index = Index(tmp_path / "idx", map_size=1 << 24)
    index.put_meta(b"format", b"9")
    index.close()
    with pytest.raises(Exception, match="index format 9 is not one this animfs reads"):
        Index(tmp_path / "idx", map_size=1 << 24)


def test_mount_refuses_an_unknown_format_in_the_foreground(archive: Archive) -> None:
    """`animfs mount` opens the index before it starts the mount process: an index it
    cannot read fails there, in one line, with nothing mounted and no process left."""
    index = Index(archive.dir / "index", map_size=1 << 24)
    index.put_meta(b"format", b"9")
    index.close()
    mnt = archive.dir / "mnt"
    mnt.mkdir()
    result = archive.run("mount", str(mnt), check=False, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("animfs: ")
    assert "index format 9 is not one this animfs reads" in lines[0]
    assert not os.path.ismount(mnt)
    assert not (archive.dir / "animfs-mount.log").exists()  # no mount process was started
