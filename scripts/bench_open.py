#!/usr/bin/env python3
"""What one open of a small, already cached file costs through the mount, and the floor.

    .venv/bin/python scripts/bench_open.py [--workdir DIR] [--files 300] [--rounds 5]

Needs root (mounts, reads as a mapped clinician with setpriv).  One series of
--files DICOM files of about 0.26 MB (the size of the series files of
scripts/bench.py) is ingested once; then each round, alternating, times passes
of open + read to the end (1 MiB blocks) + close over every file, after one
pass that puts them in the page cache:

- local:     the originals on local disk;
- floor:     a minimal pyfuse3 file system (this script, ``--floor-fs``) that
             serves the same files from memory with keep_cache: what pyfuse3
             and the kernel cost per open and nothing else;
- animfs:    the archive mounted without [users] (access control off);
- audited:   the archive mounted with a [users] table, read by a mapped
             clinician of the institution: each open is decided and gets its
             audit line (fsync'd) before it returns.

Prints the median microseconds per file of each, and each as a ratio to local
and to the floor.  The page cache serves every read: what is left is the open
and release round trips and what the handlers do.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gen_dicom  # noqa: E402

ANIMFS = [sys.executable, "-m", "animfs"]
CLINICIAN = 2001
USERS = f"""
[users.{CLINICIAN}]
name = "dr.bench"
institution = "CHL"
role = "clinician"
"""

# Passes of open + read to the end + close over every file; prints seconds per pass.
READER = """
import os, sys, time
paths = sys.stdin.read().splitlines()
passes = int(sys.argv[1])
buf = bytearray(1 << 20)
def one_pass():
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
one_pass()  # into the page cache
for _ in range(passes):
    start = time.perf_counter()
    one_pass()
    print(time.perf_counter() - start)
"""


def files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def wait_for(predicate: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            sys.exit(f"bench_open.py: {what} did not happen within {timeout:g} s")
        time.sleep(0.05)


def unmount(mountpoint: Path) -> None:
    subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True, timeout=60)
    wait_for(lambda: not os.path.ismount(mountpoint), f"unmount of {mountpoint}")


@contextmanager
def animfs_mounted(config: Path, mountpoint: Path) -> Iterator[Path]:
    subprocess.run([*ANIMFS, "--config", str(config), "mount", str(mountpoint)], check=True,
                   stdout=subprocess.DEVNULL)
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)


@contextmanager
def floor_mounted(source: Path, mountpoint: Path) -> Iterator[Path]:
    proc = subprocess.Popen([sys.executable, __file__, "--floor-fs", str(source),
                             str(mountpoint)])
    try:
        wait_for(lambda: os.path.ismount(mountpoint) or proc.poll() is not None,
                 "the floor mount")
        if proc.poll() is not None:
            sys.exit(f"bench_open.py: the floor file system exited ({proc.returncode})")
        yield mountpoint
    finally:
        if os.path.ismount(mountpoint):
            unmount(mountpoint)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def per_file_us(paths: list[Path], passes: int, uid: int | None = None) -> list[float]:
    """Microseconds per file of each pass (a fresh reader process, as another uid if given)."""
    cmd = [sys.executable, "-c", READER, str(passes)]
    if uid is not None:
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]
    out = subprocess.run(cmd, input="\n".join(map(str, paths)), capture_output=True,
                         text=True, check=True, timeout=600).stdout
    return [float(line) / len(paths) * 1e6 for line in out.split()]


def floor_fs(source: Path, mountpoint: Path) -> None:
    """A minimal read-only pyfuse3 file system: the files of ``source``, flat, from memory."""
    import pyfuse3
    import trio

    contents = [p.read_bytes() for p in files(source)]
    names = {f"{i:05d}.dcm".encode(): i + 2 for i in range(len(contents))}
    sizes = {ino: len(contents[ino - 2]) for ino in names.values()}

    class Floor(pyfuse3.Operations):
        def attr(self, ino: int) -> pyfuse3.EntryAttributes:
            a = pyfuse3.EntryAttributes()
            a.st_ino = ino
            if ino == pyfuse3.ROOT_INODE:
                a.st_mode, a.st_size = stat.S_IFDIR | 0o555, 0
            else:
                a.st_mode, a.st_size = stat.S_IFREG | 0o444, sizes[ino]
            a.entry_timeout = a.attr_timeout = 24 * 3600.0
            return a

        async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
            if inode != pyfuse3.ROOT_INODE and inode not in sizes:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self.attr(inode)

        async def lookup(self, parent: int, name: bytes,
                         ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
            if parent != pyfuse3.ROOT_INODE or name not in names:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self.attr(names[name])

        async def open(self, inode: int, flags: int,
                       ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)

        async def read(self, fh: int, off: int, size: int) -> bytes:
            return contents[fh - 2][off : off + size]

        async def release(self, fh: int) -> None:
            pass

    pyfuse3.init(Floor(), str(mountpoint), {"fsname=floor", "ro", "allow_other"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "animfs-bench-open")
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--passes", type=int, default=5, help="timed passes per round")
    parser.add_argument("--floor-fs", nargs=2, type=Path, metavar=("SOURCE", "MOUNTPOINT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_fs:
        floor_fs(*args.floor_fs)
        return
    if os.geteuid() != 0:
        sys.exit("bench_open.py: run as root (it mounts and reads as another uid)")

    work: Path = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    source, mnt = work / "input", work / "mnt"
    mnt.mkdir(parents=True)
    gen_dicom.write_series(source, patient_id="100234", patient_name="Bench^Open",
                           n_slices=args.files, rows=362, cols=362, seed=5)
    originals = files(source)
    flat = work / "flat"  # the floor serves these, by number
    flat.mkdir()
    for i, path in enumerate(originals):
        shutil.copy(path, flat / f"{i:05d}.dcm")
    subprocess.run([*ANIMFS, "init", str(work / "archive")], check=True,
                   stdout=subprocess.DEVNULL)
    config = work / "archive" / "animfs.toml"
    subprocess.run([*ANIMFS, "--config", str(config), "ingest", "--institution", "CHL",
                    str(source)], check=True, stdout=subprocess.DEVNULL)
    audited = work / "archive" / "audited.toml"
    audited.write_text(config.read_text() + USERS)
    os.chmod(work, 0o755)
    for path in (work / "input", *source.rglob("*")):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)

    results: dict[str, list[float]] = {"local": [], "floor": [], "animfs": [], "audited": []}
    for _ in range(args.rounds):
        results["local"] += per_file_us(originals, args.passes)
        with floor_mounted(flat, mnt) as m:
            served = [m / f"{i:05d}.dcm" for i in range(len(originals))]  # no readdir there
            results["floor"] += per_file_us(served, args.passes)
        with animfs_mounted(config, mnt) as m:
            served = files(m / "patients")
            results["animfs"] += per_file_us(served, args.passes)
        with animfs_mounted(audited, mnt):  # the same names: root may not list them there
            results["audited"] += per_file_us(served, args.passes, uid=CLINICIAN)

    local = statistics.median(results["local"])
    floor = statistics.median(results["floor"])
    print(f"{len(originals)} files of {originals[0].stat().st_size / 1e6:.2f} MB, "
          f"{args.rounds} rounds x {args.passes} passes; median per file (open+read+close):")
    for name, values in results.items():
        value = statistics.median(values)
        print(f"  {name:<8} {value:8.1f} us   {local / value:5.2f}x of local's speed   "
              f"{value - floor:+8.1f} us over the floor")


if __name__ == "__main__":
    main()
