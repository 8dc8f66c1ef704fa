#!/usr/bin/env bash
# Two builds of the servers, side by side in one run: req/s and CPU time per request of
# each, in alternating rounds (A then B, then B then A, ...), so that the machine's drift
# falls on both alike. What a change does natively, where scripts/instructions_servers.sh
# tells what it does in instructions.
#
#   scripts/ab_builds.sh DIR_A DIR_B   # each a target/release/examples holding gateway,
#                                      # hello and keygen
#   ROUNDS=6 DURATION=5 CONNECTIONS=50 SERVERS="gateway forward stack bare" by default
#
# For example, the tree before and after a change:
#   git worktree add /tmp/before HEAD~1
#   (cd /tmp/before && CARGO_TARGET_DIR=/tmp/before-target cargo build --release \
#     --example gateway --example hello --example keygen)
#   cargo build --release --example gateway --example hello --example keygen
#   scripts/ab_builds.sh /tmp/before-target/release/examples target/release/examples
#
# The server under test is pinned to CPU 1, wrk and the nginx upstream to CPU 0, as in
# loadtest.sh; `forward` is `hello --forward`, `stack` and `bare` the axum hello-world with
# and without the crate's stack. Each line is one round of one server; the last lines are
# the medians and B/A. Loopback only; everything started is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: $0 DIR_A DIR_B" >&2; exit 2; }
A=$1 B=$2
ROUNDS=${ROUNDS:-6}
DURATION=${DURATION:-5}
CONNECTIONS=${CONNECTIONS:-50}
SERVERS=${SERVERS:-"gateway forward stack bare"}
for tool in wrk taskset python3; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done
for dir in "$A" "$B"; do
  for bin in gateway hello keygen; do
    [ -x "$dir/$bin" ] || { echo "$dir/$bin is missing" >&2; exit 1; }
  done
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

# shellcheck source=scripts/lib.sh
. scripts/lib.sh
UPSTREAM_PORT=$(free_port)
UPSTREAM_SECRET=sk-upstream-ab
start_json_upstream "$UPSTREAM_PORT" 0
KEYS_FILE="$WORK/keys.json"
KEY=$("$A/keygen" --keys-file "$KEYS_FILE" --name ab 2>/dev/null)

# One round of `server` from build `dir`: prints "variant server req/s cpu-us-per-request".
round() { # variant dir server
  local variant=$1 dir=$2 server=$3 port pid key=$KEY out before after n
  port=$(free_port)
  start_server "$server" "$dir" "$port" "$UPSTREAM_PORT" "$KEYS_FILE"
  pid=$SERVER_PID
  wait_port "$port"
  [ "$server" = stack ] && key=$(head -1 "$WORK/stack.key")
  local url="http://127.0.0.1:$port/v1/chat/completions"
  taskset -c 0 wrk -t1 -c"$CONNECTIONS" -d1s -H "Authorization: Bearer $key" "$url" >/dev/null
  before=$(cpu_total "$pid")
  out=$(taskset -c 0 wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -H "Authorization: Bearer $key" "$url")
  after=$(cpu_total "$pid")
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  if echo "$out" | grep -q "Non-2xx"; then
    echo "$server of build $variant answered other than 200" >&2
    exit 1
  fi
  n=$(echo "$out" | awk '/requests in/ {print $1}')
  echo "$variant $server $(echo "$out" | awk '/Requests\/sec/ {print $2}')" \
    "$(awk -v c=$((after - before)) -v t="$TICK_US" -v n="$n" 'BEGIN {printf "%.2f", c * t / n}')"
}

for r in $(seq 1 "$ROUNDS"); do
  for server in $SERVERS; do
    if [ $((r % 2)) = 1 ]; then
      round A "$A" "$server"
      round B "$B" "$server"
    else
      round B "$B" "$server"
      round A "$A" "$server"
    fi
  done
done | tee "$WORK/rounds"
python3 - "$WORK/rounds" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    variant, server, rps, cpu = line.split()
    runs.setdefault(server, {}).setdefault(variant, []).append((float(rps), float(cpu)))
for server, by in runs.items():
    a, b = by["A"], by["B"]
    ra, rb = (statistics.median(x[0] for x in v) for v in (a, b))
    ca, cb = (statistics.median(x[1] for x in v) for v in (a, b))
    print(f"{server}: A {ra:.0f} req/s {ca:.2f} us/req, B {rb:.0f} req/s {cb:.2f} us/req;"
          f" B/A req/s {rb / ra:.3f}, cpu {cb / ca:.3f} (medians of {len(a)} rounds)")
PY
