#!/usr/bin/env bash
# Stops every process of the local stack that tests/env/up.sh started (by pidfile).
# Data (PKI, etcd data, logs, the cached binaries and the test image) stays for a fast restart;
# tests/env/reset.sh removes the state as well.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
source "$ENV_SRC_DIR/daemons.sh"
source "$ENV_SRC_DIR/journald.sh"
source "$ENV_SRC_DIR/podman.sh"
source "$ENV_SRC_DIR/k8s.sh"
source "$ENV_SRC_DIR/metrics-server.sh"
source "$ENV_SRC_DIR/flightctl.sh"

[ -d "$FLEETLET_DEV_DIR" ] || exit 0
exec 8>"$FLEETLET_DEV_DIR/up.lock"
flock 8
down_flightctl
down_metrics_server
down_k8s
down_podman
down_journald
left=$(CONTAINERS_CONF=$PODMAN_CONF podman ps -q 2>/dev/null | wc -l || true)
if [ "${left:-0}" != 0 ]; then
  log "note: $left Podman container(s) still run (tests should remove theirs): podman ps"
fi
log "stack stopped"
