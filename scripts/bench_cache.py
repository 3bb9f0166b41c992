#!/usr/bin/env python3
"""The cache benchmark: warm disk cache vs local disk, series prefetch on vs off, and the
hot set's hit rate before and after a backup read of 10x the cache.

    .venv/bin/python scripts/bench_cache.py [--workdir DIR] [--total-mb 500] [--large-mb 200]
                                            [--repeat 3] [--site-latency-ms 20]
                                            [--only warm,series,series-s3,series-s3-far,backup]

Needs root (drops the page cache, mounts, reads as other uids with setpriv).  Each
figure is measured --repeat times, alternating with its baseline; medians are shown.

1. Warm disk cache: the archive is read once through a mount (filling the disk
   cache), then read again through a fresh mount (memory LRU cold) once it has
   started its unpacker processes, after /proc/sys/vm/drop_caches, so every
   chunk comes from the cache folder on disk: a running mount's first read of a
   cached study.  Also shown, for information: the same read started as soon as
   the mount is up (drop_caches before mounting), while the unpackers start.
   Baseline: the same originals read from local disk after drop_caches.
   Targets >= 0.6x and >= 500 MB/s.  Also, as the ceiling for any pyfuse3 file
   system here: the same files served from memory by the minimal one of
   scripts/bench_open.py (read-ahead raised to 1 MiB as animfs does), read the
   same way after drop_caches.
2. Series: 300 files of 0.5 MB (one series), each opened, read and closed in
   order, cold (drop_caches, fresh mount once it has started its unpacker
   processes, as for the warm read; empty disk cache: every chunk from the
   sites).  With ``[cache] series_prefetch = 8`` vs ``0`` (off).  Target >= 3x.
   For local folder sites also shown, for information: the same read started as
   soon as the mount is up, while the unpackers start (about 0.14 s of CPU each,
   which a 0.5 s read shares).
   ``series`` uses the local folder sites of ``animfs init``; ``series-s3`` the same
   with both sites on moto S3 servers on 127.0.0.1 (as scripts/bench_sites.py starts
   them; moto runs on the same cores, so this is neither a remote site's latency nor
   its throughput, only a site that costs a request per chunk).  ``series-s3-far``
   reads the same through a proxy that holds every request --site-latency-ms before
   passing it on to moto: a site a network round trip away, as production's are.
3. Hot set: a clinician reads one series (the hot set) into a disk cache capped
   at --cap-mb; its hit rate is measured on a re-read through a fresh mount,
   before and after the backup role reads the whole archive (>= 10x the cap).
   Target: unchanged.  For contrast, the same after a clinician reads it all.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_open import floor_mounted  # noqa: E402

import gen_dicom  # noqa: E402

ANIMFS = [sys.executable, "-m", "animfs"]
BLOCK = 1 << 20
CLINICIAN, BACKUP = 2001, 2002
USERS = f"""
[users.{CLINICIAN}]
name = "dr.bench"
institution = "CHL"
role = "clinician"

