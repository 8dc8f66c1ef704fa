#!/usr/bin/env bash
# The criterion targets of the performance issue, over several runs of
# `cargo bench --bench overhead`, each ratio taken within one run:
#
#   P1  (inbound_1m - bare) / floor                               target <= 1.2
#   P2  (full_stack - inbound_1m) / (tower_http_same_job - bare)  target <= 1.0
#
# and, for the record, the older figures: (full_stack - bare) / floor and
# (gateway_route - bare) / floor (full_stack inside the RejectionLayer every gateway route has).
#
#   scripts/bench_ratios.sh        # RUNS=5 by default; FILTER narrows the functions run
#
# The floor is random access into a 1,000,000-entry table, so it moves with the memory
# latency a shared machine happens to give (seen here: 150 to 490 ns between runs), and with
# it the P1 ratio. One run proves little; this prints every run and the medians. Each figure
# is criterion's median estimate for that function in that run.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-5}
TARGET=${CARGO_TARGET_DIR:-target}
# Only the functions the ratios use (the jwt and metrics cases are for `cargo bench`).
FILTER=${FILTER:-'^inbound/(bare|floor|inbound_1m|full_stack|tower_http_same_job|gateway_route)$'}
RESULTS=$(mktemp)
trap 'rm -f "$RESULTS"' EXIT

cargo bench -q --bench overhead --no-run >/dev/null 2>&1
for run in $(seq 1 "$RUNS"); do
  echo "run $run of $RUNS..." >&2
  cargo bench -q --bench overhead -- "$FILTER" >/dev/null 2>&1
  echo "$run $(scripts/criterion_medians.py "$TARGET/criterion" inbound \
    bare floor inbound_1m full_stack tower_http_same_job gateway_route)" >>"$RESULTS"
done

python3 - "$RESULTS" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
print(f"{'run':>3} {'bare':>6} {'floor':>6} {'inbound_1m':>10} {'full_stack':>10} {'tower_http':>10} {'route':>6} | {'P1':>5} {'P2':>5} {'full/fl':>7} {'route/fl':>8}")
p1, p2, full, route = [], [], [], []
for run, *figures in rows:
    bare, floor, one_m, stack, peer, gateway = map(float, figures)
    p1.append((one_m - bare) / floor)
    p2.append((stack - one_m) / (peer - bare))
    full.append((stack - bare) / floor)
    route.append((gateway - bare) / floor)
    print(f"{run:>3} {bare:6.1f} {floor:6.1f} {one_m:10.1f} {stack:10.1f} {peer:10.1f} {gateway:6.1f} | {p1[-1]:5.2f} {p2[-1]:5.2f} {full[-1]:7.2f} {route[-1]:8.2f}")
def line(name, xs, target):
    print(f"{name}: median {statistics.median(xs):.2f} over {len(xs)} runs "
          f"(range {min(xs):.2f}-{max(xs):.2f}){target}")
line("P1 (inbound_1m - bare)/floor", p1, "; target <= 1.2")
line("P2 (full_stack - inbound_1m)/(tower_http_same_job - bare)", p2, "; target <= 1.0")
line("(full_stack - bare)/floor", full, "")
line("(gateway_route - bare)/floor", route, "")
PY
