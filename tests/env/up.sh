#!/usr/bin/env bash
# Brings up the local stack (or reuses the running one) and writes OUT_DIR/env and
# OUT_DIR/kubeconfig for a checkout.
#   usage: tests/env/up.sh [--out DIR] [COMPONENT...]   components: journald podman k8s metrics flightctl (default all)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
source "$ENV_SRC_DIR/daemons.sh"
source "$ENV_SRC_DIR/journald.sh"
source "$ENV_SRC_DIR/podman.sh"
source "$ENV_SRC_DIR/k8s.sh"
source "$ENV_SRC_DIR/metrics-server.sh"
source "$ENV_SRC_DIR/flightctl.sh"

out=""
components=()
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    journald | podman | k8s | metrics | flightctl) components+=("$1"); shift ;;
    *) die "unknown argument $1 (usage: up.sh [--out DIR] [journald|podman|k8s|metrics|flightctl]...)" ;;
  esac
done
[ ${#components[@]} -gt 0 ] || components=(journald podman k8s metrics flightctl)

mkdir -p "$FLEETLET_DEV_DIR"
chmod 0755 "$FLEETLET_DEV_DIR"
# One env-up at a time per machine (worktrees share the stack).
exec 8>"$FLEETLET_DEV_DIR/up.lock"
flock 8

start=$SECONDS
if ! command -v go >/dev/null && [ -x /usr/local/go/bin/go ]; then
  export PATH=/usr/local/go/bin:$PATH
fi
"$ENV_SRC_DIR/install-deps.sh"
for c in "${components[@]}"; do
  case $c in metrics) up_metrics_server ;; *) "up_$c" ;; esac
done

write_env() {
  local dir=$1 f
  mkdir -p "$dir"
  f=$(mktemp "$dir/.env.XXXXXX")
  {
    echo "# Written by tests/env/up.sh; source it to reach the local stack."
    echo "export FLEETLET_DEV_DIR=$FLEETLET_DEV_DIR"
    echo "export FLEETLET_LOG_DIR=$LOG_DIR"
    echo "export FLEETLET_PODMAN_SOCKET=$PODMAN_SOCKET"
    echo "export CONTAINERS_CONF=$PODMAN_CONF"
    echo "export FLEETLET_TEST_IMAGE=$TEST_IMAGE"
    if [ -n "${K8S_BIN:-}" ]; then
      echo "export KUBECONFIG=$dir/kubeconfig"
      k8s_env_lines
    fi
    [ -z "${FLIGHTCTL_BIN:-}" ] || flightctl_env_lines
  } > "$f"
  chmod 0644 "$f"
  mv -f "$f" "$dir/env"
  if [ -n "${K8S_BIN:-}" ]; then
    install -m 0600 "$K8S_DIR/kubeconfig" "$dir/kubeconfig"
  fi
}

# The machine-wide copy, then the checkout's.
write_env "$FLEETLET_DEV_DIR"
[ -z "$out" ] || write_env "$out"
log "stack ready in $((SECONDS - start)) s: source ${out:-$FLEETLET_DEV_DIR}/env"
