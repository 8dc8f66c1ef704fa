# Shared by loadtest.sh and streamtest.sh: a scratch dir, the processes started (stopped on
# exit, nginx included), free loopback ports and waiting for one to listen.
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
wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2
  exit 1
}
