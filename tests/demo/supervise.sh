#!/usr/bin/env bash
# Stands in for the service manager of fleetlet-agent on the demo's device that the real
# flightctl-agent manages (systemd is not PID 1 here): waits until the flightctl-agent has
# delivered the agent's configuration and its certificate, runs fleetlet-agent, and runs it again
# whenever it exits (`Restart=always`); the fleet's hook stops it when its configuration changed
# (on a device: `systemctl try-restart fleetlet-agent`). The running agent's pid is in PIDFILE.
#   tests/demo/supervise.sh CONFIG CERT PIDFILE AGENT_BINARY
set -uo pipefail
config=$1 cert=$2 pidfile=$3 agent=$4
child=
trap 'if [[ -n $child ]]; then kill -TERM "$child" 2> /dev/null; wait "$child"; fi; exit 0' TERM INT
# Bounded: the files must come within 10 minutes; at most 1000 starts.
for ((i = 0; i < 1200; i++)); do
    [[ -f $config && -f $cert ]] && break
    sleep 0.5
done
[[ -f $config && -f $cert ]] || { echo "supervise: $config or $cert never appeared" >&2; exit 1; }
for ((starts = 1; starts <= 1000; starts++)); do
    echo "supervise: starting fleetlet-agent ($starts)" >&2
    "$agent" --config "$config" run &
    child=$!
    echo "$child" > "$pidfile"
    wait "$child"
    echo "supervise: fleetlet-agent exited with $?" >&2
    child=
    sleep 0.5
done
