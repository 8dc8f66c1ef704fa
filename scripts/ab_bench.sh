#!/usr/bin/env bash
# Two builds of the overhead bench in alternating rounds: P1's terms (bare, floor, inbound_1m)
# per round and the medians of each build, so that a change to the key check is judged
# against the one before it on the same machine in the same minutes (one run of either
# moves by 20 % and more here).
#
#   cargo bench --bench overhead --no-run      # once per version; copy each executable:
#   cp target/release/deps/overhead-<hash> /tmp/overhead-a   (likewise /tmp/overhead-b)
#   scripts/ab_bench.sh /tmp/overhead-a /tmp/overhead-b      # ROUNDS=5 by default
#
# ENV_A and ENV_B, if set, are extra `NAME=value` words for each build's runs: one executable
# with a switch read from the environment measures a part by leaving it out.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 OVERHEAD_BENCH_A OVERHEAD_BENCH_B" >&2; exit 2; }
A=$(realpath "$1") B=$(realpath "$2")
ROUNDS=${ROUNDS:-5}
FILTER='^inbound/(bare|floor|inbound_1m)$'
RESULTS=$(mktemp)
SCRATCH=$(mktemp -d)
trap 'rm -rf "$RESULTS" "$SCRATCH"' EXIT

# criterion's own report of one function: "name  time: [low estimate high]".
figures() { # label output
  python3 - "$1" "$2" <<'PY'
import re, sys
label, out = sys.argv[1], sys.argv[2]
unit = {"ps": 1e-3, "ns": 1.0, "µs": 1e3, "us": 1e3, "ms": 1e6}
vals, current = {}, None
for line in out.splitlines():
    m = re.match(r"^inbound/(\w+)", line.strip())
    if m:
        current = m.group(1)
    m = re.search(r"time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", line)
    if m and current:
        vals[current] = float(m.group(1)) * unit[m.group(2)]
print(label, vals["bare"], vals["floor"], vals["inbound_1m"])
PY
}

for round in $(seq 1 "$ROUNDS"); do
  echo "round $round of $ROUNDS..." >&2
  for side in A B; do
    bin=$A extra=${ENV_A:-}
    [ "$side" = B ] && bin=$B extra=${ENV_B:-}
    # criterion writes its reports under ./target: keep them out of the work tree.
    out=$(cd "$SCRATCH" && env $extra "$bin" --bench "$FILTER" 2>/dev/null)
    figures "$side" "$out" >>"$RESULTS"
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
