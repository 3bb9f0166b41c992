"""Object stores: one small interface (base.py), a local and an S3 site, and two sites as one."""

from __future__ import annotations

from animfs.config import SiteConfig
from animfs.store.base import ObjectStore


def open_site(site: SiteConfig) -> ObjectStore:
    """The store behind one configured site."""
    if site.scheme == "file":
        from animfs.store.local import LocalStore

        return LocalStore.from_url(site.name, site.url)
    from animfs.store.s3 import S3Store

    store: ObjectStore = S3Store.from_config(site)
    return store
