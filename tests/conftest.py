"""Shared fixtures: a fresh archive per test, real mounts through the kernel, and test data.

Every mount is a real ``animfs mount --foreground`` child process; the fixture
waits (bounded) for the kernel to show it, and always unmounts and reaps the
process in teardown, also when the test failed, so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

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


@contextlib.contextmanager
def tmpfs(size: str, prefix: str) -> Iterator[Path]:
    """A tmpfs of ``size`` of its own, unmounted (lazily, if a test left it busy) after."""
    top = Path(tempfile.mkdtemp(prefix=prefix))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(top)],
                   check=True, timeout=30)
    try:
        yield top
    finally:
        subprocess.run(["umount", "-l", str(top)], check=False, timeout=30)
        top.rmdir()


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

    def status(self) -> dict[str, Any]:
        return dict(json.loads((self.path / ".animfs" / "status").read_text()))

    def wait_for_unpackers(self) -> None:
        """Until the mount's unpacker processes are ready (they start with it, niced): from
        then on they open the chunks, the fetch threads only what they cannot."""
        wait_for(lambda: self.status()["cache"]["memory"]["unpackers"], 30, "unpackers ready")

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

    def set_config(self, table: str, key: str, value: str) -> None:
        """Set ``key = value`` in ``[table]`` of the config (replaced or added)."""
        text = self.config.read_text()
        head = f"[{table}]\n"
        start = text.index(head) + len(head)
        end = text.find("\n[", start)
        body = text[start:end]
        line = f"{key} = {value}\n"
        body, n = re.subn(rf"(?m)^{key} = .*\n", line, body)
        self.config.write_text(text[:start] + (body if n else line + body) + text[end:])

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


# -- S3 sites: two moto servers as separate processes on 127.0.0.1 ----------------------------

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
S3_START_TIMEOUT = 20.0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """One ``moto_server`` process on a fixed port; it can die and come back (empty)."""

    def __init__(self, name: str, logdir: Path) -> None:
        self.name, self.port = name, free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = logdir / f"moto-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    def start(self) -> None:
        import urllib.request

        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                 "-p", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited:\n{self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):
                    return True
            except OSError:
                return False

        wait_for(ready, S3_START_TIMEOUT, f"moto_server on port {self.port}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """Die at once, as a data centre does (SIGKILL); everything it held is lost."""
        self.resume()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        """Hang: the port still accepts connections, nothing answers (SIGSTOP)."""
        assert self.proc is not None
        self.proc.send_signal(19)  # SIGSTOP
        self.paused = True

    def resume(self) -> None:
        if self.paused and self.proc is not None:
            self.proc.send_signal(18)  # SIGCONT
            self.paused = False

    def client(self) -> object:
        import boto3
        import botocore.config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
            config=botocore.config.Config(s3={"addressing_style": "path"},
                                          retries={"max_attempts": 1}),
        )

    def bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh, uniquely named one unless ``name``) and return its name."""
        import uuid

        name = name or f"animfs-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)  # type: ignore[attr-defined]
        return name


@pytest.fixture(scope="session")
def moto_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[MotoServer]]:
    """Two moto S3 servers (site-a, site-b), started once; always stopped at the end."""
    logdir = tmp_path_factory.mktemp("moto")
    saved = {key: os.environ.get(key) for key in S3_ENV}
    os.environ.update(S3_ENV)  # archive.run and mounts inherit these credentials
    servers = [MotoServer("a", logdir), MotoServer("b", logdir)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.kill()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3(moto_servers: list[MotoServer]) -> Iterator[list[MotoServer]]:
    """Both moto servers running and answering, also if the previous test stopped one."""
    for server in moto_servers:
        server.resume()
        if not server.running:
            server.start()
    yield moto_servers
    for server in moto_servers:
        server.resume()  # never leave a server hung for the next test
