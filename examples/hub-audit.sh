#!/usr/bin/env bash
# A hub's audit pass, for cron (e.g. `*/5 * * * * hub-audit.sh /srv/uploads /srv/mask-audit.safetensors`):
# uploads land in INCOMING/; each pass moves what has arrived into a batch folder of its own (a
# rename: an upload still being written must be written elsewhere and renamed into INCOMING/),
# audits the batch with the mask alone, and files each upload by its verdict under
# ROOT/{compliant,violations,uncertified,unreadable}/. The report of every batch stays in ROOT/reports/.
#   hub-audit.sh ROOT MASK [freezeasguard command]
set -euo pipefail
root=$1 mask=$2 fag=${3:-freezeasguard}
incoming=$root/incoming
mkdir -p "$incoming" "$root/reports" "$root"/{compliant,violations,uncertified,unreadable}
exec 9>"$root/.audit.lock"
flock -n 9 || exit 0                                   # one pass at a time
shopt -s nullglob
arrived=("$incoming"/*)
[ ${#arrived[@]} -gt 0 ] || exit 0
batch=$root/batches/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$batch"
mv "${arrived[@]}" "$batch"/
set +e
"$fag" verify --mask "$mask" --candidates "$batch" --report "$root/reports/$(basename "$batch").json"
code=$?
set -e
# 0 all compliant, 1 some violate, 2 some unreadable or uncertified: every upload is filed either way
[ $code -le 2 ] || exit $code
python3 - "$root/reports/$(basename "$batch").json" "$batch" "$root" <<'PY'
import json, shutil, sys
from pathlib import Path
report, batch, root = json.load(open(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3])
for row in report["uploads"]:
    shutil.move(str(batch / row["file"]), str(root / row["verdict"] / row["file"]))
    print(f"{row['verdict']:<12} {row['file']}  {row['first_violation'] or row['message']}")
PY
rmdir "$batch" 2>/dev/null || true
