"""An ``s3://bucket/prefix`` site: any S3-compatible store (AWS, MinIO, Ceph RGW) via boto3.

Object ``chunks/<id>`` lives at ``<prefix>/chunks/<id>`` in the bucket.  Addressing is
path-style (``endpoint/bucket/key``), which every S3-compatible server speaks.
Credentials come from the site's ``profile`` if one is configured, else from
boto3's standard chain (environment, shared files, instance role).

Time-outs are short and retries few, so that a dead or hung site costs a reader
seconds, not minutes; :class:`animfs.store.dual.DualStore` then reads from the other
site.  Every botocore failure becomes one of the store's own errors here, at this
edge, and nowhere else:

==========================================  ===================
no such key (404)                           ObjectNotFound
no such bucket, refused, time-out, 5xx,     SiteUnavailable
bad credentials, any other error
body shorter than its Content-Length        CorruptObject
==========================================  ===================

One boto3 client per store, created on first use: clients are thread-safe (a
session is not, so each store makes its own session under a lock).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, NoReturn
from urllib.parse import urlparse

import boto3
import botocore.config
import botocore.exceptions

from animfs.config import SiteConfig
from animfs.store.base import CorruptObject, ObjectInfo, ObjectNotFound, SiteUnavailable

CONNECT_TIMEOUT = 2.0  # seconds to open a connection: a dead host fails fast
READ_TIMEOUT = 10.0  # seconds without a byte: a 4 MiB chunk never takes that long
MAX_ATTEMPTS = 2  # one retry: a second site is a better retry than a third attempt
MAX_CONNECTIONS = 32  # > readers + read-ahead + writers at once

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


def _is_not_found(exc: Exception) -> bool:
    return isinstance(exc, botocore.exceptions.ClientError) and (
        str(exc.response.get("Error", {}).get("Code", "")) in _NOT_FOUND
    )


class S3Store:
    def __init__(
        self,
        name: str,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
    ) -> None:
        self.name = name
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self.region = region
        self.profile = profile
        self._client: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, site: SiteConfig) -> S3Store:
        url = urlparse(site.url)
        if url.scheme != "s3" or not url.netloc:
            raise ValueError(f"site {site.name}: not an s3://bucket/prefix URL: {site.url!r}")
        return cls(
            site.name,
            url.netloc,
            url.path,
            endpoint_url=site.endpoint_url,
            region=site.region,
            profile=site.profile,
        )

    def __repr__(self) -> str:
        where = self.endpoint_url or "aws"
        return f"S3Store({self.name!r}, s3://{self.bucket}/{self.prefix} at {where})"

    @property
    def client(self) -> Any:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client()
                client = self._client
        return client

    def _make_client(self) -> Any:
        try:
            session = boto3.session.Session(profile_name=self.profile)
            return session.client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self.region,
                config=botocore.config.Config(
                    s3={"addressing_style": "path"},
                    connect_timeout=CONNECT_TIMEOUT,
                    read_timeout=READ_TIMEOUT,
                    retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
                    max_pool_connections=MAX_CONNECTIONS,
                ),
            )
        except botocore.exceptions.BotoCoreError as exc:  # e.g. an unknown profile
            raise SiteUnavailable(self.name, "(client)", str(exc)) from exc

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _fail(self, key: str, exc: Exception) -> NoReturn:
        """Raise the store error that stands for ``exc``."""
        if isinstance(exc, botocore.exceptions.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in _NOT_FOUND:
                raise ObjectNotFound(self.name, key, "no such object") from exc
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
            message = error.get("Message") or code
            raise SiteUnavailable(self.name, key, f"{code} (HTTP {status}): {message}") from exc
        if isinstance(exc, botocore.exceptions.IncompleteReadError):
            raise CorruptObject(self.name, key, f"short read: {exc}") from exc
        raise SiteUnavailable(self.name, key, f"{type(exc).__name__}: {exc}") from exc

    # The ObjectStore protocol.  Every call catches BotoCoreError (connection,
    # time-out, credentials, streaming), ClientError (an S3 error answer) and
    # OSError (a socket error that slipped past botocore).

    def put(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as e:
            self._fail(key, e)

    def flush(self) -> None:
        """Nothing to do: S3 acknowledges a PUT only once the object is durable."""

    def get(self, key: str) -> bytes:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            data: bytes = answer["Body"].read()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as e:
            self._fail(key, e)
        expected = answer.get("ContentLength")
        if expected is not None and expected != len(data):
            raise CorruptObject(self.name, key, f"got {len(data)} of {expected} bytes")
        return data

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except botocore.exceptions.ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) not in _NOT_FOUND:
                self._fail(key, exc)
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            self._fail(key, exc)
        # A HEAD answer has no body, so a 404 may mean "no such bucket" as well:
        # a lost bucket is an unavailable site, not a site that lacks one object.
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as e:
            if _is_not_found(e):
                raise SiteUnavailable(self.name, key, f"no such bucket: {self.bucket}") from e
            self._fail(key, e)
        return False

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as e:
            self._fail(key, e)

    def _pages(self, prefix: str) -> Iterator[dict[str, Any]]:
        paginator = self.client.get_paginator("list_objects_v2")
        pages = iter(paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)))
        while True:
            try:
                page = next(pages, None)
            except (
                botocore.exceptions.BotoCoreError,
                botocore.exceptions.ClientError,
                OSError,
            ) as exc:
                self._fail(prefix, exc)
            if page is None:
                return
            yield from page.get("Contents", ())

    def list(self, prefix: str) -> Iterator[str]:
        cut = len(self.prefix)
        for entry in self._pages(prefix):
            yield entry["Key"][cut:]

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        cut = len(self.prefix)
        for entry in self._pages(prefix):
            yield ObjectInfo(
                entry["Key"][cut:], int(entry.get("Size", 0)), entry["LastModified"].timestamp()
            )

    def usage(self) -> tuple[int, int]:
        objects = size = 0
        for entry in self._pages(""):
            objects += 1
            size += int(entry.get("Size", 0))
        return objects, size
