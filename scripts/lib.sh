# Shared by loadtest.sh, streamtest.sh and instructions_servers.sh: a scratch dir, the
# processes started (stopped on exit, nginx included), free loopback ports and waiting for
# one to listen, an nginx of one worker, and the gateway's configuration.
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
