#!/usr/bin/env bash
# User-space instructions per server-sent event of the gateway and of `Forward` alone,
# counted by callgrind (repeatable where streamtest.sh's CPU times are not): each server
# runs under callgrind twice, N streams of E1 and then of E2 events each from `hello --sse`
# (one event every 200 ms), read to their ends by `sse_load`; the difference of the two
# totals, over N × (E2 − E1) events, is what one more event costs, set-up excluded.
#
#   scripts/instructions_streams.sh     # N=100 E1=10 E2=50
#
# Builds like scripts/instructions_servers.sh (`--cfg rustix_use_libc`, its own target
# directory). Loopback only; everything started is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-100}
E1=${E1:-10}
E2=${E2:-50}
export RUSTFLAGS="--cfg rustix_use_libc" CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}/instructions
for tool in valgrind callgrind_annotate; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
echo "building (release, for callgrind)..." >&2
cargo build -q --release --example gateway --example keygen --example hello --example sse_load
BIN=$CARGO_TARGET_DIR/release/examples

# shellcheck source=scripts/lib.sh
. scripts/lib.sh
KEY=$("$BIN/keygen" --keys-file "$WORK/keys.json" --name counted 2>/dev/null)

# Total instructions of one server run: `name` (gateway or forward), `events` a stream.
total() { # name events
  local up port pid sse
  up=$(free_port)
  port=$(free_port)
  taskset -c 0 "$BIN/hello" --sse --events "$2" --interval-ms 200 --listen "127.0.0.1:$up" \
    >/dev/null 2>&1 &
  sse=$!
  PIDS+=("$sse")
  wait_port "$up"
  if [ "$1" = gateway ]; then
    gateway_toml "$WORK/gateway.toml" "$port" "$WORK/keys.json" "$up" "
[server]
max_connections = 100000"
    UPSTREAM_KEY=sk-upstream-counted RUST_LOG=warn taskset -c 1 valgrind --tool=callgrind \
      --callgrind-out-file="$WORK/cg.$1.$2" "$BIN/gateway" --config "$WORK/gateway.toml" \
      >/dev/null 2>"$WORK/$1.log" &
  else
    taskset -c 1 valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.$1.$2" \
      "$BIN/hello" --forward "http://127.0.0.1:$up" --listen "127.0.0.1:$port" \
      >/dev/null 2>"$WORK/$1.log" &
  fi
  pid=$!
  PIDS+=("$pid")
  wait_port "$port" 600
  sleep 1
  local out
  out=$(taskset -c 0 "$BIN/sse_load" --url "http://127.0.0.1:$port/v1/chat/completions" \
    --key "$KEY" --streams "$N" --ramp-ms 500 --expect "$2")
  case "$out" in
    *"errors 0 "*"lost 0"*) ;;
    *) echo "$1 with $2 events a stream: $out" >&2; exit 1 ;;
  esac
  kill "$pid" "$sse"
  wait "$pid" 2>/dev/null || true
  wait "$sse" 2>/dev/null || true
  callgrind_annotate "$WORK/cg.$1.$2" 2>/dev/null |
    awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'
}

per_event() { # name
  local a b
  a=$(total "$1" "$E1")
  b=$(total "$1" "$E2")
  echo $(((b - a) / (N * (E2 - E1))))
}
gateway=$(per_event gateway)
forward=$(per_event forward)
echo "gateway: $gateway instructions per event; Forward alone: $forward ($(awk -v g="$gateway" -v f="$forward" 'BEGIN {printf "%.2f", g / f}')x)"
