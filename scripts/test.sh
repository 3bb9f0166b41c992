#!/usr/bin/env bash
# Set up on a fresh Debian machine and run every check: ruff, mypy --strict, and
# the pytest suite (which mounts through the kernel and starts its own S3 servers
# on 127.0.0.1). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check animfs tests scripts
.venv/bin/mypy animfs
exec .venv/bin/pytest -p no:cacheprovider "$@"
