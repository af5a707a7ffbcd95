#!/usr/bin/env bash
# Installs what `make package` and packaging/check.sh need on a fresh machine: lintian, rpmlint,
# rpm and gnupg from Debian, and cargo-deb / cargo-generate-rpm at pinned versions from
# crates.io (built once per machine; ~/.cargo/bin keeps them). Does nothing when all is there.
set -euo pipefail

CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1

apt_packages=(lintian rpmlint rpm gnupg dpkg-dev file)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "packaging: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# `cargo install --list` names each installed crate with its version.
installed=$(cargo install --list)
if ! grep -q "^cargo-deb v${CARGO_DEB_VERSION}:" <<<"$installed"; then
  echo "packaging: building cargo-deb ${CARGO_DEB_VERSION} (once per machine)"
  cargo install --locked "cargo-deb@${CARGO_DEB_VERSION}"
fi
if ! grep -q "^cargo-generate-rpm v${CARGO_GENERATE_RPM_VERSION}:" <<<"$installed"; then
  echo "packaging: building cargo-generate-rpm ${CARGO_GENERATE_RPM_VERSION} (once per machine)"
  cargo install --locked "cargo-generate-rpm@${CARGO_GENERATE_RPM_VERSION}"
fi
