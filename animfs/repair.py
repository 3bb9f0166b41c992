"""Healing the sites: repair what the journal names, and verify (scrub) what the index references.

Both are blocking and run in the calling thread (the CLI's, or a worker thread
of the mount), with a few threads of their own for site I/O.  Both can be
stopped at any point (``stop`` event, or Ctrl-C) and run again without harm:

- :func:`repair` takes journal entries one by one: it reads a copy from another
  site and checks it (a chunk must hash to its id, a manifest must equal the
  index's copy), writes it to the site that lacks it, flushes that site, and
  only then removes the entry.  Stopped half-way, an entry is either still in
  the journal or its copy is durable.
- :func:`verify` only reads and adds journal entries, which are idempotent.

What "good" means for an object is decided here, by :func:`checker`, for both.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import zstandard

from animfs import chunks
from animfs import keys as keys_mod
from animfs.chunks import CorruptChunk
from animfs.index import Index
from animfs.keys import KeyRing, SealError
from animfs.manifest import Manifest
from animfs.store.base import CorruptObject, ObjectNotFound, ObjectStore, StoreError
from animfs.store.dual import DualStore, Missed, NoGoodCopy

log = logging.getLogger(__name__)

THREADS = 4  # objects checked or copied at once
BATCH = 64  # journal entries copied between two flushes of a site

Step = Callable[[str], None]


class Unknown(Exception):
    """A journal entry names an object the index does not reference."""


def checker(
    index: Index, key: str, plain_size: int | None = None, keys: KeyRing | None = None
) -> Callable[[bytes], bytes]:
    """A check for the stored bytes of ``key``: returns them if good, else raises CorruptObject.

    Chunks must (open and) decompress to a plain chunk that hashes to their id
    (of ``plain_size`` bytes if known, else of the size their zstd frame claims,
    at most one chunk); manifests must (open and) be byte-identical to the
    index's copy, under the name that copy gives.  A sealed copy that does not
    open with ``keys`` is corrupt here, as any other bad copy.
    """
    kind, _, name = key.partition("/")
    if kind == "chunks":
        chunk_id = name

        def check_chunk(stored: bytes) -> bytes:
            size = plain_size
            if size is None:
                try:
                    frame = chunks.opened(chunk_id, stored, keys)
                    size = chunks.content_size(frame)
                except CorruptChunk as exc:
                    raise CorruptObject("", key, str(exc)) from exc
                except zstandard.ZstdError:
                    size = -1
                if not 0 <= size <= chunks.CHUNK_SIZE:
                    raise CorruptObject("", key, "not a zstd frame of one chunk")
            try:
                chunks.unseal(chunk_id, stored, size, keys)
            except CorruptChunk as exc:
                raise CorruptObject("", key, str(exc)) from exc
            return stored

        return check_chunk
    if kind == "manifests":
        return _manifest_checker(index, key, keys)
    if kind in ("log", "hosts"):  # a host's log (animfs.sync): a copy that opens to JSON
        return functools.partial(_check_log, key, keys)
    raise Unknown(f"{key}: not a chunk, a manifest or a log object")


def _check_log(key: str, keys: KeyRing | None, stored: bytes) -> bytes:
    try:
        json.loads(keys_mod.open_with(keys, key, stored))
    except (SealError, ValueError) as exc:
        raise CorruptObject("", key, f"not a log object: {exc}") from exc
    return stored


def _manifest_checker(index: Index, key: str, keys: KeyRing | None) -> Callable[[bytes], bytes]:
    if keys is None:  # unkeyed names are the index's own keys: check that up front
        try:
            known = index.manifest_bytes(bytes.fromhex(key.partition("/")[2]))
        except ValueError:
            known = None
        if known is None:
            raise Unknown(f"{key}: no such instance in the index")

    def check_manifest(stored: bytes) -> bytes:
        try:
            plain = keys_mod.open_with(keys, key, stored)
            manifest = Manifest.from_bytes(plain)
            expected_key = manifest.object_key_with(keys)
        except (SealError, ValueError) as exc:
            raise CorruptObject("", key, str(exc)) from exc
        expected = index.manifest_bytes(manifest.key)
        if expected is None:
            raise Unknown(f"{key}: no such instance in the index")
        if expected_key != key or plain != expected:
            raise CorruptObject("", key, "differs from the index's copy")
        if manifest.keyed and not keys_mod.is_sealed(stored):
            raise CorruptObject("", key, "a keyed manifest that is not sealed")
        return stored

    return check_manifest


# -- repair ------------------------------------------------------------------------------


@dataclass
class RepairReport:
    repaired: int = 0
    failed: int = 0  # no good copy anywhere, or the target site did not take it
    dropped: int = 0  # entries for objects the index does not reference
    unreachable: set[str] = field(default_factory=set)  # target sites that did not answer
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        text = f"{self.repaired} repaired, {self.failed} not repaired, {self.dropped} dropped"
        if self.unreachable:
            text += f"; unreachable: {', '.join(sorted(self.unreachable))}"
        return text


def repair(
    index: Index,
    store: DualStore,
    *,
    step: Step | None = None,
    stop: threading.Event | None = None,
    keys: KeyRing | None = None,
) -> RepairReport:
    """Copy every journalled object to the site that lacks it, from a verified good copy.

    A site that does not answer is skipped for the rest of this run (its
    entries stay for the next one); an object with no good copy anywhere stays
    journalled and is counted as failed.
    """
    report = RepairReport()
    entries = index.journal()
    with ThreadPoolExecutor(THREADS, thread_name_prefix="animfs-repair") as pool:
        for start in range(0, len(entries), BATCH):
            if stop is not None and stop.is_set():
                break
            batch = [e for e in entries[start : start + BATCH] if e.site not in report.unreachable]
            copies = [(e, pool.submit(_copy, index, store, e, keys)) for e in batch]
            done = _settle(index, copies, report, step)
            for site, entries_done in done.items():
                try:
                    store.site(site).flush()
                except StoreError as exc:
                    report.unreachable.add(site)
                    report.problems.append(f"{site}: flush failed: {exc.reason}")
                    report.failed += len(entries_done)
                    continue
                for entry in entries_done:
                    index.journal_remove(entry.site, entry.key)
                    report.repaired += 1
    return report


def _settle(
    index: Index,
    copies: list[tuple[Missed, Future[None]]],
    report: RepairReport,
    step: Step | None,
) -> dict[str, list[Missed]]:
    """Wait for a batch of copies; returns the entries copied, by target site."""
    done: dict[str, list[Missed]] = {}
    for entry, future in copies:
        if step is not None:
            step(entry.key)
        try:
            future.result()
        except Unknown as exc:
            log.warning("journal: %s; dropping the entry", exc)
            index.journal_remove(entry.site, entry.key)
            report.dropped += 1
        except NoGoodCopy as exc:
            report.failed += 1
            report.problems.append(f"{entry.site}: {exc}")
        except StoreError as exc:
            report.failed += 1
            report.unreachable.add(entry.site)
            report.problems.append(f"{entry.site}: {entry.key}: {exc.reason}")
        else:
            done.setdefault(entry.site, []).append(entry)
    return done


def _copy(index: Index, store: DualStore, entry: Missed, keys: KeyRing | None) -> None:
    check = checker(index, entry.key, keys=keys)
    try:
        target = store.site(entry.site)
    except KeyError:
        raise Unknown(f"site {entry.site} is not in the config") from None
    try:
        # The target may hold a good copy already (a write that was journalled
        # but arrived, or an earlier run stopped before removing the entry).
        check(target.get(entry.key))
        return
    except (ObjectNotFound, CorruptObject):
        pass
    data, _source = store.read(entry.key, check, exclude=entry.site)
    target.put(entry.key, data)


# -- verify ------------------------------------------------------------------------------


@dataclass
class SiteVerdict:
    checked: int = 0
    missing: int = 0
    corrupt: int = 0
    unreachable: str = ""

    @property
    def complete(self) -> bool:
        return not (self.missing or self.corrupt or self.unreachable)


def referenced(index: Index, keys: KeyRing | None = None) -> Iterator[tuple[str, int | None]]:
    """Every object the index references, once: (key, plain size for chunks)."""
    seen: set[bytes] = set()
    for data in index.manifests():
        manifest = Manifest.from_bytes(data)
        for ref in manifest.chunks:
            raw = bytes.fromhex(ref.id)
            if raw not in seen:
                seen.add(raw)
                yield chunks.chunk_key(ref.id), ref.size
        yield manifest.object_key_with(keys), None


def verify(
    index: Index,
    sites: list[ObjectStore],
    *,
    deep: bool = False,
    step: Step | None = None,
    problem: Callable[[Missed], None] | None = None,
    keys: KeyRing | None = None,
) -> dict[str, SiteVerdict]:
    """Check that every referenced object is at every one of ``sites`` (and intact, if ``deep``).

    Each missing or corrupt copy is journalled and passed to ``problem``.  A
    site that stops answering is reported unreachable and no longer checked.
    """
    verdicts = {site.name: SiteVerdict() for site in sites}
    with ThreadPoolExecutor(THREADS, thread_name_prefix="animfs-verify") as pool:
        window: list[tuple[str, dict[str, Future[str]]]] = []

        def drain() -> None:
            found = []
            for key, per_site in window:
                for name, future in per_site.items():
                    verdict = verdicts[name]
                    try:
                        outcome = future.result()
                    except StoreError as exc:
                        if not verdict.unreachable:
                            verdict.unreachable = exc.reason
                        continue
                    verdict.checked += 1
                    if outcome:
                        kind = outcome.split(":", 1)[0]
                        if kind == "missing":
                            verdict.missing += 1
                        else:
                            verdict.corrupt += 1
                        found.append(Missed(name, key, f"verify: {outcome}"))
                if step is not None:
                    step(key)
            window.clear()
            if found:
                index.journal_add(found)
                if problem is not None:
                    for entry in found:
                        problem(entry)

        try:
            for key, size in referenced(index, keys):
                per_site = {
                    site.name: pool.submit(_check_one, index, site, key, size, deep, keys)
                    for site in sites
                    if not verdicts[site.name].unreachable
                }
                window.append((key, per_site))
                if len(window) >= BATCH:
                    drain()
            drain()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return verdicts


def _check_one(
    index: Index, site: ObjectStore, key: str, size: int | None, deep: bool, keys: KeyRing | None
) -> str:
    """'' if the copy is good, else 'missing' or 'corrupt: why'.  Raises SiteUnavailable."""
    if not deep:
        return "" if site.exists(key) else "missing"
    try:
        checker(index, key, size, keys)(site.get(key))
    except ObjectNotFound:
        return "missing"
    except CorruptObject as exc:
        return f"corrupt: {exc.reason}"
    return ""


def pending(index: Index) -> Counter[str]:
    """Journal entries per site."""
    return Counter(entry.site for entry in index.journal())
