#!/usr/bin/env bash
# The main job: set up, build a demo archive (generated CT/MR series plus
# pydicom's bundled test files), mount it read-only and show the tree.
# Safe to run again: it unmounts a previous demo mount and re-ingests (a no-op).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

demo=${ANIMFS_DEMO_DIR:-$PWD/demo}
animfs=("$PWD/.venv/bin/animfs" --config "$demo/animfs.toml")
py=.venv/bin/python

if mountpoint -q "$demo/mnt" 2>/dev/null; then "${animfs[@]}" umount "$demo/mnt"; fi
[ -f "$demo/animfs.toml" ] || .venv/bin/animfs init "$demo"
if [ ! -d "$demo/input" ]; then
    echo "demo: generating DICOM series into $demo/input"
    "$py" scripts/gen_dicom.py "$demo/input/generated" --total-mb 200 --large-mb 64 --patients 6
    "$py" - "$demo/input/pydicom" <<'PY'
import shutil, sys
from pathlib import Path
sys.path.insert(0, "scripts")
import gen_dicom
dest = Path(sys.argv[1])
dest.mkdir(parents=True, exist_ok=True)
for i, path in enumerate(gen_dicom.pydicom_test_files(unique_sop=True)):
    shutil.copyfile(path, dest / f"{i:04d}_{path.name}")
PY
fi
echo "demo: ingesting"
"${animfs[@]}" ingest "$demo/input" || true   # refusals are reported line by line
mkdir -p "$demo/mnt"
"${animfs[@]}" mount "$demo/mnt"
echo
echo "demo: the archive as files:"
ls "$demo/mnt"
# head closes the pipe early: that is not a failure here.
(set +o pipefail; find "$demo/mnt/patients" -maxdepth 3 | sed "s|$demo/mnt/||" | head -30)
echo "..."
echo "$(find "$demo/mnt/patients" -type f | wc -l) files, $(du -sh "$demo/mnt/patients" | cut -f1) under $demo/mnt/patients"
echo
echo "Try: ls -l $demo/mnt/studies | head;  dcmdump \"\$(find $demo/mnt/patients -name '*.dcm' | head -1)\" | head"
echo "Unmount with: .venv/bin/animfs --config $demo/animfs.toml umount $demo/mnt"
