#!/usr/bin/env bash
# kagami serve under many concurrent connections: warm blobs, manifests by tag, misses and
# slow readers at once, for a fixed time; reports errors, requests/s, peak RSS and the
# most file descriptors the process held.
#
#   bench/load.sh                       # builds kagami (release): 1,000 connections, 60 s
#   CONNS=200 DURATION=20 bench/load.sh # smaller
#   KAGAMI=target/debug/kagami bench/load.sh   # a given binary, no build
#
# The connections are split 40% warm blob GETs (1 MiB, keep-alive), 30% manifest GETs by
# tag (keep-alive), 20% misses (a blob no registry has: every one goes to the origin and
# is a 404) and 10% slow readers (curl at 20 KB/s on a 32 MiB warm blob, for the whole
# run). Needs: docker-registry, curl, ab (apache2-utils), python3. Everything listens on
# 127.0.0.1 and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
CONNS=${CONNS:-1000}
DURATION=${DURATION:-60}
if [ -z "${KAGAMI:-}" ]; then
  cargo build --release -q -p kagami
  KAGAMI=${CARGO_TARGET_DIR:-$PWD/target}/release/kagami
fi
# ab and kagami each need a descriptor per connection (and kagami one more upstream).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((CONNS * 2 + 256)) ]; then
  echo "open files limit $(ulimit -n) is too low for $CONNS connections" >&2; exit 1
fi
WORK=$(mktemp -d /tmp/kagami-load.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

WARM_C=$((CONNS * 40 / 100)); MAN_C=$((CONNS * 30 / 100)); MISS_C=$((CONNS * 20 / 100))
SLOW_C=$((CONNS - WARM_C - MAN_C - MISS_C))

ORIGIN=$(port); KPORT=$(port)
start_registry "$WORK/origin" "$ORIGIN"
upload() { # repo file -> digest
  local d loc
  d="sha256:$(sha256sum "$2" | cut -d' ' -f1)"
  loc=$(curl -sSi -X POST "http://127.0.0.1:$ORIGIN/v2/$1/blobs/uploads/" | tr -d '\r' | awk -F': ' 'tolower($1)=="location"{print $2}')
  case $loc in http*) ;; *) loc="http://127.0.0.1:$ORIGIN$loc";; esac
  case $loc in *\?*) loc="$loc&";; *) loc="$loc?";; esac
  curl -sSf -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$2" "${loc}digest=$d" >/dev/null
  echo "$d"
}
head -c $((1024 * 1024)) /dev/urandom >"$WORK/warm.bin"
head -c $((32 * 1024 * 1024)) /dev/urandom >"$WORK/slow.bin"
echo '{}' >"$WORK/config.json"
WARM_D=$(upload library/load "$WORK/warm.bin")
SLOW_D=$(upload library/load "$WORK/slow.bin")
CFG_D=$(upload library/load "$WORK/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":3},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%d}]}' \
  "$CFG_D" "$WARM_D" $((1024 * 1024)) >"$WORK/m.json"
curl -sSf -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' --data-binary "@$WORK/m.json" \
  "http://127.0.0.1:$ORIGIN/v2/library/load/manifests/1" >/dev/null
MISS_D="sha256:$(echo missing | sha256sum | cut -d' ' -f1)"

cat >"$WORK/registries.yaml" <<YAML
mirrors:
  docker.io:
    endpoint: ["http://127.0.0.1:$ORIGIN"]
YAML
"$KAGAMI" serve --listen "127.0.0.1:$KPORT" --data-dir "$WORK/kagami" --config "$WORK/registries.yaml" \
  --disable-default-registry-endpoint 2>"$WORK/kagami.log" &
KPID=$!; PIDS+=("$KPID")
for _ in $(seq 200); do curl -s -o /dev/null "http://127.0.0.1:$KPORT/v2/" && break; sleep 0.05; done
K=http://127.0.0.1:$KPORT/v2/library/load
ACCEPT='Accept: application/vnd.oci.image.manifest.v1+json'
# Warm everything up: the blobs and the tag are in kagami's store before the load starts.
curl -sSf -o /dev/null "$K/blobs/$WARM_D?ns=docker.io"
curl -sSf -o /dev/null "$K/blobs/$SLOW_D?ns=docker.io"
curl -sSf -o /dev/null -H "$ACCEPT" "$K/manifests/1?ns=docker.io"

