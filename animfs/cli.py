"""The ``animfs`` command: arguments, logging and progress; the work is in the modules below.

Every failure the user can act on ends as one line on stderr, ``animfs: ...``,
and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from animfs import config as config_mod
from animfs import heap
from animfs.config import Config, ConfigError

log = logging.getLogger("animfs")


class Failure(Exception):
    """A command failed in a way the user can act on; the message is the one line shown."""


class Progress:
    """A one-line progress bar on a terminal; silent elsewhere (logs stay readable)."""

    def __init__(self, what: str, total: int | None = None, stream: Any = sys.stderr) -> None:
        self.what, self.total, self.stream = what, total, stream
        self.done = 0
        self.active = stream.isatty()
        self._last = 0.0

    def step(self, label: str = "") -> None:
        self.done += 1
        now = time.monotonic()
        if self.active and now - self._last > 0.1:
            self._last = now
            total = f"/{self.total}" if self.total else ""
            self.stream.write(f"\r\x1b[K{self.what} {self.done}{total} {label[-60:]}")
            self.stream.flush()

    def close(self) -> None:
        if self.active:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _load(args: argparse.Namespace) -> Config:
    return config_mod.load(args.config)


# -- commands --------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from animfs import keys

    path = config_mod.write_default(Path(args.dir), key_file=not args.no_key)
    config = config_mod.load(path)
    for site in config.sites:
        if site.scheme == "file":
            Path(site.url[len("file://") :]).mkdir(parents=True, exist_ok=True)
    print(f"wrote {path}")
    if config.key_file is not None:
        keys.create(config.key_file)
        print(f"wrote {config.key_file} (mode 0600): without it nothing stored can be read; "
              "keep a copy somewhere safe")
    print(f"use it with: export ANIMFS_CONFIG={path}")
    return 0


def _archive(config: Config) -> Any:
    """``with _archive(config) as (index, store):`` -- both closed on leaving."""
    from animfs import archive

    return archive.opened(config)


def cmd_ingest(args: argparse.Namespace) -> int:
    from animfs.index import IndexFull
    from animfs.ingest import Ingester, walk

    config = _load(args)
    paths = [Path(p) for p in args.paths]
    for path in paths:
        if not path.exists():
            raise Failure(f"{path}: no such file or folder")
    total = sum(1 for _ in walk(paths))
    ring = _keys(config)
    with _archive(config) as (index, store):
        _check_key(store, ring)
        progress = Progress("ingest", total)
        ingester = Ingester(config, index, store, institution=args.institution)

        def report(path: Path, outcome: str, reason: str) -> None:
            if outcome == "refused":
                progress.close()
                print(f"animfs: refused {path}: {reason}", file=sys.stderr)
            progress.step(path.name)

        try:
            summary = ingester.run(paths, report)
        except IndexFull as exc:  # each group committed before it stays; the rest is not in
            print(ingester.summary.line())
            raise Failure(
                f"{exc}; ingest stopped: {ingester.summary.ingested} instances were archived "
                "before it, none after ('animfs gc' finds the chunks written for the rest)"
            ) from None
        finally:
            progress.close()
            ingester.close()
    print(summary.line())
    return 1 if summary.refused else 0


def cmd_mount(args: argparse.Namespace) -> int:
    from animfs import mount

    config = _load(args)
    mountpoint = Path(args.mountpoint).absolute()
    try:
        if args.foreground:
            mount.run(config, mountpoint)
        else:
            mount.check_mountpoint(mountpoint)
            mount.spawn(config, mountpoint)
            print(f"mounted at {mountpoint}; unmount with: animfs umount {mountpoint}")
    except mount.MountError as exc:
        raise Failure(str(exc)) from None
    return 0


def cmd_export_cd(args: argparse.Namespace) -> int:
    import os

    from animfs.export import ExportError, export_cd
    from animfs.keys import for_config

    config = _load(args)
    with _archive(config) as (index, store):
        with Progress("export-cd") as progress:
            try:
                done = export_cd(
                    config,
                    index,
                    store,
                    for_config(config),
                    args.patient,
                    Path(args.dest),
                    uid=os.getuid(),
                    step=progress.step,
                )
            except ExportError as exc:
                raise Failure(str(exc)) from None
    print(f"{args.dest}: DICOMDIR, README.TXT and {done.instances} files, {done.bytes} bytes")
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from animfs import mount

    try:
        mount.unmount(Path(args.mountpoint))
    except mount.MountError as exc:
        raise Failure(str(exc)) from None
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args)
    from animfs.repair import pending
    from animfs.store.base import StoreError

    with _archive(config) as (index, store):
        journal = pending(index)
        sites: dict[str, dict[str, Any]] = {}
        for site in store.sites:
            entry: dict[str, Any] = {"pending_repairs": journal.get(site.name, 0)}
            try:
                objects, size = site.usage()
                entry.update(state="up", last_error="", objects=objects, bytes=size)
            except StoreError as exc:  # a site that does not answer is a state to report
                entry.update(state="down", last_error=exc.reason, objects=None, bytes=None)
            sites[site.name] = entry
        status = {"config": str(config.path), "index": index.counts(), "sites": sites}
        status["sync"] = _sync_report(config, index)
        status["cache"] = _cache_report(config)
    print(json.dumps(status, indent=2))
    return 0


def _sync_report(config: Config, index: Any) -> dict[str, Any]:
    from animfs.sync import last_sync

    counts = index.counts()
    return {
        "host": config.host,
        "interval": config.sync_interval,
        "last": last_sync(index),  # None: never synced
        "index_bytes_per_instance": counts["index_bytes"] // max(1, counts["instances"]),
    }


def _cache_report(config: Config) -> dict[str, Any]:
    from animfs.diskcache import report

    try:
        return report(config.cache_dir, config.cache_max_bytes)
    except OSError as exc:
        raise Failure(f"{config.cache_dir}: cannot read the cache folder: {exc.strerror}") from None


def cmd_cache_stats(args: argparse.Namespace) -> int:
    print(json.dumps(_cache_report(_load(args)), indent=2))
    return 0


def cmd_cache_clear(args: argparse.Namespace) -> int:
    from animfs.diskcache import DiskCache

    config = _load(args)
    entries, size = DiskCache(config.cache_dir, config.cache_max_bytes).clear()
    print(f"cache: deleted {entries} entries, {size / 1e6:.1f} MB, from {config.cache_dir}")
    return 0


def cmd_cache_prefetch(args: argparse.Namespace) -> int:
    import functools

    from animfs import warm
    from animfs.cache import check_stored
    from animfs.diskcache import DiskCache

    config = _load(args)
    with _archive(config) as (index, store):
        path = warm.archive_path(args.path)
        try:
            node = warm.resolve(index, path)
        except warm.NotInArchive as exc:
            raise Failure(str(exc)) from None
        disk = DiskCache(config.cache_dir, config.cache_max_bytes)
        progress = Progress("prefetch")

        def problem(text: str) -> None:
            progress.close()
            print(f"animfs: {text}", file=sys.stderr)

        check = functools.partial(check_stored, keys=_keys(config))
        with progress:
            done = warm.prefetch(
                index, store, disk, node, step=progress.step, problem=problem, check=check
            )
    print(f"{path}: {done.line()}")
    return 1 if done.failed else 0


def cmd_repair(args: argparse.Namespace) -> int:
    from animfs.repair import repair

    config = _load(args)
    ring = _keys(config)
    with _archive(config) as (index, store):
        with Progress("repair", len(index.journal())) as progress:
            report = repair(index, store, step=progress.step, keys=ring)
    for problem in report.problems:
        print(f"animfs: {problem}", file=sys.stderr)
    print(report.line())
    return 1 if report.failed else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from animfs.index import check as check_index
    from animfs.repair import verify

    config = _load(args)
    names = [args.site] if args.site else [s.name for s in config.sites]
    for name in names:
        config.site(name)  # ConfigError for an unknown site
    ring = _keys(config)
    with _archive(config) as (index, store):
        sites = [store.site(name) for name in names]
        counts = index.counts()
        progress = Progress("verify", counts["chunks"] + counts["instances"])

        def problem(entry: Any) -> None:
            progress.close()
            print(f"{entry.site}: {entry.key}: {entry.reason.removeprefix('verify: ')}")

        with progress:
            inconsistent = check_index(index)  # the index against itself, before the sites
            verdicts = verify(
                index, sites, deep=args.deep, step=progress.step, problem=problem, keys=ring
            )
    for line in inconsistent:
        print(f"index: INCONSISTENT: {line}")
    if not inconsistent:
        print(f"index: consistent, {counts['instances']} instances")
    for name, v in verdicts.items():
        if v.unreachable:
            print(f"{name}: UNREACHABLE after {v.checked} objects: {v.unreachable}")
        elif v.complete:
            how = "read and checked" if args.deep else "present"
            print(f"{name}: complete, {v.checked} objects {how}")
        else:
            print(
                f"{name}: INCOMPLETE, {v.missing} missing, {v.corrupt} corrupt "
                f"of {v.checked} objects; journalled for 'animfs repair'"
            )
    return 0 if all(v.complete for v in verdicts.values()) and not inconsistent else 1


def cmd_gc(args: argparse.Namespace) -> int:
    from animfs import gc, keys
    from animfs.manifest import Manifest

    config = _load(args)
    ring = _keys(config)
    with _archive(config) as (index, store):

        def open_manifest(name: str, stored: bytes) -> bytes:
            try:
                return keys.open_with(ring, name, stored)
            except keys.SealError as exc:
                raise ValueError(str(exc)) from None

        def manifest_name(manifest: Manifest) -> str:
            return manifest.object_key_with(ring)

        with Progress("gc") as progress:
            report = gc.collect(
                index,
                store.sites,
                grace=args.grace * 3600,
                delete=args.delete,
                manifest_name=manifest_name,
                open_manifest=open_manifest,
                step=progress.step,
            )
    for o in report.orphans:
        what = "temporary file" if o.temporary else "orphan"
        print(f"{o.site}: {o.key}: {what}, {o.size} bytes, {o.age / 3600:.1f} h old")
    print(f"gc: {report.line(args.delete)}")
    return 1 if report.blocked else 0


def _changes(args: argparse.Namespace) -> Any:
    """The access changes of ``args``' config, by the calling uid, and the index to close."""
    import os

    from animfs.consent import Changes
    from animfs.index import Index

    config = _load(args)
    index = Index(config.index_path, map_size=config.index_map_size)
    return Changes(config, index, uid=os.getuid()), index


