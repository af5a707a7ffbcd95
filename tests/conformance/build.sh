#!/usr/bin/env bash
# Builds the Kubernetes e2e test binary (`go test -c k8s.io/kubernetes/test/e2e`), its runner
# ginkgo and a static agnhost (with the porter's test certificate the agnhost image carries) from the modules pinned in tests/conformance/go.mod, once per machine: cached under
# $FLEETLET_CACHE_DIR keyed by version and a hash of the pins. Prints the directory holding them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/env/lib.sh
source "$here/../env/lib.sh"

kver=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" { print $3; exit } $1 == "k8s.io/kubernetes" && $2 ~ /^v1\./ { print $2; exit }' "$here/go.mod")
[ -n "$kver" ] || die "no k8s.io/kubernetes version in $here/go.mod"
hash=$(cat "$here/go.mod" "$here/go.sum" | sha256sum | cut -c1-10)
out="$FLEETLET_CACHE_DIR/e2e-$kver-$hash"
if [ -x "$out/e2e.test" ] && [ -x "$out/agnhost" ] && [ -x "$out/ginkgo" ] &&
  [ -f "$out/localhost.crt" ] && [ -f "$out/localhost.key" ]; then
  echo "$out"
  exit 0
fi

command -v go >/dev/null || { [ -x /usr/local/go/bin/go ] && export PATH=/usr/local/go/bin:$PATH; }
command -v go >/dev/null || die "go is not installed"
mkdir -p "$out"
# One Go build at a time per machine (shared with the stack's builds).
exec 9>"$FLEETLET_CACHE_DIR/build.lock"
log "waiting for the build lock $FLEETLET_CACHE_DIR/build.lock"
flock 9

export GOTOOLCHAIN=local GOFLAGS=-buildvcs=false
cd "$here"
minor=${kver#v1.}; minor=${minor%%.*}
ldflags="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $p.gitVersion=$kver -X $p.gitMajor=1 -X $p.gitMinor=$minor"
  ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done

if [ ! -x "$out/agnhost" ]; then
  # Static, so that it runs in an image holding nothing but it and busybox.
  log "building agnhost ($kver)"
  start=$SECONDS
  CGO_ENABLED=0 nice -n 10 go build -trimpath -ldflags "$ldflags" -o "$out/.agnhost.tmp" \
    k8s.io/kubernetes/test/images/agnhost || die "go build of agnhost failed"
  mv -f "$out/.agnhost.tmp" "$out/agnhost"
  log "built agnhost in $((SECONDS - start)) s"
fi
if [ ! -f "$out/localhost.crt" ] || [ ! -f "$out/localhost.key" ]; then
  # The upstream agnhost image carries the porter's test certificate at / (HTTPS lifecycle hook
  # tests serve with `netexec --tls-cert-file /localhost.crt`): the files from the same module.
  kdir=$(GOPROXY=off go list -m -f '{{.Dir}}' k8s.io/kubernetes) || die "k8s.io/kubernetes is not in the module cache"
  for f in localhost.crt localhost.key; do
    install -m 0644 "$kdir/test/images/agnhost/porter/$f" "$out/.$f.tmp"
    mv -f "$out/.$f.tmp" "$out/$f"
  done
fi
if [ ! -x "$out/ginkgo" ]; then
  log "building ginkgo (the suite's runner, at the version the suite uses)"
  nice -n 10 go build -trimpath -o "$out/.ginkgo.tmp" github.com/onsi/ginkgo/v2/ginkgo ||
    die "go build of ginkgo failed"
  mv -f "$out/.ginkgo.tmp" "$out/ginkgo"
fi
if [ ! -x "$out/e2e.test" ]; then
  log "building e2e.test ($kver); a cold build takes many minutes"
  start=$SECONDS
  nice -n 10 go test -c -trimpath -ldflags "$ldflags" -o "$out/.e2e.test.tmp" \
    k8s.io/kubernetes/test/e2e || die "go test -c of test/e2e failed"
  mv -f "$out/.e2e.test.tmp" "$out/e2e.test"
  log "built e2e.test in $((SECONDS - start)) s"
fi
echo "$out"
