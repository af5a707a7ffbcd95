#!/usr/bin/env bash
# Builds flightctl-api, flightctl-worker, flightctl-periodic, flightctl-db-migrate and the
# flightctl CLI from the release pinned in tests/env/flightctl/go.mod, once per machine: the
# binaries are cached under $FLEETLET_CACHE_DIR keyed by version and a hash of the pins.
# Prints the binary directory on stdout; progress goes to stderr.
set -euo pipefail
source "$(dirname "$0")/../lib.sh"
source "$ENV_SRC_DIR/flightctl/lib.sh"

out=$(flightctl_bin_dir)
ver=$(flightctl_version)
commands=(flightctl-api flightctl-worker flightctl-periodic flightctl-db-migrate flightctl)

missing=0
for c in "${commands[@]}"; do [ -x "$out/$c" ] || missing=1; done
if [ $missing = 0 ]; then
  echo "$out"
  exit 0
fi

command -v go >/dev/null || die "go is not installed"
mkdir -p "$out"
# One Flightctl build at a time per machine (worktrees may run env-up concurrently); a lock of
# its own so that a long Flightctl build does not hold up the Kubernetes one.
exec 9>"$FLEETLET_CACHE_DIR/flightctl-build.lock"
log "waiting for the build lock $FLEETLET_CACHE_DIR/flightctl-build.lock"
flock 9

cd "$ENV_SRC_DIR/flightctl"
log "downloading modules for Flightctl $ver (go mod download)"
go mod download
commit=$(go list -m -json "github.com/flightctl/flightctl@$ver" | awk -F'"' '$2 == "Hash" { print $4; exit }')
IFS=. read -r major minor patch <<< "${ver#v}"
p=github.com/flightctl/flightctl/pkg/version
ldflags="-s -w -X $p.majorFromGit=$major -X $p.minorFromGit=$minor -X $p.patchFromGit=$patch"
ldflags+=" -X $p.versionFromGit=$ver -X $p.commitFromGit=$commit -X $p.gitTreeState=clean"
ldflags+=" -X $p.buildDate=19700101"

pkgs=()
for c in "${commands[@]}"; do pkgs+=("github.com/flightctl/flightctl/cmd/$c"); done
log "building ${commands[*]} (Flightctl $ver); a cold build takes many minutes on 2 cores"
start=$SECONDS
tmp=$(mktemp -d "$out/.build.XXXXXX")
# Upstream builds these without cgo. One `go build` for all commands shares the compiled packages;
# -v lists every package as it is compiled: shown as a running count for progress.
CGO_ENABLED=0 nice -n 10 go build -p 2 -trimpath -ldflags "$ldflags" -v -o "$tmp/" "${pkgs[@]}" 2>&1 |
  awk '{ n++; if (n % 200 == 0) { printf "[env] flightctl: %d packages compiled\n", n; fflush() } }
       /^(#|.*: )/ { print; fflush() }' >&2
[ "${PIPESTATUS[0]}" -eq 0 ] || { rm -rf "$tmp"; die "go build of Flightctl $ver failed"; }
for c in "${commands[@]}"; do mv -f "$tmp/$c" "$out/$c"; done
rmdir "$tmp"
log "built Flightctl $ver in $((SECONDS - start)) s"
echo "$out"
