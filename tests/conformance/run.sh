#!/usr/bin/env bash
# `make conformance`: runs the upstream Kubernetes e2e suite's node tests against fleetlet Nodes.
#
# Builds e2e.test, ginkgo and agnhost from tests/conformance/go.mod (build.sh, cached), provides
# the images the tests run (images.sh), then starts a hub of its own and two agents (devices
# conf-1 and conf-2, untainted so that the suite's pods land on them) and runs the node-level
# [Conformance]/[NodeConformance] tests of sig-node and the node-local storage tests.
#
# The API server reaches the hub's kubelet endpoint (logs, exec, port-forward, proxy) on a
# routable address: the host end of a veth pair into a network namespace of the run, addressed
# from 198.18.0.0/15 (the benchmarking range the fault suite uses too), never loopback, which the
# API server refuses to proxy to.
#
# Environment: CONFORMANCE_FOCUS / CONFORMANCE_SKIP (ginkgo regexps) replace the default
# selection; CONFORMANCE_PROCS (default 4) parallel ginkgo processes; CONFORMANCE_DIR (default
# target/conformance); CONFORMANCE_TIMEOUT (default 3h: then the suite stops, reports what ran
# and counts the rest as not run); FLEETLET_CONFORMANCE_BIN (prebuilt fleetlet binaries: no cargo build);
# CONFORMANCE_NAME (default conf) names devices, hub instance and netns, so runs never collide;
# CONFORMANCE_LINK_PORT, CONFORMANCE_KUBELET_PORT (and the 8 after it), CONFORMANCE_OPS_PORT and
# CONFORMANCE_REGISTRY_PORT (default: the ops port + 1) are its loopback/host ports. Runs on one
# machine take turns (a lock, CONFORMANCE_LOCK).
# Prints the counts and the tests that did not pass; exit status 1 when any failed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$here/../.." && pwd)
# shellcheck source=tests/env/proc.sh
source "$ROOT/tests/env/proc.sh"
log() { printf '[conformance %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ -f "$ROOT/target/dev/env" ] || die "target/dev/env missing: run make env-up"
# shellcheck disable=SC1091
source "$ROOT/target/dev/env"
kubectl=("$FLEETLET_KUBECTL" --kubeconfig "$KUBECONFIG")
podman=(podman --url "unix://$FLEETLET_PODMAN_SOCKET")

name=${CONFORMANCE_NAME:-conf}
# It also names the veth pair (15 bytes at most for the kernel): 9 characters at most.
[[ $name =~ ^[a-z0-9]([a-z0-9-]{0,7}[a-z0-9])?$ ]] || die "CONFORMANCE_NAME must be a DNS label of at most 9 characters"
dir=${CONFORMANCE_DIR:-$ROOT/target/conformance}
case $dir in /*) ;; *) dir=$PWD/$dir ;; esac
procs=${CONFORMANCE_PROCS:-4}
devices=("$name-1" "$name-2")
link_port=${CONFORMANCE_LINK_PORT:-17643}
kubelet_port=${CONFORMANCE_KUBELET_PORT:-17650}
ops_port=${CONFORMANCE_OPS_PORT:-17680}
registry_port=${CONFORMANCE_REGISTRY_PORT:-$((ops_port + 1))}

default_focus='\[sig-node\].*(\[Conformance\]|\[NodeConformance\])|\[sig-storage\] (ConfigMap|Secrets|Projected (configMap|secret|downwardAPI|combined)|Downward API volume|EmptyDir volumes) '
# Serial and disruptive tests restart or reconfigure the node and its kubelet, which fleetlet's
# devices are not; flaky ones are excluded upstream too.
default_skip='\[Serial\]|\[Disruptive\]|\[Flaky\]'
focus=${CONFORMANCE_FOCUS:-$default_focus}
skip=${CONFORMANCE_SKIP:-$default_skip}

# One run at a time on a machine: the suite's pods go to any untainted Ready Node, so two runs
# at once would put pods on each other's Nodes (and lose them when the other run ends).
lock=${CONFORMANCE_LOCK:-/tmp/fleetlet-conformance.lock}
exec 9> "$lock"
if ! flock -n 9; then
  log "another conformance run holds $lock; waiting for it"
  flock 9
fi

bin=$("$here/build.sh")
provided=$("$here/images.sh" "$bin")

if [[ -n ${FLEETLET_CONFORMANCE_BIN:-} ]]; then
  fbin=$FLEETLET_CONFORMANCE_BIN
else
  log "building fleetlet-hub and fleetlet-agent (debug)"
  (cd "$ROOT" && ${CARGO:-cargo} build --quiet -p fleetlet-hub -p fleetlet-agent --bins)
  fbin=${CARGO_TARGET_DIR:-$ROOT/target}/debug
fi

mkdir -p "$dir"/{run,logs,state,report}
rm -rf "$dir"/report/* "$dir"/logs/*.log

# ---- teardown: processes, Nodes, netns; also what a killed earlier run left behind ----
netns=fleetlet-$name
host_if=flc-$name
cleanup() {
  local p
  for p in "$dir"/run/*.pid; do
    [ -e "$p" ] && pidfile_stop "$p" 50 > /dev/null 2>&1 || true
  done
  "${kubectl[@]}" delete node "${devices[@]}" --ignore-not-found --wait=false > /dev/null 2>&1 || true
  # The devices' containers: the agents are stopped before they could remove them.
  local d id
  for d in "${devices[@]}"; do
    for id in $("${podman[@]}" ps -aq --filter "label=io.fleetlet.device=$d" 2> /dev/null); do
      "${podman[@]}" rm -f -t 0 "$id" > /dev/null 2>&1 || true
    done
    for id in $("${podman[@]}" pod ps -q --filter "label=io.fleetlet.device=$d" 2> /dev/null); do
      "${podman[@]}" pod rm -f "$id" > /dev/null 2>&1 || true
    done
  done
  ip link del "$host_if" 2> /dev/null || true
  ip netns del "$netns" 2> /dev/null || true
  rm -rf "$dir/registry"
  # The tmpfs volumes of pods the stopped agents had not removed yet (deepest first).
  local m
  for m in $(awk -v s="$dir/state/" 'index($5, s) == 1 { print $5 }' /proc/self/mountinfo | sort -r); do
    umount -l "$m" 2> /dev/null || true
  done
}
cleanup
# Fresh devices: a killed run's agent state (pods of deleted namespaces) does not carry over.
rm -rf "$dir/state"
trap cleanup EXIT

# ---- a routable address for the hub's kubelet endpoint ----
# One /30 of 198.19.255.0/24 not held by another interface (the fault suite uses the low blocks).
used=$(ip -4 -o addr show | awk '{ print $4 }')
hub_ip=
for b in $(seq 0 63); do
  cand=198.19.255.$((b * 4 + 1))
  grep -q "^$cand/" <<< "$used" || { hub_ip=$cand; peer_ip=198.19.255.$((b * 4 + 2)); break; }
done
[ -n "$hub_ip" ] || die "no free /30 in 198.19.255.0/24"
ip netns add "$netns"
ip link add "$host_if" type veth peer name "${host_if}-p"
ip link set "${host_if}-p" netns "$netns"
ip addr add "$hub_ip/30" dev "$host_if"
ip link set "$host_if" up
ip -n "$netns" addr add "$peer_ip/30" dev "${host_if}-p"
ip -n "$netns" link set "${host_if}-p" up
ip -n "$netns" link set lo up
log "hub kubelet endpoint on $hub_ip:$kubelet_port ($host_if, peer in netns $netns)"

# ---- the images, pullable: a registry of the run and a Podman service that pulls from it ----
# Tests with imagePullPolicy Always (the ImageVolume test's volume) must reach a registry: the
# images images.sh provided are pushed to a distribution registry on loopback, and the agents
# talk to a Podman API service of the run (sharing the stack's storage) whose registries.conf
# sends localhost/e2e-test-images there over plain HTTP. Other registries stay unreachable.
command -v docker-registry > /dev/null || die "docker-registry is missing (tests/env/install-deps.sh installs it)"
mkdir -p "$dir/registry/storage"
cat > "$dir/registry/config.yml" <<YAML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $dir/registry/storage
http:
  addr: 127.0.0.1:$registry_port
  secret: $(openssl rand -hex 16)
YAML
e2e_registry=$(awk '$1 == "promoterE2eRegistry:" { print $2 }' "$here/repo-list.yaml")
cat > "$dir/registry/registries.conf" <<CONF
unqualified-search-registries = []

[[registry]]
prefix = "$e2e_registry"
location = "127.0.0.1:$registry_port/${e2e_registry#*/}"
insecure = true
CONF
containers_conf=$(dirname "$FLEETLET_PODMAN_SOCKET")/containers.conf
[ -f "$containers_conf" ] || containers_conf=$ROOT/tests/env/containers.conf
run_podman_socket=$dir/run/podman.sock
rm -f "$run_podman_socket"

