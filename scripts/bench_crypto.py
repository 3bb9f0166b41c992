#!/usr/bin/env python3
"""What sealing costs: ingest and first-read throughput with and without a key.

    sudo .venv/bin/python scripts/bench_crypto.py [--total-mb 200] [--large-mb 64] [--rounds 3]

One generated archive of DICOM files (many small instances and one large
multi-frame one).  Each round makes two fresh archives side by side, one by
``animfs init --no-key`` (baseline: zstd chunks named by SHA-256) and one by
``animfs init`` (sealed: AES-256-GCM, HMAC-SHA256 chunk ids), in alternating
order so drift on a shared machine hits both, and for each:

* ingest: ``animfs ingest`` of the whole folder (MB of DICOM per second);
* first read: mount, read every file once in 1 MiB reads, with an empty disk
  cache and a fresh mount (every chunk comes from a site, is opened, checked
  and decompressed).

Reports the median of each and the ratio sealed / baseline (the target is a
cost under 15 %), plus the per-chunk cost of the crypto alone.  Needs root
(mount).
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(HERE.parent))

import gen_dicom  # noqa: E402

ANIMFS = [sys.executable, "-m", "animfs"]
MOUNT_TIMEOUT = 30.0


def run(*args: str) -> None:
    subprocess.run([*ANIMFS, *args], check=True, capture_output=True, timeout=1800)


def one(data: Path, total: int, sealed: bool, work: Path) -> tuple[float, float]:
    """(ingest MB/s, first-read MB/s) for one fresh archive."""
    folder = Path(tempfile.mkdtemp(prefix="sealed-" if sealed else "plain-", dir=work))
    config = folder / "animfs.toml"
    run("init", *([] if sealed else ["--no-key"]), str(folder))
    start = time.perf_counter()
    run("--config", str(config), "ingest", str(data))
    ingest = total / (time.perf_counter() - start) / 1e6
    mnt = folder / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(
        [*ANIMFS, "--config", str(config), "mount", "--foreground", str(mnt)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(mnt):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("mount did not come up")
            time.sleep(0.05)
        files = sorted(p for p in (mnt / "patients").rglob("*") if p.is_file())
        start = time.perf_counter()
        read = 0
        for path in files:
            with open(path, "rb", buffering=0) as f:
                while block := f.read(1 << 20):
                    read += len(block)
        first = read / (time.perf_counter() - start) / 1e6
        assert read == total, (read, total)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=60)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    shutil.rmtree(folder, ignore_errors=True)
    return ingest, first


def crypto_alone(chunk: bytes, rounds: int = 20) -> dict[str, float]:
    """Milliseconds per 4 MiB chunk: zstd alone, and what sealing adds on each side."""
    from animfs import chunks, keys

    ring = keys.new_ring()
    out: dict[str, list[float]] = {k: [] for k in ("compress", "seal+", "decompress", "open+")}
    for _ in range(rounds):
        t0 = time.perf_counter()
        cid, plain_stored = chunks.seal(chunk)
        t1 = time.perf_counter()
        sid, sealed = chunks.seal(chunk, ring)
        t2 = time.perf_counter()
        chunks.unseal(cid, plain_stored, len(chunk))
        t3 = time.perf_counter()
        chunks.unseal(sid, sealed, len(chunk), ring)
        t4 = time.perf_counter()
        out["compress"].append(t1 - t0)
        out["seal+"].append((t2 - t1) - (t1 - t0))
        out["decompress"].append(t3 - t2)
        out["open+"].append((t4 - t3) - (t3 - t2))
    return {k: statistics.median(v) * 1e3 for k, v in out.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--total-mb", type=int, default=200)
    p.add_argument("--large-mb", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench_crypto: needs root (mount)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="animfs-bench-crypto-"))
    try:
        data = work / "data"
        files = gen_dicom.make_archive(data, total_mb=args.total_mb, large_mb=args.large_mb)
        total = sum(f.stat().st_size for f in files)
        print(f"{len(files)} files, {total / 1e6:.0f} MB; {args.rounds} rounds")
        results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for r in range(args.rounds):
            for sealed in ((False, True) if r % 2 == 0 else (True, False)):
                results[sealed].append(one(data, total, sealed, work))
                i, f = results[sealed][-1]
                name = "sealed" if sealed else "plain "
                print(f"  round {r + 1} {name}: ingest {i:6.1f} MB/s, first read {f:6.1f} MB/s")
        for what, k in (("ingest", 0), ("first read", 1)):
            plain = statistics.median(x[k] for x in results[False])
            sealed = statistics.median(x[k] for x in results[True])
            print(
                f"{what:>10}: plain {plain:6.1f} MB/s, sealed {sealed:6.1f} MB/s, "
                f"sealed/plain {sealed / plain:.3f} (cost {(1 - sealed / plain) * 100:+.1f} %)"
            )
        with open(files[0], "rb") as f:
            chunk = f.read(4 << 20)
        costs = crypto_alone(chunk)
        print(
            "per 4 MiB chunk (ms, median): "
            + ", ".join(f"{k} {v:.2f}" for k, v in costs.items())
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
