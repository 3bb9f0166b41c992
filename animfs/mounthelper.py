"""``mount.animfs``: the helper that mount(8) runs for ``mount -t fuse.animfs CONFIG DIR``
and for an /etc/fstab line of type ``fuse.animfs``.

For a type ``fuse.animfs`` mount(8) runs ``/sbin/mount.fuse.animfs`` (it looks for
``/sbin/mount.<type>``, and only then falls back to ``mount.fuse``, which would run
a program named after the subtype with other arguments); ``scripts/setup.sh``
links that name to this console script.  It is called as::

    mount.fuse.animfs CONFIG MOUNTPOINT [-sfnv] [-o OPTIONS] [-t TYPE]

and, like every mount helper, returns once the file system is mounted: it starts
the mount in the background exactly as ``animfs mount`` does (same checks of the
mount point, same log beside the config).  The mount is always read-only and
``allow_other``; options are accepted and otherwise ignored (mount(8) and systemd
act on ``noauto``, ``nofail``, ``_netdev``, ``x-systemd.*`` themselves).
Unmount with ``umount DIR``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from animfs import config as config_mod
from animfs import mount
from animfs.config import ConfigError

# mount(8)'s exit codes: usage error, and mount failure.
EX_USAGE = 1
EX_FAIL = 32


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mount.animfs", description="mount(8) helper: mount an animfs archive"
    )
    p.add_argument("config", help="the archive's animfs.toml (the fstab 'device' field)")
    p.add_argument("mountpoint")
    p.add_argument("-o", dest="options", default="", help="mount options (accepted, ignored)")
    p.add_argument("-t", dest="type", default="fuse.animfs", help="file system type")
    p.add_argument("-s", action="store_true", help="sloppy: ignore unknown options (always)")
    p.add_argument("-f", dest="fake", action="store_true", help="do everything but mount")
    p.add_argument("-n", action="store_true", help="do not write /etc/mtab (never written)")
    p.add_argument("-v", dest="verbose", action="store_true", help="say what is done")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:
        return EX_USAGE if exc.code else 0
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="mount.animfs: %(message)s",
        stream=sys.stderr,
    )
    mountpoint = Path(args.mountpoint).absolute()
    try:
        config = config_mod.load(args.config)
        mount.check_mountpoint(mountpoint)
        if args.fake:
            return 0
        mount.spawn(config, mountpoint)
    except (ConfigError, mount.MountError) as exc:
        print(f"mount.animfs: {exc}", file=sys.stderr)
        return EX_FAIL
    if args.verbose:
        where = f"{args.config} mounted at {mountpoint}"
        print(f"mount.animfs: {where} (log: {mount.log_path(config)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
