#!/usr/bin/env bash
# kagami pull vs skopeo copy vs curl, in the same run, on loopback.
#
#   bench/pull.sh             # builds kagami (release) and prints the figures
#   RUNS=5 SIZE_MB=100 bench/pull.sh
#
# Builds a single-layer image of SIZE_MB random bytes with umoci, pushes it to a
# docker-registry on 127.0.0.1, then times (RUNS runs each, medians):
#   curl    GET of the layer blob into a file (raw transfer, no verification)
#   skopeo  skopeo copy docker://... oci:DIR:1 (whole image, fresh directory each run)
#   kagami  kagami pull ... --output DIR (whole image, fresh directory each run)
# Needs: docker-registry, skopeo, umoci, curl, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
SIZE_MB=${SIZE_MB:-200}
cargo build --release -q -p kagami
KAGAMI=${CARGO_TARGET_DIR:-$PWD/target}/release/kagami
WORK=$(mktemp -d /tmp/kagami-bench-pull.XXXXXX)
# Where the tools write: tmpfs by default, so that disk writeback (very noisy on this
# machine kind) does not drown the transfer; OUT_BASE=/tmp measures with the disk.
OUT_BASE=${OUT_BASE:-/dev/shm}
OUT=$(mktemp -d "$OUT_BASE/kagami-bench-out.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK" "$OUT"; }
trap cleanup EXIT

. bench/lib.sh

PORT=$(port)
start_registry "$WORK/reg" "$PORT" false
echo "building a ${SIZE_MB} MB single-layer image..." >&2
push_big_image "$WORK" "$SIZE_MB" "127.0.0.1:$PORT/bench/big:1"
IMAGE=127.0.0.1:$PORT/bench/big:1
LAYER=$(skopeo inspect --tls-verify=false --raw "docker://$IMAGE" |
  python3 -c 'import json,sys; m=json.load(sys.stdin); print(max(m["layers"], key=lambda l: l["size"])["digest"])')
BYTES=$(skopeo inspect --tls-verify=false --raw "docker://$IMAGE" |
  python3 -c 'import json,sys; m=json.load(sys.stdin); print(sum(l["size"] for l in m["layers"]))')

# Each timed command starts with no dirty pages pending (sync), so that one tool's
# writeback does not land in the next one's time; the order rotates between runs.
declare -A T
time_curl() { curl -sf -o "$OUT/curl.out" "http://127.0.0.1:$PORT/v2/bench/big/blobs/$LAYER"; }
time_skopeo() { skopeo copy --quiet --src-tls-verify=false "docker://$IMAGE" "oci:$OUT/out:1"; }
time_kagami() { "$KAGAMI" pull "$IMAGE" --output "$OUT/out" >/dev/null; }
TOOLS=(curl skopeo kagami)
for i in $(seq "$RUNS"); do
  for k in 0 1 2; do
    t=${TOOLS[$(((i + k) % 3))]}
    rm -rf "$OUT/out" "$OUT/curl.out"; sync
    s=$(now); "time_$t"; e=$(now)
    T[$t]+="$(echo "$e - $s" | bc) "
  done
done
rm -rf "$OUT/out" "$OUT/curl.out"

curl_med=$(echo "${T[curl]}" | tr ' ' '\n' | grep . | median)
echo
echo "image: 1 layer, $((BYTES / 1024 / 1024)) MiB compressed; $RUNS runs each; $(nproc) cores; output in $OUT_BASE"
printf '%-8s %10s %10s %12s   %s\n' tool median_s MB/s vs_curl runs
for t in curl skopeo kagami; do
  runs=$(echo "${T[$t]}" | tr ' ' '\n' | grep . | tr '\n' ' ')
  med=$(echo "${T[$t]}" | tr ' ' '\n' | grep . | median)
  mbs=$(echo "scale=0; $BYTES / 1000000 / $med" | bc)
  ratio=$(echo "scale=2; $med / $curl_med" | bc)
  printf '%-8s %10.3f %10s %11sx   %s\n' "$t" "$med" "$mbs" "$ratio" "$runs"
done