start() {
  local n=$1 exe=$2
  shift 2
  (cd / && RUST_LOG=${RUST_LOG:-info} NO_COLOR=1 exec setsid "$exe" "$@" >> "$dir/logs/$n.log" 2>&1 < /dev/null 9>&-) &
  pidfile_write "$dir/run/$n.pid" "$!" "$exe"
}
start registry "$(command -v docker-registry)" serve "$dir/registry/config.yml"
CONTAINERS_CONF=$containers_conf CONTAINERS_REGISTRIES_CONF=$dir/registry/registries.conf \
  start podman "$(command -v podman)" system service --time=0 "unix://$run_podman_socket"
for _ in $(seq 100); do
  [ -S "$run_podman_socket" ] && curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$registry_port/v2/" && break
  sleep 0.1
done
[ -S "$run_podman_socket" ] || die "the run's Podman service did not start (log: $dir/logs/podman.log)"
for image in $provided; do
  "${podman[@]}" push --tls-verify=false "$image" "docker://127.0.0.1:$registry_port/${image#*/}" > /dev/null 2>&1 ||
    die "pushing $image to the run's registry failed (log: $dir/logs/registry.log)"
done
log "registry of the run on 127.0.0.1:$registry_port holds: $(echo $provided)"

# ---- PKI: link CA and certificates; kubelet serving certificate from the cluster CA ----
umask 077
pki=$dir/pki
[ -f "$pki/ca.pem" ] || "$fbin/fleetlet-hub" pki --dir "$pki" init > /dev/null
"$fbin/fleetlet-hub" pki --dir "$pki" issue-server --name 127.0.0.1 --name localhost > /dev/null
for d in "${devices[@]}"; do "$fbin/fleetlet-hub" pki --dir "$pki" issue-device "$d" > /dev/null; done
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=fleetlet-$name-kubelet" \
  -keyout "$pki/kubelet-key.pem" -out "$pki/kubelet.csr" 2> /dev/null
