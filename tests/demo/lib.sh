# Shared by demo.sh and demo-down.sh: paths and names of the demo.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEMO=$ROOT/target/demo
DEMO_DEVICES=(demo-a1 demo-a2 demo-b1)
DEMO_NAMESPACE=fleetlet-demo
DEMO_MANIFEST=$ROOT/examples/demo-deployment.yaml
# Loopback ports of the hub: agent link (mTLS), kubelet API (logs/exec), ops (health, metrics).
DEMO_LINK_PORT=${FLEETLET_DEMO_LINK_PORT:-17443}
DEMO_KUBELET_PORT=${FLEETLET_DEMO_KUBELET_PORT:-17450}
DEMO_OPS_PORT=${FLEETLET_DEMO_OPS_PORT:-17480}

say() { printf '==> %s\n' "$*"; }

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

# Stops the process of pidfile $1 if it still runs the executable recorded next to the pid.
stop_pidfile() {
    local file=$1 pid exe i
    [[ -f $file ]] || return 0
    read -r pid exe < "$file" || true
    if [[ -n ${pid:-} && -e /proc/$pid && "$(readlink "/proc/$pid/exe" 2>/dev/null)" == "$exe" ]]; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            # Gone, or a zombie (no executable) waiting to be reaped.
            readlink "/proc/$pid/exe" > /dev/null 2>&1 || break
            sleep 0.1
        done
        if readlink "/proc/$pid/exe" > /dev/null 2>&1; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$file"
}
