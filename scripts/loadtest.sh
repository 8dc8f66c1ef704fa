#!/usr/bin/env bash
# Load test on loopback: the reference gateway against nginx doing the same job (and against
# the gateway's proxy alone, with no authentication: what forwarding itself costs), and an
# axum hello-world with and without the crate's whole layer stack.
#
#   scripts/loadtest.sh     # ROUNDS=3 DURATION=6 CONNECTIONS=50 THREADS=1 RATE_SECS=4 by default
#
# Saturated throughput is measured with wrk (closed loop). Latency is measured with oha at a
# constant rate (open loop, `--latency-correction`, so a stall counts against every request it
# delays): half of nginx's saturated rate, against the upstream directly, the gateway, nginx
# and `Forward` alone in alternating rounds; "added latency" is each proxy's median p50 and
# p99 minus the direct upstream's, and the line printed is the gateway's added latency over
# nginx's (<= 1.00: the gateway adds no more); `Forward`'s tells the layers' share from
# hyper's. oha and the upstream share CPU 0, so the script prints how busy CPU 0 was in each
# round and warns when it was saturated (then the figures hold the load side's own queue) or
# when nginx added nothing (then the ratio means nothing).
#
# Every server under test gets one worker pinned to CPU 1 (the gateway `workers = 1`, nginx
# `worker_processes 1`, the hello example a current-thread runtime); wrk and the upstream
# share CPU 0, so the servers compete with nothing but themselves. Shared machines drift by
# several per cent from one run to the next, so the targets compared with each other are
# measured in alternating rounds and each figure is the median over the rounds. Figures
# are req/s, p99 latency and the server's CPU time per request (user and system, from
# /proc: where the time goes); the last two lines are the ratios the README reports.
# Everything started is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-6}
CONNECTIONS=${CONNECTIONS:-50}
THREADS=${THREADS:-1}
KEYS=${KEYS:-100}
RATE_SECS=${RATE_SECS:-4}
TARGET=${CARGO_TARGET_DIR:-target}

install() {
  local missing=()
  command -v wrk >/dev/null || missing+=(wrk)
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  command -v oha >/dev/null || { echo "installing oha" >&2; cargo install -q --locked oha; }
}
install
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

echo "building (release)..." >&2
cargo build -q --release --example gateway --example keygen --example hello
BIN=$TARGET/release/examples

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

UPSTREAM_PORT=$(free_port)
GATEWAY_PORT=$(free_port)
NGINX_PORT=$(free_port)
BARE_PORT=$(free_port)
STACK_PORT=$(free_port)
FORWARD_PORT=$(free_port)
UPSTREAM_SECRET=sk-upstream-load-test


# The upstream: a provider stand-in answering a small JSON body, on CPU 0.
start_json_upstream "$UPSTREAM_PORT" 0
# nginx's worker, the process that serves (the master only forks it).
nginx_worker() { pgrep -P "$(cat "$WORK/nginx-$1.pid")" | head -1; }
UPSTREAM_PID=$(nginx_worker upstream)

# Keys: issued with keygen into a key file the gateway reads; nginx gets the same keys.
KEYS_FILE="$WORK/keys.json"
KEY=""
MAP=""
for i in $(seq 1 "$KEYS"); do
  k=$("$BIN/keygen" --keys-file "$KEYS_FILE" --name "load-$i" 2>/dev/null)
  [ -z "$KEY" ] && KEY=$k
  MAP="$MAP    \"Bearer $k\" 1;
"
done

start_server gateway "$BIN" "$GATEWAY_PORT" "$UPSTREAM_PORT" "$KEYS_FILE"
GATEWAY_PID=$SERVER_PID

# nginx as the gateway: the same key check (a map of valid keys, 401 otherwise), the same
# credential rewrite, a request id, and keepalive to the upstream.
start_nginx gateway "map \$http_authorization \$key_ok {
    default 0;
$MAP  }
  upstream provider { server 127.0.0.1:$UPSTREAM_PORT; keepalive 64; }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location /v1/ {
      if (\$key_ok = 0) { return 401 '{\"error\":{\"message\":\"Invalid API key.\"}}'; }
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_set_header Authorization \"Bearer $UPSTREAM_SECRET\";
      proxy_set_header X-Api-Key \"\";
      proxy_set_header Api-Key \"\";
      proxy_set_header X-Goog-Api-Key \"\";
      proxy_set_header X-Request-Id \$request_id;
      add_header X-Request-Id \$request_id;
      proxy_pass http://provider;
    }
  }" 1

