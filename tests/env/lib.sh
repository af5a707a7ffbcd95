# Shared settings of the local stack scripts (sourced, not run).
# Machine-wide state lives in FLEETLET_DEV_DIR so that every worktree shares one stack.
FLEETLET_DEV_DIR=${FLEETLET_DEV_DIR:-/var/tmp/fleetlet-dev}
FLEETLET_CACHE_DIR=${FLEETLET_CACHE_DIR:-/var/cache/fleetlet}
ENV_SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
case $FLEETLET_DEV_DIR in /*) ;; *) FLEETLET_DEV_DIR=$PWD/$FLEETLET_DEV_DIR ;; esac
case $FLEETLET_CACHE_DIR in /*) ;; *) FLEETLET_CACHE_DIR=$PWD/$FLEETLET_CACHE_DIR ;; esac
export FLEETLET_DEV_DIR FLEETLET_CACHE_DIR

log() { printf '[env %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# The pinned versions, read from the Go module that pins them.
k8s_version() { awk '$1 == "k8s.io/kubernetes" || $2 == "k8s.io/kubernetes" { for (i=1;i<=NF;i++) if ($i ~ /^v1\./) { print $i; exit } }' "$ENV_SRC_DIR/k8s/go.mod"; }
etcd_version() { awk '$1 == "go.etcd.io/etcd/server/v3" { print $2; exit }' "$ENV_SRC_DIR/k8s/go.mod"; }

# Binaries are cached per machine under a key naming the versions plus a hash of the pins.
bin_dir() {
  local hash
  hash=$(cat "$ENV_SRC_DIR/k8s/go.mod" "$ENV_SRC_DIR/k8s/go.sum" | sha256sum | cut -c1-10)
  echo "$FLEETLET_CACHE_DIR/k8s-$(k8s_version)-etcd-$(etcd_version)-$hash/bin"
}

# metrics-server, built from its Go module (tests/env/build-metrics-server.sh).
METRICS_SERVER_VERSION=${FLEETLET_METRICS_SERVER_VERSION:-v0.8.0}
