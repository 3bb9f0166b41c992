"""The ObjectStore contract (animfs/store/base.py), one suite run against every kind of site.

``local``: a LocalStore under tmp_path.  ``s3``: an S3Store on a moto server
(a separate process on 127.0.0.1).  ``s3-env``: an S3Store on the endpoint in
``$ANIMFS_TEST_S3_ENDPOINT`` (bucket ``$ANIMFS_TEST_S3_BUCKET``, default
``animfs-test``, created if missing; credentials from the standard chain), only
when that is set.  Every S3 test works under a fresh prefix, removed afterwards.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from animfs.config import SiteConfig
from animfs.store import open_site
from animfs.store.base import ObjectNotFound, ObjectStore, SiteUnavailable
from animfs.store.local import LocalStore
from animfs.store.s3 import S3Store

from conftest import MotoServer, free_port

KINDS = ["local", "s3"] + (["s3-env"] if os.environ.get("ANIMFS_TEST_S3_ENDPOINT") else [])


def _s3_env_site() -> SiteConfig:
    import boto3
    import botocore.exceptions

    endpoint = os.environ["ANIMFS_TEST_S3_ENDPOINT"]
    bucket = os.environ.get("ANIMFS_TEST_S3_BUCKET", "animfs-test")
    region = os.environ.get("ANIMFS_TEST_S3_REGION", "us-east-1")
    client = boto3.client("s3", endpoint_url=endpoint, region_name=region)
    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError:
        client.create_bucket(Bucket=bucket)
    return SiteConfig("env", f"s3://{bucket}/contract-{uuid.uuid4().hex[:12]}", endpoint, region)


@pytest.fixture(params=KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "local":
        site = SiteConfig("local", f"file://{tmp_path / 'site'}")
        (tmp_path / "site").mkdir()
    elif request.param == "s3":
        server: MotoServer = request.getfixturevalue("s3")[0]
        site = SiteConfig("moto", f"s3://{server.bucket()}/some/prefix", server.endpoint,
                          "us-east-1")
    else:
        site = _s3_env_site()
    s = open_site(site)
    yield s
    if request.param != "local":
        for key in list(s.list("")):
            s.delete(key)


def test_open_site_picks_the_kind(store: ObjectStore) -> None:
    assert isinstance(store, LocalStore if store.name == "local" else S3Store)


def test_put_get_round_trip(store: ObjectStore) -> None:
    data = os.urandom(100_000)
    store.put("chunks/" + "ab" * 32, data)
    store.flush()
    assert store.get("chunks/" + "ab" * 32) == data
    assert store.exists("chunks/" + "ab" * 32)


def test_empty_object(store: ObjectStore) -> None:
    store.put("manifests/" + "00" * 32, b"")
    assert store.get("manifests/" + "00" * 32) == b""
    assert store.exists("manifests/" + "00" * 32)


def test_large_object_is_byte_identical(store: ObjectStore) -> None:
    data = os.urandom(9 << 20)  # more than one S3 multipart threshold and two chunks
    store.put("chunks/big", data)
    assert hashlib.sha256(store.get("chunks/big")).hexdigest() == hashlib.sha256(data).hexdigest()


def test_missing_object(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound) as info:
        store.get("chunks/" + "cd" * 32)
    assert info.value.site == store.name
    assert info.value.key == "chunks/" + "cd" * 32
    assert not store.exists("chunks/" + "cd" * 32)


def test_put_again_replaces(store: ObjectStore) -> None:
    store.put("manifests/" + "12" * 32, b"bad copy")
    store.put("manifests/" + "12" * 32, b"repaired copy")
    assert store.get("manifests/" + "12" * 32) == b"repaired copy"


def test_delete(store: ObjectStore) -> None:
    store.put("chunks/" + "ef" * 32, b"x")
    store.delete("chunks/" + "ef" * 32)
    assert not store.exists("chunks/" + "ef" * 32)
    with pytest.raises(ObjectNotFound):
        store.get("chunks/" + "ef" * 32)
    store.delete("chunks/" + "ef" * 32)  # a missing object is not an error


def test_list_and_usage(store: ObjectStore) -> None:
    chunk_keys = {f"chunks/{i:02x}" + "0" * 62 for i in range(7)}
    manifest_keys = {f"manifests/{i:02x}" + "1" * 62 for i in range(3)}
    for n, key in enumerate(sorted(chunk_keys | manifest_keys)):
        store.put(key, b"y" * (n + 1))
    store.flush()
    assert set(store.list("chunks/")) == chunk_keys
    assert set(store.list("manifests/")) == manifest_keys
    assert set(store.list("chunks/03")) == {"chunks/03" + "0" * 62}
    assert list(store.list("nothing/")) == []
    assert store.usage() == (10, sum(range(1, 11)))


def test_list_info_gives_size_and_time_of_write(store: ObjectStore) -> None:
    import time

    before = time.time()
    keys = {f"chunks/{i:02x}" + "2" * 62: b"w" * (i + 3) for i in range(4)}
    for key, data in keys.items():
        store.put(key, data)
    store.put("manifests/" + "3" * 64, b"m")
    infos = {info.key: info for info in store.list_info("chunks/")}
    assert set(infos) == set(keys)
    for key, info in infos.items():
        assert info.size == len(keys[key])
        assert before - 2 <= info.mtime <= time.time() + 2  # S3 times are whole seconds


def test_other_keys_round_trip(store: ObjectStore) -> None:
    store.put("probe/sub/key", b"z")
    assert store.get("probe/sub/key") == b"z"
    assert "probe/sub/key" in set(store.list("probe/"))


def test_threads_put_and_get_at_once(store: ObjectStore) -> None:
    blobs = {f"chunks/{i:064x}": os.urandom(20_000 + i) for i in range(64)}
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: store.put(*kv), blobs.items()))
        store.flush()
        got = dict(zip(blobs, pool.map(store.get, blobs), strict=True))
    assert got == blobs


# -- a site that is gone: every call says SiteUnavailable, never hangs or says "not found" ----


@pytest.fixture(params=["local", "s3-dead-port", "s3-no-bucket"])
def dead_store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        root = tmp_path / "gone"
        root.mkdir()
        store: ObjectStore = LocalStore("gone", root)
        store.put("chunks/" + "aa" * 32, b"x")
        shutil.rmtree(root)
        return store
    if request.param == "s3-dead-port":
        endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        return S3Store.from_config(SiteConfig("gone", "s3://b/p", endpoint, "us-east-1"))
    server: MotoServer = request.getfixturevalue("s3")[0]
    return S3Store.from_config(
        SiteConfig("gone", "s3://no-such-bucket/p", server.endpoint, "us-east-1"))


def test_dead_site_is_unavailable(dead_store: ObjectStore) -> None:
    key = "chunks/" + "aa" * 32
    with pytest.raises(SiteUnavailable) as info:
        dead_store.get(key)
    assert info.value.site == "gone"
    with pytest.raises(SiteUnavailable):
        dead_store.exists(key)
    with pytest.raises(SiteUnavailable):
        list(dead_store.list("chunks/"))
    if not isinstance(dead_store, LocalStore):  # a local put recreates its folder
        with pytest.raises(SiteUnavailable):
            dead_store.put(key, b"x")
        with pytest.raises(SiteUnavailable):
            dead_store.usage()


def test_s3_errors_are_chained(s3: list[MotoServer]) -> None:
    store = S3Store.from_config(
        SiteConfig("moto", f"s3://{s3[0].bucket()}", s3[0].endpoint, "us-east-1"))
    with pytest.raises(ObjectNotFound) as info:
        store.get("chunks/none")
    import botocore.exceptions

    assert isinstance(info.value.__cause__, botocore.exceptions.ClientError)


def test_s3_prefix_keeps_sites_apart(s3: list[MotoServer]) -> None:
    bucket = s3[0].bucket()
    one = S3Store.from_config(SiteConfig("one", f"s3://{bucket}/one", s3[0].endpoint))
    two = S3Store.from_config(SiteConfig("two", f"s3://{bucket}/two/", s3[0].endpoint))
    one.put("chunks/k", b"1")
    assert not two.exists("chunks/k")
    assert list(two.list("")) == []
    assert list(one.list("")) == ["chunks/k"]
    keys = [o["Key"] for o in s3[0].client().list_objects_v2(Bucket=bucket)["Contents"]]  # type: ignore[attr-defined]
    assert keys == ["one/chunks/k"]


def test_s3_bad_url_is_refused() -> None:
    with pytest.raises(ValueError):
        S3Store.from_config(SiteConfig("x", "s3:///no-bucket"))
