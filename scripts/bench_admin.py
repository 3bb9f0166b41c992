"""What the admin features cost, each against a baseline measured in the same run.

- Reading every extended attribute of every file through the mount (what
  ``getfattr -d -R`` does), per request, against ``listxattr`` (a FUSE round trip
  that reads one node from the index) and against ``stat`` of the same files (the
  kernel answers from its attribute cache): attributes come from the index only,
  so a value should cost about a round trip, never a fetch.
- Opening and reading ``/.animfs/status`` against a ``stat`` of a file.
- Committing instances to the index with the /by-date and /by-modality views
  against the same commits with the views switched off (the extra LMDB writes).

Run as root (it mounts): ``sudo .venv/bin/python scripts/bench_admin.py``.  The
machine is shared and noisy: each figure is the median of several repeats.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from animfs.index import Index  # noqa: E402
from animfs.manifest import Manifest  # noqa: E402

import gen_dicom  # noqa: E402

REPEATS = 7


def median_time(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def animfs(config: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "animfs", "--config", str(config), *args], check=True,
                   capture_output=True, timeout=600)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-admin-"))
    try:
        files = gen_dicom.make_archive(work / "in", total_mb=40, patients=6, seed=3)
        subprocess.run([sys.executable, "-m", "animfs", "init", str(work / "a")], check=True,
                       capture_output=True)
        config = work / "a" / "animfs.toml"
        animfs(config, "ingest", str(work / "in"))
        mnt = work / "mnt"
        mnt.mkdir()
        animfs(config, "mount", str(mnt))
        try:
            paths = [Path(top) / name for top, _, names in os.walk(mnt / "patients")
                     for name in names]

            def stat_all() -> None:
                for p in paths:
                    os.stat(p)

            def list_all() -> None:
                for p in paths:
                    os.listxattr(p)

            def xattrs_all() -> None:
                for p in paths:
                    for name in os.listxattr(p):
                        os.getxattr(p, name)

            stat_all()  # warm the kernel's entries: both then pay the same lookups
            t_stat = median_time(stat_all)
            t_list = median_time(list_all)
            t_x = median_time(xattrs_all)
            n_attrs = len(os.listxattr(paths[0]))
            per_value = (t_x - t_list) / len(paths) / n_attrs
            per_list = t_list / len(paths)
            print(f"files: {len(paths)} ({len(files)} generated), {n_attrs} attributes each")
            print(f"every attribute of every file: {t_x * 1e3:.1f} ms; listxattr of every "
                  f"file: {t_list * 1e3:.1f} ms; stat of every file (kernel cache): "
                  f"{t_stat * 1e3:.1f} ms")
            print(f"per getxattr {per_value * 1e6:.0f} us vs per listxattr round trip "
                  f"{per_list * 1e6:.0f} us: ratio {per_value / per_list:.2f}x")

            status = mnt / ".animfs" / "status"
            t_status = median_time(lambda: status.read_bytes(), 31)
            t_one = median_time(lambda: os.stat(paths[0]), 31)
            print(f"open+read /.animfs/status: {t_status * 1e3:.2f} ms; stat of a file: "
                  f"{t_one * 1e6:.0f} us; ratio {t_status / t_one:.0f}x")
        finally:
            animfs(config, "umount", str(mnt))

        source = Index(work / "a" / "index")
        try:
            manifests = [Manifest.from_bytes(m) for m in source.manifests()]
        finally:
            source.close()
        manifests.sort(key=lambda m: m.ingested_ns)

        def commit_all(views: bool) -> float:
            times = []
            for i in range(REPEATS):
                target = work / f"idx-{views}-{i}"
                index = Index(target)
                if not views:
                    index._add_views = lambda txn, manifest: None  # type: ignore[method-assign]
                start = time.perf_counter()
                index.add_many(manifests)
                times.append(time.perf_counter() - start)
                index.close()
                shutil.rmtree(target)
            return statistics.median(times)

        with_views, without = commit_all(True), commit_all(False)
        print(f"index commit of {len(manifests)} instances: with views {with_views * 1e3:.1f} ms, "
              f"without {without * 1e3:.1f} ms; ratio {with_views / without:.2f}x")
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(work / "mnt")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
