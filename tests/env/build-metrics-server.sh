#!/usr/bin/env bash
# Builds metrics-server from its Go module (sigs.k8s.io/metrics-server, the version below, with
# the dependencies its own go.mod pins), once per machine: the binary is cached under
# $FLEETLET_CACHE_DIR keyed by version and Go version, so later runs return at once.
# Prints the binary's path.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

version=$METRICS_SERVER_VERSION
command -v go >/dev/null || die "go is not installed"
gover=$(GOTOOLCHAIN=local go env GOVERSION)
out="$FLEETLET_CACHE_DIR/metrics-server-$version-$gover/bin"
if [ -x "$out/metrics-server" ]; then
  echo "$out/metrics-server"
  exit 0
fi
mkdir -p "$out" "$FLEETLET_CACHE_DIR"
exec 9>"$FLEETLET_CACHE_DIR/build.lock"
log "waiting for the build lock $FLEETLET_CACHE_DIR/build.lock"
flock 9
if [ ! -x "$out/metrics-server" ]; then
  log "building metrics-server $version with $gover; a cold build takes minutes"
  start=$SECONDS
  tmp=$(mktemp -d "$out/.build.XXXXXX")
  # `go install pkg@version` builds with the module's own go.mod (no local module involved).
  GOTOOLCHAIN=local GOFLAGS=-buildvcs=false GOBIN="$tmp" nice -n 10 \
    go install -p 2 -trimpath -ldflags "-s -w" \
    "sigs.k8s.io/metrics-server/cmd/metrics-server@$version" ||
    { rm -rf "$tmp"; die "go install of metrics-server $version failed"; }
  mv -f "$tmp/metrics-server" "$out/metrics-server"
  rm -rf "$tmp"
  log "built metrics-server in $((SECONDS - start)) s"
fi
echo "$out/metrics-server"
