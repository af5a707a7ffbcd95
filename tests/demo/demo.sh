#!/usr/bin/env bash
# `make demo`: fleetlet end to end on this machine, with the stack's Flightctl as the inventory.
# A fourth device runs the real flightctl-agent, which enrolls it and delivers fleetlet-agent's
# configuration and link certificate from Flightctl Fleet b's template.
# Needs the local stack (`make env-up`, which the Makefile target runs first). Builds the binaries,
# creates the Flightctl Fleets a and b, enrolls three devices in Flightctl (enrollment requests
# approved with their fleet label) and obtains each one's fleetlet link certificate from
# Flightctl's device-svc-client signer, starts the hub on the Flightctl inventory and one agent per
# device (background processes, pidfiles in target/demo/run, logs in target/demo/logs and, for the
# agents, in the journal), applies examples/demo-deployment.yaml and waits until its pods run.
# `make demo-down` undoes it; `make demo-device-stop|demo-device-start DEVICE=...` stops and starts
# one agent; `make demo-device-fleet DEVICE=... FLEET=...` relabels a device in Flightctl.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
load_env

# A demo that already runs is replaced: stop it and start from a clean slate.
"$ROOT/tests/demo/demo-down.sh" > /dev/null

if [[ -n ${FLEETLET_DEMO_BIN:-} ]]; then
    say "using the binaries in $DEMO_BIN"
    [[ -x $HUB && -x $AGENT ]] || { echo "make demo: $HUB or $AGENT missing" >&2; exit 1; }
else
    say "building fleetlet-hub and fleetlet-agent (debug)"
    (cd "$ROOT" && ${CARGO:-cargo} build --quiet -p fleetlet-hub -p fleetlet-agent --bins)
fi

