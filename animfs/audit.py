"""The audit log: hash-chained JSON lines, one per open decision and per access change.

Each line is one JSON object (sorted keys, UTF-8) with two chain fields:

``prev``  the SHA-256 (hex) of the previous line's bytes, without its newline;
          64 zeros on the first line.
``hash``  the SHA-256 (hex) of this line's object without ``hash`` itself,
          serialised the same way.

So an edited line fails its own ``hash``, and a deleted, inserted or moved
line breaks the ``prev`` of the line that now follows it: :func:`verify`
names the first line that is wrong.  (Cutting lines off the end leaves a
shorter, valid chain; compare the head that ``audit verify`` prints with one
kept elsewhere to detect that.)

Several processes append to one log (the mount, and the ``consent``,
``record`` and ``break-glass`` commands), so every append takes an exclusive
``flock`` on the file and reads the last line under it before writing: the
chain never forks.  An append returns only after ``fsync``.

In the mount, :class:`GroupCommit` batches the lines of concurrent opens into
one locked write and one ``fsync`` in a worker thread, so the trio loop never
blocks on the disk and a busy mount pays one ``fsync`` per batch, not per open.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger(__name__)

GENESIS = "0" * 64
_TAIL_STEP = 8192


class AuditUnavailable(Exception):
    """The audit log could not be written; nothing that needed a line may proceed."""


def now_text(now: float) -> str:
    """A time as the log writes it: ISO 8601 in UTC, to the microsecond."""
    return datetime.fromtimestamp(now, UTC).isoformat(timespec="microseconds")


def process_name(pid: int) -> str:
    """The command name of a process (``/proc/<pid>/comm``), or "" once it is gone."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().rstrip(b"\n").decode("utf-8", "replace")
    except OSError:
        return ""


def open_entry(
    *,
    now: float,
    uid: int,
    user: Any,
    pid: int,
    path: str,
    patient: str,
    study: str,
    allowed: bool,
    rule: str,
) -> dict[str, Any]:
    """The line for one open decision.  ``user`` is a config ``User`` or None (unmapped)."""
    return {
        "time": now_text(now),
        "event": "open",
        "uid": uid,
        "user": getattr(user, "name", None),
        "institution": getattr(user, "institution", None),
        "role": getattr(user, "role", None),
        "pid": pid,
        "process": process_name(pid),
        "path": path,
        "patient": patient,
        "study": study,
        "decision": "allow" if allowed else "deny",
        "rule": rule,
        "break_glass": rule == "break-glass",
    }


def _dumps(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def seal(entry: Mapping[str, Any], prev: str) -> bytes:
    """The line (without newline) that chains ``entry`` after a line whose hash is ``prev``."""
    body = {k: v for k, v in entry.items() if k not in ("prev", "hash")}
    body["prev"] = prev
    body["hash"] = hashlib.sha256(_dumps(body)).hexdigest()
    return _dumps(body)


def chain(entries: Sequence[Mapping[str, Any]], prev: str) -> bytes:
    """Lines for ``entries`` chained after ``prev``, each ending in a newline."""
    out = []
    for entry in entries:
        line = seal(entry, prev)
        prev = hashlib.sha256(line).hexdigest()
        out.append(line + b"\n")
    return b"".join(out)


def _last_line(fd: int) -> bytes | None:
    """The last line of the file open at ``fd`` (without newline), or None if it is empty."""
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    end = size
    # A file that does not end in a newline has a torn last line: it is still the
    # line the next one chains to, and verify will name it.
    tail = b""
    pos = end
    while pos > 0:
        step = min(_TAIL_STEP, pos)
        pos -= step
        tail = os.pread(fd, step, pos) + tail
        body = tail[:-1] if tail.endswith(b"\n") else tail
        cut = body.rfind(b"\n")
        if cut >= 0:
            return body[cut + 1 :]
    return tail[:-1] if tail.endswith(b"\n") else tail


class AuditFile:
    """The log file, appended to under an exclusive lock; each append is durable on return."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditUnavailable(f"{path}: cannot open the audit log: {exc.strerror}") from exc

    def close(self) -> None:
        os.close(self.fd)

    def append(self, entries: Sequence[Mapping[str, Any]]) -> None:
        """Chain ``entries`` onto the log and fsync.  Raises :class:`AuditUnavailable`."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                last = _last_line(self.fd)
                prev = GENESIS if last is None else hashlib.sha256(last).hexdigest()
                data = chain(entries, prev)
                if last is not None and not _ends_with_newline(self.fd):
                    data = b"\n" + data
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view) :]
                os.fsync(self.fd)
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError as exc:
            raise AuditUnavailable(f"{self.path}: audit write failed: {exc.strerror}") from exc


