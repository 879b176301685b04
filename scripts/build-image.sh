#!/usr/bin/env bash
# Builds kagami's container image as an OCI archive (.tar) from the local binary, with no
# base image and no network: the image holds /kagami (stripped), the shared libraries it
# loads (from ldd), the CA certificates and a minimal /etc. Reproducible: the same binary
# and SOURCE_DATE_EPOCH give the same bytes, hence the same manifest digest.
#
#   scripts/build-image.sh [OUT.tar]
#
# Environment:
#   KAGAMI_BIN         the binary to package; unset: `cargo build --release --locked
#                      --features containerd -p kagami` (needs protoc) and its output
#   IMAGE_NAME         the name recorded in the archive (default localhost/kagami:VERSION)
#   SOURCE_DATE_EPOCH  the timestamp of the config and of every file (default: the last
#                      commit's time, or 0 outside git)
#   CA_BUNDLE          the CA certificates (default /etc/ssl/certs/ca-certificates.crt)
#
# Prints the manifest digest on the last line of stdout. Load the archive into a node's
# containerd with `ctr -n k8s.io images import OUT.tar` (docs/deployment.md).
set -euo pipefail
export LC_ALL=C
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$repo/target/image/kagami.tar}"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n1)"
name="${IMAGE_NAME:-localhost/kagami:${version:-0.0.0}}"
ca="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
if [[ -z "${SOURCE_DATE_EPOCH:-}" ]]; then
  SOURCE_DATE_EPOCH="$(git -C "$repo" log -1 --format=%ct 2>/dev/null || echo 0)"
fi
epoch="$SOURCE_DATE_EPOCH"
created="$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)"

for tool in tar gzip sha256sum ldd strip; do
  command -v "$tool" >/dev/null || { echo "build-image.sh: $tool is not installed" >&2; exit 1; }
done
[[ -f "$ca" ]] || { echo "build-image.sh: no CA bundle at $ca (install ca-certificates or set CA_BUNDLE)" >&2; exit 1; }

bin="${KAGAMI_BIN:-}"
if [[ -z "$bin" ]]; then
  (cd "$repo" && cargo build --release --locked --features containerd -p kagami >&2)
  bin="${CARGO_TARGET_DIR:-$repo/target}/release/kagami"
fi
[[ -x "$bin" ]] || { echo "build-image.sh: KAGAMI_BIN=$bin is not an executable" >&2; exit 1; }

case "$(uname -m)" in
  x86_64) arch=amd64 ;;
  aarch64) arch=arm64 ;;
  *) arch="$(uname -m)" ;;
esac

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root/etc/ssl/certs" "$root/tmp"

strip -o "$root/kagami" "$bin"
chmod 0755 "$root/kagami"
# Every shared library the binary loads, at the path the dynamic loader looks for it
# (symbolic links resolved: the file itself at the link's path).
ldd "$bin" | awk '/=> \//{print $3} /^[[:space:]]*\//{print $1}' | sort -u | while read -r lib; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
  chmod 0755 "$root$lib"
done
cp -L "$ca" "$root/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/:/kagami\nnobody:x:65534:65534:nobody:/:/kagami\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
chmod 1777 "$root/tmp"

# Fixed order, times, owners and modes; no atime/ctime; gzip without name or time.
tarflags=(--sort=name --format=gnu --mtime="@$epoch" --owner=0 --group=0 --numeric-owner)
layer="$work/layer.tar"
(cd "$root" && find . -mindepth 1 -maxdepth 1 -printf '%P\n' | sort | tar "${tarflags[@]}" -cf "$layer" -T -)
diff_id="sha256:$(sha256sum "$layer" | cut -d' ' -f1)"
gzip -n -9 "$layer"
layer="$layer.gz"

layout="$work/layout"
mkdir -p "$layout/blobs/sha256"
# Stores a file as a blob; prints "DIGEST SIZE".
blob() {
  local d
  d="$(sha256sum "$1" | cut -d' ' -f1)"
  mv "$1" "$layout/blobs/sha256/$d"
  echo "sha256:$d $(stat -c %s "$layout/blobs/sha256/$d")"
}
read -r layer_digest layer_size < <(blob "$layer")

printf '%s' "{\"architecture\":\"$arch\",\"config\":{\"Cmd\":[\"serve\"],\"Entrypoint\":[\"/kagami\"],\"Env\":[\"PATH=/\",\"SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt\"],\"Labels\":{\"org.opencontainers.image.title\":\"kagami\",\"org.opencontainers.image.version\":\"$version\"},\"WorkingDir\":\"/\"},\"created\":\"$created\",\"history\":[{\"created\":\"$created\",\"created_by\":\"scripts/build-image.sh\"}],\"os\":\"linux\",\"rootfs\":{\"diff_ids\":[\"$diff_id\"],\"type\":\"layers\"}}" >"$work/config.json"
read -r config_digest config_size < <(blob "$work/config.json")

printf '%s' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"$config_digest\",\"size\":$config_size},\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"$layer_digest\",\"size\":$layer_size}],\"annotations\":{\"org.opencontainers.image.created\":\"$created\",\"org.opencontainers.image.version\":\"$version\"}}" >"$work/manifest.json"
read -r manifest_digest manifest_size < <(blob "$work/manifest.json")

tag="${name##*:}"
[[ "$name" == *:* && "$tag" != */* ]] || tag=latest
printf '%s' "{\"schemaVersion\":2,\"manifests\":[{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"$manifest_digest\",\"size\":$manifest_size,\"platform\":{\"architecture\":\"$arch\",\"os\":\"linux\"},\"annotations\":{\"io.containerd.image.name\":\"$name\",\"org.opencontainers.image.ref.name\":\"$tag\"}}]}" >"$layout/index.json"
printf '%s' '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"

mkdir -p "$(dirname "$out")"
(cd "$layout" && find . -mindepth 1 -printf '%P\n' | sort | tar "${tarflags[@]}" --no-recursion -cf "$work/image.tar" -T -)
mv "$work/image.tar" "$out"

echo "image: $name ($arch)" >&2
echo "archive: $out ($(stat -c %s "$out") bytes; layer $layer_size bytes compressed)" >&2
echo "$manifest_digest"
