"""animfs.toml: read once into frozen dataclasses and passed down explicitly.

Every command finds its config from ``--config PATH``, else ``$ANIMFS_CONFIG``,
else ``./animfs.toml``.  A missing or wrong key is a :class:`ConfigError` whose
message names the file and the key, so the CLI can print one clear line.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ROLES = ("clinician", "admin", "backup")
DEFAULT_UNPACKERS = min(4, os.cpu_count() or 1)  # processes opening chunks (animfs.unpack)


class ConfigError(Exception):
    """The config file is missing, unreadable, or has a wrong or missing key."""


@dataclass(frozen=True)
class SiteConfig:
    name: str
    url: str
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None

    @property
    def scheme(self) -> str:
        return urlparse(self.url).scheme


@dataclass(frozen=True)
class User:
    uid: int
    name: str
    institution: str
    role: str


@dataclass(frozen=True)
class Config:
    path: Path
    index_path: Path
    index_map_size: int
    cache_dir: Path
    cache_max_bytes: int
    memory_bytes: int
    min_sites: int
    preferred: str
    sites: tuple[SiteConfig, ...]
    key_file: Path | None
    audit_path: Path
    institutions: Mapping[str, str] = field(default_factory=dict)
    users: Mapping[int, User] = field(default_factory=dict)
    repair_interval: float = 300.0  # seconds between the mount's background repair passes
    series_prefetch: int = 8  # following files of a folder fetched when one is opened; 0: off
    unpackers: int = DEFAULT_UNPACKERS  # the mount's chunk-opening processes (animfs.unpack)
    snapshot_interval: float = 3600.0  # seconds between the mount's index snapshots; 0: none
    host: str = ""  # this mount host's name in the sites' logs (animfs.sync); "" = hostname
    sync_interval: float = 60.0  # seconds between the mount's syncs from other hosts; 0: none

    def site(self, name: str) -> SiteConfig:
        for site in self.sites:
            if site.name == name:
                return site
        raise ConfigError(f"{self.path}: no site named {name!r}")


def find_path(explicit: str | os.PathLike[str] | None) -> Path:
    """The config file to use: the explicit one, else $ANIMFS_CONFIG, else ./animfs.toml."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("ANIMFS_CONFIG")
    if env:
        return Path(env)
    return Path("animfs.toml")


class _Table:
    """One TOML table, read with errors that name the file and the dotted key."""

    def __init__(self, path: Path, prefix: str, data: Mapping[str, Any]) -> None:
        self.path, self.prefix, self.data = path, prefix, data

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: [{self.key(name)}] {problem}")

    def get(self, name: str, kind: type, default: Any = ...) -> Any:
        if name not in self.data:
            if default is ...:
                raise self.error(name, "is missing")
            return default
        value = self.data[name]
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            raise self.error(name, f"must be a {kind.__name__}, not {value!r}")
        return value

    def table(self, name: str, required: bool = True) -> _Table:
        value = self.get(name, dict, ... if required else {})
        return _Table(self.path, self.key(name), value)

    def path_value(self, name: str, default: Any = ...) -> Path:
        """A path; relative ones are taken relative to the config file's folder."""
        raw = self.get(name, str, default)
        if raw is None:
            return None  # type: ignore[return-value]
        return (self.path.parent / Path(raw).expanduser()).resolve()

    def positive(self, name: str, default: int) -> int:
        value: int = self.get(name, int, default)
        if value <= 0:
            raise self.error(name, f"must be positive, not {value}")
        return value


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and check the config file at ``find_path(path)``."""
    path = find_path(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such config file (give --config, set ANIMFS_CONFIG, "
            "or create one with 'animfs init DIR')"
        ) from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    path = path.resolve()
    top = _Table(path, "", raw)

    index = top.table("index")
    cache = top.table("cache")
    replication = top.table("replication", required=False)
    sites = _sites(path, top.get("sites", list))
    min_sites = replication.positive("min_sites", 1)
    if min_sites > len(sites):
        raise replication.error("min_sites", f"is {min_sites} but only {len(sites)} sites exist")
    preferred = replication.get("preferred", str, sites[0].name)
    if preferred not in {s.name for s in sites}:
        raise replication.error("preferred", f"names no site: {preferred!r}")
    security = top.table("security", required=False)
    audit = top.table("audit", required=False)
    return Config(
        path=path,
        index_path=index.path_value("path"),
        index_map_size=index.positive("map_size", 64 << 30),
        cache_dir=cache.path_value("dir"),
        cache_max_bytes=cache.positive("max_bytes", 10 << 30),
        memory_bytes=cache.positive("memory_bytes", 256 << 20),
        min_sites=min_sites,
        preferred=preferred,
        sites=sites,
        key_file=security.path_value("key_file", None),
        audit_path=audit.path_value("path", str(path.parent / "audit.jsonl")),
        institutions=_institutions(top.table("institutions", required=False)),
        users=_users(top.table("users", required=False)),
        repair_interval=float(replication.positive("repair_interval", 300)),
        series_prefetch=_non_negative(cache, "series_prefetch", 8),
        unpackers=_non_negative(cache, "unpackers", DEFAULT_UNPACKERS),
        snapshot_interval=float(_non_negative(index, "snapshot_interval", 3600)),
        host=_host(top.table("sync", required=False)),
        sync_interval=float(_non_negative(top.table("sync", required=False), "interval", 60)),
    )


def _host(table: _Table) -> str:
    """This host's name in the logs at the sites: one path component, unique per host."""
    name: str = table.get("host", str, "") or socket.gethostname()
    if not name or "/" in name or name in (".", "..") or len(name) > 64:
        raise table.error("host", f"must be a short name without '/', not {name!r}")
    return name


