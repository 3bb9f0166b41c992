"""The mount: the only ``trio.run``.  Builds store -> cache -> index -> fs and owns the nursery.

``animfs mount`` without ``--foreground`` starts this same code in a child
process (``--foreground``) with its output in the mount log, waits until the
kernel shows the mount, and returns; a child that dies first makes the parent
fail with the child's last log lines.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import trio

from animfs import archive, fs, keys, recovery, repair, sync
from animfs.audit import AuditFile, AuditUnavailable, GroupCommit
from animfs.cache import ChunkCache
from animfs.config import Config
from animfs.diskcache import DiskCache
from animfs.index import Index, IndexError_
from animfs.keys import KeyRing
from animfs.store.base import StoreError
from animfs.store.dual import DualStore, NotEnoughSites, WriteBatch

log = logging.getLogger(__name__)

READ_AHEAD_KB = 1024  # the kernel then sends 1 MiB read requests
START_TIMEOUT = 30.0
STATE_SECONDS = 3.0  # how often access-state changes are looked for and published
PROBE_SECONDS = 3.0  # how often sites marked down are asked whether they answer again


class MountError(Exception):
    """The mount point cannot be used; the message says why."""


def log_path(config: Config) -> Path:
    return config.path.parent / "animfs-mount.log"


def check_mountpoint(mountpoint: Path) -> None:
    """Refuse a mount point that is missing, not a folder, in use or not empty.

    A dead animfs mount left by a killed process ("transport endpoint is not
    connected") is cleared, so that a crashed mount can simply be started again.
    """
    try:
        os.stat(mountpoint)
        if os.path.ismount(mountpoint):
            # For a second after its process died, the kernel may still answer
            # stat from its attribute cache; a listing always asks the process.
            os.listdir(mountpoint)
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
            raise MountError(f"{mountpoint}: {exc.strerror}") from None
        log.warning("%s: clearing a dead mount left by a process that was killed", mountpoint)
        subprocess.run(
            ["fusermount3", "-u", "-z", str(mountpoint)],
            check=False,
            capture_output=True,
            timeout=30,
        )
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint}: already a mount point (unmount it first)")
    if not mountpoint.is_dir():
        raise MountError(f"{mountpoint}: not a folder")
    if any(mountpoint.iterdir()):
        raise MountError(f"{mountpoint}: not empty; animfs mounts only on an empty folder")


def spawn(config: Config, mountpoint: Path) -> None:
    """Start the mount in the background and wait until it serves (or fails).

    The index is opened here first, so that an index of an older format is
    upgraded in the foreground, where the user sees it happen and no start-up
    time-out applies, and one that cannot be read fails here, in one line."""
    try:
        Index(config.index_path, map_size=config.index_map_size).close()
    except IndexError_ as exc:
        raise MountError(str(exc)) from None
    logfile = log_path(config)
    with open(logfile, "ab") as out:
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "animfs",
                "--config",
                str(config.path),
                "mount",
                "--foreground",
                str(mountpoint),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if os.path.ismount(mountpoint):
            return
        if child.poll() is not None:
            raise MountError(
                f"the mount process exited ({child.returncode}); see {logfile}:\n{_tail(logfile)}"
            )
        time.sleep(0.05)
    child.terminate()
    raise MountError(f"{mountpoint}: not mounted after {START_TIMEOUT:.0f} s; see {logfile}")


def _tail(path: Path, lines: int = 5) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def unmount(mountpoint: Path) -> None:
    result = subprocess.run(
        ["fusermount3", "-u", str(mountpoint)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise MountError(result.stderr.strip() or f"{mountpoint}: unmount failed")


def run(config: Config, mountpoint: Path) -> None:
    """Mount in this process and serve until unmounted or signalled."""
    check_mountpoint(mountpoint)
    ring = keys.for_config(config)  # a missing or unreadable key file: refuse to start
    with archive.opened(config) as (index, store), _audit_file(config) as audit_file:
        trio.run(_serve, config, index, store, mountpoint, audit_file, ring)


@contextlib.contextmanager
def _audit_file(config: Config) -> Iterator[AuditFile | None]:
    """The audit log when access control is on (the config maps users), else None."""
    if not config.users:
        log.warning("no [users] in %s: access control is off, opens are not audited", config.path)
        yield None
        return
    try:
        audit_file = AuditFile(config.audit_path)
    except AuditUnavailable as exc:
        raise MountError(str(exc)) from None
    log.info("access control on for %d users; audit log %s", len(config.users), config.audit_path)
    try:
        yield audit_file
    finally:
        audit_file.close()


async def _serve(
    config: Config,
    index: Index,
    store: DualStore,
    mountpoint: Path,
    audit_file: AuditFile | None = None,
    ring: KeyRing | None = None,
) -> None:
    async with trio.open_nursery() as nursery:
        disk = DiskCache(config.cache_dir, config.cache_max_bytes)
        cache = ChunkCache(
            store,
            memory_bytes=config.memory_bytes,
            nursery=nursery,
            disk=disk,
            keys=ring,
            unpackers=config.unpackers,
            config_path=config.path,
        )
        audit_log = GroupCommit(audit_file, nursery) if audit_file is not None else None
        operations = fs.Operations(
            index,
            cache,
            users=config.users,
            audit_log=audit_log,
            series_ahead=config.series_prefetch,
        )
        options = set(pyfuse3.default_options)
        options |= {"fsname=animfs", "subtype=animfs", "ro", "allow_other"}
        pyfuse3.init(operations, str(mountpoint), options)
        log.info("mounted %s at %s", config.path, mountpoint)
        stop_repair = threading.Event()
        try:
            nursery.start_soon(_stop_on_signal)
            nursery.start_soon(_raise_read_ahead, mountpoint)
            nursery.start_soon(_probe_sites, store)
            nursery.start_soon(_repair_in_background, config, index, store, stop_repair, ring)
            nursery.start_soon(_keep_at_sites, config, index, store, ring)
            await pyfuse3.main()
        finally:
            stop_repair.set()  # a repair pass in its thread ends after the object in hand
            pyfuse3.close(unmount=True)
            nursery.cancel_scope.cancel()
            log.info("unmounted %s", mountpoint)


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return


async def _probe_sites(store: DualStore) -> None:
    """Bring a site that was marked down back as soon as it answers again."""
    limiter = trio.CapacityLimiter(1)
    while True:
        await trio.sleep(PROBE_SECONDS)
        # abandon_on_cancel: a probe of a hung site may wait out its time-out,
        # and touches nothing but the site states, so unmount need not wait for it.
        await trio.to_thread.run_sync(store.probe, limiter=limiter, abandon_on_cancel=True)


async def _keep_at_sites(
    config: Config, index: Index, store: DualStore, ring: KeyRing | None
) -> None:
    """Publish access-state changes and the audit head every few seconds, and upload an
    index snapshot every ``snapshot_interval`` seconds (animfs.recovery).

    Nothing is written under a key that does not open the archive's key check: a
    mount started with a wrong key file serves nothing and must not write either."""
    limiter = trio.CapacityLimiter(1)
    try:
        await trio.to_thread.run_sync(recovery.check_key, store, ring, limiter=limiter)
    except (recovery.RecoveryError, StoreError, NotEnoughSites) as exc:
        log.error("%s: this mount writes no state or snapshots", exc)
        return
    host_log = sync.Log(ring, config.host)

    def log_to(batch: WriteBatch, names: list[str]) -> None:
        host_log.append(batch, state=names)

    next_snapshot = time.monotonic() + config.snapshot_interval
    next_sync = time.monotonic()  # at once: what other hosts wrote while this one was down
    while True:
        await trio.sleep(STATE_SECONDS)
        if config.sync_interval and time.monotonic() >= next_sync:
            next_sync = time.monotonic() + config.sync_interval
            try:
                synced = await trio.to_thread.run_sync(
                    sync.sync, index, store, ring, config.host, limiter=limiter
                )
                if synced.added or synced.patients:
                    log.info("%s", synced.line())
            except (sync.SyncError, StoreError, IndexError_, OSError) as exc:
                log.warning("sync from other hosts failed (next pass retries): %s", exc)
        try:
            await trio.to_thread.run_sync(
                recovery.publish, index, store, ring, config.audit_path, log_to, limiter=limiter
            )
            if config.snapshot_interval and time.monotonic() >= next_snapshot:
                next_snapshot = time.monotonic() + config.snapshot_interval
                snap = await trio.to_thread.run_sync(
                    recovery.take_snapshot,
                    index,
                    store,
                    ring,
                    config.index_path.parent,
                    limiter=limiter,
                )
                log.info("index snapshot %s: %d instances", snap.id, snap.instances)
        except (StoreError, NotEnoughSites, OSError) as exc:
            log.warning("state or snapshot not written to the sites (next pass retries): %s", exc)


async def _repair_in_background(
    config: Config,
    index: Index,
    store: DualStore,
    stop: threading.Event,
    ring: KeyRing | None = None,
) -> None:
    """Run ``animfs repair`` every ``repair_interval`` seconds while mounted."""
    while True:
        await trio.sleep(config.repair_interval)
        if not index.journal(limit=1):
            continue
        report = await trio.to_thread.run_sync(
            functools.partial(repair.repair, index, store, stop=stop, keys=ring)
        )
        log.info("background repair: %s", report.line())


async def _raise_read_ahead(mountpoint: Path) -> None:
    """Ask the kernel for 1 MiB reads: FUSE mounts start with a small read-ahead."""

    def raise_it() -> None:
        dev = os.stat(mountpoint).st_dev
        knob = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        try:
            if int(knob.read_text()) < READ_AHEAD_KB:
                knob.write_text(str(READ_AHEAD_KB))
        except OSError as exc:
            log.info("cannot raise %s to %d: %s", knob, READ_AHEAD_KB, exc.strerror)

    await trio.to_thread.run_sync(raise_it)
