#!/usr/bin/env bash
# Runs the OCI distribution-spec conformance suite (pull and content discovery) against
# kagami as a mirror of a docker-registry, and in the same run against docker-registry's
# own pull-through mode, on loopback. The suite is not part of kagami: build it from
# opencontainers/distribution-spec (folder conformance/, `go test -c`) and pass the binary.
#
#   scripts/conformance.sh /path/to/conformance.test [kagami binary]
#
# Prints the suite's summary for each server; reports go to $OUT (default
# /tmp/kagami-conformance). docs/CONFORMANCE.md has the last result and explains each
# failure.
set -euo pipefail
suite=$(realpath "$1")
cd "$(dirname "$0")/.."
kagami=${2:-target/release/kagami}
[ -x "$kagami" ] || cargo build --release -p kagami
kagami=$(realpath "$kagami")
. bench/lib.sh
OUT=${OUT:-/tmp/kagami-conformance}
rm -rf "$OUT" && mkdir -p "$OUT"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

origin_port=$(port)
start_registry "$OUT/origin" "$origin_port" true
origin=127.0.0.1:$origin_port

# A small image under several tags (mixed case and order the registry does not sort).
work=$OUT/image && mkdir -p "$work" && cd "$work"
umoci init --layout oci >/dev/null
umoci new --image oci:img >/dev/null
head -c 4096 /dev/urandom >f.bin
umoci insert --image oci:img f.bin /f.bin >/dev/null
umoci config --image oci:img --architecture amd64 --os linux --config.cmd /f.bin >/dev/null
tags=(v1 v2 alpha Beta)
for t in "${tags[@]}"; do
  skopeo copy --quiet --dest-tls-verify=false oci:oci:img "docker://$origin/myorg/myrepo:$t"
done
cd - >/dev/null
accept=application/vnd.oci.image.manifest.v1+json
manifest_digest=$(curl -sfI -H "Accept: $accept" "http://$origin/v2/myorg/myrepo/manifests/v1" |
  tr -d '\r' | awk 'tolower($1)=="docker-content-digest:" {print $2}')
config_digest=$(curl -sf -H "Accept: $accept" "http://$origin/v2/myorg/myrepo/manifests/v1" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["config"]["digest"])')

kagami_port=$(port)
cat >"$OUT/registries.yaml" <<YAML
mirrors:
  registry.example.test:
    endpoint: ["http://$origin"]
YAML
"$kagami" serve --listen "127.0.0.1:$kagami_port" --data-dir "$OUT/kagami-data" \
  --config "$OUT/registries.yaml" --disable-default-registry-endpoint >"$OUT/kagami.log" 2>&1 &
PIDS+=($!)
proxy_port=$(port)
mkdir -p "$OUT/proxy"
cat >"$OUT/proxy/config.yml" <<YAML
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $OUT/proxy/data
http:
  addr: 127.0.0.1:$proxy_port
health:
  storagedriver:
    enabled: false
proxy:
  remoteurl: http://$origin
YAML
docker-registry serve "$OUT/proxy/config.yml" >"$OUT/proxy/log" 2>&1 &
PIDS+=($!)
for p in "$kagami_port" "$proxy_port"; do
  for _ in $(seq 200); do curl -s -o /dev/null "http://127.0.0.1:$p/v2/" && break; sleep 0.05; done
done

run_suite() {
  local name=$1 url=$2 namespace=$3
  mkdir -p "$OUT/$name"
  echo "== $name: $url, namespace $namespace"
  (
    cd "$OUT/$name"
    OCI_ROOT_URL=$url OCI_NAMESPACE=$namespace OCI_CROSSMOUNT_NAMESPACE=$namespace-other \
      OCI_TEST_PULL=1 OCI_TEST_CONTENT_DISCOVERY=1 OCI_TEST_PUSH=0 OCI_TEST_CONTENT_MANAGEMENT=0 \
      OCI_TAG_NAME=v1 OCI_MANIFEST_DIGEST=$manifest_digest OCI_BLOB_DIGEST=$config_digest \
      OCI_TAG_LIST=$(IFS=,; echo "${tags[*]}") OCI_REPORT_DIR=$OUT/$name OCI_HIDE_SKIPPED_WORKFLOWS=0 \
      "$suite" -test.v -ginkgo.no-color >"$OUT/$name/output.txt" 2>&1 || true
  )
  grep -E "^(Ran|FAIL|PASS|SUCCESS)|Passed|Failed" "$OUT/$name/output.txt" | tail -4
  grep -E "^\s*\[FAIL\]" "$OUT/$name/output.txt" | sort -u || true
}
run_suite kagami "http://127.0.0.1:$kagami_port" registry.example.test/myorg/myrepo
run_suite docker-registry-proxy "http://127.0.0.1:$proxy_port" myorg/myrepo
