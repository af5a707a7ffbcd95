#!/usr/bin/env bash
# `make demo-down`: removes what `make demo` started — the demo Deployment and namespace, the hub
# and agent processes (by pidfile: pid and start time, so a rebuilt binary does not hide them),
# the demo Nodes and the demo's Podman pods (selected by the io.fleetlet.device label) — and
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
for d in "${DEMO_DEVICES[@]}"; do
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
rm -rf "$DEMO/state"
say "demo stopped; the local stack still runs (make env-down stops it)"
