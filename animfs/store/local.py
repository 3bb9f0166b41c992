"""A ``file://`` site: objects as files in a local folder (the embedded default).

``chunks/<id>`` and ``manifests/<id>`` fan out into two levels of folders by
the first four hex digits, so that no folder holds millions of files; other
keys map to paths as they are.  A put writes a temporary file in the target
folder and renames it over the key, so readers never see a partial object;
:meth:`LocalStore.flush` fsyncs what was written and the folders it went into.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from animfs.store.base import ObjectInfo, ObjectNotFound, SiteUnavailable

_FANNED = ("chunks/", "manifests/")
SYNCFS_ABOVE = 8  # objects to flush above which one syncfs beats an fsync each


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        fn: Callable[[int], int] = ctypes.CDLL(None, use_errno=True).syncfs
        return fn
    except (OSError, AttributeError):
        return None


_syncfs = _load_syncfs()
_TMP = ".tmp-"


class LocalStore:
    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = root
        self._lock = threading.Lock()
        self._unsynced: list[Path] = []
        self._tmp_names = TempNames(_TMP)  # several processes may write to one site

    @classmethod
    def from_url(cls, name: str, url: str) -> LocalStore:
        return cls(name, Path(unquote(urlparse(url).path)))

    def path(self, key: str) -> Path:
        for prefix in _FANNED:
            if key.startswith(prefix):
                leaf = key[len(prefix) :]
                if len(leaf) >= 4:
                    return self.root / prefix / leaf[:2] / leaf[2:4] / leaf
        if ".." in key.split("/"):
            raise ValueError(f"bad key {key!r}")
        return self.root / key

    def _unavailable(self, key: str, exc: OSError) -> SiteUnavailable:
        return SiteUnavailable(self.name, key, exc.strerror or str(exc))

    def put(self, key: str, data: bytes) -> None:
        """Write to a temporary name and rename.  With os calls on strings: a buffered
        ``open`` adds an fstat, an ioctl and an lseek to every object, each a hand-over
        of the GIL that ingest's other threads wait for."""
        path = self.path(key)
        tmp = os.path.join(path.parent, self._tmp_names.next())
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            try:
                fd = os.open(tmp, flags, 0o666)
            except FileNotFoundError:  # its folder is new (checked only then: puts are hot)
                self._make_folder(path.parent, key)
                fd = os.open(tmp, flags, 0o666)
            try:
                write_all(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise self._unavailable(key, exc) from exc
        with self._lock:
            self._unsynced.append(path)

    def _make_folder(self, folder: Path, key: str) -> None:
        if not self.root.is_dir():
            # Gone (an unmounted disk, a renamed folder): writing would make a new,
            # empty site in its place, on whatever disk holds the folder above.
            raise SiteUnavailable(self.name, key, f"site folder {self.root} is gone")
        folder.mkdir(parents=True, exist_ok=True)

    def flush(self) -> None:
        with self._lock:
            paths, self._unsynced = self._unsynced, []
        if len(paths) > SYNCFS_ABOVE and _syncfs is not None:
            # One syncfs(2) of the site's file system costs about what one fsync
            # does, and covers every file and rename so far: far cheaper for a group.
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                if _syncfs(fd) != 0:
                    err = ctypes.get_errno()
                    raise self._unavailable("(flush)", OSError(err, os.strerror(err)))
            finally:
                os.close(fd)
            return
        folders = set()
        try:
            for path in paths:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
                folders.add(path.parent)
            for folder in folders:
                fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise self._unavailable("(flush)", exc) from exc

    def get(self, key: str) -> bytes:
        # os calls on a string, not open() on a Path: a mount reads a chunk per small
        # file, and each of the seven system calls of open().read() hands over the GIL.
        try:
            fd = os.open(str(self.path(key)), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if not self.root.is_dir():
                raise SiteUnavailable(self.name, key, f"site folder {self.root} is gone") from None
            raise ObjectNotFound(self.name, key, "no such object") from None
        except OSError as exc:
            raise self._unavailable(key, exc) from exc
        try:
            return read_all(fd)
        except OSError as exc:
            raise self._unavailable(key, exc) from exc
        finally:
            os.close(fd)

    def exists(self, key: str) -> bool:
        if not self.root.is_dir():
            raise SiteUnavailable(self.name, key, f"site folder {self.root} is gone")
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        try:
            self.path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise self._unavailable(key, exc) from exc

    def list(self, prefix: str) -> Iterator[str]:
        if not self.root.is_dir():
            raise SiteUnavailable(self.name, prefix, f"site folder {self.root} is gone")
        top = prefix.split("/", 1)[0]
        base = self.root / top
        for dirpath, _dirs, files in os.walk(base):
            for file in files:
                if file.startswith(_TMP):
                    continue
                key = (
                    f"{top}/{file}"
                    if top + "/" in _FANNED
                    else _relative_key(self.root, Path(dirpath) / file)
                )
                if key.startswith(prefix):
                    yield key

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        for key in self.list(prefix):
            try:
                st = os.stat(self.path(key))
            except FileNotFoundError:
                continue  # deleted since it was listed
            except OSError as exc:
                raise self._unavailable(key, exc) from exc
            yield ObjectInfo(key, st.st_size, st.st_mtime)

    def temporaries(self) -> Iterator[ObjectInfo]:
        """Files a put was writing when its process died (``animfs gc`` removes old
        ones); ``key`` is the file's path relative to the site folder."""
        for dirpath, _dirs, files in os.walk(self.root):
            for file in files:
                if file.startswith(_TMP):
                    path = Path(dirpath) / file
                    try:
                        st = os.stat(path)
                    except OSError:
                        continue
                    yield ObjectInfo(_relative_key(self.root, path), st.st_size, st.st_mtime)

    def remove_temporary(self, relative: str) -> None:
        path = self.root / relative
        if not path.name.startswith(_TMP) or ".." in Path(relative).parts:
            raise ValueError(f"not a temporary file: {relative!r}")
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise self._unavailable(relative, exc) from exc

    def usage(self) -> tuple[int, int]:
        objects = size = 0
        try:
            for dirpath, _dirs, files in os.walk(self.root):
                for file in files:
                    if not file.startswith(_TMP):
                        objects += 1
                        size += os.stat(os.path.join(dirpath, file)).st_size
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise self._unavailable("(usage)", exc) from exc
        return objects, size


def _relative_key(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


class TempNames:
    """Names for temporary files, unique among the processes writing to one folder and
    among this one's threads, with no random bytes to fetch for each (a system call,
    and a hand-over of the GIL, on a path that writes a file per small file)."""

    def __init__(self, prefix: str) -> None:
        self._prefix = f"{prefix}{os.getpid()}-{os.urandom(4).hex()}-"
        self._numbers = itertools.count()  # next() of a count is atomic under the GIL

    def next(self) -> str:
        return f"{self._prefix}{next(self._numbers)}"


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd`` (a write may take only part)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_all(fd: int, size: int | None = None) -> bytes:
    """The whole file open at ``fd``, in one read when it has the ``size`` expected
    (default: its size now).  A regular file reads short only at its end; one
    longer than expected (damaged, or still growing) is read to its end."""
    if size is None:
        size = os.fstat(fd).st_size
    data = os.read(fd, size + 1)
    if len(data) <= size:
        return data
    parts = [data]
    while part := os.read(fd, 1 << 20):
        parts.append(part)
    return b"".join(parts)
