"""DualStore over in-memory sites that can be made to fail, hang or lie: no servers, no kernel."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from animfs.store.base import CorruptObject, ObjectNotFound, SiteUnavailable
from animfs.store.dual import DualStore, Missed, NoGoodCopy, NotEnoughSites


class FakeSite:
    """A site in a dict; ``mode`` is "up", "dead" (refuses) or "hung" (blocks until released)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.objects: dict[str, bytes] = {}
        self.mode = "up"
        self.release = threading.Event()
        self.gets = 0

    def _answer(self, key: str) -> None:
        if self.mode == "hung":
            self.release.wait(10)
            raise SiteUnavailable(self.name, key, "read timeout")
        if self.mode == "dead":
            raise SiteUnavailable(self.name, key, "connection refused")

    def put(self, key: str, data: bytes) -> None:
        self._answer(key)
        self.objects[key] = data

    def flush(self) -> None:
        pass

    def get(self, key: str) -> bytes:
        self.gets += 1
        self._answer(key)
        if key not in self.objects:
            raise ObjectNotFound(self.name, key, "no such object")
        return self.objects[key]

    def exists(self, key: str) -> bool:
        self._answer(key)
        return key in self.objects

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    def list(self, prefix: str) -> Iterator[str]:
        return iter([k for k in self.objects if k.startswith(prefix)])

    def usage(self) -> tuple[int, int]:
        return len(self.objects), sum(map(len, self.objects.values()))


def check(stored: bytes) -> bytes:
    if stored.startswith(b"bad"):
        raise CorruptObject("", "", "bad bytes")
    return stored


@pytest.fixture
def sites() -> Iterator[tuple[FakeSite, FakeSite]]:
    a, b = FakeSite("a"), FakeSite("b")
    yield a, b
    a.release.set()
    b.release.set()


def dual(a: FakeSite, b: FakeSite, journal: list[Missed], min_sites: int = 1) -> DualStore:
    return DualStore([b, a], preferred="a", min_sites=min_sites, on_bad_copy=journal.append,
                     hedge_seconds=0.2)


def test_read_prefers_and_fails_over(sites: tuple[FakeSite, FakeSite]) -> None:
    a, b = sites
    journal: list[Missed] = []
    store = dual(a, b, journal)
    a.objects["k"] = b.objects["k"] = b"good"
    assert store.read("k", check) == (b"good", "a")
    a.mode = "dead"
    assert store.read("k", check) == (b"good", "b")
    assert not store.state["a"].up and "refused" in store.state["a"].last_error
    assert journal == []  # an unavailable site lacks nothing: no journal entry
    gets = a.gets
    assert store.read("k", check) == (b"good", "b")
    assert a.gets == gets  # marked down: not asked again
    store.close()


def test_bad_and_missing_copies_are_journalled(sites: tuple[FakeSite, FakeSite]) -> None:
    a, b = sites
    journal: list[Missed] = []
    store = dual(a, b, journal)
    a.objects["corrupt"] = b"bad copy"
    b.objects["corrupt"] = b.objects["missing"] = b"good"
    assert store.read("corrupt", check) == (b"good", "b")
    assert store.read("missing", check) == (b"good", "b")
    assert [(m.site, m.key, m.reason.split(":")[0]) for m in journal] == [
        ("a", "corrupt", "corrupt"), ("a", "missing", "missing")]
    assert store.state["a"].up  # a site that answers is up, even with a bad copy
    with pytest.raises(NoGoodCopy):
        store.read("nowhere", check)
    store.close()


def test_hung_site_is_hedged_then_marked_down(sites: tuple[FakeSite, FakeSite]) -> None:
    a, b = sites
    store = dual(a, b, [])
    a.objects["k"] = b.objects["k"] = b"good"
    a.mode = "hung"
    assert store.read("k", check) == (b"good", "b")
    assert not store.state["a"].up
    gets = a.gets
    assert store.read("k", check) == (b"good", "b")
    assert a.gets == gets
    a.release.set()
    store.close()


def test_probe_brings_a_site_back(sites: tuple[FakeSite, FakeSite]) -> None:
    a, b = sites
    store = dual(a, b, [])
    a.objects["k"] = b.objects["k"] = b"good"
    a.mode = "dead"
    store.read("k", check)
    store.probe()
    assert not store.state["a"].up  # still dead
    a.mode = "up"
    store.probe()
    assert store.state["a"].up
    assert store.read("k", check) == (b"good", "a")
    store.close()


def test_write_with_a_site_down(sites: tuple[FakeSite, FakeSite]) -> None:
    a, b = sites
    b.mode = "dead"
    store = dual(a, b, [], min_sites=1)
    batch = store.batch()
    batch.put("chunks/1", b"one")
    batch.put("manifests/m", b"m")
    missed = batch.commit()
    assert sorted((m.site, m.key) for m in missed) == [("b", "chunks/1"), ("b", "manifests/m")]
    assert a.objects == {"chunks/1": b"one", "manifests/m": b"m"}
    assert not store.state["b"].up
    store.close()

    strict = dual(a, b, [], min_sites=2)
    batch = strict.batch()
    batch.put("chunks/2", b"two")
    with pytest.raises(NotEnoughSites, match="min_sites = 2"):
        batch.commit()
    strict.close()