start_server forward "$BIN" "$FORWARD_PORT" "$UPSTREAM_PORT"
FORWARD_PID=$SERVER_PID
start_server bare "$BIN" "$BARE_PORT"
BARE_PID=$SERVER_PID
start_server stack "$BIN" "$STACK_PORT"
STACK_PID=$SERVER_PID
for port in "$GATEWAY_PORT" "$NGINX_PORT" "$BARE_PORT" "$STACK_PORT" "$FORWARD_PORT"; do wait_port "$port"; done
STACK_KEY=$(head -1 "$WORK/stack.key")
NGINX_PID=$(nginx_worker gateway)

# Sanity: every target answers 200 with the key and 401 without, so wrk measures real work.
check() { # url key
  local ok bad
  ok=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $2" "$1")
  bad=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer not-a-key" "$1")
  if [ "$ok" != 200 ] || { [ "$2" != none ] && [ "$bad" != 401 ]; }; then
    echo "sanity check failed for $1: $ok with the key, $bad without" >&2
    cat "$WORK/gateway.log" >&2
    exit 1
  fi
}
check "http://127.0.0.1:$GATEWAY_PORT/v1/chat/completions" "$KEY"
check "http://127.0.0.1:$NGINX_PORT/v1/chat/completions" "$KEY"
check "http://127.0.0.1:$STACK_PORT/v1/chat/completions" "$STACK_KEY"
check "http://127.0.0.1:$BARE_PORT/v1/chat/completions" none
check "http://127.0.0.1:$FORWARD_PORT/v1/chat/completions" none

