"""Layer 3: who may open what, through a real mount, as other uids (setpriv).

Two patients: CHL-P100 (imaged at CHL) and HRS-P200 (imaged at HRS).  Users:
a clinician at each institution, an admin, a backup account; uid 1005 and root
are not in the config.  Every open is checked by errno or by bytes, and the
audit log is checked line by line against the opens made.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Archive, Mount, gen_dicom, wait_for

CHL_DR, HRS_DR, ADMIN, BACKUP, NOBODY = 1001, 1002, 1003, 1004, 1005
CHL_PATIENT, HRS_PATIENT = "CHL-P100", "HRS-P200"

USERS = f"""
[users.{CHL_DR}]
name = "dr.muller"
institution = "CHL"
role = "clinician"

[users.{HRS_DR}]
name = "dr.weber"
institution = "HRS"
role = "clinician"

[users.{ADMIN}]
name = "it.admin"
institution = "CHL"
role = "admin"

[users.{BACKUP}]
name = "backup"
institution = "CHL"
role = "backup"
"""

# Runs as another uid: one JSON line per path, {"sha": ...} or {"errno": ...}.
_OPEN = """
import hashlib, json, sys
for path in sys.argv[1:]:
    try:
        with open(path, "rb") as f:
            print(json.dumps({"sha": hashlib.sha256(f.read()).hexdigest()}))
    except OSError as exc:
        print(json.dumps({"errno": exc.errno}))
"""
_LIST = """
import json, os, sys
try:
    print(json.dumps({"names": sorted(os.listdir(sys.argv[1]))}))
except OSError as exc:
    print(json.dumps({"errno": exc.errno}))
"""
_WALK = """
import hashlib, json, os, sys
out = {}
for top, dirs, files in os.walk(sys.argv[1]):
    for name in files:
        path = os.path.join(top, name)
        with open(path, "rb") as f:
            out[os.path.relpath(path, sys.argv[1])] = hashlib.sha256(f.read()).hexdigest()
print(json.dumps(out))
"""


def as_uid(uid: int, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd],
        capture_output=True,
        text=True,
        timeout=60,
    )


def py_as(uid: int, script: str, *args: str) -> list[dict[str, object]]:
    result = as_uid(uid, sys.executable, "-c", script, *args)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def open_as(uid: int, path: Path) -> dict[str, object]:
    return py_as(uid, _OPEN, str(path))[0]


def list_as(uid: int, path: Path) -> dict[str, object]:
    return py_as(uid, _LIST, str(path))[0]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def audit_lines(archive: Archive) -> list[dict[str, object]]:
    path = archive.dir / "audit.jsonl"
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def attempts_in_log(archive: Archive) -> list[tuple[int, str, str, str]]:
    """Every attempt at a patient's file, as (uid, path in the mount, decision, rule).

    A refused attempt is written once: at ``open``, or at ``lookup`` when the
    kernel has to ask for a name on the way for that user (its entry expired or
    was dropped, which a loaded machine makes likely).  The path is then that
    of the folder or file refused, on the way to the file.
    """
    return [
        (int(e["uid"]), str(e["path"]).strip("/"), str(e["decision"]), str(e["rule"]))  # type: ignore[call-overload]
        for e in audit_lines(archive)
        if e["event"] in ("open", "lookup")
    ]


def opens_in_log(archive: Archive) -> list[tuple[int, str, str, str]]:
    return [
        (int(e["uid"]), str(e["path"]).rsplit("/", 1)[-1], str(e["decision"]), str(e["rule"]))  # type: ignore[call-overload]
        for e in audit_lines(archive)
        if e["event"] == "open"
    ]


class World:
    """An archive with the two patients, mounted, with the files as the backup uid sees them."""

    def __init__(self, archive: Archive, mount: Mount, sources: dict[str, str]) -> None:
        self.archive, self.mount, self.sources = archive, mount, sources
        # /patients only: the other trees show the same files again (and /.animfs/status)
        listing = py_as(BACKUP, _WALK, str(mount.path / "patients"))[0]
        self.files = {f"patients/{rel}": mount.path / "patients" / rel for rel in listing}
        self.backup_shas = {f"patients/{rel}": sha for rel, sha in listing.items()}

    def file_of(self, patient: str) -> Path:
        """The first file of a patient's only study."""
        return min(p for rel, p in self.files.items() if rel.startswith(f"patients/{patient}_"))

    def patient_dir(self, patient: str) -> Path:
        return self.file_of(patient).parents[2]