def _change(args: argparse.Namespace, make: Callable[[Any], str]) -> int:
    from animfs.audit import AuditUnavailable
    from animfs.consent import Refused

    changes, index = _changes(args)
    try:
        print(make(changes))
        _publish_state(changes.config, index)
    except (Refused, AuditUnavailable) as exc:
        raise Failure(str(exc)) from None
    finally:
        index.close()
    return 0


def _publish_state(config: Config, index: Any) -> None:
    """Copy the change to the sites now if this user can (key and sites); else the mount,
    which looks for unpublished changes every few seconds, does it."""
    from animfs import keys, recovery
    from animfs.store import open_site
    from animfs.store.base import StoreError
    from animfs.store.dual import DualStore, NotEnoughSites

    try:
        ring = keys.for_config(config)
    except keys.KeyError_ as exc:
        log.debug("state left for the mount to publish: %s", exc)
        return
    store = DualStore(
        [open_site(s) for s in config.sites],
        preferred=config.preferred,
        min_sites=config.min_sites,
    )
    try:
        from animfs.sync import Log

        host_log = Log(ring, config.host)
        recovery.publish(
            index, store, ring, config.audit_path, lambda b, names: host_log.append(b, state=names)
        )
    except (NotEnoughSites, StoreError, OSError) as exc:
        log.debug("state left for the mount to publish: %s", exc)
    finally:
        store.close()


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def cmd_consent_grant(args: argparse.Namespace) -> int:
    def make(changes: Any) -> str:
        c = changes.grant(args.patient, args.to, args.until)
        return f"consent: {args.patient} to {c.to} until {_when(c.until)}"

    return _change(args, make)


