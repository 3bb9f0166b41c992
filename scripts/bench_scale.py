#!/usr/bin/env python3
"""How animfs holds up as the index grows: 10k, 100k, 1M (and 10M) instances.

    bench_scale.py                      # 10k, 100k, 1M
    bench_scale.py --sizes 10000,100000,1000000,10000000
    bench_scale.py --workdir /tmp/scale --sizes 10000000 --build-only   # build, keep
    bench_scale.py --workdir /tmp/scale --sizes 10000,100000,1000000,10000000

One archive (``animfs init --no-key`` in a temporary folder) whose index is
filled by ``gen_index.py`` (no chunk data) and grown from one size to the next.
With --workdir, each size has its own archive ``<workdir>/<size>``, filled once
and reused by later runs (10M instances take half an hour or more to generate),
so a run can compare a kept 10M index against 10k built afresh.
Before each size is mounted, its index file is put in a known page-cache state
(--page-cache), whether it was just generated or is reused from an earlier run.
This decides much of the mount's RSS: the kernel maps a cached page's neighbours
with it on a fault (64 KiB), and a whole large folio at once (up to 2 MiB on
Linux 6.18).  Large folios are what bulk writes (the generator's transactions of
20,000 instances) and read() read-ahead put in the cache; the mount's own reads
(no read-ahead on its map) bring in single pages.  "pages" (the default) drops
the file from the cache and reads it back in page-size pieces (fully cached, as
if read by the mount itself); "read" reads it back with read() instead (large
folios, as a copy or backup of the index file leaves it); "cold" only drops
it; "as-is" leaves it.
At each size it reports index bytes per instance (pages in use, and the file),
then mounts the archive for real, access control on (uid 0 is a clinician of
CHL; every sampled file is a CHL study, so its opens are allowed and audited),
and measures through the kernel, on files and folders not touched before:

- lookup:  ``stat`` of a file never looked up (its folders already are)
- getattr: ``statx(AT_STATX_FORCE_SYNC)`` of a looked-up file (the kernel must ask)
- readdir: ``listdir`` of a series folder never listed, counted once for every
  sample in that series: at 10M nearly every sample is in a series of its own,
  at 10k most fall in a few series listed before, and counting each listing
  once would compare the series of a random instance at 10M (median 195 files)
  with the distinct series sampled at 10k (median 146): 1.3x slower at 10M for
  that alone.  Also per file listed ("readdir/f", in us).
- open:    ``open`` + ``close`` of a looked-up file: access decision + durable audit line
- ls -l:   the ``ls -l`` command on a patient folder never listed

with median and p99 per operation and the ratio of each median to the smallest
size's, and the peak RSS (VmHWM) of the mount process.  The machine is shared:
each size's figures are the median of --repeat rounds of --samples operations,
and with --workdir the rounds go round the sizes (10k, 10M, 10k, 10M, ...), so
that every size meets the same load.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import dataclasses
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gen_index  # noqa: E402

from animfs import config as config_mod  # noqa: E402
from animfs.index import Index  # noqa: E402
from animfs.manifest import Manifest  # noqa: E402

PYTHON = sys.executable
AT_STATX_FORCE_SYNC = 0x2000
STATX_BASIC_STATS = 0x7FF
_libc = ctypes.CDLL(None, use_errno=True)


def statx_sync(path: str) -> None:
    buf = ctypes.create_string_buffer(256)
    if _libc.statx(-100, path.encode(), AT_STATX_FORCE_SYNC, STATX_BASIC_STATS, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def index_bytes(index: Index) -> tuple[int, int]:
    """(bytes of pages in use over every sub-database, bytes of the data file)."""
    psize = index.env.stat()["psize"]
    used = 0
    with index.env.begin() as txn:
        for db in index._db.values():
            st = txn.stat(db)
            used += (st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]) * psize
    return used, (index.path / "data.mdb").stat().st_size


def sample(index: Index, count: int, rng: random.Random) -> list[Manifest]:
    """``count`` random CHL instances, by random positions in the instance keys."""
    out: list[Manifest] = []
    seen: set[bytes] = set()
    with index.env.begin() as txn:
        cursor = txn.cursor(db=index._db["instances"])
        for _attempt in range(count * 100):
            if len(out) >= count:
                break
            if not cursor.set_range(rng.randbytes(32)):
                continue
            manifest = index._manifest_in(txn, bytes(cursor.key()))
            if manifest and manifest.institution == "CHL" and manifest.key not in seen:
                seen.add(manifest.key)
                out.append(manifest)
    return out


def timed(fn: object, *args: object) -> float:
    start = time.perf_counter()
    fn(*args)  # type: ignore[operator]
    return time.perf_counter() - start


def measure(mnt: Path, picks: list[Manifest]) -> dict[str, list[float]]:
    ops = ("lookup", "getattr", "readdir", "readdir/f", "open", "ls")
    out: dict[str, list[float]] = {k: [] for k in ops}
    listed: set[int] = set()
    in_series = collections.Counter(m.placement.series_ino for m in picks)
    for m in picks:
        p = m.placement
        patient = mnt / "patients" / p.patient_name
        series = patient / p.study_name / p.series_name
        os.stat(series)  # folders looked up: the file's lookup is measured alone
        path = str(series / p.file_name)
        fresh = p.series_ino not in listed  # a listing fills the kernel's entries
        if fresh:
            out["lookup"].append(timed(os.stat, path))
        else:
            os.stat(path)
        out["getattr"].append(timed(statx_sync, path))
        if fresh:
            start = time.perf_counter()
            files = len(os.listdir(series))
            took = time.perf_counter() - start
            out["readdir"] += [took] * in_series[p.series_ino]  # see the docstring
            out["readdir/f"] += [took / files] * in_series[p.series_ino]

        def open_close(path: str = path) -> None:
            os.close(os.open(path, os.O_RDONLY))

        out["open"].append(timed(open_close))

        def ls(patient: Path = patient) -> None:
            subprocess.run(["ls", "-l", str(patient)], check=True, capture_output=True)

        if p.patient_ino not in listed:
            out["ls"].append(timed(ls))
        listed.update((p.series_ino, p.patient_ino))
    return out


def memory(pid: int) -> tuple[int, int]:
    """(peak RSS, anonymous RSS now) of a process, in bytes.  The peak counts the index's
    pages the process has touched through its memory map (page cache, shared and
    reclaimable); the anonymous part is the process's own memory."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            fields[key] = int(value.split()[0]) * 1024
    return fields.get("VmHWM", -1), fields.get("RssAnon", -1)


