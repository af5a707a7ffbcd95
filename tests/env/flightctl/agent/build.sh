#!/usr/bin/env bash
# Builds Flightctl's device side from the release pinned in tests/env/flightctl/agent/go.mod (the
# server's release, ../go.mod): the real flightctl-agent and Flightctl's device simulator
# (devicesimulator, many in-process flightctl-agents). Once per machine: the binaries are cached
# under $FLEETLET_CACHE_DIR keyed by version and a hash of the pins. Prints the binary directory
# on stdout; progress goes to stderr.
set -euo pipefail
source "$(dirname "$0")/../../lib.sh"

mod=$ENV_SRC_DIR/flightctl/agent
ver=$(awk '$1 == "require" && $2 == "github.com/flightctl/flightctl" { print $3; exit }' "$mod/go.mod")
[ "$ver" = "$(awk '$1 == "require" && $2 == "github.com/flightctl/flightctl" { print $3; exit }' "$ENV_SRC_DIR/flightctl/go.mod")" ] ||
  die "tests/env/flightctl/agent/go.mod pins Flightctl $ver, not the server's release"
hash=$(cat "$mod/go.mod" "$mod/go.sum" | sha256sum | cut -c1-10)
out=$FLEETLET_CACHE_DIR/flightctl-device-$ver-$hash/bin
commands=(flightctl-agent devicesimulator)

missing=0
for c in "${commands[@]}"; do [ -x "$out/$c" ] || missing=1; done
if [ $missing = 0 ]; then
  echo "$out"
  exit 0
fi

command -v go >/dev/null || die "go is not installed"
mkdir -p "$out"
# The same lock as the server's build: both compile most of Flightctl's packages.
exec 9>"$FLEETLET_CACHE_DIR/flightctl-build.lock"
log "waiting for the build lock $FLEETLET_CACHE_DIR/flightctl-build.lock"
flock 9

cd "$mod"
log "downloading modules for Flightctl $ver's device side (go mod download)"
go mod download
commit=$(go list -m -json "github.com/flightctl/flightctl@$ver" | awk -F'"' '$2 == "Hash" { print $4; exit }')
IFS=. read -r major minor patch <<< "${ver#v}"
p=github.com/flightctl/flightctl/pkg/version
ldflags="-s -w -X $p.majorFromGit=$major -X $p.minorFromGit=$minor -X $p.patchFromGit=$patch"
ldflags+=" -X $p.versionFromGit=$ver -X $p.commitFromGit=$commit -X $p.gitTreeState=clean"
ldflags+=" -X $p.buildDate=19700101"
pkgs=()
for c in "${commands[@]}"; do pkgs+=("github.com/flightctl/flightctl/cmd/$c"); done
log "building ${commands[*]} (Flightctl $ver)"
start=$SECONDS
tmp=$(mktemp -d "$out/.build.XXXXXX")
# Upstream builds the agent without cgo as well.
CGO_ENABLED=0 nice -n 10 go build -p 2 -trimpath -ldflags "$ldflags" -o "$tmp/" "${pkgs[@]}" >&2 ||
  { rm -rf "$tmp"; die "go build of Flightctl $ver's device side failed"; }
for c in "${commands[@]}"; do mv -f "$tmp/$c" "$out/$c"; done
rmdir "$tmp"
log "built Flightctl $ver's device side in $((SECONDS - start)) s"
echo "$out"
