#!/usr/bin/env bash
# Builds the agent's .deb (cargo-deb) and .rpm (cargo-generate-rpm) into target/package.
# The .rpm is signed with $FLEETLET_RPM_SIGNING_KEY (an armored PGP secret key); without one,
# a throwaway key is made for this build so the signature path is exercised like a release.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/package
mkdir -p "$out"
rm -f "$out"/*.deb "$out"/*.rpm

cargo build --release -p fleetlet-agent
cargo deb -p fleetlet-agent --no-build -o "$out"

key=${FLEETLET_RPM_SIGNING_KEY:-}
if [ -z "$key" ]; then
  key="$out/test-signing-key.asc"
  if [ ! -s "$key" ]; then
    gnupg=$(mktemp -d)
    trap 'rm -rf "$gnupg"' EXIT
    GNUPGHOME=$gnupg gpg --batch --quiet --passphrase '' \
      --quick-gen-key 'fleetlet package test key <fleetlet@example.invalid>' rsa3072 sign 7d
    GNUPGHOME=$gnupg gpg --batch --armor --export-secret-keys > "$key.tmp"
    GNUPGHOME=$gnupg gpg --batch --armor --export > "$out/test-signing-key.pub"
    chmod 0600 "$key.tmp"
    mv "$key.tmp" "$key"
  fi
fi
cargo generate-rpm -p agent -o "$out/" --signing-key "$key"
ls -l "$out"/*.deb "$out"/*.rpm
