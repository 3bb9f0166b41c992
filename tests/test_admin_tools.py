"""Layer 3: the mount as admins, legacy software and backup jobs use it, with real,
unmodified tools from Debian's packages (dcmtk, libgdcm-tools, dcm2niix, tar, rsync,
coreutils, findutils, attr, util-linux's mount).

One archive for the module: a CT series (institution HA), then an MR series
(HB), then pydicom's own test files (many transfer syntaxes, HA).  Root is the
backup role, so every open by the tools is decided and audited; uid 1001 is a
clinician at HA.  Each test mounts it itself, so remounts are real.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from animfs.index import (
    BY_DATE_INO,
    BY_MODALITY_INO,
    DIR,
    ROOT_INO,
    STATUS_INO,
    Index,
    hashed_ino,
)
from animfs.manifest import Manifest, instance_key

import gen_dicom
from conftest import Archive, files_under, sha256_file, wait_for

CLINICIAN = 1001  # dr at HA: may see the CT and pydicom studies, not the MR one
HELPER = Path("/sbin/mount.fuse.animfs")

INSTITUTIONS = '"Hospital A" = "HA"\n"Hospital B" = "HB"\n'
USERS = f"""
[users.0]
name = "backup"
institution = "HA"
role = "backup"

[users.{CLINICIAN}]
name = "dr.a"
institution = "HA"
role = "clinician"
"""


class World:
    """The module's archive, its originals, and the index's view of them."""

    def __init__(self, archive: Archive, originals: dict[str, Path], series: dict[str, Path],
                 marker: Path) -> None:
        self.archive, self.originals, self.series, self.marker = archive, originals, series, marker
        index = Index(archive.dir / "index")
        try:
            self.manifests = {
                sop: Manifest.from_bytes(index.manifest_bytes(instance_key(sop)) or b"")
                for sop in originals
            }
            root = index.node(ROOT_INO)
            assert root is not None
            self.total_bytes = root.bytes_below
        finally:
            index.close()

    def in_mount(self, mount: Path, sop: str) -> Path:
        return mount / self.manifests[sop].path().lstrip("/")

    def audit_opens(self) -> int:
        path = self.archive.dir / "audit.jsonl"
        if not path.exists():
            return 0
        lines = path.read_bytes().splitlines()
        return sum(1 for line in lines if json.loads(line)["event"] == "open")


def sop_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture(scope="module")
def world(series_dir: Path) -> Iterator[World]:
    directory = Path(tempfile.mkdtemp(prefix="animfs-admin-"))
    directory.chmod(0o755)
    archive = Archive(directory)
    try:
        text = archive.config.read_text()
        head, table, tail = text.partition("[institutions]")
        assert table, "animfs init wrote no [institutions] table"
        archive.config.write_text(head + table + "\n" + INSTITUTIONS + tail)
        archive.append_config(USERS)
        archive.ingest(series_dir / "ct")
        marker = directory / "marker"  # find -newer: between the CT and everything after
        marker.touch()
        archive.ingest(series_dir / "mr")
        extra = directory / "pydicom"
        extra.mkdir()
        for i, path in enumerate(p for p in gen_dicom.pydicom_test_files(unique_sop=True)
                                 if p.suffix == ".dcm"):
            shutil.copy(path, extra / f"{i:03d}_{path.name}")
        archive.ingest(extra, check=False, extra=["--institution", "HA"])  # some are refused
        candidates = files_under(series_dir / "ct") + files_under(series_dir / "mr")
        candidates += files_under(extra)
        index = Index(directory / "index")
        try:
            originals = {sop: p for p in candidates
                         if index.manifest_bytes(instance_key(sop := sop_of(p))) is not None}
        finally:
            index.close()
        assert len(originals) >= 18 + 10, "too few files were archived to test with"
        # The marker's mtime: just after the CT's last instance entered the archive.
        w = World(archive, originals, {"ct": series_dir / "ct", "mr": series_dir / "mr"}, marker)
        ct_times = [m.ingested_ns for sop, m in w.manifests.items()
                    if originals[sop].parent == series_dir / "ct"]
        os.utime(marker, ns=(max(ct_times), max(ct_times)))
        yield w
    finally:
        archive.close()
        shutil.rmtree(directory, ignore_errors=True)


def run(*cmd: str | Path, cwd: Path | None = None, check: bool = True,
        ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120,
                            cwd=cwd, errors="replace")
    if check:
        assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{result.stderr}"
    return result


def as_uid(uid: int, *cmd: str | Path) -> subprocess.CompletedProcess[str]:
    return run("setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd, check=False)


# -- DICOM tools ------------------------------------------------------------------------------


def test_dicom_tools_read_the_mount_as_they_read_the_originals(world: World) -> None:
    with world.archive.mounted() as m:
        compared = 0
        for sop, original in world.originals.items():
            mounted = world.in_mount(m.path, sop)
            for tool in (["dcmdump"], ["dcmftest"], ["gdcminfo"]):
                a = run(*tool, original, check=False)
                b = run(*tool, mounted, check=False)
                assert b.returncode == a.returncode, (tool, original, b.stdout[:300], b.stderr)
                # Only the paths differ; everything else the tools print must not.
                out_a = (a.stdout + a.stderr).replace(str(original), "FILE")
                out_b = (b.stdout + b.stderr).replace(str(mounted), "FILE")
                assert out_b == out_a, (tool, original)
                compared += 1
            assert sha256_file(mounted) == sha256_file(original)
        assert compared == 3 * len(world.originals)

        # dcm2niix converts a whole series folder to the same NIfTI and sidecar.
        for name, folder in world.series.items():
            mounted_folder = world.in_mount(m.path, sop_of(files_under(folder)[0])).parent
            outputs = []
            for source in (folder, mounted_folder):
                out = Path(tempfile.mkdtemp(prefix=f"nii-{name}-", dir=world.archive.dir))
                log = run("dcm2niix", "-z", "n", "-f", "%s_%d", "-o", out, source)
                lines = [line.replace(str(out), "OUT") for line in log.stdout.splitlines()
                         if not line.startswith("Conversion required")]
                files = {p.name: sha256_file(p) for p in sorted(out.iterdir())}
                outputs.append((lines, files))
            assert any(n.endswith(".nii") for n in outputs[0][1]), outputs[0]
            assert outputs[1] == outputs[0]


# -- backup tools -----------------------------------------------------------------------------


def tar_of(mount: Path) -> bytes:
    result = subprocess.run(["tar", "cf", "-", "-C", str(mount), "."], capture_output=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def tar_listing(data: bytes) -> str:
    result = subprocess.run(["tar", "tvf", "-", "--full-time"], input=data, capture_output=True,
                            timeout=60)
    assert result.returncode == 0
    return result.stdout.decode()


def test_tar_twice_gives_the_same_bytes_and_the_same_listing_after_a_remount(
    world: World,
) -> None:
    with world.archive.mounted() as m:
        first = tar_of(m.path)
        second = tar_of(m.path)
    assert hashlib.sha256(second).digest() == hashlib.sha256(first).digest()
    with world.archive.mounted() as m:
        third = tar_of(m.path)
    listing = tar_listing(first)
    assert tar_listing(third) == listing
    assert hashlib.sha256(third).digest() == hashlib.sha256(first).digest()
    # Every archived file is in it, with its size, and the views' links too.
    for manifest in world.manifests.values():
        assert f" {manifest.size} " in listing and manifest.placement.file_name in listing
    assert "./by-date/" in listing and " -> ../../../../patients/" in listing


def test_rsync_after_a_remount_transfers_nothing(world: World) -> None:
    dest = Path(tempfile.mkdtemp(prefix="rsync-", dir=world.archive.dir))
    try:
        with world.archive.mounted() as m:
            first = run("rsync", "-a", "--itemize-changes", f"{m.path}/", f"{dest}/")
        assert first.stdout.count(">f+++++++++") >= len(world.originals)
        for sop, original in world.originals.items():
            copy = dest / world.manifests[sop].path().lstrip("/")
            assert sha256_file(copy) == sha256_file(original)
        with world.archive.mounted() as m:
            second = run("rsync", "-a", "--itemize-changes", f"{m.path}/", f"{dest}/")
        assert second.stdout == ""
    finally:
        run("chmod", "-R", "u+w", dest)
        shutil.rmtree(dest)


def test_du_find_and_stat_agree_with_the_index(world: World) -> None:
    with world.archive.mounted() as m:
        du = run("du", "-sb", m.path / "patients").stdout.split()[0]
        assert int(du) == world.total_bytes == sum(mf.size for mf in world.manifests.values())

        newer = run("find", m.path / "patients", "-type", "f", "-newer", world.marker).stdout
        expected = sorted(str(world.in_mount(m.path, sop)) for sop, p in world.originals.items()
                          if p.parent != world.series["ct"])
        assert sorted(newer.splitlines()) == expected

        fmt = "%i %s %Y %a %h"
        for sop, manifest in world.manifests.items():
            path = world.in_mount(m.path, sop)
            ino, size, mtime, mode, links = run("stat", "-c", fmt, path).stdout.split()
            assert int(ino) == manifest.placement.file_ino
            assert int(size) == manifest.size
            assert int(mtime) == manifest.ingested_ns // 10**9
            assert (mode, links) == ("444", "2")  # its names under /patients and /cd
            assert os.stat(path).st_mtime_ns == manifest.ingested_ns

        # df: the archive's logical size, nothing free.
        vfs = os.statvfs(m.path)
        assert vfs.f_blocks * vfs.f_frsize == -(-world.total_bytes // 512) * 512
        assert vfs.f_bavail == 0
        df = run("df", "-B1", "--output=size,used", m.path).stdout.split()
        assert df[-2:] == [str(vfs.f_blocks * vfs.f_frsize)] * 2


# -- extended attributes ----------------------------------------------------------------------


def getfattr(path: Path) -> dict[str, str]:
    out = run("getfattr", "-d", "--absolute-names", path).stdout
    return dict(re.findall(r'^(user\.[\w.]+)="(.*)"$', out, re.M))


def test_getfattr_shows_the_index_values_and_opens_nothing(world: World) -> None:
    with world.archive.mounted() as m:
        opens = world.audit_opens()
        for sop, manifest in world.manifests.items():
            inst = manifest.instance
            attrs = getfattr(world.in_mount(m.path, sop))
            assert attrs == {
                "user.dicom.PatientID": inst.patient_id,
                "user.dicom.PatientName": inst.patient_name,
                "user.dicom.StudyInstanceUID": inst.study_uid,
                "user.dicom.SeriesInstanceUID": inst.series_uid,
                "user.dicom.SOPInstanceUID": sop,
                "user.dicom.SOPClassUID": inst.sop_class_uid,
                "user.dicom.Modality": inst.modality,
                "user.dicom.StudyDate": inst.study_date,
                "user.dicom.InstitutionName": inst.institution_name,
                "user.dicom.TransferSyntaxUID": inst.transfer_syntax,
                "user.animfs.sha256": sha256_file(world.originals[sop]),
                "user.animfs.institution": manifest.institution,
                "user.animfs.chunks": str(len(manifest.chunks)),
                "user.animfs.stored_bytes": str(sum(c.stored for c in manifest.chunks)),
                "user.animfs.sites": "site-a,site-b",
                "user.animfs.cached": attrs["user.animfs.cached"],  # checked below
            }
            assert attrs["user.animfs.cached"] in ("0", "1")
        patients = getfattr(m.path / "patients")
        assert patients == {"user.animfs.files": str(len(world.manifests)),
                            "user.animfs.bytes": str(world.total_bytes),
                            "user.animfs.subdirs": patients["user.animfs.subdirs"]}
        assert world.audit_opens() == opens, "reading attributes was audited as an open"

        # Reading a file does count, and then the file is in the cache (the
        # clinician's read: the backup role's reads stream past the caches).
        mr_sop = sop_of(files_under(world.series["mr"])[0])
        ct_sop = sop_of(files_under(world.series["ct"])[-1])
        mounted = world.in_mount(m.path, ct_sop)
        assert getfattr(mounted)["user.animfs.cached"] == "0"
        read = as_uid(CLINICIAN, "sha256sum", mounted)
        assert read.stdout.split()[0] == sha256_file(world.originals[ct_sop])
        assert world.audit_opens() == opens + 1
        assert getfattr(mounted)["user.animfs.cached"] == "1"

        # A clinician who may not see a patient gets EACCES on its attributes.
        hidden = world.in_mount(m.path, mr_sop)
        denied = as_uid(CLINICIAN, "getfattr", "-n", "user.dicom.PatientName", hidden)
        assert denied.returncode != 0 and os.strerror(errno.EACCES) in denied.stderr
        denied = as_uid(CLINICIAN, sys.executable, "-c",
                        "import os, sys; os.getxattr(sys.argv[1], 'user.dicom.PatientID')", hidden)
        assert "PermissionError" in denied.stderr
        seen = as_uid(CLINICIAN, "getfattr", "-n", "user.dicom.PatientID", "--only-values",
                      world.in_mount(m.path, ct_sop))
        assert seen.stdout == world.manifests[ct_sop].instance.patient_id, seen
        assert world.audit_opens() == opens + 1


def test_a_journalled_site_is_left_out_of_user_animfs_sites(world: World) -> None:
    from animfs.chunks import chunk_key
    from animfs.store.dual import Missed

    sop = sop_of(files_under(world.series["mr"])[-1])
    manifest = world.manifests[sop]
    index = Index(world.archive.dir / "index")
    try:
        index.journal_add([Missed("site-b", chunk_key(manifest.chunks[0].id), "missing")])
    finally:
        index.close()
    try:
        with world.archive.mounted() as m:
            assert getfattr(world.in_mount(m.path, sop))["user.animfs.sites"] == "site-a"
    finally:
        index = Index(world.archive.dir / "index")
        try:
            index.journal_remove("site-b", chunk_key(manifest.chunks[0].id))
        finally:
            index.close()


# -- views, status ----------------------------------------------------------------------------


def test_by_date_and_by_modality_link_every_study_with_stable_inodes(world: World) -> None:
    studies = {m.instance.study_uid: m for m in world.manifests.values()}
    with world.archive.mounted() as m:
        first = {}
        for uid, manifest in studies.items():
            inst, place = manifest.instance, manifest.placement
            date = inst.study_date if re.fullmatch(r"\d{8}", inst.study_date) else "00000000"
            day = m.path / "by-date" / date[:4] / date[4:6] / date[6:]
            links = [p for p in day.iterdir()
                     if os.readlink(p).endswith(f"/{place.patient_name}/{place.study_name}")]
            assert len(links) == 1, (uid, list(day.iterdir()))
            target = os.readlink(links[0])
            assert target == f"../../../../patients/{place.patient_name}/{place.study_name}"
            study_dir = m.path / "patients" / place.patient_name / place.study_name
            assert os.path.samefile(links[0], study_dir)
            assert links[0].lstat().st_ino == hashed_ino(b"D\0" + uid.encode())
            first[uid] = links[0].relative_to(m.path)
        for manifest in world.manifests.values():  # every modality of a study has its link
            inst = manifest.instance
            month = (m.path / "by-modality" / (inst.modality or "OT")
                     / inst.study_date[:4] / inst.study_date[4:6])
            if not re.fullmatch(r"\d{8}", inst.study_date):
                continue
            targets = [os.readlink(p) for p in month.iterdir()]
            assert any(t.endswith(f"/{manifest.placement.study_name}") for t in targets)
        inodes = {uid: (m.path / p).lstat().st_ino for uid, p in first.items()}
        view_dirs = {p.relative_to(m.path): p.stat().st_ino
                     for p in (m.path / "by-date").rglob("*") if p.is_dir() and not p.is_symlink()}
        assert m.path.joinpath("by-date").stat().st_ino == BY_DATE_INO
        assert m.path.joinpath("by-modality").stat().st_ino == BY_MODALITY_INO
    with world.archive.mounted() as m:
        # The clinician at HA sees HA's studies in the views, not HB's MR study; asked
        # first, before root's lookups put the names in the kernel's cache.
        mr = world.manifests[sop_of(files_under(world.series["mr"])[0])]
        date = mr.instance.study_date
        mr_link = m.path / first[mr.instance.study_uid]
        day = mr_link.parent
        month = m.path / "by-modality" / "MR" / date[:4] / date[4:6]
        probe = ("import os, sys\ntry:\n    os.lstat(sys.argv[1])\nexcept OSError as e:\n"
                 "    print(e.errno)")
        for hidden in (mr_link, month / mr_link.name):
            found = as_uid(CLINICIAN, sys.executable, "-c", probe, hidden).stdout.strip()
            assert found == str(errno.EACCES), hidden
        listing = "import json, os, sys; print(json.dumps(os.listdir(sys.argv[1])))"
        shown = json.loads(as_uid(CLINICIAN, sys.executable, "-c", listing, day).stdout)
        assert as_uid(CLINICIAN, "ls", month).stdout.split() == []
        assert mr_link.name in os.listdir(day) and mr_link.name not in shown
        assert sorted(shown) == sorted(p.name for p in day.iterdir() if p != mr_link)

        assert {uid: (m.path / p).lstat().st_ino for uid, p in first.items()} == inodes
        assert {p: (m.path / p).stat().st_ino for p in view_dirs} == view_dirs
        for rel in view_dirs:
            folder = m.path / rel
            assert folder.stat().st_nlink == 2 + sum(1 for p in folder.iterdir()
                                                     if p.is_dir() and not p.is_symlink())


def status_of(path: Path) -> dict[str, object]:
    with open(path, "rb") as f:
        doc: dict[str, object] = json.loads(f.read())
    return doc


def test_status_file_is_fresh_at_every_open(world: World) -> None:
    with world.archive.mounted() as m:
        path = m.path / ".animfs" / "status"
        st = path.stat()
        assert (st.st_ino, st.st_size, st.st_mode & 0o777) == (STATUS_INO, 0, 0o444)
        before = status_of(path)
        counters = before["counters"]
        assert isinstance(counters, dict)
        assert set(before["sites"]) == {"site-a", "site-b"}  # type: ignore[arg-type]
        assert before["index"]["instances"] == len(world.manifests)  # type: ignore[index]
        assert "cache" in before

        sop, original = next(iter(world.originals.items()))
        assert sha256_file(world.in_mount(m.path, sop)) == sha256_file(original)
        # Denied at open: the kernel already knows the name (root looked it up), so
        # the clinician's open reaches the access check instead of failing at lookup.
        mr_file = world.in_mount(m.path, sop_of(files_under(world.series["mr"])[0]))
        mr_file.stat()
        denied = as_uid(CLINICIAN, "cat", mr_file)
        assert denied.returncode != 0
        after = status_of(path)
        now = after["counters"]
        assert isinstance(now, dict)
        assert now["opens"] == counters["opens"] + 2
        assert now["denials"] == counters["denials"] + 1
        assert now["read_bytes"] == counters["read_bytes"] + world.manifests[sop].size
        read_per_site = now["bytes_read_per_site"]
        assert sum(read_per_site.values()) > 0  # type: ignore[attr-defined]
        # Readable with cat and by an unprivileged mapped user; write answers EROFS.
        assert json.loads(as_uid(CLINICIAN, "cat", path).stdout)["counters"]["opens"] == 2
        with pytest.raises(OSError) as err:
            open(path, "wb")
        assert err.value.errno == errno.EROFS
        assert as_uid(1005, "cat", path).returncode != 0  # unmapped: nothing
        root = m.path.stat()
        top = [p for p in m.path.iterdir() if p.is_dir() and not p.is_symlink()]
        assert {".animfs", "by-date", "by-modality"} <= {p.name for p in top}
        assert root.st_nlink == 2 + len(top)
        assert getfattr(m.path)["user.animfs.files"] == str(len(world.manifests))
        index_dir = Index(world.archive.dir / "index")
        try:
            node = index_dir.node(BY_DATE_INO)
            assert node is not None and node.kind == DIR
        finally:
            index_dir.close()


# -- mount(8) and fstab -----------------------------------------------------------------------


def test_mount_t_fuse_animfs_and_an_fstab_line_mount_and_umount_unmounts(world: World) -> None:
    assert HELPER.exists() and os.access(HELPER, os.X_OK), (
        f"{HELPER} is missing: scripts/setup.sh installs it")
    mnt = Path(tempfile.mkdtemp(prefix="mnt-fstab-", dir=world.archive.dir))
    mnt.chmod(0o755)
    # An fstab of our own (mount -T): the machine's /etc/fstab is never touched.
    fstab = world.archive.dir / "fstab-test"
    line = f"{world.archive.config} {mnt} fuse.animfs ro,noauto,nofail 0 0"
    fstab.write_text(f"# animfs test\n{line}\n")
    log = world.archive.dir / "animfs-mount.log"

    def unmounted_lines() -> int:
        return log.read_text().count(f"unmounted {mnt}") if log.exists() else 0

    try:
        for how in (["mount", "-T", fstab, mnt],
                    ["mount", "-t", "fuse.animfs", world.archive.config, mnt]):
            done = unmounted_lines()
            run(*how)
            assert os.path.ismount(mnt)
            assert f" {mnt} fuse.animfs ro," in Path("/proc/mounts").read_text()
            sop, original = next(iter(world.originals.items()))
            rel = world.manifests[sop].path().lstrip("/")
            assert sha256_file(mnt / rel) == sha256_file(original)
            # A mounted mount point is refused, with mount(8)'s failure status.
            again = run("mount", "-T", fstab, mnt, check=False)
            assert again.returncode == 32 and "already a mount point" in again.stderr
            run("umount", mnt)
            assert not os.path.ismount(mnt)
            wait_for(lambda: unmounted_lines() > done, 30, "the mount process to finish")  # noqa: B023
        # A folder that is not empty is refused too.
        (mnt / "stray").write_text("x")
        refused = run("mount", "-T", fstab, mnt, check=False)
        assert refused.returncode == 32 and "not empty" in refused.stderr
        assert not os.path.ismount(mnt)
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)
