# Shared by demo.sh, demo-down.sh and device.sh: paths and names of the demo, starting and
# stopping its processes.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=tests/env/proc.sh
source "$ROOT/tests/env/proc.sh"
# Everything below can be renamed through the environment, so that a test (hub/tests/quickstart.rs)
# runs a demo of its own next to a user's: FLEETLET_DEMO_DIR, FLEETLET_DEMO_NAME (device name
# prefix, hub instance, namespace fleetlet-NAME), FLEETLET_DEMO_FLEET_A/_B, the ports below and
# FLEETLET_DEMO_BIN (prebuilt binaries: no build).
DEMO=${FLEETLET_DEMO_DIR:-$ROOT/target/demo}
case $DEMO in /*) ;; *) DEMO=$PWD/$DEMO ;; esac
DEMO_NAME=${FLEETLET_DEMO_NAME:-demo}
DEMO_FLEET_A=${FLEETLET_DEMO_FLEET_A:-a}
DEMO_FLEET_B=${FLEETLET_DEMO_FLEET_B:-b}
# Flightctl names an enrolled device by its fingerprint, and its device-svc-client signer takes
# the fingerprint from the certificate's common name after its last "-" and requires at least 16
# characters: device (and Node) names are long and have dots where the demo's name has hyphens.
DEMO_DEVICE_BASE=${DEMO_NAME//-/.}.edge.device
DEMO_DEVICES=("$DEMO_DEVICE_BASE.a1" "$DEMO_DEVICE_BASE.a2" "$DEMO_DEVICE_BASE.b1")
# Flightctl labels of the demo's devices: which demo a device belongs to (the hub's
# enabled_selector) and its fleet (the selector of the Flightctl Fleets a and b).
DEMO_LABEL=fleetlet.io/demo
DEMO_FLEET_LABEL=fleetlet.io/demo-fleet
DEMO_NAMESPACE=fleetlet-$DEMO_NAME
DEMO_MANIFEST=$ROOT/examples/demo-deployment.yaml
if [[ ! $DEMO_NAME =~ ^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$ || ! $DEMO_FLEET_A =~ ^[a-z0-9-]+$ || ! $DEMO_FLEET_B =~ ^[a-z0-9-]+$ ]]; then
    echo "FLEETLET_DEMO_NAME ($DEMO_NAME) and FLEETLET_DEMO_FLEET_A/_B ($DEMO_FLEET_A, $DEMO_FLEET_B) must be lowercase DNS labels" >&2
    exit 64
fi
# Loopback ports of the hub: agent link (mTLS), kubelet API (logs/exec), ops (health, metrics).
DEMO_LINK_PORT=${FLEETLET_DEMO_LINK_PORT:-17443}
DEMO_KUBELET_PORT=${FLEETLET_DEMO_KUBELET_PORT:-17450}
DEMO_OPS_PORT=${FLEETLET_DEMO_OPS_PORT:-17480}
# The device managed by the real flightctl-agent (its name is its key's fingerprint, known once
# it asked to enroll: demo_fa_device); its test root holds everything it writes.
DEMO_FA=$DEMO/flightctl-agent
DEMO_FA_ROOT=$DEMO_FA/root
# The binaries demo.sh builds (or finds in FLEETLET_DEMO_BIN).
DEMO_BIN=${FLEETLET_DEMO_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug}
HUB=$DEMO_BIN/fleetlet-hub
AGENT=$DEMO_BIN/fleetlet-agent
# journald's native socket: when it is there (the local stack runs journald), the demo agents log
# to the journal like an installed agent does, and a copy goes to their file in target/demo/logs.
JOURNAL_SOCKET=/run/systemd/journal/socket

say() { printf '==> %s\n' "$*"; }

# fc_api METHOD PATH [CURL ARGS...]: a request to the stack's Flightctl API as flightctl-admin
# (body type FC_CONTENT_TYPE, default application/json).
fc_api() {
    local method=$1 path=$2
    shift 2
    curl -sS --fail-with-body --max-time 30 --cacert "$FLIGHTCTL_CA_FILE" \
        -H "Authorization: Bearer $(cat "$FLIGHTCTL_ADMIN_TOKEN_FILE")" -H "Content-Type: ${FC_CONTENT_TYPE:-application/json}" \
        -X "$method" "$FLIGHTCTL_API_URL$path" "$@"
}

# The flightctl CLI of the stack, logged in as flightctl-admin.
flightctl_cli() { "$FLIGHTCTL_BIN_DIR/flightctl" --config-dir "$FLIGHTCTL_CLI_CONFIG_DIR" "$@"; }

# demo_fa_device: the name of the flightctl-agent's device, once it asked to enroll: recorded by
# demo.sh, else the enrollment id in its banner (which the agent rewrites once enrolled).
demo_fa_device() {
    if [[ -s $DEMO_FA/device-name ]]; then
        cat "$DEMO_FA/device-name"
        return
    fi
    sed -n 's#.*/enroll/\([A-Za-z0-9]*\).*#\1#p' "$DEMO_FA_ROOT/etc/issue.d/flightctl-banner.issue" 2> /dev/null | head -n 1 || true
}