def _ends_with_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size == 0 or os.pread(fd, 1, size - 1) == b"\n"


def append(path: Path, entry: Mapping[str, Any]) -> None:
    """Append one line to the log at ``path`` (for the commands that change access)."""
    log = AuditFile(path)
    try:
        log.append([entry])
    finally:
        log.close()


@dataclass
class _Batch:
    entries: list[Mapping[str, Any]] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)
    error: AuditUnavailable | None = None


class GroupCommit:
    """The mount's writer: :meth:`record` returns once its line is durable.

    Lines arriving while a batch is being written wait for the next batch;
    one worker thread writes a batch at a time, so lines keep the order in
    which :meth:`record` was called.
    """

    def __init__(self, log: AuditFile, nursery: trio.Nursery) -> None:
        self.log = log
        self._pending = _Batch()
        self._wakeup = trio.Event()
        self.batches = 0
        self.lines = 0
        nursery.start_soon(self._writer)

    async def record(self, entry: Mapping[str, Any]) -> None:
        batch = self._pending
        batch.entries.append(entry)
        self._wakeup.set()
        await batch.done.wait()
        if batch.error is not None:
            raise batch.error

    async def _writer(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                batch, self._pending = self._pending, _Batch()
                try:
                    await trio.to_thread.run_sync(self.log.append, batch.entries)
                    self.batches += 1
                    self.lines += len(batch.entries)
                except AuditUnavailable as exc:
                    batch.error = exc
                batch.done.set()
        finally:
            log.info("audit: %d lines written in %d batches", self.lines, self.batches)


# -- reading --------------------------------------------------------------------------


def head(path: Path) -> tuple[str, int] | None:
    """(chain head, bytes) of the log: the SHA-256 of its last line, which the next line
    chains to, and its size; None when there is no log yet.  Reads only its tail."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        last = _last_line(fd)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    return (GENESIS if last is None else hashlib.sha256(last).hexdigest()), size



@dataclass(frozen=True)
class Verdict:
    lines: int  # lines checked (all of them when intact)
    head: str  # SHA-256 of the last good line
    broken_line: int | None = None  # 1-based number of the first bad line
    problem: str = ""

    @property
    def intact(self) -> bool:
        return self.broken_line is None


def verify(path: Path) -> Verdict:
    """Check the chain from the first line; stop at the first line that is wrong."""
    prev = GENESIS
    number = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = raw[:-1] if raw.endswith(b"\n") else raw
            problem = _check_line(line, prev)
            if problem:
                return Verdict(number - 1, prev, number, problem)
            prev = hashlib.sha256(line).hexdigest()
    return Verdict(number, prev)


def _check_line(line: bytes, prev: str) -> str:
    try:
        entry = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return "not a JSON line (edited or torn)"
    if not isinstance(entry, dict) or "hash" not in entry or "prev" not in entry:
        return "not an audit line (no chain fields)"
    if seal(entry, entry["prev"]) != line:
        return "the line was edited (its content does not match its hash)"
    if entry["prev"] != prev:
        return "the chain is broken here: a line before it was deleted, inserted or moved"
    return ""


def entries(path: Path) -> Iterator[dict[str, Any]]:
    """Every parseable line of the log, in order (unparseable ones are skipped)."""
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        for raw in f:
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                entry = json.loads(raw)
                if isinstance(entry, dict):
                    yield entry