# One wrk run: prints "rps p99_ms user_us sys_us", the last two per request, of the server.
wrk_once() { # url key server-pid
  local out u0 s0 u1 s1
  read -r u0 s0 < <(cpu_ticks "$3")
  out=$(taskset -c 0 wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -H "Authorization: Bearer $2" "$1")
  read -r u1 s1 < <(cpu_ticks "$3")
  if echo "$out" | grep -q "Non-2xx"; then
    echo "non-2xx answers under load from $1:" >&2
    echo "$out" >&2
    exit 1
  fi
  echo "$out" | awk -v du=$((u1 - u0)) -v ds=$((s1 - s0)) -v tick="$TICK_US" \
    '/requests in/ {n=$1}
    /^Requests\/sec:/ {rps=$2}
    $1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; p99=v}
    END {print rps, p99, du * tick / n, ds * tick / n}'
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# Measures targets in alternating rounds (each round runs every target once); reports each
# and prints "rps p99 cpu_us" medians for all, in order.
compare() { # (name url key pid)...
  local n=$(($# / 4)) args=("$@") i round r p u s
  local -a rps p99 user sys
  for ((i = 0; i < n; i++)); do
    taskset -c 0 wrk -t"$THREADS" -c"$CONNECTIONS" -d1s -H "Authorization: Bearer ${args[4 * i + 2]}" "${args[4 * i + 1]}" >/dev/null 2>&1
  done
  for round in $(seq 1 "$ROUNDS"); do
    for ((i = 0; i < n; i++)); do
      read -r r p u s < <(wrk_once "${args[4 * i + 1]}" "${args[4 * i + 2]}" "${args[4 * i + 3]}")
      rps[i]="${rps[i]:-} $r"; p99[i]="${p99[i]:-} $p"; user[i]="${user[i]:-} $u"; sys[i]="${sys[i]:-} $s"
    done
  done
  local out=()
  for ((i = 0; i < n; i++)); do
    local m=()
    for list in "${rps[i]}" "${p99[i]}" "${user[i]}" "${sys[i]}"; do
      m+=("$(printf '%s\n' $list | median)")
    done
    report "${args[4 * i]}" "${m[0]}" "${m[1]}" "${m[2]}" "${m[3]}" "${rps[i]# }"
    out+=("${m[0]}" "${m[1]}" "$(awk -v u="${m[2]}" -v s="${m[3]}" 'BEGIN {print u + s}')")
  done
  echo "${out[*]}"
}

report() { # name rps p99 user_us sys_us rounds
  printf '%-22s %8.0f req/s  p99 %5.2f ms  cpu/req %5.2f us (user %4.2f, sys %5.2f)  rounds: %s\n' \
    "$1" "$2" "$3" "$(awk -v u="$4" -v s="$5" 'BEGIN {print u + s}')" "$4" "$5" "$6" >&2
}

# PERF=FILE: a perf profile (cpu-clock, call graphs) of the gateway under load to FILE, first;
# PERF_STACK=FILE the same of the axum hello-world with the stack.
profile() { # file url key pid
  taskset -c 0 wrk -t"$THREADS" -c"$CONNECTIONS" -d8s -H "Authorization: Bearer $3" "$2" >/dev/null &
  local load=$!
  sleep 1
  perf record -q -e cpu-clock -F 4999 -g -p "$4" -o "$1" -- sleep 5 >/dev/null 2>&1
  wait "$load"
}
[ -n "${PERF:-}" ] && profile "$PERF" "http://127.0.0.1:$GATEWAY_PORT/v1/chat/completions" "$KEY" "$GATEWAY_PID"
[ -n "${PERF_STACK:-}" ] && profile "$PERF_STACK" "http://127.0.0.1:$STACK_PORT/v1/chat/completions" "$STACK_KEY" "$STACK_PID"
echo "wrk: $THREADS thread(s), $CONNECTIONS connections, $ROUNDS rounds of ${DURATION}s, on loopback" >&2
read -r up_rps up_p99 up_user up_sys < <(wrk_once "http://127.0.0.1:$UPSTREAM_PORT/v1/chat/completions" "$KEY" "$UPSTREAM_PID")
report "upstream (direct)" "$up_rps" "$up_p99" "$up_user" "$up_sys" "-"
read -r gw_rps gw_p99 _ ng_rps ng_p99 _ fw_rps _ _ < <(compare \
  "gateway" "http://127.0.0.1:$GATEWAY_PORT/v1/chat/completions" "$KEY" "$GATEWAY_PID" \
  "nginx (same job)" "http://127.0.0.1:$NGINX_PORT/v1/chat/completions" "$KEY" "$NGINX_PID" \
  "Forward alone, no auth" "http://127.0.0.1:$FORWARD_PORT/v1/chat/completions" "$KEY" "$FORWARD_PID")
read -r stack_rps stack_p99 stack_cpu bare_rps bare_p99 bare_cpu < <(compare \
  "axum hello (stack)" "http://127.0.0.1:$STACK_PORT/v1/chat/completions" "$STACK_KEY" "$STACK_PID" \
  "axum hello (bare)" "http://127.0.0.1:$BARE_PORT/v1/chat/completions" none "$BARE_PID")

# Latency at a fixed offered load: half of nginx's saturated rate, open loop, in ROUNDS
# alternating rounds (the direct upstream, the gateway, nginx, `Forward` alone), medians over
# the rounds.
RATE=$(awk -v n="$ng_rps" 'BEGIN {printf "%d", n / 2}')
# CPU 0's idle and total time so far, in ticks: oha and the upstream run there, and a busy
# CPU 0 means the figures hold the load side's own queue, not only the server's.
cpu0_ticks() { awk '$1 == "cpu0" {t = 0; for (i = 2; i <= NF; i++) t += $i; print $5 + $6, t}' /proc/stat; }
# One oha run at $RATE: prints "p50_ms p99_ms cpu0_busy_percent".
oha_once() { # url key
  local i0 t0 i1 t1 lat
  read -r i0 t0 < <(cpu0_ticks)
  lat=$(taskset -c 0 oha --no-tui --output-format json --latency-correction -q "$RATE" -z "${RATE_SECS}s" \
    -c "$CONNECTIONS" -H "Authorization: Bearer $2" "$1" | python3 -c '
import json, sys
r = json.load(sys.stdin)
codes = r.get("statusCodeDistribution", {})
if set(codes) - {"200"}:
    sys.exit(f"non-200 answers at a fixed rate: {codes}")
p = r["latencyPercentiles"]
print(p["p50"] * 1000, p["p99"] * 1000)')
  read -r i1 t1 < <(cpu0_ticks)
  echo "$lat $(awk -v i="$((i1 - i0))" -v t="$((t1 - t0))" 'BEGIN {printf "%.0f", 100 * (1 - i / t)}')"
}
echo "oha: constant $RATE req/s (half of nginx's saturated rate), $ROUNDS rounds of ${RATE_SECS}s each, $CONNECTIONS connections" >&2
declare -A LAT
for _ in $(seq 1 "$ROUNDS"); do
  for target in upstream:$UPSTREAM_PORT gateway:$GATEWAY_PORT nginx:$NGINX_PORT forward:$FORWARD_PORT; do
    name=${target%%:*} busy=""
    read -r p50 p99 busy < <(oha_once "http://127.0.0.1:${target#*:}/v1/chat/completions" "$KEY") || true
    [ -n "${busy:-}" ] || { echo "the fixed-rate run against $name failed" >&2; exit 1; }
    LAT[$name.p50]+="$p50 " LAT[$name.p99]+="$p99 " LAT[$name.busy]+="$busy "
  done
done
med() { printf '%s\n' ${LAT[$1]} | median; }
up50=$(med upstream.p50) up99=$(med upstream.p99) gw50=$(med gateway.p50) gw99=$(med gateway.p99)
ng50=$(med nginx.p50) ng99=$(med nginx.p99) fw50=$(med forward.p50) fw99=$(med forward.p99)
awk -v u50="$up50" -v u99="$up99" -v g50="$gw50" -v g99="$gw99" -v n50="$ng50" -v n99="$ng99" \
  -v f50="$fw50" -v f99="$fw99" 'BEGIN {
  printf "at a fixed rate, p50 / p99 ms: upstream direct %.3f / %.3f, gateway %.3f / %.3f (adds %.3f / %.3f), nginx %.3f / %.3f (adds %.3f / %.3f), Forward alone %.3f / %.3f (adds %.3f / %.3f)\n",
    u50, u99, g50, g99, g50 - u50, g99 - u99, n50, n99, n50 - u50, n99 - u99, f50, f99, f50 - u50, f99 - u99 }' >&2
echo "CPU 0 (oha and the upstream) busy, per round: direct ${LAT[upstream.busy]}%, gateway ${LAT[gateway.busy]}%, nginx ${LAT[nginx.busy]}%, Forward ${LAT[forward.busy]}%" >&2
for name in upstream gateway nginx forward; do
  if awk -v b="$(med "$name.busy")" 'BEGIN {exit !(b >= 90)}'; then
    echo "warning: CPU 0 was saturated in the $name rounds; their latencies include the load side's own queue" >&2
  fi
done
if awk -v a="$ng50" -v b="$up50" -v c="$ng99" -v d="$up99" 'BEGIN {exit !(a - b <= 0 || c - d <= 0)}'; then
  echo "warning: nginx added no latency over the upstream at p50 or p99; a ratio against it is not meaningful" >&2
fi

awk -v gp="$gw_p99" -v np="$ng_p99" \
  'BEGIN { printf "saturated: gateway p99 %.2f ms, nginx p99 %.2f ms\n", gp, np }'
awk -v s="$stack_p99" -v b="$bare_p99" 'BEGIN { printf "saturated: axum stack p99 %.2f ms, bare p99 %.2f ms\n", s, b }'
awk -v g="$gw_rps" -v f="$fw_rps" 'BEGIN { printf "gateway/forward req/s ratio: %.2f\n", g / f }'
awk -v g="$gw_rps" -v n="$ng_rps" 'BEGIN { printf "gateway/nginx req/s ratio: %.2f\n", g / n }'
awk -v u50="$up50" -v u99="$up99" -v g50="$gw50" -v g99="$gw99" -v n50="$ng50" -v n99="$ng99" \
  'BEGIN { printf "added latency gateway/nginx p50: %.2f p99: %.2f\n", (g50 - u50) / (n50 - u50), (g99 - u99) / (n99 - u99) }'
awk -v s="$stack_cpu" -v b="$bare_cpu" 'BEGIN { printf "axum stack/bare cpu ratio: %.2f\n", s / b }'
awk -v s="$stack_rps" -v b="$bare_rps" 'BEGIN { printf "axum stack/bare req/s ratio: %.2f\n", s / b }'
