#!/usr/bin/env python3
"""Benchmark two S3 sites: cold reads through the mount vs raw boto3, and the cost of failover.

Starts two moto S3 servers on 127.0.0.1 (separate processes), an archive with
both as sites, ingests a generated archive of ``--mb`` MiB, then measures in
the same run, against the same server:

1. cold sequential read of every file through a fresh mount (as ``cat`` does,
   1 MiB at a time) vs raw boto3 GETs of the same stored objects (one stream,
   and as many streams as the mount fetches with); prints the ratio;
2. the extra time a read pays when the preferred site has just died (killed:
   connections refused) or hung (SIGSTOP: connections accepted, no answer):
   the first file read after the failure, and the files after it, against the
   same files read with both sites up.

moto is slow and in memory, so keep the size modest (100-200 MiB).  Usage:
    .venv/bin/python scripts/bench_sites.py [--mb 150] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import boto3  # noqa: E402
import botocore.config  # noqa: E402

from animfs.cache import FETCH_THREADS  # noqa: E402
from animfs.index import Index  # noqa: E402
from animfs.manifest import Manifest  # noqa: E402

import gen_dicom  # noqa: E402

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_DEFAULT_REGION": "us-east-1"}
PREFIX = "archive"
BLOCK = 1 << 20


class Server:
    def __init__(self, name: str, workdir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.name, self.endpoint = name, f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / f"moto-{name}.log", "ab")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
             "-p", str(self.port)],
            stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"moto_server {self.name} did not start")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=10)

    def client(self) -> object:
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            config=botocore.config.Config(s3={"addressing_style": "path"},
                                          max_pool_connections=FETCH_THREADS * 2))


def animfs(config: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "animfs", "--config", str(config), *args],
                            capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"animfs {' '.join(args)}: {result.stderr}")
    return result.stdout


class Mounted:
    def __init__(self, config: Path, workdir: Path) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="mnt-", dir=workdir))
        self.log = open(workdir / "mount.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "animfs", "--config", str(config), "mount", "--foreground",
             str(self.path)], stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mount failed; see mount.log")
            time.sleep(0.05)

    def __enter__(self) -> Mounted:
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True, timeout=60)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def read_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(BLOCK):
            size += len(block)
            digest.update(block)
    return size, digest.hexdigest()


def mount_files(mount: Mounted) -> list[Path]:
    return sorted(p for p in (mount.path / "patients").rglob("*") if p.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=150, help="archive size in MiB (default 150)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    os.environ.update(ENV)
    workdir = Path(tempfile.mkdtemp(prefix="bench-sites-"))
    workdir.chmod(0o755)
    servers = [Server("a", workdir), Server("b", workdir)]
    try:
        for server in servers:
            server.start()
            server.client().create_bucket(Bucket="site")  # type: ignore[attr-defined]
        return run(workdir, servers, args.mb)
    finally:
        for server in servers:
            server.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")


def run(workdir: Path, servers: list[Server], mb: int) -> int:
    archive = workdir / "archive"
    animfs(archive / "animfs.toml", "init", str(archive))
    config = archive / "animfs.toml"
    text = config.read_text()
    for name, server in zip(("site-a", "site-b"), servers, strict=True):
        text = re.sub(rf'name = "{name}"\nurl = "[^"]*"',
                      f'name = "{name}"\nurl = "s3://site/{PREFIX}"\n'
                      f'endpoint_url = "{server.endpoint}"\nregion = "us-east-1"', text)
    text = re.sub(r"repair_interval = \d+", "repair_interval = 86400", text)
    config.write_text(text)

    t = time.monotonic()
    source = gen_dicom.make_archive(workdir / "dicom", total_mb=mb, patients=4, seed=7)
    print(f"generated {len(source)} files, {sum(p.stat().st_size for p in source) / 1e6:.0f} MB "
          f"in {time.monotonic() - t:.1f} s")
    t = time.monotonic()
    print("ingest:", animfs(config, "ingest", str(workdir / "dicom")).strip(),
          f"({time.monotonic() - t:.1f} s)")

    index = Index(archive / "index")
    by_sha = {}
    for data in index.manifests():
        m = Manifest.from_bytes(data)
        by_sha[m.sha256] = m
    index.close()

    # 1. cold sequential read through the mount vs raw boto3 GETs of the same objects.
    with Mounted(config, workdir) as mount:
        files = mount_files(mount)
        t = time.monotonic()
        logical = 0
        keys: list[str] = []
        for path in files:
            size, sha = read_file(path)
            logical += size
            keys += [f"{PREFIX}/chunks/{ref.id}" for ref in by_sha[sha].chunks]
        mount_s = time.monotonic() - t
    seen: set[str] = set()
    keys = [k for k in keys if not (k in seen or seen.add(k))]  # type: ignore[func-returns-value]
    client = servers[0].client()

    def get(key: str) -> int:
        return len(client.get_object(Bucket="site", Key=key)["Body"].read())  # type: ignore[attr-defined]

    t = time.monotonic()
    stored = sum(get(k) for k in keys)
    raw1_s = time.monotonic() - t
    t = time.monotonic()
    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        assert sum(pool.map(get, keys)) == stored
    rawn_s = time.monotonic() - t

    print(f"\n1. cold sequential read, {len(files)} files, {logical / 1e6:.0f} MB "
          f"({stored / 1e6:.0f} MB stored in {len(keys)} chunks) from site-a")
    print(f"   through the mount:           {mount_s:6.2f} s  {logical / mount_s / 1e6:7.1f} MB/s "
          f"of files, {stored / mount_s / 1e6:6.1f} MB/s of stored chunks")
    print(f"   raw boto3 GET, 1 stream:     {raw1_s:6.2f} s  {stored / raw1_s / 1e6:7.1f} MB/s "
          f"of stored chunks")
    print(f"   raw boto3 GET, {FETCH_THREADS} streams:    {rawn_s:6.2f} s  "
          f"{stored / rawn_s / 1e6:7.1f} MB/s of stored chunks")
    print(f"   ratio mount/raw: {raw1_s / mount_s:.2f}x (vs 1 stream), "
          f"{rawn_s / mount_s:.2f}x (vs {FETCH_THREADS} streams)   [target >= 0.7x]")

    # 2. failover: the same files read cold with both sites up, then with site-a
    #    failing just before the second file.  One file per series (the first):
    #    opening a file prefetches the following ones of its series, which would
    #    hide the failure from the file read next.
    firsts: dict[Path, Path] = {}
    for path in files:
        firsts.setdefault(path.parent, path)
    same = [p.relative_to(mount.path) for p in firsts.values()][:12]

    def timed(mount: Mounted, fail: int | None = None) -> list[float]:
        times = []
        for i, rel in enumerate(same):
            if i == 1 and fail is not None:
                servers[0].signal(fail)
            t = time.monotonic()
            read_file(mount.path / rel)
            times.append(time.monotonic() - t)
        return times

    with Mounted(config, workdir) as mount:
        base = timed(mount)
    normal = statistics.median(base[1:])
    print(f"\n2. failover: the first file of {len(same)} series, one after another; "
          f"median {normal * 1000:.0f} ms per file read cold with both sites up")
    for what, signum in (("hung (SIGSTOP)", signal.SIGSTOP), ("killed (SIGKILL)", signal.SIGKILL)):
        with Mounted(config, workdir) as mount:
            times = timed(mount, signum)
            if signum == signal.SIGSTOP:
                servers[0].signal(signal.SIGCONT)
        after = statistics.median(times[2:])
        print(f"   site-a {what:17}: first read after it {times[1] * 1000:6.0f} ms "
              f"(+{(times[1] - normal) * 1000:.0f} ms); the reads after: median "
              f"{after * 1000:.0f} ms (+{(after - normal) * 1000:.0f} ms)   "
              f"[target: < 2 s once, then none]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
