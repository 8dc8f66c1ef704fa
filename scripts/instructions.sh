#!/usr/bin/env bash
# Instructions per request of each stack, counted by callgrind (repeatable on a busy machine,
# unlike times): `scripts/instructions.sh` (N=20000 requests by default).
#
# rustix reads the vDSO itself, which valgrind does not survive; `rustix_use_libc` makes it go
# through libc. That changes the build, so it gets a target directory of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-20000}
export RUSTFLAGS="--cfg rustix_use_libc" CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}/instructions
bin=$(cargo bench --bench instructions --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "instructions" and m.get("executable"):
        print(m["executable"])')
count() { valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" "$1" "$N" 2>&1 | awk '/Collected/ {gsub(",", "", $NF); print $NF}'; }
bare=$(count bare)
for mode in floor inbound full route; do
  total=$(count "$mode")
  over=$(( (total - bare) / N ))
  echo "$mode: $over instructions per request (over bare, $N requests)"
  case $mode in floor) floor=$over ;; inbound) inbound=$over ;; esac
done
# P1's terms in instructions: repeatable, but blind to cache misses and to SHA-NI (valgrind
# runs SHA-256 in software, which weighs on both sides).
python3 -c "print(f'inbound/floor instructions: {$inbound / $floor:.2f}')"
