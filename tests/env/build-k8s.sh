#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kubectl from the
# modules pinned in tests/env/k8s/go.mod, once per machine: the binaries are cached under
# $FLEETLET_CACHE_DIR keyed by version, so later runs return at once.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

out=$(bin_dir)
kver=$(k8s_version)
components=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl)
declare -A pkg=(
  [etcd]=go.etcd.io/etcd/server/v3
  [kube-apiserver]=k8s.io/kubernetes/cmd/kube-apiserver
  [kube-controller-manager]=k8s.io/kubernetes/cmd/kube-controller-manager
  [kube-scheduler]=k8s.io/kubernetes/cmd/kube-scheduler
  [kubectl]=k8s.io/kubernetes/cmd/kubectl
)

missing=()
for c in "${components[@]}"; do [ -x "$out/$c" ] || missing+=("$c"); done
if [ ${#missing[@]} -eq 0 ]; then
  echo "$out"
  exit 0
fi

command -v go >/dev/null || die "go is not installed"
mkdir -p "$out"
# One build at a time per machine: worktrees may run env-up concurrently.
exec 9>"$FLEETLET_CACHE_DIR/build.lock"
log "waiting for the build lock $FLEETLET_CACHE_DIR/build.lock"
flock 9

minor=${kver#v1.}; minor=${minor%%.*}
ldflags="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $p.gitVersion=$kver -X $p.gitMajor=1 -X $p.gitMinor=$minor"
  ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done

# The toolchain of the machine (no toolchain download), no VCS stamping of the build.
export GOTOOLCHAIN=local GOFLAGS=-buildvcs=false
cd "$ENV_SRC_DIR/k8s"
# Fetches only the modules these packages need (a plain `go mod download` would fetch the
# whole module graph of Kubernetes).
log "downloading the modules of ${missing[*]} (go list -deps)"
pkgs=()
for c in "${missing[@]}"; do pkgs+=("${pkg[$c]}"); done
go list -deps "${pkgs[@]}" >/dev/null
for c in "${missing[@]}"; do
  [ -x "$out/$c" ] && continue
  log "building $c from ${pkg[$c]} ($kver; etcd $(etcd_version)); cold builds take minutes"
  start=$SECONDS
  tmp="$out/.$c.tmp"
  # -v lists every package as it is compiled: shown as a running count for progress.
  nice -n 10 go build -p 2 -trimpath -ldflags "$ldflags" -v -o "$tmp" "${pkg[$c]}" 2>&1 |
    awk -v c="$c" '{ n++; if (n % 200 == 0) { printf "[env] %s: %d packages compiled\n", c, n; fflush() } }
                   /^(#|.*: )/ { print; fflush() }' >&2
  [ "${PIPESTATUS[0]}" -eq 0 ] || die "go build of $c failed"
  mv -f "$tmp" "$out/$c"
  log "built $c in $((SECONDS - start)) s"
done
echo "$out"