openssl x509 -req -in "$pki/kubelet.csr" -CA "$FLEETLET_CLUSTER_CA_CERT" -CAkey "$FLEETLET_CLUSTER_CA_KEY" \
  -set_serial "0x$(openssl rand -hex 16)" -days 2 -out "$pki/kubelet.pem" \
  -extfile <(printf 'subjectAltName=IP:%s\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n' "$hub_ip") 2> /dev/null
rm -f "$pki/kubelet.csr"

{
  echo "# The conformance run's devices: untainted Nodes the e2e suite schedules onto."
  for d in "${devices[@]}"; do printf '[[device]]\nname = "%s"\nfleet = "%s"\n' "$d" "$name"; done
} > "$dir/devices.toml"
cat > "$dir/hub.toml" <<TOML
kubeconfig = "$KUBECONFIG"
[ops]
listen = "127.0.0.1:$ops_port"
[inventory]
static_file = "$dir/devices.toml"
[nodes]
instance = "fleetlet-$name"
disconnect_grace_secs = 30
taints = []
[kubelet]
listen = "$hub_ip:$kubelet_port"
advertise_address = "$hub_ip"
# A port per Node (stats, /pods): free, as nothing else listens on this run's own address.
node_ports = "$((kubelet_port + 1))-$((kubelet_port + 8))"
cert_file = "$pki/kubelet.pem"
key_file = "$pki/kubelet-key.pem"
client_ca_file = "$FLEETLET_CLUSTER_CA_CERT"
[link]
listen = "127.0.0.1:$link_port"
client_ca_file = "$pki/ca.pem"
cert_file = "$pki/hub.pem"
key_file = "$pki/hub-key.pem"
TOML
for d in "${devices[@]}"; do
  mkdir -p "$dir/state/$d"
  cat > "$dir/agent-$d.toml" <<TOML
device_name = "$d"
state_dir = "$dir/state/$d"
podman_socket = "$run_podman_socket"
resync_secs = 5
node_ip = "$hub_ip"
[hub]
endpoint = "https://127.0.0.1:$link_port"
ca_file = "$pki/ca.pem"
cert_file = "$pki/devices/$d.pem"
key_file = "$pki/devices/$d-key.pem"
reconnect_max_backoff_secs = 2
TOML
done
umask 022

