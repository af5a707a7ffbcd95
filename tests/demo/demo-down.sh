#!/usr/bin/env bash
# `make demo-down`: removes what `make demo` started — the demo Deployment and namespace, the hub
# and agent processes (by pidfile: pid and start time, so a rebuilt binary does not hide them),
# the demo Nodes, the demo's Podman pods (selected by the io.fleetlet.device label) and the
# demo's devices, enrollment requests, certificate signing requests and Fleets in Flightctl — and
# leaves the shared local stack running (`make env-down`).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
load_env

# Delete the workload while the agents still run, so they stop its containers themselves.
if "${KUBECTL[@]}" get namespace "$DEMO_NAMESPACE" > /dev/null 2>&1; then
    say "deleting namespace $DEMO_NAMESPACE (the demo Deployment)"
    "${KUBECTL[@]}" delete deployment hello -n "$DEMO_NAMESPACE" --ignore-not-found --timeout=60s || true
    "${KUBECTL[@]}" wait --for=delete pod -l app=hello -n "$DEMO_NAMESPACE" --timeout=60s > /dev/null 2>&1 || true
fi

for f in "$DEMO"/run/*.pid; do
    [[ -e $f ]] || continue
    say "stopping $(basename "$f" .pid)"
    demo_stop "$(basename "$f" .pid)"
done

if "${KUBECTL[@]}" get namespace "$DEMO_NAMESPACE" > /dev/null 2>&1; then
    # Pods left on a Node whose agent is gone never finish terminating on their own.
    "${KUBECTL[@]}" delete pod --all -n "$DEMO_NAMESPACE" --force --grace-period=0 > /dev/null 2>&1 || true
    "${KUBECTL[@]}" delete namespace "$DEMO_NAMESPACE" --timeout=120s
fi
fa_device=$(demo_fa_device)
for d in "${DEMO_DEVICES[@]}" ${fa_device:+"$fa_device"}; do
    "${KUBECTL[@]}" delete node "$d" --ignore-not-found
    filter="label=io.fleetlet.device=$d"
    for id in $("${PODMAN[@]}" pod ps -q --filter "$filter"); do
        "${PODMAN[@]}" pod rm -f "$id" > /dev/null
    done
    for id in $("${PODMAN[@]}" ps -aq --filter "$filter"); do
        "${PODMAN[@]}" rm -f -t 0 "$id" > /dev/null
    done
done
# The agents' desired state goes too: the next demo starts from an empty device.
rm -rf "$DEMO/state" "$DEMO/flightctl"

# Flightctl: the demo's devices with what enrolled them, and the Fleets labelled as this demo's.
# Flightctl answers 404 for what is already gone.
fc_delete() {
    local out
    if ! out=$(fc_api DELETE "$1" 2>&1) && [[ $out != *'"code":404'* ]]; then
        echo "demo-down: DELETE $1 in Flightctl failed: $out" >&2
    fi
}
# `flightctl certificate request -n enroll-DEVICE` names its request enroll-DEVICE-<random>.
csrs=$(fc_api GET /api/v1/certificatesigningrequests 2> /dev/null |
    python3 -c 'import json,sys; print("\n".join(i["metadata"]["name"] for i in json.load(sys.stdin).get("items") or []))' 2> /dev/null || true)
for d in "${DEMO_DEVICES[@]}" ${fa_device:+"$fa_device"}; do
    fc_delete "/api/v1/devices/$d"
    fc_delete "/api/v1/enrollmentrequests/$d"
    fc_delete "/api/v1/certificatesigningrequests/fleetlet-$d"
    # The flightctl-agent names its requests after the device (management and fleetlet certificates).
    while read -r csr; do
        if [[ $csr == "enroll-$d-"* || $csr == *"$d"* ]]; then
            fc_delete "/api/v1/certificatesigningrequests/$csr"
        fi
    done <<< "$csrs"
done
while read -r csr; do
    if [[ $csr == "enroll-$DEMO_NAME-flightctl-agent-"* ]]; then
        fc_delete "/api/v1/certificatesigningrequests/$csr"
    fi
done <<< "$csrs"
rm -rf "$DEMO_FA"
for fleet in "$DEMO_FLEET_A" "$DEMO_FLEET_B"; do
    owner=$(fc_api GET "/api/v1/fleets/$fleet" 2> /dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["metadata"].get("labels",{}).get(sys.argv[1],""))' "$DEMO_LABEL" 2> /dev/null || true)
    if [[ $owner == "$DEMO_NAME" ]]; then
        fc_delete "/api/v1/fleets/$fleet"
    fi
done
say "demo stopped; the local stack still runs (make env-down stops it)"
