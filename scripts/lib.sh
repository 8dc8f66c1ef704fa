# Shared by loadtest.sh, streamtest.sh, instructions_servers.sh and ab_builds.sh: a scratch
# dir, the processes started (stopped on exit, nginx included), free loopback ports and
# waiting for one to listen, an nginx of one worker, the provider stand-in, the gateway's
# configuration, the servers under test and their CPU time.
# Needs $NGINX set before `cleanup` runs.

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for conf in "$WORK"/nginx-*.conf; do
    [ -f "$conf" ] && "$NGINX" -p "$WORK" -c "$conf" -s stop 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # port [tenths of a second: 100 unless told; a server under valgrind needs more]
  for _ in $(seq 1 "${2:-100}"); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2
  exit 1
}

# An nginx of one worker on CPU `cpu`, serving `config-body` (inside `http { }`); its
# configuration, pid and logs are `$WORK/nginx-NAME.*`.
start_nginx() { # name config-body cpu
  local conf="$WORK/nginx-$1.conf"
  cat >"$conf" <<CONF
worker_processes 1;
error_log $WORK/nginx-$1.error.log;
pid $WORK/nginx-$1.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/$1-body;
  proxy_temp_path $WORK/$1-proxy;
  fastcgi_temp_path $WORK/$1-fastcgi;
  uwsgi_temp_path $WORK/$1-uwsgi;
  scgi_temp_path $WORK/$1-scgi;
  $2
}
CONF
  taskset -c "$3" "$NGINX" -p "$WORK" -c "$conf"
}

# The provider stand-in the load is proxied to: an nginx answering every request 200 with a
# small chat-completion body, on CPU `cpu`; returns once it listens.
start_json_upstream() { # port cpu
  start_nginx upstream "server {
    listen 127.0.0.1:$1;
    location / { default_type application/json; return 200 '{\"id\":\"chatcmpl-1\",\"choices\":[]}'; }
  }" "$2"
  wait_port "$1"
}

# The gateway's configuration for the measurements: one worker, the key file, one OpenAI
# route to the upstream, the credential from $UPSTREAM_KEY; `extra` goes before the route.
gateway_toml() { # file port keys-file upstream-port [extra]
  cat >"$1" <<TOML
listen = "127.0.0.1:$2"
keys_file = "$3"
sources = ["header:x-api-key", "bearer"]
workers = 1
${5:-}

[[route]]
prefix = "/v1"
upstream = "http://127.0.0.1:$4/v1"
provider = "openai"
credential_env = "UPSTREAM_KEY"
TOML
}

# One server under test on CPU 1, started in the background; its pid is added to PIDS and
# left in SERVER_PID. `gateway`: the measurement configuration (`$WORK/gateway.toml`, with
# `extra` as gateway_toml takes it; the upstream credential $UPSTREAM_SECRET; its output in
# `$WORK/gateway.log`); `forward`:
# `hello --forward` to the upstream; `stack`: `hello --stack`, its key in `$WORK/stack.key`;
# `bare`: `hello`.
start_server() { # name bin-dir port [upstream-port [keys-file [extra]]]
  case $1 in
    gateway)
      gateway_toml "$WORK/gateway.toml" "$3" "$5" "$4" "${6:-}"
      UPSTREAM_KEY=${UPSTREAM_SECRET:?} RUST_LOG=warn \
        taskset -c 1 "$2/gateway" --config "$WORK/gateway.toml" >"$WORK/gateway.log" 2>&1 &
      ;;
    forward)
      taskset -c 1 "$2/hello" --forward "http://127.0.0.1:$4" --listen "127.0.0.1:$3" >/dev/null 2>&1 &
      ;;
    stack) taskset -c 1 "$2/hello" --stack --listen "127.0.0.1:$3" >"$WORK/stack.key" 2>/dev/null & ;;
    bare) taskset -c 1 "$2/hello" --listen "127.0.0.1:$3" >/dev/null 2>&1 & ;;
    *) echo "unknown server $1" >&2; exit 2 ;;
  esac
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
}

# CPU time a process has used so far, in clock ticks of TICK_US microseconds: user and
# system (`cpu_ticks`), or both together (`cpu_total`).
cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
cpu_total() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))
