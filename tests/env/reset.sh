#!/usr/bin/env bash
# Stops the local stack and deletes its state (PKI, etcd data, logs, Podman socket dir), so the
# next env-up starts from scratch. The cached Go binaries and the test image are kept.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
"$ENV_SRC_DIR/down.sh"
case $FLEETLET_DEV_DIR in
  / | "") die "refusing to delete FLEETLET_DEV_DIR=$FLEETLET_DEV_DIR" ;;
esac
rm -rf "$FLEETLET_DEV_DIR"
log "removed $FLEETLET_DEV_DIR"