def cmd_consent_revoke(args: argparse.Namespace) -> int:
    def make(changes: Any) -> str:
        c = changes.revoke(args.patient, args.to)
        return f"consent revoked: {args.patient} to {c.to}"

    return _change(args, make)


def cmd_consent_list(args: argparse.Namespace) -> int:
    changes, index = _changes(args)
    try:
        now = time.time()
        for patient, c in index.consents(args.patient):
            if c.revoked is not None:
                state = f"revoked {_when(c.revoked)}"
            elif c.until is not None and c.until <= now:
                state = "expired"
            else:
                state = "in force"
            print(f"{patient}\t{c.to}\tgranted {_when(c.granted)}\tuntil {_when(c.until)}\t{state}")
    finally:
        index.close()
    return 0


def cmd_record_set(args: argparse.Namespace) -> int:
    def make(changes: Any) -> str:
        changes.set_record(args.patient, args.state)
        return f"record: {args.patient} {args.state}"

    return _change(args, make)


def cmd_break_glass(args: argparse.Namespace) -> int:
    def make(changes: Any) -> str:
        g = changes.break_glass(args.patient, args.reason, args.hours)
        return f"break-the-glass: uid {g.uid} may open {args.patient} until {_when(g.until)}"

    return _change(args, make)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from animfs import audit

    config = _load(args)
    try:
        verdict = audit.verify(config.audit_path)
    except OSError as exc:
        raise Failure(f"{config.audit_path}: cannot read the audit log: {exc.strerror}") from None
    if not verdict.intact:
        print(f"audit: {config.audit_path}: line {verdict.broken_line}: {verdict.problem}")
        return 1
    print(f"audit: {config.audit_path}: {verdict.lines} lines, chain intact, head {verdict.head}")
    return 0


