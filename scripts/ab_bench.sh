#!/usr/bin/env bash
# Two builds of the overhead bench in alternating rounds: P1's terms (bare, floor, inbound_1m)
# per round (criterion's median estimate, as bench_ratios.sh reports them) and the medians of
# each build, so that a change to the key check is judged against the one before it on the
# same machine in the same minutes (one run of either moves by 20 % and more here).
#
#   cargo bench --bench overhead --no-run      # once per version; copy each executable:
#   cp target/release/deps/overhead-<hash> /tmp/overhead-a   (likewise /tmp/overhead-b)
#   scripts/ab_bench.sh /tmp/overhead-a /tmp/overhead-b      # ROUNDS=5 by default
#
# ENV_A and ENV_B, if set, are extra `NAME=value` words for each build's runs: one executable
# with a switch read from the environment measures a part by leaving it out.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 OVERHEAD_BENCH_A OVERHEAD_BENCH_B" >&2; exit 2; }
A=$(realpath "$1") B=$(realpath "$2") HERE=$(dirname "$(realpath "$0")")
ROUNDS=${ROUNDS:-5}
FILTER='^inbound/(bare|floor|inbound_1m)$'
RESULTS=$(mktemp)
SCRATCH=$(mktemp -d)
trap 'rm -rf "$RESULTS" "$SCRATCH"' EXIT

for round in $(seq 1 "$ROUNDS"); do
  echo "round $round of $ROUNDS..." >&2
  for side in A B; do
    bin=$A extra=${ENV_A:-}
    [ "$side" = B ] && bin=$B extra=${ENV_B:-}
    # Each run's reports go to the scratch dir, read at once (the next run replaces them).
    CRITERION_HOME="$SCRATCH" env $extra "$bin" --bench "$FILTER" >/dev/null 2>&1
    echo "$side $("$HERE/criterion_medians.py" "$SCRATCH" inbound bare floor inbound_1m)" >>"$RESULTS"
  done
done

python3 - "$RESULTS" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
print(f"{'':4} {'bare':>6} {'floor':>6} {'inbound_1m':>10} {'P1':>5}")
p1, one_m = {"A": [], "B": []}, {"A": [], "B": []}
for side, bare, floor, inbound in rows:
    bare, floor, inbound = float(bare), float(floor), float(inbound)
    p1[side].append((inbound - bare) / floor)
    one_m[side].append(inbound)
    print(f"{side:4} {bare:6.1f} {floor:6.1f} {inbound:10.1f} {p1[side][-1]:5.2f}")
for side in "AB":
    print(f"{side}: P1 median {statistics.median(p1[side]):.2f} "
          f"(range {min(p1[side]):.2f}-{max(p1[side]):.2f}), "
          f"inbound_1m median {statistics.median(one_m[side]):.1f} ns")
print(f"B/A inbound_1m medians: {statistics.median(one_m['B']) / statistics.median(one_m['A']):.3f}")
PY