start hub "$fbin/fleetlet-hub" run -c "$dir/hub.toml"
for d in "${devices[@]}"; do start "agent-$d" "$fbin/fleetlet-agent" --config "$dir/agent-$d.toml" run; done
for d in "${devices[@]}"; do
  "${kubectl[@]}" wait --for=condition=Ready "node/$d" --timeout=120s > /dev/null 2>&1 ||
    { sleep 5; "${kubectl[@]}" wait --for=condition=Ready "node/$d" --timeout=60s; } ||
    die "Node $d is not Ready (logs in $dir/logs)"
done
log "Nodes ${devices[*]} are Ready"

# ---- the suite ----
export KUBE_TEST_REPO_LIST=$here/repo-list.yaml
args=(
  --kubeconfig="$KUBECONFIG"
  --provider=skeleton
  --report-dir="$dir/report"
  # Other tests' fleetlet Nodes (tainted) and NotReady leftovers must not hold the suite.
  --allowed-not-ready-nodes=-1
  --non-blocking-taints=virtual-kubelet.io/provider,node-role.kubernetes.io/control-plane
  --minStartupPods=-1
  --e2e-verify-service-account=false
  --node-os-distro=debian
  --dump-logs-on-failure=false
)
log "running e2e.test ($procs processes): focus '$focus', skip '$skip'"
rc=0
"$bin/ginkgo" --procs="$procs" --no-color --timeout="${CONFORMANCE_TIMEOUT:-3h}" --focus="$focus" --skip="$skip" \
  --junit-report=junit.xml --output-dir="$dir/report" "$bin/e2e.test" -- "${args[@]}" \
  > "$dir/logs/e2e.log" 2>&1 || rc=$?

# ---- counts and the tests that did not pass ----
junit=$dir/report/junit.xml
[ -f "$junit" ] || { tail -n 40 "$dir/logs/e2e.log" >&2; die "no JUnit report (e2e.test exit $rc); log: $dir/logs/e2e.log"; }
python3 - "$junit" "$focus" "$skip" "$dir/logs/e2e.log" <<'PY'
import re, sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
focus, skip = re.compile(sys.argv[2]), re.compile(sys.argv[3])
passed, failed, skipped, not_run = [], [], [], []
for tc in root.iter("testcase"):
    name = tc.get("name", "")
    if name.startswith("[SynchronizedBeforeSuite]") or name.startswith("[SynchronizedAfterSuite]") \
            or name.startswith("[ReportAfterSuite]") or name.startswith("[BeforeSuite]") \
            or name.startswith("[AfterSuite]"):
        if tc.find("failure") is not None or tc.find("error") is not None:
            failed.append(name)
        continue
    # Specs outside the selection are reported as skipped too; they are not counted.
    if not focus.search(name) or skip.search(name):
        continue
    sk = tc.find("skipped")
    if sk is not None and "interrupt" in (sk.get("message", "") + (sk.text or "")).lower():
        not_run.append(name)
    elif tc.find("skipped") is not None or tc.get("status") == "skipped":
        skipped.append(name)
    elif tc.find("failure") is not None or tc.find("error") is not None:
        failed.append(name)
    else:
        passed.append(name)
if not (passed or failed or skipped or not_run):
    # Ginkgo stopped by its --timeout in parallel mode writes no test cases: count what the
    # log shows (each finished spec prints a bullet; failed ones "• [FAILED]" and their name).
    log = open(sys.argv[4], errors="replace").read()
    fails = re.findall(r"• \[FAILED\] \[[0-9.]+ seconds\]\n(\[sig[^\n]*)", log)
    ran = log.count("•")
    total = re.search(r"Will run (\d+) of", log)
    print(f"conformance (from the log; the suite stopped before its report): "
          f"{ran - len(fails)} passed, {len(fails)} failed"
          + (f", {int(total.group(1)) - ran} not run" if total else ""))
    for n in sorted(fails):
        print(f"  FAILED {n}")
    sys.exit(0)
print(f"conformance: {len(passed)} passed, {len(failed)} failed, {len(skipped)} skipped"
      + (f", {len(not_run)} not run (suite timeout)" if not_run else ""))
for n in sorted(failed):
    print(f"  FAILED {n}")
PY
log "full log: $dir/logs/e2e.log; JUnit: $junit"
exit "$rc"
