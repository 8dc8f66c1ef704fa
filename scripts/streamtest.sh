#!/usr/bin/env bash
# Streaming at scale, on loopback: N concurrent server-sent-event streams through the
# reference gateway and through nginx doing the same job (the same key check and credential
# swap, `proxy_buffering off`), from a Rust SSE upstream (`hello --sse`: one event every
# 200 ms per stream for 20 s), read to their ends by `sse_load`.
#
#   scripts/streamtest.sh        # STREAMS="1000 5000" EVENTS=100 INTERVAL_MS=200 by default
#                                # SERVERS="gateway nginx forward": which to measure; the
#                                # ratios need the gateway and nginx
#
# Each server under test has one worker pinned to CPU 1 (the gateway `workers = 1`, nginx
# `worker_processes 1`); the upstream and the client share CPU 0. For each server and
# stream count: errors (streams that failed to open, answered other than 200 or broke off),
# lost events (expected but never read), the server's RSS per open stream (sampled once all
# are open, minus its RSS before) and its CPU time per event delivered (user and system,
# from /proc, over the whole run). `Forward` alone (`hello --forward`: hyper's server and
# client and the crate's proxy, no authentication) runs too, to tell what the layers cost
# from what hyper does per connection. The last line is the issue's, for the largest count.
# Everything started is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

STREAMS=${STREAMS:-"1000 5000"}
EVENTS=${EVENTS:-100}
INTERVAL_MS=${INTERVAL_MS:-200}
KEYS=${KEYS:-100}
TARGET=${CARGO_TARGET_DIR:-target}

command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] ||
  { apt-get update -qq && apt-get install -y -qq nginx >/dev/null; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
# Two descriptors a stream in each proxy, one in the client and the upstream.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

echo "building (release)..." >&2
cargo build -q --release --example gateway --example keygen --example hello --example sse_load
BIN=$TARGET/release/examples

# shellcheck source=scripts/lib.sh
. scripts/lib.sh
UPSTREAM_PORT=$(free_port)
GATEWAY_PORT=$(free_port)
NGINX_PORT=$(free_port)
FORWARD_PORT=$(free_port)
UPSTREAM_SECRET=sk-upstream-stream-test
SERVERS=${SERVERS:-"gateway nginx forward"}

taskset -c 0 "$BIN/hello" --sse --events "$EVENTS" --interval-ms "$INTERVAL_MS" \
  --listen "127.0.0.1:$UPSTREAM_PORT" >/dev/null 2>&1 &
PIDS+=($!)

KEYS_FILE="$WORK/keys.json"
KEY=""
MAP=""
for i in $(seq 1 "$KEYS"); do
  k=$("$BIN/keygen" --keys-file "$KEYS_FILE" --name "stream-$i" 2>/dev/null)
  [ -z "$KEY" ] && KEY=$k
  MAP="$MAP    \"Bearer $k\" 1;
"
done

start_server gateway "$BIN" "$GATEWAY_PORT" "$UPSTREAM_PORT" "$KEYS_FILE" "
[server]
max_connections = 100000"
GATEWAY_PID=$SERVER_PID

cat >"$WORK/nginx-gateway.conf" <<CONF
worker_processes 1;
worker_rlimit_nofile 20000;
error_log $WORK/nginx.error.log;
pid $WORK/nginx.pid;
events { worker_connections 30000; }
http {
  access_log off;
  client_body_temp_path $WORK/body;
  proxy_temp_path $WORK/proxy;
  fastcgi_temp_path $WORK/fastcgi;
  uwsgi_temp_path $WORK/uwsgi;
  scgi_temp_path $WORK/scgi;
  map \$http_authorization \$key_ok {
    default 0;
$MAP  }
  upstream provider { server 127.0.0.1:$UPSTREAM_PORT; keepalive 64; }
  server {
    listen 127.0.0.1:$NGINX_PORT backlog=8192;
    location /v1/ {
      if (\$key_ok = 0) { return 401 '{"error":{"message":"Invalid API key."}}'; }
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer $UPSTREAM_SECRET";
      proxy_set_header X-Api-Key "";
      proxy_set_header Api-Key "";
      proxy_set_header X-Goog-Api-Key "";
      proxy_set_header X-Request-Id \$request_id;
      add_header X-Request-Id \$request_id;
      proxy_buffering off;
      proxy_read_timeout 300s;
      proxy_pass http://provider;
    }
  }
}
CONF
taskset -c 1 "$NGINX" -p "$WORK" -c "$WORK/nginx-gateway.conf"
start_server forward "$BIN" "$FORWARD_PORT" "$UPSTREAM_PORT"
FORWARD_PID=$SERVER_PID
for port in "$UPSTREAM_PORT" "$GATEWAY_PORT" "$NGINX_PORT" "$FORWARD_PORT"; do wait_port "$port"; done
NGINX_PID=$(pgrep -P "$(cat "$WORK/nginx.pid")" | head -1)

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# One run: prints "errors lost rss_per_stream_bytes cpu_us_per_event".
run() { # url pid streams
  local ramp=$(($3 / 2)) rss0 cpu0 rss1 cpu1 out
  [ "$ramp" -lt 500 ] && ramp=500
  rss0=$(rss_kb "$2")
  cpu0=$(cpu_total "$2")
  taskset -c 0 "$BIN/sse_load" --url "$1" --key "$KEY" --streams "$3" --ramp-ms "$ramp" \
    --expect "$EVENTS" >"$WORK/load.out" 2>"$WORK/load.err" &
  local load=$!
  # Sampled halfway through a stream's life once the last has opened.
  sleep "$(awk -v r="$ramp" -v e="$EVENTS" -v i="$INTERVAL_MS" 'BEGIN {print (r + e * i / 2) / 1000}')"
  rss1=$(rss_kb "$2")
  wait "$load"
  cpu1=$(cpu_total "$2")
  out=$(cat "$WORK/load.out")
  [ -s "$WORK/load.err" ] && head -5 "$WORK/load.err" >&2
  echo "$out" | awk -v n="$3" -v r0="$rss0" -v r1="$rss1" -v dc=$((cpu1 - cpu0)) -v tick="$TICK_US" \
    '{for (i = 1; i < NF; i += 2) v[$i] = $(i + 1)}
     END {print v["errors"], v["lost"], (r1 - r0) * 1024 / n, (v["events"] > 0 ? dc * tick / v["events"] : 0)}'
}

printf '%-9s %7s %7s %7s %12s %14s\n' server streams errors lost "rss/stream" "cpu/event" >&2
declare -A R
for n in $STREAMS; do
  for server in $SERVERS; do
    case $server in
      gateway) url="http://127.0.0.1:$GATEWAY_PORT/v1/stream" pid=$GATEWAY_PID ;;
      nginx) url="http://127.0.0.1:$NGINX_PORT/v1/stream" pid=$NGINX_PID ;;
      forward) url="http://127.0.0.1:$FORWARD_PORT/v1/stream" pid=$FORWARD_PID ;;
    esac
    read -r errors lost rss cpu < <(run "$url" "$pid" "$n")
    R[$server,$n]="$errors $lost $rss $cpu"
    printf '%-9s %7d %7d %7d %10.0f B %11.2f us\n' "$server" "$n" "$errors" "$lost" "$rss" "$cpu" >&2
    sleep 2 # let the closed connections go
  done