@pytest.fixture
def world(archive: Archive, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("access-data")
    sources: dict[str, str] = {}
    for patient_id, institution, name in (
        ("P100", "CHL", "Muller^Anna"),
        ("P200", "HRS", "Weber^Paul"),
    ):
        paths = gen_dicom.write_series(
            root / patient_id,
            patient_id=patient_id,
            patient_name=name,
            n_slices=3,
            rows=32,
            cols=32,
            study_description="CT Head",
            institution_name=f"Hospital {institution}",
            seed=int(patient_id[1:]),
        )
        archive.ingest(root / patient_id, extra=["--institution", institution])
        sources.update({sha(p): str(p) for p in paths})
    archive.append_config(USERS)
    with archive.mounted() as mount:
        # The clinicians run `animfs break-glass` themselves: in production the index and
        # the log are writable by a group they are in; here, by everyone.
        index_dir = archive.dir / "index"
        for path in [index_dir, *index_dir.iterdir(), archive.dir / "audit.jsonl"]:
            path.chmod(0o777 if path.is_dir() else 0o666)
        yield World(archive, mount, sources)


def test_backup_reads_everything_byte_identical(world: World) -> None:
    assert len(world.backup_shas) == 6
    assert sorted(world.backup_shas.values()) == sorted(world.sources)
    log = opens_in_log(world.archive)
    assert len(log) == 6 and {(uid, d, r) for uid, _, d, r in log} == {(BACKUP, "allow", "backup")}


def test_consent_grant_revoke_and_record_state(world: World) -> None:
    a, own, other = world.archive, world.file_of(CHL_PATIENT), world.file_of(HRS_PATIENT)
    expected = []

    def check(uid: int, path: Path, ok: bool, rule: str) -> None:
        got = open_as(uid, path)
        assert got == (
            {"sha": world.backup_shas[str(path.relative_to(world.mount.path))]}
            if ok
            else {"errno": 13}
        ), (uid, path.name, rule)
        expected.append((uid, path, "allow" if ok else "deny", rule))

    skipped = len(attempts_in_log(a))  # the backup walk of the fixture
    check(CHL_DR, own, True, "own-institution")
    check(CHL_DR, other, False, "no-consent")
    # A clinician sees only the patients (and studies) they may open.
    assert list_as(CHL_DR, world.mount / "patients") == {
        "names": [world.patient_dir(CHL_PATIENT).name]
    }
    assert len(list_as(CHL_DR, world.mount / "studies")["names"]) == 1  # type: ignore[arg-type]
    assert list_as(CHL_DR, world.patient_dir(HRS_PATIENT)) == {"errno": 13}
    # A name that does not exist looks like a hidden one to a clinician, not to backup.
    assert open_as(CHL_DR, world.mount / "patients" / "HRS-P999_X") == {"errno": 13}
    assert open_as(BACKUP, world.mount / "patients" / "HRS-P999_X") == {"errno": 2}

    a.run("consent", "grant", "--patient", HRS_PATIENT, "--to", "CHL")
    check(CHL_DR, other, True, "consent")
    assert len(list_as(CHL_DR, world.mount / "patients")["names"]) == 2  # type: ignore[arg-type]
    check(HRS_DR, own, False, "no-consent")  # the consent is HRS-P200's, to CHL only

    a.run("consent", "revoke", "--patient", HRS_PATIENT, "--to", "CHL")
    check(CHL_DR, other, False, "no-consent")

    a.run("consent", "grant", "--patient", HRS_PATIENT, "--to", "all")
    check(CHL_DR, other, True, "consent")
    a.run("record", "set", "--patient", HRS_PATIENT, "closed")
    check(CHL_DR, other, False, "record-closed")
    a.run("record", "set", "--patient", HRS_PATIENT, "opted-out")
    check(CHL_DR, other, False, "opted-out")
    check(HRS_DR, other, True, "own-institution")  # opting out stops sharing, not care
    a.run("record", "set", "--patient", HRS_PATIENT, "in-order")
    cat = subprocess.run(
        ["setpriv", f"--reuid={CHL_DR}", f"--regid={CHL_DR}", "--clear-groups", "cat", str(other)],
        capture_output=True,
        timeout=60,
    )
    assert cat.returncode == 0
    assert (
        hashlib.sha256(cat.stdout).hexdigest()
        == world.backup_shas[str(other.relative_to(world.mount.path))]
    )
    expected.append((CHL_DR, other, "allow", "consent"))

    logged = attempts_in_log(a)[skipped:]
    assert [(u, d, r) for u, _, d, r in logged] == [(u, d, r) for u, _, d, r in expected]
    for (_, path, _, _), (_, file, decision, _) in zip(logged, expected, strict=True):
        relative = file.relative_to(world.mount.path)
        on_the_way = [str(relative), *(str(folder) for folder in relative.parents)]
        logged_at = [str(relative)] if decision == "allow" else on_the_way
        assert path in logged_at, (path, file)
    last = audit_lines(a)[-1]
    assert (last["process"], last["user"], last["institution"], last["role"]) == (
        "cat",
        "dr.muller",
        "CHL",
        "clinician",
    )
    assert last["path"] == "/" + str(other.relative_to(world.mount.path))
    assert last["patient"] == HRS_PATIENT and len(str(last["study"])) > 10
    events = [e["event"] for e in audit_lines(a) if e["event"] not in ("open", "lookup")]
    assert events == [
        "consent-grant",
        "consent-revoke",
        "consent-grant",
        "record-set",
        "record-set",
        "record-set",
    ]
    listed = a.run("consent", "list", "--patient", HRS_PATIENT).stdout.splitlines()
    assert len(listed) == 2 and any("revoked" in line for line in listed)
    shown = a.run("audit", "show", "--patient", HRS_PATIENT).stdout
    assert shown.count("dr.muller") >= 7 and "consent-revoke" in shown


def test_break_the_glass_needs_a_reason_and_expires(world: World) -> None:
    a, other = world.archive, world.file_of(HRS_PATIENT)
    no_reason = a.run("break-glass", "--patient", HRS_PATIENT, check=False, uid=CHL_DR)
    blank = a.run(
        "break-glass", "--patient", HRS_PATIENT, "--reason", "  ", check=False, uid=CHL_DR
    )
    admin = a.run("break-glass", "--patient", HRS_PATIENT, "--reason", "x", check=False, uid=ADMIN)
    assert (no_reason.returncode, blank.returncode, admin.returncode) == (2, 2, 2)
    assert "reason" in blank.stderr and "clinician" in admin.stderr
    assert open_as(CHL_DR, other) == {"errno": 13}

    a.run("break-glass", "--patient", HRS_PATIENT, "--reason", "unconscious in ER", uid=CHL_DR)
    assert open_as(CHL_DR, other) == {
        "sha": world.backup_shas[str(other.relative_to(world.mount.path))]
    }
    assert open_as(HRS_DR, world.file_of(CHL_PATIENT)) == {"errno": 13}  # the grant is CHL_DR's

    # A grant of about a second replaces it; once past, the same open is refused again.
    a.run(
        "break-glass",
        "--patient",
        HRS_PATIENT,
        "--reason",
        "follow-up",
        "--hours",
        "0.0003",
        uid=CHL_DR,
    )
    until = time.time() + 0.0003 * 3600
    wait_for(lambda: time.time() > until + 0.05, 10, "the short grant to expire")
    assert open_as(CHL_DR, other) == {"errno": 13}

    # A refused attempt is refused at open, or at the lookup of a name the kernel
    # no longer caches: one line either way.
    opens = [
        e for e in audit_lines(a) if e["event"] in ("open", "lookup") and e["uid"] == CHL_DR
    ]
    assert [(e["decision"], e["rule"], e["break_glass"]) for e in opens] == [
        ("deny", "no-consent", False),
        ("allow", "break-glass", True),
        ("deny", "no-consent", False),
    ]
    grants = [e for e in audit_lines(a) if e["event"] == "break-glass"]
    assert [g["reason"] for g in grants] == ["unconscious in ER", "follow-up"]
    assert grants[0]["uid"] == CHL_DR
    shown = a.run("audit", "show", "--patient", HRS_PATIENT).stdout
    assert shown.count("BREAK-THE-GLASS") == 1


def test_admin_lists_but_opens_nothing(world: World) -> None:
    names = list_as(ADMIN, world.mount / "patients")["names"]
    assert len(names) == 2  # type: ignore[arg-type]
    assert open_as(ADMIN, world.file_of(CHL_PATIENT)) == {"errno": 13}
    assert open_as(ADMIN, world.file_of(HRS_PATIENT)) == {"errno": 13}
    assert opens_in_log(world.archive)[-2:] == [
        (ADMIN, world.file_of(p).name, "deny", "admin") for p in (CHL_PATIENT, HRS_PATIENT)
    ]
    # Reading attributes is not an open: no line, and it works.
    before = len(audit_lines(world.archive))
    assert as_uid(ADMIN, "stat", "-c", "%s", str(world.file_of(CHL_PATIENT))).returncode == 0
    assert len(audit_lines(world.archive)) == before


@pytest.mark.parametrize("uid", [NOBODY, 0])
def test_unmapped_uid_is_refused_even_ls(world: World, uid: int) -> None:
    for folder in (world.mount.path, world.mount / "patients", world.patient_dir(CHL_PATIENT)):
        assert list_as(uid, folder) == {"errno": 13}
    ls = as_uid(uid, "ls", str(world.mount / "patients"))
    assert ls.returncode != 0 and "Permission denied" in ls.stderr
    assert open_as(uid, world.file_of(CHL_PATIENT)) == {"errno": 13}
    assert opens_in_log(world.archive)[-1] == (
        uid,
        world.file_of(CHL_PATIENT).name,
        "deny",
        "unmapped",
    )


def test_editing_any_line_fails_verify_at_that_line(world: World) -> None:
    a = world.archive
    open_as(CHL_DR, world.file_of(HRS_PATIENT))
    a.run("consent", "grant", "--patient", HRS_PATIENT, "--to", "CHL", "--until", "2999-12-31")
    open_as(CHL_DR, world.file_of(HRS_PATIENT))
    path = a.dir / "audit.jsonl"
    original = path.read_bytes()
    ok = a.run("audit", "verify")
    lines = original.splitlines(keepends=True)
    assert f"{len(lines)} lines, chain intact" in ok.stdout
    for k in range(1, len(lines) + 1):
        edited = list(lines)
        edited[k - 1] = edited[k - 1].replace(b'"uid":', b'"uid":9', 1)
        assert edited[k - 1] != lines[k - 1]
        path.write_bytes(b"".join(edited))
        result = a.run("audit", "verify", check=False)
        assert result.returncode == 1 and f"line {k}:" in result.stdout, (k, result.stdout)
    path.write_bytes(b"".join(lines[:2] + lines[3:]))  # a deleted line
    result = a.run("audit", "verify", check=False)
    assert result.returncode == 1 and "line 3:" in result.stdout
    path.write_bytes(original)
    assert a.run("audit", "verify").returncode == 0


def test_a_refused_attempt_is_audited_even_when_the_kernel_forgot_the_names(world: World) -> None:
    """With the kernel's name cache dropped, the clinician's attempt stops at the lookup
    of the patient folder, never reaching open: it still gets its one audit line."""
    a, other = world.archive, world.file_of(HRS_PATIENT)
    before = len(audit_lines(a))
    Path("/proc/sys/vm/drop_caches").write_text("2\n")  # dentries and inodes
    assert open_as(CHL_DR, other) == {"errno": 13}
    new = [e for e in audit_lines(a)[before:] if e["uid"] == CHL_DR]
    assert [(e["event"], e["decision"], e["rule"], e["patient"]) for e in new] == [
        ("lookup", "deny", "no-consent", HRS_PATIENT)
    ]
    assert new[0]["path"] == "/" + str(world.patient_dir(HRS_PATIENT).relative_to(world.mount.path))
    assert a.run("audit", "verify").returncode == 0
