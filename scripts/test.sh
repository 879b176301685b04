#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine: installs the real tools the
# integration tests drive (docker-registry, containerd, skopeo, umoci, podman, dockerd, ...;
# binutils and ca-certificates for scripts/build-image.sh),
# then runs formatting and lint checks and every test. Run from anywhere; needs root for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(docker-registry skopeo containerd umoci busybox-static protobuf-compiler apache2-utils curl chromium podman buildah binutils ca-certificates)
# dockerd without its recommends (apparmor, needrestart, ...): the tests only pull with it.
bare_packages=(docker.io)
missing() {
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}
mapfile -t missing < <(missing "${packages[@]}")
mapfile -t missing_bare < <(missing "${bare_packages[@]}")
if ((${#missing[@]} + ${#missing_bare[@]})); then
  echo "installing: ${missing[*]} ${missing_bare[*]}"
  apt-get update -qq
  if ((${#missing[@]})); then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if ((${#missing_bare[@]})); then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing_bare[@]}" >/dev/null
  fi
fi

cargo fmt --all -- --check
# Lint the default build and the one with containerd's content store (feature
# kagami/containerd, which needs protoc): each has code the other does not compile.
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --workspace --all-targets --locked --features kagami/containerd -- -D warnings
# Snapshots are compared, never written, in the test run. The tests run with the feature
# on, so that the containerd scenario and the flags it adds are tested too.
INSTA_UPDATE=no cargo test --workspace --locked --features kagami/containerd