done

set -- $STREAMS
first=$1
last=${!#}
# The comparisons need both the gateway and nginx (SERVERS may name fewer).
measured() { case " $SERVERS " in *" $1 "*) return 0 ;; esac; return 1; }
measured gateway && measured nginx || exit 0
if [ -n "${R[forward,$last]:-}" ]; then
  read -r _ _ f_rss f_cpu <<<"${R[forward,$last]}"
  read -r _ _ g_rss g_cpu <<<"${R[gateway,$last]}"
  # What the layers cost per stream over hyper and the proxy alone.
  awk -v l="$last" -v gr="$g_rss" -v fr="$f_rss" -v gc="$g_cpu" -v fc="$f_cpu" \
    'BEGIN { printf "at %d: rss/stream gateway/forward %.2f, cpu/event gateway/forward %.2f\n", l, (fr > 0 ? gr / fr : 0), (fc > 0 ? gc / fc : 0) }'
fi
read -r _ _ g_rss1 g_cpu1 <<<"${R[gateway,$first]}"
read -r _ _ n_rss1 n_cpu1 <<<"${R[nginx,$first]}"
read -r g_err g_lost g_rss g_cpu <<<"${R[gateway,$last]}"
read -r n_err n_lost n_rss n_cpu <<<"${R[nginx,$last]}"
if [ "$first" != "$last" ]; then
  awk -v f="$first" -v l="$last" -v g1="$g_rss1" -v g2="$g_rss" -v n1="$n_rss1" -v n2="$n_rss" \
    -v gc1="$g_cpu1" -v gc2="$g_cpu" -v nc1="$n_cpu1" -v nc2="$n_cpu" 'BEGIN {
      printf "from %d to %d streams: rss/stream gateway %.0f -> %.0f B, nginx %.0f -> %.0f B; cpu/event gateway %.2f -> %.2f us, nginx %.2f -> %.2f us\n", f, l, g1, g2, n1, n2, gc1, gc2, nc1, nc2 }'
fi
echo "nginx at $last: errors $n_err lost $n_lost"
# errors and lost are the gateway's (nginx's are on the line above).
awk -v n="$last" -v e="$g_err" -v lost="$g_lost" -v gr="$g_rss" -v nr="$n_rss" -v gc="$g_cpu" -v nc="$n_cpu" \
  'BEGIN { printf "streams: %d errors: %d lost: %d rss/stream gateway/nginx: %.2f cpu/event gateway/nginx: %.2f\n", n, e, lost, (nr > 0 ? gr / nr : 0), (nc > 0 ? gc / nc : 0) }'
