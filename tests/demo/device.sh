#!/usr/bin/env bash
# `make demo-device-stop DEVICE=demo.edge.device.a1` / `make demo-device-start DEVICE=demo.edge.device.a1`: stops or
# starts the agent of one demo device, as a device losing power or its network would (its pods
# keep running in Podman while the agent is down). `status` says whether it runs. `fleet` moves
# the device to another fleet the way an operator would, by its label in Flightctl:
#   tests/demo/device.sh stop|start|status DEVICE
#   tests/demo/device.sh fleet DEVICE FLEET
set -euo pipefail
source "$(dirname "$0")/lib.sh"

usage() {
    echo "usage: $0 stop|start|status DEVICE | fleet DEVICE FLEET   (DEVICE: ${DEMO_DEVICES[*]})" >&2
    exit 64
}
[[ $# -ge 2 ]] || usage
action=$1 device=$2 fleet=${3:-}
case $action in
    stop | start | status) [[ $# -eq 2 ]] || usage ;;
    fleet)
        [[ $# -eq 3 ]] || usage
        if [[ $fleet != "$DEMO_FLEET_A" && $fleet != "$DEMO_FLEET_B" ]]; then
            echo "$0: unknown demo fleet \"$fleet\"; the demo's fleets are: $DEMO_FLEET_A $DEMO_FLEET_B" >&2
            exit 64
        fi
        ;;
    *) usage ;;
esac
if [[ -z $device ]]; then
    echo "$0: which device? e.g. make demo-device-$action DEVICE=demo.edge.device.a1 (devices: ${DEMO_DEVICES[*]})" >&2
    exit 64
fi
if ! demo_is_device "$device"; then
    echo "$0: unknown demo device \"$device\"; the demo's devices are: ${DEMO_DEVICES[*]}" >&2
    exit 64
fi
if [[ ! -f $DEMO/agent-$device.toml ]]; then
    echo "$0: no demo configuration for $device ($DEMO/agent-$device.toml): run make demo first" >&2
    exit 1
fi
load_env

case $action in
    fleet)
        say "relabelling $device in Flightctl: $DEMO_FLEET_LABEL=$fleet"
        # JSON Patch; "/" in a label key is written "~1".
        FC_CONTENT_TYPE=application/json-patch+json fc_api PATCH "/api/v1/devices/$device" \
            -d "[{\"op\":\"replace\",\"path\":\"/metadata/labels/${DEMO_FLEET_LABEL//\//~1}\",\"value\":\"$fleet\"}]" > /dev/null
        say "waiting for Flightctl's fleet controller and the hub to move Node $device to fleet $fleet (up to 60 s)"
        for ((i = 0; i < 60; i++)); do
            now=$("${KUBECTL[@]}" get node "$device" -o 'jsonpath={.metadata.labels.flightctl\.io/fleet}' 2> /dev/null || true)
            if [[ $now == "$fleet" ]]; then
                flightctl_cli get device "$device"
                "${KUBECTL[@]}" get node "$device" -L flightctl.io/fleet
                exit 0
            fi
            sleep 1
        done
        echo "$0: Node $device still has flightctl.io/fleet=${now:-<none>} after 60 s" >&2
        exit 1
        ;;
    status)
        if pid=$(pidfile_pid "$DEMO/run/agent-$device.pid"); then
            echo "fleetlet-agent of $device runs (pid $pid)"
        else
            echo "fleetlet-agent of $device is stopped"
        fi
        ;;
    stop)
        if ! demo_running "agent-$device"; then
            say "fleetlet-agent of $device is not running"
            exit 0
        fi
        demo_stop "agent-$device"
        say "stopped fleetlet-agent of $device; its pods keep running in Podman"
        say "the hub marks Node $device Ready=Unknown after its disconnect grace (10 s in the demo):"
        say "  kubectl get node $device -w"
        ;;
    start)
        if demo_running "agent-$device"; then
            say "fleetlet-agent of $device already runs"
            exit 0
        fi
        if [[ ! -x $AGENT ]]; then
            echo "$0: $AGENT missing: run make demo first" >&2
            exit 1
        fi
        say "starting fleetlet-agent for $device"
        demo_agent_start "$device"
        rc=0
        demo_wait_node "$device" 60 || rc=$?
        case $rc in
            0) say "Node $device is Ready" ;;
            2)
                echo "$0: $DEMO_EXITED exited; last lines of its log:" >&2
                tail -n 25 "$DEMO/logs/$DEMO_EXITED.log" >&2
                exit 1
                ;;
            *)
                echo "$0: Node $device is not Ready after 60 s; see $DEMO/logs/agent-$device.log" >&2
                exit 1
                ;;
        esac
        ;;
esac
