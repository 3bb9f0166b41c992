#!/usr/bin/env bash
# Set up animfs on a fresh Debian machine: the apt packages it and its tests
# need (only when missing), a virtualenv in .venv, and the package with its
# test extra. Safe to run again; prints what it does.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv attr dcmtk dicom3tools rsync util-linux
              libgdcm-tools dcm2niix)
missing=()
for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    sudo_cmd=(); [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $("$python" --version)"
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# mount(8) runs /sbin/mount.<type> for `mount -t fuse.animfs` and fstab lines.
helper=/sbin/mount.fuse.animfs
if [ "$(readlink "$helper" 2>/dev/null)" != "$PWD/.venv/bin/mount.animfs" ]; then
    echo "setup: linking $helper -> $PWD/.venv/bin/mount.animfs"
    sudo_cmd=(); [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" ln -sfn "$PWD/.venv/bin/mount.animfs" "$helper"
fi
echo "setup: ready (.venv/bin/animfs)"