[users.{BACKUP}]
name = "backup"
institution = "CHL"
role = "backup"
"""

# Read files in order in 1 MiB blocks (as cp or a viewer would); prints bytes and seconds.
READER = """
import sys, time
buf = bytearray(1 << 20)
total, start = 0, time.perf_counter()
for path in sys.stdin.read().splitlines():
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
print(total, time.perf_counter() - start)
"""


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def files_as(uid: int, root: Path) -> dict[Path, int]:
    """Files below ``root`` and their sizes, as ``uid`` lists them (root may not)."""
    out = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                          "find", str(root), "-type", "f", "-printf", "%s %p\\n"],
                         capture_output=True, text=True, check=True).stdout
    return {Path(path): int(size) for size, path in (line.split(" ", 1)
                                                   for line in out.splitlines())}


def read_files(paths: list[Path], uid: int | None = None) -> tuple[int, float]:
    """(bytes, seconds) of reading ``paths`` in order, in a separate process (as ``uid``)."""
    cmd = [sys.executable, "-c", READER]
    if uid is not None:
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]
    out = subprocess.run(cmd, input="\n".join(map(str, paths)), capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[0]), float(out[1])


class Archive:
    def __init__(self, directory: Path, cache_mb: int, users: bool = False) -> None:
        shutil.rmtree(directory, ignore_errors=True)
        self.dir = directory
        subprocess.run([*ANIMFS, "init", str(directory)], check=True, stdout=subprocess.DEVNULL)
        self.config = directory / "animfs.toml"
        self.set(max_bytes=cache_mb * 1_000_000)
        if users:
            with open(self.config, "a") as f:
                f.write(USERS)
        self.mnt = directory / "mnt"
        self.mnt.mkdir()
        directory.chmod(0o755)
        self.mnt.chmod(0o755)

    def set(self, **keys: int) -> None:
        """Set keys of the [cache] table."""
        text = self.config.read_text()
        for key, value in keys.items():
            text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
            if not n:
                text = text.replace("[cache]\n", f"[cache]\n{key} = {value}\n", 1)
        self.config.write_text(text)

    def run(self, *args: str) -> str:
        return subprocess.run([*ANIMFS, "--config", str(self.config), *args], check=True,
                              capture_output=True, text=True).stdout

    def cache_stats(self) -> dict[str, float]:
        return dict(json.loads(self.run("cache", "stats")))

    @contextmanager
    def mounted(self) -> Iterator[Path]:
        self.run("mount", str(self.mnt))
        try:
            yield self.mnt
        finally:
            subprocess.run(["fusermount3", "-u", str(self.mnt)], check=True, timeout=60)
            for _ in range(300):  # the daemon saves the cache stats as it exits
                if not os.path.ismount(self.mnt) and not self._daemon_running():
                    break
                time.sleep(0.1)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the mount's unpacker processes are ready (they start with it, niced)."""
        deadline = time.monotonic() + timeout
        status = self.mnt / ".animfs" / "status"
        while not json.loads(status.read_text())["cache"]["memory"]["unpackers"]:
            if time.monotonic() > deadline:
                sys.exit(f"bench_cache.py: the mount's unpackers not ready after {timeout:g} s")
            time.sleep(0.05)

    def _daemon_running(self) -> bool:
        out = subprocess.run(["pgrep", "-f", f"--config {self.config} mount"],
                             capture_output=True, text=True).stdout
        return bool(out.strip())


def report(name: str, value: float, baseline: float, unit: str, target: str) -> None:
    ratio = value / baseline if baseline else float("nan")
    print(f"{name:<36} {value:9.1f} {unit:<5} baseline {baseline:9.1f} {unit:<5} "
          f"ratio {ratio:5.2f}x   target {target}", flush=True)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def bench_warm(work: Path, source: Path, repeat: int) -> None:
    inputs = files(source)
    size = sum(p.stat().st_size for p in inputs)
    a = Archive(work / "warm", cache_mb=100_000)
    a.run("ingest", str(source))
    with a.mounted() as mnt:  # fill the disk cache
        read_files(files(mnt / "patients"))
    cached, at_once, local, floor = [], [], [], []
    (work / "floor").mkdir(exist_ok=True)
    for _ in range(repeat):
        drop_caches()
        n, s = read_files(inputs)
        local.append(n / s / 1e6)
        with a.mounted() as mnt:  # a running mount: its unpackers have started
            a.wait_ready()
            drop_caches()
            n, s = read_files(files(mnt / "patients"))
            assert n == size, (n, size)
            cached.append(n / s / 1e6)
        drop_caches()
        with a.mounted() as mnt:  # read at once: the unpackers start meanwhile
            n, s = read_files(files(mnt / "patients"))
            assert n == size, (n, size)
            at_once.append(n / s / 1e6)
        with floor_mounted(source, work / "floor") as mnt:
            raise_read_ahead(mnt)
            served = [mnt / f"{i:05d}.dcm" for i in range(len(inputs))]  # its names, flat
            drop_caches()
            n, s = read_files(served)
            assert n == size, (n, size)
            floor.append(n / s / 1e6)
    stats = a.cache_stats()
    print(f"  warm runs MB/s: cache {[round(x) for x in cached]}, local {[round(x) for x in local]}"
          f", pyfuse3 floor {[round(x) for x in floor]}, read at once after mounting "
          f"{[round(x) for x in at_once]}; last mount: {stats['hits']} disk hits, "
          f"{stats['misses']} misses")
    report("warm disk cache first read", median(cached), median(local), "MB/s",
           ">= 0.6x and >= 500 MB/s")
    report("  the same, read as soon as mounted", median(at_once), median(local), "MB/s",
           "(info)")
    report("  the same vs the pyfuse3 floor", median(cached), median(floor), "MB/s", "(info)")


