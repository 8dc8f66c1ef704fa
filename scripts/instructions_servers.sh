#!/usr/bin/env bash
# User-space instructions per request of the servers the load test times, counted by
# callgrind under a real load (repeatable where wrk's req/s are not): the reference gateway
# against `Forward` alone in front of the same nginx upstream (P4), and the axum hello-world
# with and without the crate's stack (P3).
#
#   scripts/instructions_servers.sh     # SECS=8 of counted load per server; KEEP=DIR keeps
#                                       # the profiles (cg.NAME) and request counts (n.NAME)
#
# Each server runs under callgrind; wrk (4 connections) warms it up for 3 s, the counters
# are zeroed, wrk runs SECS seconds, the counters are dumped, and the count is divided by
# the requests wrk completed. The kernel's share (most of a proxied request) is not counted.
# callgrind hides SHA-NI from the program, so SHA-256 runs its software path here: the key
# digest (about 3,400 instructions) costs far less natively.
# Then, for each pair, the instructions per request by crate (scripts/callgrind_crates.py):
# which dependency's code the difference runs, inlined code charged to the crate it came
# from.
# Builds like scripts/instructions.sh (`--cfg rustix_use_libc`, its own target directory),
# with line tables so that inlined code can be told apart (the counts stay within 0.2 % of
# a build without them: gateway 47,340 against 47,262, the axum stack 22,636 against 22,677).
# Everything started is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-8}
export RUSTFLAGS="--cfg rustix_use_libc" CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}/instructions
export CARGO_PROFILE_RELEASE_DEBUG=line-tables-only
for tool in valgrind callgrind_control wrk; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
echo "building (release, for callgrind)..." >&2
cargo build -q --release --example gateway --example keygen --example hello
BIN=$CARGO_TARGET_DIR/release/examples

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

UPSTREAM_PORT=$(free_port)
start_json_upstream "$UPSTREAM_PORT" 0-1
KEY=$("$BIN/keygen" --keys-file "$WORK/keys.json" --name counted 2>/dev/null)

# Runs `$@` under callgrind on `port`; prints instructions per request with `key`, and
# leaves the profile in `$WORK/cg.NAME` and the request count in `$WORK/n.NAME`.
count() { # name port key command...
  local name=$1 port=$2 key=$3 out n total pid
  shift 3
  UPSTREAM_KEY=sk-upstream-counted RUST_LOG=warn valgrind --tool=callgrind \
    --callgrind-out-file="$WORK/cg.$name" "$@" >"$WORK/$name.out" 2>"$WORK/$name.log" &
  pid=$!
  PIDS+=("$pid")
  wait_port "$port" 600
  sleep 1
  [ "$key" = stdout ] && key=$(head -1 "$WORK/$name.out")
  local url="http://127.0.0.1:$port/v1/chat/completions"
  wrk -t1 -c4 -d3s -H "Authorization: Bearer $key" "$url" >/dev/null
  callgrind_control -z "$pid" >/dev/null 2>&1
  out=$(wrk -t1 -c4 -d"${SECS}s" -H "Authorization: Bearer $key" "$url")
  callgrind_control -d "$pid" >/dev/null 2>&1
  if echo "$out" | grep -q "Non-2xx"; then
    echo "$name answered other than 200 under load" >&2
    exit 1
  fi
  n=$(echo "$out" | awk '/requests in/ {print $1}')
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  mv "$(ls -S "$WORK/cg.$name".* | head -1)" "$WORK/cg.$name"
  echo "$n" >"$WORK/n.$name"
  total=$(callgrind_annotate "$WORK/cg.$name" 2>/dev/null |
    awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  echo $((total / n))
}

GATEWAY_PORT=$(free_port)
gateway_toml "$WORK/gateway.toml" "$GATEWAY_PORT" "$WORK/keys.json" "$UPSTREAM_PORT"
gateway=$(count gateway "$GATEWAY_PORT" "$KEY" "$BIN/gateway" --config "$WORK/gateway.toml")
port=$(free_port)
forward=$(count forward "$port" "$KEY" "$BIN/hello" --forward "http://127.0.0.1:$UPSTREAM_PORT" --listen "127.0.0.1:$port")
port=$(free_port)
stack=$(count stack "$port" stdout "$BIN/hello" --stack --listen "127.0.0.1:$port")
port=$(free_port)
bare=$(count bare "$port" none "$BIN/hello" --listen "127.0.0.1:$port")
echo "gateway: $gateway instructions per request; Forward alone: $forward ($(awk -v g="$gateway" -v f="$forward" 'BEGIN {printf "%.2f", g / f}')x)"
echo "axum hello with the stack: $stack; bare: $bare ($(awk -v s="$stack" -v b="$bare" 'BEGIN {printf "%.2f", s / b}')x)"
by_crate() { # a b
  scripts/callgrind_crates.py "$1" "$WORK/cg.$1" "$(cat "$WORK/n.$1")" "$2" "$WORK/cg.$2" "$(cat "$WORK/n.$2")"
}
if [ -n "${KEEP:-}" ]; then
  mkdir -p "$KEEP"
  cp "$WORK"/cg.{gateway,forward,stack,bare} "$WORK"/n.{gateway,forward,stack,bare} "$KEEP"
fi
echo
by_crate gateway forward
echo
by_crate stack bare
