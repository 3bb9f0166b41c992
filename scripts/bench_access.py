#!/usr/bin/env python3
"""What access control costs per open: the decision plus the durable audit line.

    .venv/bin/python scripts/bench_access.py [--files 400] [--rounds 5] [--threads 8]

One archive of many small instances, mounted twice at once from the same index
and sites:

* baseline: a config with no [users], so access control is off: no decision,
  no audit line.  Everything else (FUSE round trips, index reads, the chunk
  cache, keep_cache) is the same code on the same data.
* checked: the same config plus [users]; every open reads the patient's state,
  decides, and waits until its audit line is fsynced (group commit).

Each file is opened, its first 4 KiB read, and closed, by the same uid in both
mounts (a backup-role uid, and a clinician opening their own institution's
studies), after one warm-up pass so that no chunk is fetched from a site during
the timed passes.  Passes alternate between the mounts so drift hits both.
Reports the median time per open+read+close, the median added by the check,
and the ratio.  A second figure runs ``--threads`` readers at once, where
concurrent opens share one fsync.  Needs root (mount, setpriv).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gen_dicom  # noqa: E402

ANIMFS = [sys.executable, "-m", "animfs"]
BACKUP_UID, CLINICIAN_UID = 1004, 1001

USERS = f"""
[users.{BACKUP_UID}]
name = "backup"
institution = "CHL"
role = "backup"

[users.{CLINICIAN_UID}]
name = "dr.bench"
institution = "CHL"
role = "clinician"
"""

# Runs as the reader uid: times open + read 4 KiB + close of each path given on stdin.
READER = r"""
import json, os, sys, time, threading
paths = sys.stdin.read().split("\n")
threads = int(sys.argv[1])
times = [0.0] * len(paths)
def work(k):
    for i in range(k, len(paths), threads):
        t = time.perf_counter()
        fd = os.open(paths[i], os.O_RDONLY)
        os.read(fd, 4096)
        os.close(fd)
        times[i] = time.perf_counter() - t
start = time.perf_counter()
workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
for w in workers: w.start()
for w in workers: w.join()
print(json.dumps({"times": times, "wall": time.perf_counter() - start}))
"""


def run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=1800)


class Mounted:
    def __init__(self, config: Path, path: Path) -> None:
        path.mkdir(mode=0o755)
        self.path = path
        self.log = open(path.parent / f"{path.name}.log", "ab")
        self.proc = subprocess.Popen(
            [*ANIMFS, "--config", str(config), "mount", "--foreground", str(path)],
            stdout=self.log,
            stderr=self.log,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not os.path.ismount(path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"mount at {path} did not come up; see {self.log.name}")
            time.sleep(0.05)

    def stop(self) -> None:
        subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True, timeout=60)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def read_pass(uid: int, paths: list[str], threads: int) -> tuple[list[float], float]:
    result = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        + [sys.executable, "-c", READER, str(threads)],
        input="\n".join(paths),
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    out = json.loads(result.stdout)
    return out["times"], out["wall"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=400, help="instances in the archive")
    p.add_argument("--rounds", type=int, default=5, help="timed passes per mount and reader")
    p.add_argument("--threads", type=int, default=8, help="readers in the concurrent figure")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="animfs-bench-access-"))
    work.chmod(0o755)
    mounts: list[Mounted] = []
    try:
        run(*ANIMFS, "init", str(work / "archive"))
        base_config = work / "archive" / "animfs.toml"
        checked_config = work / "archive" / "animfs-users.toml"
        shutil.copy(base_config, checked_config)
        with open(checked_config, "a") as f:
            f.write(USERS)
        per_series = 100
        for s in range((args.files + per_series - 1) // per_series):
            n = min(per_series, args.files - s * per_series)
            gen_dicom.write_series(
                work / "input" / f"s{s}",
                patient_id=f"B{s:03d}",
                patient_name=f"Bench^{s}",
                n_slices=n,
                rows=64,
                cols=64,
                series_number=s + 1,
                seed=s,
            )
        run(
            *ANIMFS,
            "--config",
            str(base_config),
            "ingest",
            "--institution",
            "CHL",
            str(work / "input"),
        )

        baseline = Mounted(base_config, work / "mnt-baseline")
        mounts.append(baseline)
        checked = Mounted(checked_config, work / "mnt-checked")
        mounts.append(checked)
        rels = sorted(
            str(q.relative_to(baseline.path)) for q in (baseline.path / "patients").rglob("*.dcm")
        )
        assert len(rels) == args.files, (len(rels), args.files)

        def paths(m: Mounted) -> list[str]:
            return [str(m.path / r) for r in rels]

        print(
            f"{len(rels)} files of {os.path.getsize(paths(baseline)[0])} bytes; "
            f"{args.rounds} timed passes per figure"
        )
        for uid, who in ((BACKUP_UID, "backup role"), (CLINICIAN_UID, "clinician, own studies")):
            read_pass(uid, paths(baseline), 1)  # warm-up: chunks into the memory cache
            read_pass(uid, paths(checked), 1)
            base_t: list[float] = []
            checked_t: list[float] = []
            for _ in range(args.rounds):
                base_t += read_pass(uid, paths(baseline), 1)[0]
                checked_t += read_pass(uid, paths(checked), 1)[0]
            b, c = statistics.median(base_t), statistics.median(checked_t)
            print(
                f"one reader, {who}: median open+read 4 KiB+close "
                f"{b * 1e3:.3f} ms without checks, {c * 1e3:.3f} ms with; "
                f"added {(c - b) * 1e3:.3f} ms per open (target < 1 ms), ratio {c / b:.2f}"
            )

        base_w = checked_w = 0.0
        base_t, checked_t = [], []
        for _ in range(args.rounds):
            t, w = read_pass(BACKUP_UID, paths(baseline), args.threads)
            base_t += t
            base_w += w
            t, w = read_pass(BACKUP_UID, paths(checked), args.threads)
            checked_t += t
            checked_w += w
        n = len(rels) * args.rounds
        b, c = statistics.median(base_t), statistics.median(checked_t)
        print(
            f"{args.threads} readers at once, backup role: median "
            f"{b * 1e3:.3f} ms without, {c * 1e3:.3f} ms with, added {(c - b) * 1e3:.3f} ms, "
            f"ratio {c / b:.2f}; {n / base_w:.0f} vs {n / checked_w:.0f} opens/s"
        )
        audit = work / "archive" / "audit.jsonl"
        lines = sum(1 for _ in open(audit, "rb"))
        verify = subprocess.run(
            [*ANIMFS, "--config", str(checked_config), "audit", "verify"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        print(f"audit log: {lines} lines; {verify.stdout.strip()}")
        return 0
    finally:
        for m in mounts:
            m.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
