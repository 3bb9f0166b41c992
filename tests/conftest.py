"""Shared fixtures: a fresh archive per test, real mounts through the kernel, and test data.

Every mount is a real ``animfs mount --foreground`` child process; the fixture
waits (bounded) for the kernel to show it, and always unmounts and reaps the
process in teardown, also when the test failed, so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gen_dicom  # noqa: E402

MOUNT_TIMEOUT = 30.0


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


class Mount:
    """A running ``animfs mount --foreground`` and its mount point."""

    def __init__(self, archive: Archive, path: Path, env: dict[str, str] | None = None) -> None:
        self.archive, self.path = archive, path
        self.log = archive.dir / f"mount-{path.name}.log"
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [*archive.command(), "mount", "--foreground", str(path)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            env={**os.environ, **(env or {})},
        )

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mount exited with {self.proc.returncode}:\n{self.log_text()}")
            return os.path.ismount(path)

        try:
            wait_for(ready, MOUNT_TIMEOUT, f"mount at {path}")
        except BaseException:
            self.stop()
            raise

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """Unmount and reap the process; returns its exit status (-9 if it had to be killed)."""
        if os.path.ismount(self.path):
            subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True, timeout=30)
            if os.path.ismount(self.path):
                subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True,
                               timeout=30)
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            rc = -9
        self._log.close()
        return rc

    def __truediv__(self, other: str) -> Path:
        return self.path / other


class Archive:
    """A fresh archive made by ``animfs init`` in a folder that other uids may traverse."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.config = directory / "animfs.toml"
        self.mounts: list[Mount] = []
        run = self.run("init", str(directory), config=False)
        assert self.config.exists(), run.stderr

    def command(self, config: bool = True) -> list[str]:
        base = [sys.executable, "-m", "animfs"]
        return [*base, "--config", str(self.config)] if config else base

    def run(self, *args: str, check: bool = True, config: bool = True, uid: int | None = None,
            input: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        cmd = self.command(config) + list(args)
        if uid is not None:
            cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                input=input)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def ingest(self, *paths: Path | str, check: bool = True,
               extra: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
        return self.run("ingest", *extra, *[str(p) for p in paths], check=check)

    def append_config(self, text: str) -> None:
        with open(self.config, "a") as f:
            f.write("\n" + text + "\n")

    @contextlib.contextmanager
    def mounted(self, env: dict[str, str] | None = None) -> Iterator[Mount]:
        """Mount, yield, then unmount and check that the mount process exited cleanly."""
        path = Path(tempfile.mkdtemp(prefix="mnt-", dir=self.dir))
        path.chmod(0o755)
        mount = Mount(self, path, env)
        self.mounts.append(mount)
        try:
            yield mount
        finally:
            rc = mount.stop()
            self.mounts.remove(mount)
        assert rc == 0, f"mount process exited with {rc}:\n{mount.log_text()}"

    def close(self) -> None:
        for mount in list(self.mounts):
            mount.stop()


@pytest.fixture
def archive() -> Iterator[Archive]:
    # Not under tmp_path: pytest's folders are 0700, and access tests switch uid.
    directory = Path(tempfile.mkdtemp(prefix="animfs-test-"))
    directory.chmod(0o755)
    a = Archive(directory)
    try:
        yield a
    finally:
        a.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def series_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few small generated series (CT and MR, two patients), shared by the session."""
    root = tmp_path_factory.mktemp("series")
    gen_dicom.write_series(root / "ct", patient_id="P001", patient_name="Doe^Jane",
                           n_slices=12, rows=64, cols=64, series_number=1, modality="CT",
                           study_description="CT Thorax", series_description="Axial 1mm",
                           institution_name="Hospital A", seed=1)
    gen_dicom.write_series(root / "mr", patient_id="P002", patient_name="Roe^Richard",
                           n_slices=6, rows=128, cols=128, series_number=3, modality="MR",
                           study_description="MR Knee", series_description="T1 sag",
                           institution_name="Hospital B", seed=2)
    return root


def sha256_file(path: Path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