def run_size(
    cfg: Path, mnt: Path, picks: list[Manifest]
) -> tuple[dict[str, list[float]], tuple[int, int]]:
    log = open(cfg.parent / "mount.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [PYTHON, "-m", "animfs", "--config", str(cfg), "mount", "--foreground", str(mnt)],
        stdout=log, stderr=log,
    )
    try:
        deadline = time.monotonic() + 120
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mount failed: see {log.name}")
            time.sleep(0.1)
        figures = measure(mnt, picks)
        return figures, memory(proc.pid)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def make_archive(work: Path) -> Path:
    """An archive in ``work`` set up for the bench (once); returns its config."""
    cfg = work / "animfs.toml"
    if cfg.exists():
        return cfg
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)
    subprocess.run([PYTHON, "-m", "animfs", "init", "--no-key", str(work)], check=True,
                   capture_output=True)
    with open(cfg, "a") as f:
        f.write('\n[users.0]\nname = "bench"\ninstitution = "CHL"\nrole = "clinician"\n'
                '\n[sync]\ninterval = 0\n')
    # No chunk data exists: no series prefetch, whose failed fetches would journal repairs.
    text = cfg.read_text().replace("snapshot_interval = 3600", "snapshot_interval = 0")
    text = text.replace("series_prefetch = 8", "series_prefetch = 0")
    cfg.write_text(text)
    (work / "mnt").mkdir(exist_ok=True)
    return cfg


def fill_to(index: Index, size: int, seed: int) -> float:
    """Grow ``index`` to ``size`` instances (new patients from ``seed``); returns the
    seconds it took (0 when it already holds them)."""
    have = index.counts()["instances"]
    if have > size:
        raise SystemExit(f"{index.path} holds {have:,} instances, more than {size:,}")
    if have == size:
        return 0.0
    return gen_index.fill(index, size - have, seed=seed, batch=20_000)


def set_page_cache(data_file: Path, state: str) -> None:
    """Put the index file in the page cache as ``state`` says (see the docstring):
    "pages": dropped, then read back with POSIX_FADV_WILLNEED, which reads in
    single pages (unlike read(), whose read-ahead makes large folios), 8 MiB per
    call (the most the kernel reads for one); "read": dropped, then read back with
    read(); "cold": dropped; "as-is": left."""
    if state == "as-is":
        return
    fd = os.open(data_file, os.O_RDONLY)
    try:
        os.fdatasync(fd)  # dirty pages are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if state == "pages":
            size, step = os.fstat(fd).st_size, 8 << 20
            for offset in range(0, size, step):
                os.posix_fadvise(fd, offset, step, os.POSIX_FADV_WILLNEED)
            os.pread(fd, 1, size - 1)  # waits for the last of the reads
        elif state == "read":
            while os.read(fd, 1 << 24):
                pass
    finally:
        os.close(fd)