# demo_fleet_of DEVICE: the demo fleet a device starts in (a1, a2: fleet a; b1: fleet b).
demo_fleet_of() { [[ $1 == *.b1 ]] && echo "$DEMO_FLEET_B" || echo "$DEMO_FLEET_A"; }

# The stack's environment (KUBECONFIG, FLEETLET_KUBECTL, FLEETLET_PODMAN_SOCKET, ...).
load_env() {
    if [[ ! -f $ROOT/target/dev/env ]]; then
        echo "target/dev/env missing: run make env-up" >&2
        return 1
    fi
    # shellcheck disable=SC1091
    source "$ROOT/target/dev/env"
    KUBECTL=("$FLEETLET_KUBECTL" --kubeconfig "$KUBECONFIG")
    PODMAN=(podman --url "unix://$FLEETLET_PODMAN_SOCKET")
}

# demo_start NAME EXE ARGS...: a background process in its own session that outlives make, its
# output in target/demo/logs/NAME.log (appended: a restarted agent keeps its history). The
# pidfile records pid and start time (tests/env/proc.sh), so demo-down stops exactly this
# process even after a rebuild of EXE, and never a recycled pid.
demo_start() {
    local name=$1 exe=$2
    shift 2
    mkdir -p "$DEMO/run" "$DEMO/logs"
    printf '==== %s starting at %(%FT%TZ)T ====\n' "$name" -1 >> "$DEMO/logs/$name.log"
    # From / so that no process keeps the checkout as its working directory.
    (cd / && RUST_LOG=${RUST_LOG:-info} NO_COLOR=1 exec setsid "$exe" "$@" >> "$DEMO/logs/$name.log" 2>&1 < /dev/null) &
    pidfile_write "$DEMO/run/$name.pid" "$!" "$exe"
}

# demo_agent_start DEVICE: starts the agent of one demo device from its configuration.
demo_agent_start() {
    local d=$1 log=stderr
    [[ -S $JOURNAL_SOCKET ]] && log=journald+stderr
    FLEETLET_AGENT_LOG=$log demo_start "agent-$d" "$AGENT" --config "$DEMO/agent-$d.toml" run
}

# demo_running NAME: the process of pidfile NAME still runs.
demo_running() { pidfile_pid "$DEMO/run/$1.pid" > /dev/null; }

# demo_stop NAME: stops the process of pidfile NAME (SIGTERM, SIGKILL after 5 s).
demo_stop() { pidfile_stop "$DEMO/run/$1.pid" 50 > /dev/null; }

# demo_is_device NAME: NAME is one of the demo's devices.
demo_is_device() {
    local d
    for d in "${DEMO_DEVICES[@]}"; do [[ $d == "$1" ]] && return 0; done
    return 1
}

# demo_wait_node DEVICE SECONDS: waits until the Node is Ready without a not-ready/unreachable
# taint; returns 1 after SECONDS, or at once (2) when a pidfile's process has exited.
demo_wait_node() {
    local d=$1 limit=$2 i ready taints f
    for ((i = 0; i < limit; i++)); do
        ready=$("${KUBECTL[@]}" get node "$d" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2> /dev/null || true)
        taints=$("${KUBECTL[@]}" get node "$d" -o 'jsonpath={.spec.taints[*].key}' 2> /dev/null || true)
        if [[ $ready == True && $taints != *node.kubernetes.io/* ]]; then
            return 0
        fi
        for f in "$DEMO"/run/*.pid; do
            [[ -e $f ]] || continue
            demo_running "$(basename "$f" .pid)" || { DEMO_EXITED=$(basename "$f" .pid); return 2; }
        done
        sleep 1
    done
    return 1
}