def _non_negative(table: _Table, name: str, default: int) -> int:
    value: int = table.get(name, int, default)
    if value < 0:
        raise table.error(name, f"must be 0 or more, not {value}")
    return value


def _sites(path: Path, raw: list[Any]) -> tuple[SiteConfig, ...]:
    sites = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: [[sites]] entry {i + 1} must be a table")
        table = _Table(path, f"sites.{i + 1}", entry)
        url = table.get("url", str)
        scheme = urlparse(url).scheme
        if scheme not in ("file", "s3"):
            raise table.error("url", f"must start with file:// or s3://, not {url!r}")
        sites.append(
            SiteConfig(
                name=table.get("name", str),
                url=url,
                endpoint_url=table.get("endpoint_url", str, None),
                region=table.get("region", str, None),
                profile=table.get("profile", str, None),
            )
        )
    if not sites:
        raise ConfigError(f"{path}: [[sites]] needs at least one site")
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: [[sites]] names must be unique: {names}")
    return tuple(sites)


def _institutions(table: _Table) -> dict[str, str]:
    return {name: table.get(name, str) for name in table.data}


def _users(table: _Table) -> dict[int, User]:
    users = {}
    for uid_text in table.data:
        if not uid_text.isdigit():
            raise table.error(uid_text, "must be a numeric Unix uid")
        user = table.table(uid_text)
        role = user.get("role", str)
        if role not in ROLES:
            raise user.error("role", f"must be one of {', '.join(ROLES)}, not {role!r}")
        uid = int(uid_text)
        users[uid] = User(
            uid=uid,
            name=user.get("name", str),
            institution=user.get("institution", str),
            role=role,
        )
    return users


TEMPLATE = """\
# animfs configuration, written by 'animfs init'.  Keys are described in README.md.

[index]
path = "{dir}/index"                  # LMDB environment folder
snapshot_interval = 3600              # seconds between the mount's index snapshots; 0: none

[cache]
dir = "{dir}/cache"
max_bytes = 10_000_000_000            # disk cache cap
memory_bytes = 268_435_456            # decompressed-chunk LRU
series_prefetch = 8                   # files fetched ahead when one of a folder is opened
# unpackers = 2                       # processes opening chunks for the mount (default: cores,
                                      # at most 4); 0: its own threads do it all

[replication]
min_sites = 1                         # sites that must hold a write before it is acknowledged
preferred = "site-a"                  # read from here first
repair_interval = 300                 # seconds between the mount's background repairs

[[sites]]
name = "site-a"
url = "file://{dir}/site-a"

[[sites]]
name = "site-b"
url = "file://{dir}/site-b"

{security}[audit]
path = "{dir}/audit.jsonl"            # hash-chained JSON lines

[institutions]                        # InstitutionName as written by modalities -> code
# "Centre Hospitalier de Luxembourg" = "CHL"

# [users.1001]                        # by Unix uid
# name = "dr.muller"
# institution = "CHL"
# role = "clinician"                  # clinician | admin | backup
"""


SECURITY = """\
[security]
key_file = "animfs.key"               # seals everything stored; keep a copy somewhere safe

"""


def write_default(directory: Path, *, key_file: bool = True) -> Path:
    """Write DIR/animfs.toml with two local sites under DIR; refuse to overwrite one.

    With ``key_file`` the config names DIR/animfs.key (which the caller creates)."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "animfs.toml"
    if path.exists():
        raise ConfigError(f"{path}: already exists; not overwriting it")
    path.write_text(TEMPLATE.format(dir=directory, security=SECURITY if key_file else ""))
    return path