mkdir -p "$DEMO"/{run,logs,state,flightctl}
# A new demo, new log files (a device restarted with device.sh appends to its file).
rm -f "$DEMO"/logs/*.log
umask 077
PKI=$DEMO/pki
say "development PKI for the hub's serving certificates in ${PKI#"$ROOT"/}"
if [[ ! -f $PKI/ca.pem ]]; then
    "$HUB" pki --dir "$PKI" init > /dev/null
fi
"$HUB" pki --dir "$PKI" issue-server --name 127.0.0.1 --name localhost > /dev/null
# The API server reaches the hub's kubelet API (kubectl logs/exec) and checks its serving
# certificate against the cluster CA, so that one is signed by the stack's CA.
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=fleetlet-demo-kubelet \
    -keyout "$PKI/kubelet-key.pem" -out "$PKI/kubelet.csr" 2> /dev/null
openssl x509 -req -in "$PKI/kubelet.csr" -CA "$FLEETLET_CLUSTER_CA_CERT" -CAkey "$FLEETLET_CLUSTER_CA_KEY" \
    -set_serial "0x$(openssl rand -hex 16)" -days 30 -out "$PKI/kubelet.pem" \
    -extfile <(printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n') 2> /dev/null
rm -f "$PKI/kubelet.csr"

# The Flightctl Fleets: a device joins the fleet whose selector its labels match (Flightctl's fleet
# controller sets the device's owner, which the hub turns into the Node label flightctl.io/fleet).
# Fleet b's template also carries fleetlet-agent's configuration for a device that runs the real
# flightctl-agent: agent.toml (hub endpoint, CA, certificate, device policy), the hub's CA, a
# certificate drop-in (the flightctl-agent gets the link certificate from Flightctl's
# device-svc-client signer) and after-updating hooks. Paths inside agent.toml lie below that
# device's test root (FLIGHTCTL_TEST_ROOT_DIR); on a real device they are the plain paths.
for fleet in "$DEMO_FLEET_A" "$DEMO_FLEET_B"; do
    say "creating Flightctl Fleet $fleet (devices labelled $DEMO_FLEET_LABEL=$fleet)"
    with_config=
    [[ $fleet == "$DEMO_FLEET_B" ]] && with_config=1
    fc_api POST /api/v1/fleets -d "$(FLEET=$fleet WITH_CONFIG=$with_config FA_ROOT=$DEMO_FA_ROOT \
        FLEET_LABEL=$DEMO_FLEET_LABEL DEMO_LABEL=$DEMO_LABEL DEMO_NAME=$DEMO_NAME HUB_CA=$PKI/ca.pem \
        LINK_PORT=$DEMO_LINK_PORT PODMAN_SOCKET=$FLEETLET_PODMAN_SOCKET python3 "$ROOT/tests/demo/fleet-json.py")" > /dev/null
done

# A demo run by a test carries the test's owner labels to its Nodes (device labels become Node
# labels), so a killed test's Nodes are found and removed by the next test run (tests/support).
owner_labels=
if [[ ${FLEETLET_TEST_OWNER:-} =~ ^([0-9]+):([0-9]+)$ ]]; then
    owner_labels=",fleetlet.test/owner-pid=${BASH_REMATCH[1]},fleetlet.test/owner-start=${BASH_REMATCH[2]}"
fi
for d in "${DEMO_DEVICES[@]}"; do
    say "enrolling $d in Flightctl (fleet $(demo_fleet_of "$d")) and getting its link certificate from Flightctl's signer"
    if ! "$ROOT/tests/env/flightctl/device-cert.sh" "$d" "$DEMO/flightctl/$d" \
        "$DEMO_LABEL=$DEMO_NAME,$DEMO_FLEET_LABEL=$(demo_fleet_of "$d")$owner_labels" > /dev/null 2> "$DEMO/logs/enroll-$d.log"; then
        cat "$DEMO/logs/enroll-$d.log" >&2
        echo "make demo: enrolling $d in Flightctl failed" >&2
        exit 1
    fi
done

cat > "$DEMO/hub.toml" <<TOML
kubeconfig = "$KUBECONFIG"
[ops]
listen = "127.0.0.1:$DEMO_OPS_PORT"
# The devices, their fleets and labels come from Flightctl; a device of this demo gets a Node.
[inventory.flightctl]
api_url = "$FLIGHTCTL_API_URL"
ca_file = "$FLIGHTCTL_CA_FILE"
token_file = "$FLIGHTCTL_VIEWER_TOKEN_FILE"
enabled_selector = "$DEMO_LABEL=$DEMO_NAME"
poll_interval_secs = 2
last_seen_interval_secs = 30
[nodes]
instance = "$DEMO_NAME"
disconnect_grace_secs = 10
[kubelet]
listen = "127.0.0.1:$DEMO_KUBELET_PORT"
cert_file = "$PKI/kubelet.pem"
key_file = "$PKI/kubelet-key.pem"
client_ca_file = "$FLEETLET_CLUSTER_CA_CERT"
# Agents authenticate with certificates from Flightctl's device-svc-client signer, common name
# fleetlet-<Flightctl device name>.
[link]
listen = "127.0.0.1:$DEMO_LINK_PORT"
client_ca_file = "$FLIGHTCTL_SIGNER_CA_FILE"
identity_prefix = "fleetlet-"
cert_file = "$PKI/hub.pem"
key_file = "$PKI/hub-key.pem"
TOML

for d in "${DEMO_DEVICES[@]}"; do
    mkdir -p "$DEMO/state/$d"
    cat > "$DEMO/agent-$d.toml" <<TOML
device_name = "$d"
state_dir = "$DEMO/state/$d"
podman_socket = "$FLEETLET_PODMAN_SOCKET"
resync_secs = 5
node_ip = "127.0.0.1"
[hub]
endpoint = "https://127.0.0.1:$DEMO_LINK_PORT"
ca_file = "$PKI/ca.pem"
cert_file = "$DEMO/flightctl/$d/fleetlet.crt"
key_file = "$DEMO/flightctl/$d/fleetlet.key"
reconnect_max_backoff_secs = 2
TOML
done
umask 022

failed() {
    echo >&2
    echo "make demo failed: $*" >&2
    for log in "$DEMO"/logs/*.log; do
        echo "----- last lines of ${log#"$ROOT"/} -----" >&2
        tail -n 25 "$log" >&2
    done
    echo >&2
    echo "The processes still run for inspection; make demo-down stops them." >&2
    exit 1
}

# The hub's ports must be free (demo-down above stopped a previous demo's hub).
for port in "$DEMO_LINK_PORT" "$DEMO_KUBELET_PORT" "$DEMO_OPS_PORT"; do
    if ss -Hltn "sport = :$port" | grep -q .; then
        echo "make demo: 127.0.0.1:$port is in use by another process; choose other ports with" >&2
        echo "FLEETLET_DEMO_LINK_PORT, FLEETLET_DEMO_KUBELET_PORT, FLEETLET_DEMO_OPS_PORT" >&2
        exit 1
    fi
done

say "starting fleetlet-hub (link 127.0.0.1:$DEMO_LINK_PORT, kubelet API 127.0.0.1:$DEMO_KUBELET_PORT)"
demo_start hub "$HUB" run -c "$DEMO/hub.toml"
for d in "${DEMO_DEVICES[@]}"; do
    say "starting fleetlet-agent for $d"
    demo_agent_start "$d"
done

# A fourth device, managed by the real flightctl-agent (built from Flightctl's Go module by env-up):
# it enrolls on its own, the demo approves it into fleet b, and everything fleetlet-agent needs —
# its configuration and its link certificate — comes through Flightctl. It runs as root with
# Flightctl's FLIGHTCTL_TEST_ROOT_DIR: all it writes lies below target/demo/flightctl-agent/root
# (proc and sys are links to the real ones: it reads the default route there).
[[ -x ${FLIGHTCTL_DEVICE_BIN_DIR:-}/flightctl-agent ]] ||
    failed "flightctl-agent missing (FLIGHTCTL_DEVICE_BIN_DIR=${FLIGHTCTL_DEVICE_BIN_DIR:-unset}): run make env-up"
say "starting the real flightctl-agent for a fourth device (its files below ${DEMO_FA_ROOT#"$ROOT"/})"
rm -rf "$DEMO_FA"
mkdir -p "$DEMO_FA_ROOT"/{etc/flightctl,var/lib/flightctl,run}
ln -s /proc "$DEMO_FA_ROOT/proc"
ln -s /sys "$DEMO_FA_ROOT/sys"
(
    umask 077
    # Its enrollment (bootstrap) certificate, embedded in its configuration.
    flightctl_cli certificate request -n "enroll-$DEMO_NAME-flightctl-agent" -o embedded -d "$DEMO_FA" 2> /dev/null
    printf 'spec-fetch-interval: 2s\nstatus-update-interval: 5s\n'
) > "$DEMO_FA_ROOT/etc/flightctl/config.yaml" || failed "no enrollment certificate from Flightctl"
(
    export FLIGHTCTL_TEST_ROOT_DIR=$DEMO_FA_ROOT
    demo_start flightctl-agent "$FLIGHTCTL_DEVICE_BIN_DIR/flightctl-agent" --config /etc/flightctl/config.yaml
)
fa_device=
for ((i = 0; i < 60; i++)); do
    fa_device=$(demo_fa_device)
    [[ -n $fa_device ]] && break
    sleep 1
done
[[ -n $fa_device ]] || failed "the flightctl-agent did not ask to enroll within 60 s"
echo "$fa_device" > "$DEMO_FA/device-name"
say "approving the flightctl-agent's enrollment request $fa_device into fleet $DEMO_FLEET_B"
approval=$(python3 -c 'import json,sys
labels = {sys.argv[1]: sys.argv[2], sys.argv[3]: sys.argv[4]}
for kv in filter(None, sys.argv[5].split(",")):
    k, _, v = kv.partition("="); labels[k] = v
print(json.dumps({"approved": True, "labels": labels}))' "$DEMO_LABEL" "$DEMO_NAME" "$DEMO_FLEET_LABEL" "$DEMO_FLEET_B" "${owner_labels#,}")
for ((i = 0; i < 30; i++)); do
    fc_api PUT "/api/v1/enrollmentrequests/$fa_device/approval" -d "$approval" > /dev/null 2>&1 && break
    sleep 1
done
say "starting fleetlet-agent for $fa_device once the flightctl-agent delivered its configuration and certificate"
demo_start "agent-flightctl-managed" "$ROOT/tests/demo/supervise.sh" "$DEMO_FA_ROOT/etc/fleetlet/agent.toml" \
    "$DEMO_FA_ROOT/etc/fleetlet/certs/device.crt" "$DEMO_FA_ROOT/run/fleetlet-agent.pid" "$AGENT"

say "waiting for the Nodes ${DEMO_DEVICES[*]} to be Ready (up to 90 s)"
for d in "${DEMO_DEVICES[@]}"; do
    rc=0
    demo_wait_node "$d" 90 || rc=$?
    case $rc in
        0) ;;
        2) failed "$DEMO_EXITED exited (its log is below)" ;;
        *) failed "Node $d is not Ready after 90 s" ;;
    esac
done

say "waiting for the Node $fa_device of the flightctl-agent's device to be Ready (up to 180 s)"
rc=0
demo_wait_node "$fa_device" 180 || rc=$?
case $rc in
    0) ;;
    2) failed "$DEMO_EXITED exited (its log is below)" ;;
    *) failed "Node $fa_device is not Ready after 180 s" ;;
esac

say "applying ${DEMO_MANIFEST#"$ROOT"/}"
# With the default names this is the file as it is; a renamed demo gets its namespace and fleet.
sed -e "s/fleetlet-demo\$/$DEMO_NAMESPACE/" -e "s/flightctl.io\/fleet: a\$/flightctl.io\/fleet: $DEMO_FLEET_A/" \
    "$DEMO_MANIFEST" | "${KUBECTL[@]}" apply -f -
say "waiting for its pods to be Running and Ready (up to 180 s)"
"${KUBECTL[@]}" rollout status deployment/hello -n "$DEMO_NAMESPACE" --timeout=180s ||
    failed "deployment hello is not available after 180 s: $("${KUBECTL[@]}" get pods -n "$DEMO_NAMESPACE" -o wide 2>&1)"

echo
say "flightctl get devices,fleets -l $DEMO_LABEL=$DEMO_NAME   (Flightctl's view)"
flightctl_cli get devices -l "$DEMO_LABEL=$DEMO_NAME" -o wide 2>/dev/null || flightctl_cli get devices -l "$DEMO_LABEL=$DEMO_NAME"
flightctl_cli get fleets -l "$DEMO_LABEL=$DEMO_NAME"
echo
say "kubectl get nodes,pods   (Kubernetes' view: one Node per Flightctl device, label flightctl.io/fleet)"
"${KUBECTL[@]}" get nodes -l "$DEMO_LABEL=$DEMO_NAME" -L flightctl.io/fleet
"${KUBECTL[@]}" get pods -n "$DEMO_NAMESPACE" -o wide
echo
for d in "${DEMO_DEVICES[@]}"; do
    echo "Podman containers of $d (label io.fleetlet.device=$d):"
    "${PODMAN[@]}" ps --filter "label=io.fleetlet.device=$d" --format 'table {{.ID}} {{.Names}} {{.Image}} {{.Status}} {{.PodName}}'
done

rel() { printf '%s' "${1#"$ROOT"/}"; }
journal_hint="(the stack's journald is not running: agent logs are only in the files below)"
if [[ -S $JOURNAL_SOCKET ]]; then
    journal_hint="journalctl -t fleetlet-agent DEVICE=${DEMO_DEVICES[0]} -n 20   # an agent's log in the journal"
fi
cat <<TEXT

fleetlet runs: the two pods of deployment "hello" are on fleet $DEMO_FLEET_A's devices, none on ${DEMO_DEVICES[2]} (fleet $DEMO_FLEET_B).
$fa_device (fleet $DEMO_FLEET_B) runs the real flightctl-agent, which enrolled it and delivered
fleetlet-agent's configuration and link certificate from Flightctl (files below $(rel "$DEMO_FA_ROOT")).
docs/quickstart.md walks through more (one device, a fleet, a pod too big, an update, a device
offline and back, deletion). Try (from $ROOT):

  source target/dev/env
  kubectl() { "\$FLEETLET_KUBECTL" "\$@"; }   # kubectl of the local stack
  kubectl -n $DEMO_NAMESPACE logs deploy/hello                # logs, served by the hub from the device
  kubectl -n $DEMO_NAMESPACE scale deploy/hello --replicas=3  # more pods, still only in fleet $DEMO_FLEET_A
  kubectl -n $DEMO_NAMESPACE delete pod -l app=hello          # replaced by new ones
  kubectl -n $DEMO_NAMESPACE delete deploy/hello              # containers leave Podman
  podman --url unix://\$FLEETLET_PODMAN_SOCKET ps --filter label=io.fleetlet.device=${DEMO_DEVICES[0]}
  $(rel "$AGENT") --config $(rel "$DEMO")/agent-${DEMO_DEVICES[0]}.toml status
  $journal_hint
  make demo-device-stop DEVICE=${DEMO_DEVICES[0]}    # the device goes offline (its pods keep running)
  make demo-device-start DEVICE=${DEMO_DEVICES[0]}   # and comes back
  make demo-device-fleet DEVICE=${DEMO_DEVICES[2]} FLEET=$DEMO_FLEET_A   # relabel in Flightctl: its Node moves to fleet $DEMO_FLEET_A
  $FLIGHTCTL_BIN_DIR/flightctl --config-dir $FLIGHTCTL_CLI_CONFIG_DIR get devices -l $DEMO_LABEL=$DEMO_NAME
  find $(rel "$DEMO_FA_ROOT")/etc/fleetlet -type f   # what the flightctl-agent delivered to $fa_device

Logs: $(rel "$DEMO")/logs/{hub,agent-${DEMO_DEVICES[0]},agent-${DEMO_DEVICES[1]},agent-${DEMO_DEVICES[2]},flightctl-agent,agent-flightctl-managed}.log
Stop: make demo-down (hub, agents, demo Nodes, pods and namespace; the stack keeps running)
      make env-down  (then the local stack too)
TEXT