def raise_read_ahead(mountpoint: Path) -> None:
    """1 MiB read requests, as the animfs mount asks for its own."""
    dev = os.stat(mountpoint).st_dev
    Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").write_text("1024")


def series_input(work: Path) -> Path:
    source = work / "series-input"
    if not source.is_dir():
        gen_dicom.write_series(source, patient_id="S300", patient_name="Series^Test",
                               n_slices=300, rows=512, cols=512, modality="CT",
                               study_description="CT Series", series_description="Axial",
                               institution_name="CHL", seed=9)
    return source


def bench_series(work: Path, repeat: int) -> None:
    a = Archive(work / "series", cache_mb=100_000)
    a.run("ingest", str(series_input(work)))
    series_runs(a, repeat, "series of 300 x 0.5 MB, cold", at_once=True)


class DelayProxy:
    """A TCP proxy on 127.0.0.1 that holds everything a client sends for ``delay``
    seconds before passing it on (answers go back at once): each request to the site
    behind it costs that much more, as a round trip to another data centre would."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port, self.delay = target_port, delay
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                return
            server.settimeout(None)
            for src, dst, delay in ((client, server, self.delay), (server, client, 0.0)):
                threading.Thread(target=self._pump, args=(src, dst, delay), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
        try:
            while data := src.recv(1 << 16):
                time.sleep(delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def bench_series_s3(work: Path, repeat: int, latency_ms: float = 0.0) -> None:
    """The series read with both sites on moto S3 servers, through a DelayProxy of
    ``latency_ms`` if given (ingest goes to moto directly: only the reads are timed)."""
    from bench_sites import ENV, PREFIX, Server

    os.environ.update(ENV)  # moto's credentials, for the mount and ingest processes
    servers = [Server("a", work), Server("b", work)]
    proxies: list[DelayProxy] = []
    try:
        for server in servers:
            server.start()
            server.client().create_bucket(Bucket="site")  # type: ignore[attr-defined]
        a = Archive(work / "series-s3", cache_mb=100_000)
        text = a.config.read_text()
        for name, server in zip(("site-a", "site-b"), servers, strict=True):
            text = re.sub(rf'name = "{name}"\nurl = "[^"]*"',
                          f'name = "{name}"\nurl = "s3://site/{PREFIX}"\n'
                          f'endpoint_url = "{server.endpoint}"\nregion = "us-east-1"', text)
        a.config.write_text(re.sub(r"repair_interval = \d+", "repair_interval = 86400", text))
        a.run("ingest", str(series_input(work)))
        name = "series of 300 x 0.5 MB, cold, S3"
        if latency_ms:
            text = a.config.read_text()
            for server in servers:
                proxies.append(DelayProxy(server.port, latency_ms / 1000))
                text = text.replace(server.endpoint, proxies[-1].endpoint)
            a.config.write_text(text)
            name += f" +{latency_ms:g} ms"
        series_runs(a, repeat, name)
    finally:
        for proxy in proxies:
            proxy.close()
        for server in servers:
            server.stop()


def series_runs(a: Archive, repeat: int, name: str, at_once: bool = False) -> None:
    """The cold series read with series prefetch on and off, on a running mount (its
    unpackers started); ``at_once``: also read as soon as mounted, for information."""
    for ready in (True, False) if at_once else (True,):
        timings: dict[int, list[float]] = {8: [], 0: []}
        for _ in range(repeat):
            for ahead in (8, 0):
                a.set(series_prefetch=ahead)
                a.run("cache", "clear")
                drop_caches()
                with a.mounted() as mnt:
                    if ready:
                        a.wait_ready()
                    paths = files(mnt / "patients")
                    assert len(paths) == 300
                    _n, s = read_files(paths)
                    timings[ahead].append(s)
        on, off = median(timings[8]), median(timings[0])
        print(f"  series runs s: prefetch {[round(x, 2) for x in timings[8]]}, "
              f"off {[round(x, 2) for x in timings[0]]}")
        if ready:
            report(name, 300 / on, 300 / off, "files/s", ">= 3x with series prefetch")
        else:
            report("  the same, read as soon as mounted", 300 / on, 300 / off, "files/s",
                   "(info)")


def bench_backup(work: Path, source: Path, cap_mb: int) -> None:
    a = Archive(work / "hot", cache_mb=cap_mb, users=True)
    a.run("ingest", "--institution", "CHL", str(source))
    stored = sum(p.stat().st_size for p in (a.dir / "site-a" / "chunks").rglob("*")
                 if p.is_file())
    with a.mounted() as mnt:
        sizes = files_as(BACKUP, mnt / "patients")
        everything = sorted(sizes, key=str)
        folders: dict[Path, int] = {}
        for path, size in sizes.items():
            folders[path.parent] = folders.get(path.parent, 0) + size
        hot_dir = max((d for d, size in folders.items() if size < cap_mb * 1e6 * 0.8),
                      key=lambda d: folders[d])
        hot = sorted(p for p in everything if p.parent == hot_dir)
        read_files(hot, CLINICIAN)

    def hit_rate() -> float:
        drop_caches()
        with a.mounted():
            read_files(hot, CLINICIAN)
        stats = a.cache_stats()
        return stats["hits"] / max(1, stats["hits"] + stats["misses"])

    before = hit_rate()
    rounds = max(1, int(10 * cap_mb * 1e6 / stored + 0.999))
    with a.mounted():
        for _ in range(rounds):
            drop_caches()
            read_files(everything, BACKUP)
    after_backup = hit_rate()
    with a.mounted():
        for _ in range(rounds):
            drop_caches()
            read_files(everything, CLINICIAN)
    after_clinician = hit_rate()
    print(f"  hot set {len(hot)} files; cache cap {cap_mb} MB; archive {stored / 1e6:.0f} MB "
          f"stored, read {rounds}x ({rounds * stored / 1e6 / cap_mb:.0f}x the cap)")
    report("hot-set hit rate after backup", after_backup * 100, before * 100, "%",
           "unchanged (1.00x)")
    print(f"  for contrast, after a clinician reads the same: {after_clinician * 100:.0f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "animfs-bench-cache")
    parser.add_argument("--total-mb", type=int, default=500)
    parser.add_argument("--large-mb", type=int, default=200)
    parser.add_argument("--cap-mb", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--site-latency-ms", type=float, default=20.0)
    parser.add_argument("--only", default="warm,series,series-s3,series-s3-far,backup")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_cache.py: run as root (it drops the page cache, mounts, and reads "
                 "as other uids)")
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)
    source = work / "input"
    if not source.is_dir():
        print(f"generating {args.total_mb} MB of DICOM into {source} ...", flush=True)
        gen_dicom.make_archive(source, total_mb=args.total_mb, large_mb=args.large_mb)
    inputs = files(source)
    print(f"input: {len(inputs)} files, {sum(p.stat().st_size for p in inputs) / 1e6:.0f} MB",
          flush=True)
    steps: dict[str, Callable[[], None]] = {
        "warm": lambda: bench_warm(work, source, args.repeat),
        "series": lambda: bench_series(work, args.repeat),
        "series-s3": lambda: bench_series_s3(work, args.repeat),
        "series-s3-far": lambda: bench_series_s3(work, args.repeat, args.site_latency_ms),
        "backup": lambda: bench_backup(work, source, args.cap_mb),
    }
    for name in args.only.split(","):
        steps[name]()


if __name__ == "__main__":
    main()
