"""``animfs key reseal``: rewrite every object at every site under the current key.

After ``animfs key rotate`` new objects are sealed under the new key and old
ones stay readable under theirs; this pass moves the old ones over.  Each
object not yet under the current key is read, checked, sealed again under
the same name (chunk ids and manifest names depend on the id key only, so
nothing is renamed and no manifest changes) and written over the old copy,
which is then gone.  Objects written before any key existed are checked (a
chunk against its SHA-256 id, a manifest against the index's copy) and
sealed in place the same way; their names stay the unkeyed ones they had.
Unsealed state objects and snapshots of such an archive are dropped instead
(the index holds their content: state is published again, under its keyed
name, and the next snapshot is sealed).

Resumable: objects are taken in name order per site, and after every flushed
batch the index records (in ``meta``) the last name done and the key being
moved to, so a pass stopped at any point and started again goes on from
there; a copy already under the current key is never rewritten.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from animfs import keys
from animfs.index import Index
from animfs.keys import KeyRing, SealError
from animfs.recovery import SNAPSHOT_PREFIX, STATE_PREFIX
from animfs.repair import Unknown, checker
from animfs.store.base import CorruptObject, ObjectNotFound, ObjectStore, StoreError

BATCH = 64
THREADS = 4
PREFIXES = ("chunks/", "manifests/", "state/", SNAPSHOT_PREFIX)

Step = Callable[[str], None]


@dataclass
class ResealReport:
    resealed: int = 0  # rewritten under the current key
    current: int = 0  # already under it
    dropped: int = 0  # unsealed state objects and snapshots removed
    failed: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.resealed} objects resealed, {self.current} already under the current key, "
            f"{self.dropped} unsealed state/snapshot objects dropped, {len(self.failed)} failed"
        )


def _checkpoint_key(site: str) -> bytes:
    return b"reseal\0" + site.encode()


def reseal(
    index: Index,
    sites: list[ObjectStore],
    ring: KeyRing,
    *,
    step: Step | None = None,
    stop: threading.Event | None = None,
) -> ResealReport:
    report = ResealReport()
    with ThreadPoolExecutor(THREADS, thread_name_prefix="animfs-reseal") as pool:
        for site in sites:
            saved = index.meta(_checkpoint_key(site.name))
            after = ""
            if saved is not None:
                mark = json.loads(saved)
                if mark["key"] == ring.current:
                    after = mark["after"]
            names = sorted(n for prefix in PREFIXES for n in site.list(prefix) if n > after)
            for start in range(0, len(names), BATCH):
                if stop is not None and stop.is_set():
                    return report
                batch = names[start : start + BATCH]
                outcomes = pool.map(functools.partial(_one, index, site, ring), batch)
                for name, outcome in zip(batch, outcomes, strict=True):
                    if step is not None:
                        step(name)
                    if outcome == "resealed":
                        report.resealed += 1
                    elif outcome == "current":
                        report.current += 1
                    elif outcome == "dropped":
                        report.dropped += 1
                    else:
                        report.failed.append(f"{site.name}: {name}: {outcome}")
                site.flush()
                mark = {"key": ring.current, "after": batch[-1]}
                index.put_meta(_checkpoint_key(site.name), json.dumps(mark).encode())
    if report.dropped:
        index.mark_all_state()  # publish it again, sealed and under keyed names
    return report


def _one(index: Index, site: ObjectStore, ring: KeyRing, name: str) -> str:
    """'resealed', 'current', 'dropped' or what went wrong."""
    try:
        stored = site.get(name)
    except ObjectNotFound:
        return "current"  # gone meanwhile (a pruned snapshot): nothing to move
    except StoreError as exc:
        return exc.reason
    kid = keys.key_id_of(stored)
    if kid == ring.current:
        return "current"
    if kid is None and name.startswith((STATE_PREFIX, SNAPSHOT_PREFIX, "state/")):
        site.delete(name)
        return "dropped"
    try:
        if kid is None:  # written before the key: check it as a repair would
            checker(index, name, keys=ring)(stored)
            plain = stored
        else:
            plain = ring.open(name, stored)
    except (CorruptObject, SealError, Unknown) as exc:
        return f"not resealed: {exc}"
    try:
        site.put(name, ring.seal(name, plain))
    except StoreError as exc:
        return exc.reason
    return "resealed"