@dataclasses.dataclass
class Size:
    """One size's archive, its index figures and its rounds' samples and results."""

    size: int
    cfg: Path
    used: int
    file_bytes: int
    gen_seconds: float
    rounds: list[list[Manifest]]
    results: list[dict[str, list[float]]] = dataclasses.field(default_factory=list)
    rss: int = 0
    anon: int = 0

    def run_round(self, page_cache: str) -> None:
        config = config_mod.load(self.cfg)
        set_page_cache(config.index_path / "data.mdb", page_cache)
        figures, (peak, own) = run_size(self.cfg, self.cfg.parent / "mnt",
                                        self.rounds[len(self.results)])
        self.results.append(figures)
        self.rss, self.anon = max(self.rss, peak), max(self.anon, own)

    def merged(self) -> dict[str, tuple[float, float]]:
        """Per operation: (median of the rounds' medians, median of their p99s)."""
        return {
            op: (
                statistics.median(statistics.median(r[op]) for r in self.results),
                statistics.median(pct(r[op], 0.99) for r in self.results),
            )
            for op in self.results[0]
        }


def prepare(size: int, work: Path, seed: int, args: argparse.Namespace,
            rng: random.Random) -> Size:
    """Build (or reuse) ``size``'s archive in ``work`` and sample its rounds."""
    cfg = make_archive(work)
    config = config_mod.load(cfg)
    index = Index(config.index_path, map_size=1 << 40)
    try:
        gen_seconds = fill_to(index, size, seed)
        if args.build_only:
            print(f"{size:>10,}: {work} ({gen_seconds:.0f} s)", flush=True)
            return Size(size, cfg, 0, 0, gen_seconds, [])
        used, file_bytes = index_bytes(index)
        rounds = [sample(index, args.samples, rng) for _ in range(args.repeat)]
    finally:
        index.close()
    return Size(size, cfg, used, file_bytes, gen_seconds, rounds)


def report(one: Size, base: Size) -> None:
    print(
        f"{one.size:>10,}: {one.used / one.size:6.0f} B/instance in use "
        f"({one.file_bytes / one.size:.0f} file), generated in {one.gen_seconds:.0f} s, mount "
        f"peak RSS {one.rss / 2**20:.0f} MiB (anonymous {one.anon / 2**20:.0f} MiB)",
        flush=True,
    )
    first = base.merged()
    for op, (median, p99) in one.merged().items():
        unit, scale = ("us", 1e6) if op == "readdir/f" else ("ms", 1e3)
        print(
            f"{'':>12}{op:9} median {median * scale:7.3f} {unit}  p99 {p99 * scale:7.3f} "
            f"{unit}  x{median / first[op][0]:.2f} of {base.size:,}",
            flush=True,
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--samples", type=int, default=200, help="operations of each kind per round")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per size (each on a fresh mount)")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--keep", help="build the archive in this folder and keep it")
    where.add_argument("--workdir", help="one archive per size in <workdir>/<size>, built "
                       "once and reused")
    ap.add_argument("--page-cache", choices=("pages", "read", "cold", "as-is"), default="pages",
                    help="the index file's page-cache state at each mount (see above)")
    ap.add_argument("--build-only", action="store_true",
                    help="with --workdir: fill each size's archive, measure nothing")
    args = ap.parse_args()
    if args.build_only and not args.workdir:
        ap.error("--build-only needs --workdir")
    sizes = [int(s) for s in args.sizes.split(",")]
    top = Path(args.workdir or args.keep or tempfile.mkdtemp(prefix="animfs-scale-"))
    rng = random.Random(7)
    try:
        if args.workdir:  # every size at hand: rounds go round the sizes
            done = [prepare(size, top / str(size), 1, args, rng) for size in sizes]
            if args.build_only:
                return 0
            for _round in range(args.repeat):
                for one in done:
                    one.run_round(args.page_cache)
            for one in done:
                report(one, done[0])
        else:  # one archive, grown from size to size (new patients at each step)
            done = []
            for step, size in enumerate(sizes):
                one = prepare(size, top, step + 1, args, rng)
                for _round in range(args.repeat):
                    one.run_round(args.page_cache)
                done.append(one)
                report(one, done[0])
    finally:
        if not (args.keep or args.workdir):
            shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