echo "machine: $(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
echo "kagami $("$KAGAMI" --version | cut -d' ' -f2) ($KAGAMI)"
echo "load: $CONNS connections for $DURATION s: $WARM_C warm-blob, $MAN_C manifest, $MISS_C miss, $SLOW_C slow readers"
echo

# Resource samples of the kagami process, once a second.
sample() {
  while kill -0 "$KPID" 2>/dev/null; do
    printf '%s %s\n' "$(awk '/VmRSS/{print $2}' "/proc/$KPID/status")" "$(ls "/proc/$KPID/fd" | wc -l)"
    sleep 1
  done
}
sample >"$WORK/samples" &
SAMPLER=$!; PIDS+=("$SAMPLER")

run_ab() { # name concurrency url [header]
  local extra=()
  [ -n "${4:-}" ] && extra=(-H "$4")
  ab -q -r -k -t "$DURATION" -n 100000000 -c "$2" "${extra[@]}" "$3" >"$WORK/ab.$1" 2>&1 || true
}
run_ab warm "$WARM_C" "$K/blobs/$WARM_D?ns=docker.io" &
A1=$!
run_ab manifest "$MAN_C" "$K/manifests/1?ns=docker.io" "$ACCEPT" &
A2=$!
run_ab miss "$MISS_C" "$K/blobs/$MISS_D?ns=docker.io" &
A3=$!
SLOWS=()
for i in $(seq "$SLOW_C"); do
  ( rc=0; curl -sS -o /dev/null --limit-rate 20k --max-time "$DURATION" "$K/blobs/$SLOW_D?ns=docker.io" 2>/dev/null || rc=$?
    echo "$rc" >"$WORK/slow.$i" ) &
  SLOWS+=($!)
done
wait "$A1" "$A2" "$A3" "${SLOWS[@]}"

# After the load: still serving, and what it holds now.
sleep 2
after_ok=$(curl -s -o /dev/null -w '%{http_code}' "$K/blobs/$WARM_D?ns=docker.io")
RSS_AFTER=$(awk '/VmRSS/{printf "%.0f", $2/1024}' "/proc/$KPID/status")
FDS_AFTER=$(ls "/proc/$KPID/fd" | wc -l)
PEAK=$(awk '/VmHWM/{printf "%.0f", $2/1024}' "/proc/$KPID/status")
kill "$SAMPLER" 2>/dev/null || true

field() { awk -F': *' -v k="$2" '$1==k{print $2+0; found=1} END{if(!found) print 0}' "$WORK/ab.$1"; }
printf '%-12s %10s %10s %8s %8s %10s\n' workload requests "req/s" failed non-2xx "p99 (ms)"
for w in warm manifest miss; do
  p99=$(awk '$1=="99%"{print $2}' "$WORK/ab.$w")
  printf '%-12s %10s %10s %8s %8s %10s\n' "$w" "$(field "$w" 'Complete requests')" \
    "$(awk -F': *' '$1=="Requests per second"{printf "%.0f", $2}' "$WORK/ab.$w")" \
    "$(field "$w" 'Failed requests')" "$(field "$w" 'Non-2xx responses')" "${p99:--}"
done
slow_ok=0; slow_err=0
for i in $(seq "$SLOW_C"); do
  case $(cat "$WORK/slow.$i") in 0|28) slow_ok=$((slow_ok + 1));; *) slow_err=$((slow_err + 1));; esac
done
echo "slow readers: $slow_ok streamed until the end of the run (curl exit 28 at --max-time), $slow_err failed"
echo "misses are 404 by design (the origin has no such blob): their non-2xx count is not an error"
echo
echo "kagami peak RSS (VmHWM): $PEAK MiB; most RSS sampled: $(awk 'BEGIN{m=0} {if($1>m)m=$1} END{printf "%.0f", m/1024}' "$WORK/samples") MiB"
echo "kagami most open fds sampled: $(awk 'BEGIN{m=0} {if($2>m)m=$2} END{print m}' "$WORK/samples"); after the run: $FDS_AFTER fds, $RSS_AFTER MiB RSS"
echo "warm blob GET after the run: HTTP $after_ok"
grep -c ' ERROR ' "$WORK/kagami.log" | xargs printf 'kagami log: %s ERROR lines\n'