def cmd_audit_show(args: argparse.Namespace) -> int:
    from animfs import audit

    config = _load(args)
    for e in audit.entries(config.audit_path):
        if e.get("patient") != args.patient:
            continue
        if args.json:
            print(json.dumps(e, ensure_ascii=False))
            continue
        who = f"{e.get('user') or 'unmapped'} (uid {e.get('uid')}"
        if e.get("event") == "open":
            who += f", {e.get('institution')} {e.get('role')})" if e.get("role") else ")"
            flag = "  BREAK-THE-GLASS" if e.get("break_glass") else ""
            print(
                f"{e.get('time')}  {e.get('decision')}  {e.get('rule')}  {who}  "
                f"{e.get('process')}[{e.get('pid')}]  {e.get('path')}{flag}"
            )
        else:
            details = {k: v for k, v in e.items() if k not in _AUDIT_COMMON}
            extra = " ".join(f"{k}={v}" for k, v in sorted(details.items()))
            print(f"{e.get('time')}  {e.get('event')}  {who})  {extra}")
    return 0


_AUDIT_COMMON = {"time", "event", "uid", "user", "patient", "prev", "hash"}


# -- keys, snapshots and rebuilds -------------------------------------------------------


def _keys(config: Config) -> Any:
    from animfs import keys

    return keys.for_config(config)


def _check_key(store: Any, ring: Any) -> None:
    """Refuse to write anything under a key file that is not the archive's."""
    from animfs import recovery
    from animfs.store.base import StoreError
    from animfs.store.dual import NotEnoughSites

    try:
        recovery.check_key(store, ring)
    except recovery.RecoveryError as exc:
        store.close()
        raise Failure(str(exc)) from None
    except (StoreError, NotEnoughSites) as exc:
        store.close()
        raise Failure(f"cannot check the key against the sites: {exc}") from None


def cmd_key_create(args: argparse.Namespace) -> int:
    from animfs import keys

    config = _load(args)
    if config.key_file is None:
        raise Failure(f"{config.path}: name the key file first: [security] key_file = ...")
    ring = keys.create(config.key_file)
    print(f"wrote {config.key_file} (mode 0600, key {ring.current}): new objects are sealed; "
          "'animfs key reseal' seals the ones stored before")
    return 0


def cmd_key_rotate(args: argparse.Namespace) -> int:
    from animfs import keys

    config = _load(args)
    if config.key_file is None:
        raise Failure(f"{config.path}: no [security] key_file: nothing is sealed, no key to rotate")
    ring = keys.load(config.key_file).rotated()
    keys.save(ring, config.key_file)
    print(f"{config.key_file}: key {ring.current} added and made current; new objects are "
          f"sealed under it, older keys ({', '.join(k for k in ring.keys if k != ring.current)}) "
          "still open what they sealed")
    if args.no_reseal:
        print("run 'animfs key reseal' to move the stored objects to the new key")
        return 0
    return cmd_key_reseal(args)


def cmd_key_reseal(args: argparse.Namespace) -> int:
    from animfs.reseal import reseal

    config = _load(args)
    ring = _keys(config)
    if ring is None:
        raise Failure(f"{config.path}: no [security] key_file: nothing to reseal")
    with _archive(config) as (index, store):
        with Progress("reseal") as progress:
            report = reseal(index, list(store.sites), ring, step=progress.step)
            if report.dropped:
                _publish_state(config, index)
    for problem in report.failed:
        print(f"animfs: {problem}", file=sys.stderr)
    print(f"key {ring.current}: {report.line()}")
    return 1 if report.failed else 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    from animfs import recovery
    from animfs.store.dual import NotEnoughSites

    config = _load(args)
    ring = _keys(config)
    with _archive(config) as (index, store):
        try:
            snap = recovery.take_snapshot(index, store, ring, config.index_path.parent)
        except NotEnoughSites as exc:
            raise Failure(f"snapshot not stored: {exc}") from None
    print(f"snapshot {snap.id}: {snap.instances} instances, {snap.bytes / 1e6:.1f} MB of index "
          f"in {snap.parts} parts, at every site that answered")
    return 0


