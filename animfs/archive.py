"""The index and the two sites of one config, opened together and closed together.

Every command that touches stored data, and the mount, works on this pair: a
copy found missing or damaged while reading is logged once and journalled in
the index for ``animfs repair``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from animfs.config import Config
from animfs.index import Index
from animfs.store import open_site
from animfs.store.dual import DualStore, Missed

log = logging.getLogger(__name__)


@contextlib.contextmanager
def opened(config: Config) -> Iterator[tuple[Index, DualStore]]:
    """``(index, store)`` for ``config``; both closed on leaving, also on error."""
    index = Index(config.index_path, map_size=config.index_map_size)
    try:

        def journal(entry: Missed) -> None:
            log.warning(
                "site %s: %s %s; journalled for repair", entry.site, entry.key, entry.reason
            )
            index.journal_add([entry])

        store = DualStore(
            [open_site(s) for s in config.sites],
            preferred=config.preferred,
            min_sites=config.min_sites,
            on_bad_copy=journal,
        )
        try:
            yield index, store
        finally:
            store.close()
    finally:
        index.close()
