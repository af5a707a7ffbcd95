#!/usr/bin/env bash
# Agent footprint benchmark (make agent-bench): stripped release binary size, and the agent's
# RSS and CPU over a fixed window, idle and with 10 running pods, against the local stack's
# real Podman. Prints figures next to the targets; it does not fail on a miss.
set -euo pipefail
cd "$(dirname "$0")/../.."

WINDOW=${AGENT_BENCH_WINDOW:-60}  # one full default resync period
PODS=${AGENT_BENCH_PODS:-10}
: "${FLEETLET_PODMAN_SOCKET:?source target/dev/env (make env-up) first}"
IMAGE=${FLEETLET_TEST_IMAGE:-localhost/fleetlet-test/busybox:1}

cargo build --release -p fleetlet-agent >/dev/null
BIN=target/release/fleetlet-agent
DEVICE=bench-footprint-$$
WORK=$(mktemp -d)
AGENT_PID=

cleanup() {
  [ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null || true
  for p in $(curl -s --unix-socket "$FLEETLET_PODMAN_SOCKET" \
      "http://d/v4.0.0/libpod/pods/json?filters=%7B%22label%22%3A%5B%22io.fleetlet.device%3D$DEVICE%22%5D%7D" |
      python3 -c 'import json,sys; [print(p["Name"]) for p in json.load(sys.stdin) or []]'); do
    # Podman 4.3 may refuse while a container is between "stopped" and "exited": retry.
    for _ in 1 2 3 4 5 6 7 8; do
      code=$(curl -s -o /dev/null -w '%{http_code}' --unix-socket "$FLEETLET_PODMAN_SOCKET" \
        -X DELETE "http://d/v4.0.0/libpod/pods/$p?force=true")
      [ "$code" = 200 ] || [ "$code" = 404 ] && break
      sleep 0.5
    done
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

desired() { # $1 = number of pods
  python3 - "$1" "$IMAGE" > "$WORK/desired.json" <<'PY'
import json, sys
n, image = int(sys.argv[1]), sys.argv[2]
pods = [{"pod": {"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"bench-{i}", "namespace": "bench", "uid": f"bench-uid-{i}"},
        "spec": {"hostNetwork": True, "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "c", "image": image,
                                 "command": ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 5; done"],
                                 "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 10}}]}}}
        for i in range(n)]
print(json.dumps({"generation": n + 1, "pods": pods}))
PY
}

start_agent() {
  printf 'device_name = "%s"\nstate_dir = "%s"\npodman_socket = "%s"\n' \
    "$DEVICE" "$WORK/state" "$FLEETLET_PODMAN_SOCKET" > "$WORK/agent.toml"
  FLEETLET_AGENT_LOG=stderr RUST_LOG=warn "$BIN" run --config "$WORK/agent.toml" \
    --desired-file "$WORK/desired.json" 2>>"$WORK/agent.log" &
  AGENT_PID=$!
}

stop_agent() { kill "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true; AGENT_PID=; }

ticks() { awk '{print $14 + $15}' "/proc/$AGENT_PID/stat"; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$AGENT_PID/status"; }

measure() { # $1 = label, $2 = target MiB
  local t0 t1 hz rss cpu
  hz=$(getconf CLK_TCK)
  t0=$(ticks)
  sleep "$WINDOW"
  t1=$(ticks)
  rss=$(rss_kib)
  cpu=$(python3 -c "print(f'{($t1 - $t0) / $hz / $WINDOW * 100:.3f}')")
  printf '%-22s RSS %6.2f MiB (target <= %s MiB)   CPU %s %% of a core over %ss\n' \
    "$1" "$(python3 -c "print($rss/1024)")" "$2" "$cpu" "$WINDOW"
}

size=$(stat -c %s "$BIN")
printf 'agent binary (release, stripped): %.2f MiB (%s bytes)\n' "$(python3 -c "print($size/1048576)")" "$size"

desired 0
start_agent
sleep 5
measure "idle, 0 pods" 10
stop_agent

desired "$PODS"
start_agent
for _ in $(seq 1 120); do
  running=$(python3 -c "
import json,sys
try: f=json.load(open('$WORK/state/status.json'))
except Exception: print(0); sys.exit()
print(sum(1 for p in f['pods'] if p['phase']=='Running' and p['ready']==p['containers']))")
  [ "$running" -ge "$PODS" ] && break
  sleep 0.5
done
[ "$running" -ge "$PODS" ] || { cat "$WORK/agent.log"; echo "only $running/$PODS pods ready" >&2; exit 1; }
sleep 5
measure "$PODS pods running" 15
echo "idle CPU target: <= 0.1 % of a core"