def cmd_rebuild_index(args: argparse.Namespace) -> int:
    from animfs import recovery
    from animfs.store import open_site

    config = _load(args)
    ring = _keys(config)
    site = open_site(config.site(args.from_site or config.preferred))
    with Progress("rebuild") as progress:
        try:
            report = recovery.rebuild(
                config.index_path,
                config.index_map_size,
                site,
                ring,
                snapshot=args.from_snapshot is not None,
                snapshot_id=args.from_snapshot or None,
                allow_plain=args.allow_plain,
                step=progress.step,
            )
        except recovery.RecoveryError as exc:
            raise Failure(str(exc)) from None
    print(report.line())
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from animfs import sync

    config = _load(args)
    ring = _keys(config)
    with _archive(config) as (index, store):
        with Progress("sync") as progress:
            try:
                report = sync.sync(
                    index, store, ring, config.host, full=args.full, step=progress.step
                )
            except sync.SyncError as exc:
                raise Failure(f"sync stopped: {exc}") from None
    print(report.line())
    return 0


def _add_recovery_commands(sub: Any) -> None:
    c = sub.add_parser("sync", help="add what other mount hosts wrote to the sites since the "
                       "last sync")
    c.set_defaults(fn=cmd_sync)
    c.add_argument("--full", action="store_true",
                   help="list every manifest at the sites, not only the hosts' logs")
    key = sub.add_parser("key", help="the sealing keys").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    c = key.add_parser("create", help="make the key file the config names (none yet)")
    c.set_defaults(fn=cmd_key_create)
    c = key.add_parser("rotate", help="add a new key for new writes, then reseal")
    c.set_defaults(fn=cmd_key_rotate)
    c.add_argument("--no-reseal", action="store_true", help="only add the key")
    c = key.add_parser("reseal", help="rewrite stored objects under the current key (resumable)")
    c.set_defaults(fn=cmd_key_reseal)
    c = sub.add_parser("snapshot", help="upload a compact copy of the index to every site")
    c.set_defaults(fn=cmd_snapshot)
    c = sub.add_parser("rebuild-index", help="make the index again from one site")
    c.set_defaults(fn=cmd_rebuild_index)
    c.add_argument("--from-site", metavar="NAME", help="the site to read (default: preferred)")
    c.add_argument("--from-snapshot", nargs="?", const="", metavar="ID",
                   help="start from the newest (or this) snapshot, then newer manifests")
    c.add_argument("--allow-plain", action="store_true",
                   help="accept unsealed objects though a key is configured")


# -- parser ----------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="animfs", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="config file (else $ANIMFS_CONFIG, else ./animfs.toml)")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> Any:
        cmd = sub.add_parser(name, help=help, description=help)
        cmd.set_defaults(fn=fn)
        return cmd

    c = add("init", cmd_init, "write DIR/animfs.toml with two local sites and a key under DIR")
    c.add_argument("dir")
    c.add_argument("--no-key", action="store_true", help="no key file: nothing is sealed")
    c = add("ingest", cmd_ingest, "archive DICOM files and folders (recursively)")
    c.add_argument("--institution", help="producing institution (else InstitutionName)")
    c.add_argument("paths", nargs="+")
    c = add("mount", cmd_mount, "mount the archive read-only")
    c.add_argument("--foreground", "-f", action="store_true", help="serve in this process")
    c.add_argument("mountpoint")
    c = add("umount", cmd_umount, "unmount a mounted archive")
    c.add_argument("mountpoint")
    c = add("export-cd", cmd_export_cd, "write a patient's DICOM medium (DICOMDIR) to a folder")
    c.add_argument("--patient", required=True, help="the patient, as ISSUER-PATIENTID")
    c.add_argument("dest", help="a new or empty folder")
    _add_access_commands(sub)
    add("status", cmd_status, "sites, index, repair and cache state as JSON")
    cache = sub.add_parser("cache", help="the local disk cache of chunks").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    for name, fn, help_ in (
        ("stats", cmd_cache_stats, "use and hit counters of the disk cache, as JSON"),
        ("clear", cmd_cache_clear, "delete every cached chunk (safe while mounted)"),
        ("prefetch", cmd_cache_prefetch, "fetch a study or series into the cache ahead of use"),
    ):
        c = cache.add_parser(name, help=help_, description=help_)
        c.set_defaults(fn=fn)
    c.add_argument("path", help="a folder inside a mount, or its path from the mount root")
    add("repair", cmd_repair, "copy every journalled object to the site that lacks it")
    c = add("verify", cmd_verify, "check that every referenced object is at every site")
    c.add_argument("--site", help="check only this site")
    c.add_argument("--deep", action="store_true", help="also read every object and check it")
    c = add("gc", cmd_gc, "find chunks no instance uses (left by a crash); --delete removes them")
    c.add_argument("--delete", action="store_true", help="delete them (default: only list)")
    c.add_argument("--grace", type=float, default=24.0, metavar="HOURS",
                   help="spare what was written this recently: an ingest may be about to "
                   "commit it (default 24)")
    _add_recovery_commands(sub)
    return p


def _add_access_commands(sub: Any) -> None:
    """consent, record, break-glass and audit, each with its own sub-commands."""

    def group(name: str, help: str) -> Any:
        return sub.add_parser(name, help=help, description=help).add_subparsers(
            dest="action", required=True, metavar="ACTION"
        )

    def add(parent: Any, name: str, fn: Callable[[argparse.Namespace], int], help: str) -> Any:
        cmd = parent.add_parser(name, help=help, description=help)
        cmd.set_defaults(fn=fn)
        return cmd

    patient_help = "the patient, as ISSUER-PATIENTID"
    consent = group("consent", "a patient's consent to share their imaging")
    c = add(consent, "grant", cmd_consent_grant, "let an institution (or all) open the images")
    c.add_argument("--patient", required=True, help=patient_help)
    c.add_argument("--to", required=True, help="institution code or name, or 'all'")
    c.add_argument("--until", help="YYYY-MM-DD (through that day) or an ISO date and time")
    c = add(consent, "revoke", cmd_consent_revoke, "withdraw a consent")
    c.add_argument("--patient", required=True, help=patient_help)
    c.add_argument("--to", required=True, help="institution code or name, or 'all'")
    c = add(consent, "list", cmd_consent_list, "consents, revoked and expired ones included")
    c.add_argument("--patient", help=patient_help)

    record = group("record", "the state of a patient's shared record")
    c = add(record, "set", cmd_record_set, "in-order allows sharing; closed and opted-out stop it")
    c.add_argument("--patient", required=True, help=patient_help)
    c.add_argument("state", choices=["in-order", "closed", "opted-out"])

    c = sub.add_parser("break-glass", help="emergency access to one patient, for yourself")
    c.set_defaults(fn=cmd_break_glass)
    c.add_argument("--patient", required=True, help=patient_help)
    c.add_argument("--reason", required=True, help="why: written to the audit log")
    c.add_argument("--hours", type=float, default=4.0, help="how long (default 4, fractions ok)")

    log_ = group("audit", "the hash-chained audit log")
    add(log_, "verify", cmd_audit_verify, "check the chain; exit 1 at the first broken line")
    c = add(log_, "show", cmd_audit_show, "who opened a patient's images, when, under which rule")
    c.add_argument("--patient", required=True, help=patient_help)
    c.add_argument("--json", action="store_true", help="print the log lines themselves")


def _quiet_pydicom(record: logging.LogRecord) -> bool:
    return not record.name.startswith("pydicom") or record.levelno >= logging.ERROR


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    heap.keep_freed_buffers()  # chunk buffers are reused, not faulted in afresh
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        # pydicom logs what it makes of damaged input (undecodable names, odd lengths),
        # and sets its logger's level when imported; a file it cannot read is refused in
        # one line of ours, the rest is archived as it is.
        for handler in logging.getLogger().handlers:
            handler.addFilter(_quiet_pydicom)
    try:
        result: int = args.fn(args)
        return result
    except (Failure, ConfigError) as exc:
        print(f"animfs: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the index's own errors say what is wrong in one line
        from animfs.index import IndexError_

        if not isinstance(exc, IndexError_):
            raise
        print(f"animfs: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("animfs: interrupted", file=sys.stderr)
        return 130
