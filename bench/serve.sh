#!/usr/bin/env bash
# kagami serve vs docker-registry's pull-through mode, in the same run, on loopback.
#
#   bench/serve.sh            # builds kagami (release) and prints the figures
#   KAGAMI_BIN=path/to/kagami bench/serve.sh   # a given binary (e.g. another commit's)
#   KAGAMI_ARGS="--max-fetches 8" bench/serve.sh   # more flags for the kagami under test
#   SCENARIO=memory bench/serve.sh   # only the last part: many blobs in flight to slow
#                                    # clients (MEM_N, MEM_MB, MEM_RATE), peak RSS
#
# Needs: docker-registry, curl, wrk (apt-get install docker-registry curl wrk).
# Every process listens on 127.0.0.1 and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
SIZE_MB=${SIZE_MB:-200}
if [ -n "${KAGAMI_BIN:-}" ]; then
  KAGAMI=$KAGAMI_BIN
else
  cargo build --release -q -p kagami
  KAGAMI=${CARGO_TARGET_DIR:-$PWD/target}/release/kagami
fi
WORK=$(mktemp -d /tmp/kagami-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

# shellcheck source=bench/lib.sh
. bench/lib.sh # port, median, pct, push_blob
wait_port() { for _ in $(seq 200); do curl -s -o /dev/null "http://127.0.0.1:$1/v2/" && return 0; sleep 0.05; done; echo "port $1 never answered" >&2; exit 1; }
registry() { # name port [remote]
  local dir=$WORK/$1; mkdir -p "$dir"
  cat >"$dir/config.yml" <<YAML
version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $dir/data
http:
  addr: 127.0.0.1:$2
health:
  storagedriver:
    enabled: false
YAML
  if [ -n "${3:-}" ]; then printf 'proxy:\n  remoteurl: http://127.0.0.1:%s\n' "$3" >>"$dir/config.yml"; fi
  docker-registry serve "$dir/config.yml" >"$dir/log" 2>&1 &
  PIDS+=($!); wait_port "$2"
}

ORIGIN=$(port); PROXY=$(port); KPORT=$(port)
registry origin "$ORIGIN"
registry proxy "$PROXY" "$ORIGIN"
cat >"$WORK/registries.yaml" <<YAML
mirrors:
  docker.io:
    endpoint: ["http://127.0.0.1:$ORIGIN"]
YAML
"$KAGAMI" serve --listen 127.0.0.1:$KPORT --data-dir "$WORK/kagami" --config "$WORK/registries.yaml" \
  --disable-default-registry-endpoint ${KAGAMI_ARGS:-} 2>"$WORK/kagami.log" &
KPID=$!; PIDS+=($KPID); wait_port "$KPORT"

get_mbps() { curl -sSf -o /dev/null -w '%{speed_download}\n' "$1" | awk '{printf "%.0f\n", $1/1e6}'; }
blob_url() { # where repo digest
  case $1 in
    origin) echo "http://127.0.0.1:$ORIGIN/v2/$2/blobs/$3";;
    proxy) echo "http://127.0.0.1:$PROXY/v2/$2/blobs/$3";;
    kagami) echo "http://127.0.0.1:$KPORT/v2/$2/blobs/$3?ns=docker.io";;
  esac
}
upstream_gets() { grep -c "GET /v2/$1/blobs/$2" "$WORK/origin/log" || true; }

echo "machine: $(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
echo "kagami $("$KAGAMI" --version | cut -d' ' -f2), docker-registry $(docker-registry --version 2>/dev/null | awk '{print $3}'), blob ${SIZE_MB} MiB, medians of $RUNS"
echo

PPID_PROXY=${PIDS[1]}
rss_peak() { awk '/VmHWM/{printf "%.0f", $2/1024}' "/proc/$1/status"; }
if [ "${SCENARIO:-all}" = all ]; then
# Cold: a fresh blob per run, through each mirror.
# CPU of each mirror per cold byte: utime+stime of its process (/proc/PID/stat) from before
# the GET to 1 s after it (kagami's commit, docker-registry's post-transfer work included).
declare -A COLD CPU
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
for who in proxy kagami; do
  pid=$KPID; [ "$who" = proxy ] && pid=$PPID_PROXY
  for r in $(seq "$RUNS"); do
    d=$(push_blob "library/cold$r$who")
    t0=$(cpu_ticks "$pid")
    COLD[$who]+="$(get_mbps "$(blob_url "$who" "library/cold$r$who" "$d")") "
    sleep 1
    CPU[$who]+="$(awk -v a="$t0" -v b="$(cpu_ticks "$pid")" -v hz="$(getconf CLK_TCK)" -v n=$((SIZE_MB*1048576)) 'BEGIN{printf "%.2f", (b-a)/hz*1e9/n}') "
  done
done
WARM_D=$(push_blob library/warm)
for who in proxy kagami; do curl -sSf -o /dev/null "$(blob_url "$who" library/warm "$WARM_D")"; done
sleep 1
declare -A WARM
for who in origin proxy kagami; do
  for r in $(seq "$RUNS"); do WARM[$who]+="$(get_mbps "$(blob_url "$who" library/warm "$WARM_D")") "; done
done
m() { echo "$1" | tr ' ' '\n' | grep -v '^$' | median; }
O=$(m "${WARM[origin]}")
printf '%-44s %10s %10s %10s\n' "blob GET throughput (MB/s)" origin docker-reg kagami
printf '%-44s %10s %10s %10s\n' "warm" "$O" "$(m "${WARM[proxy]}")" "$(m "${WARM[kagami]}")"
printf '%-44s %10s %10s %10s\n' "cold" "-" "$(m "${COLD[proxy]}")" "$(m "${COLD[kagami]}")"
printf '%-44s %10s %10s %10s\n' "cold: CPU of the mirror per byte (ns)" "-" "$(m "${CPU[proxy]}")" "$(m "${CPU[kagami]}")"
awk -v o="$O" -v p="$(m "${WARM[proxy]}")" -v k="$(m "${WARM[kagami]}")" -v pc="$(m "${COLD[proxy]}")" -v kc="$(m "${COLD[kagami]}")" \
  'BEGIN{printf "ratios to origin: warm docker-registry %.2f, kagami %.2f; cold docker-registry %.2f, kagami %.2f\n", p/o, k/o, pc/o, kc/o}'
echo

# Upstream bytes for one cold blob requested by 1 and by 10 concurrent clients.
printf '%-44s %10s %10s\n' "upstream copies of one cold blob" docker-reg kagami
for n in 1 10; do
  row=()
  for who in proxy kagami; do
    repo="library/fan$n$who"; d=$(push_blob "$repo")
    cpids=(); for _ in $(seq "$n"); do curl -sSf -o /dev/null "$(blob_url "$who" "$repo" "$d")" & cpids+=($!); done; wait "${cpids[@]}"
    sleep 2
    row+=("$(upstream_gets "$repo" "$d")")
  done
  printf '%-44s %10s %10s\n' "$n client(s)" "${row[0]}" "${row[1]}"
done
echo

# Manifest HEAD by tag, warm, one keep-alive connection: p50/p99 over 200 requests.
TMP=$WORK/m; mkdir -p "$TMP"
echo '{}' >"$TMP/config.json"
CFG_D="sha256:$(sha256sum "$TMP/config.json" | cut -d' ' -f1)"
loc=$(curl -sSi -X POST "http://127.0.0.1:$ORIGIN/v2/library/small/blobs/uploads/" | tr -d '\r' | awk -F': ' 'tolower($1)=="location"{print $2}')
case $loc in http*) ;; *) loc="http://127.0.0.1:$ORIGIN$loc";; esac
case $loc in *\?*) loc="$loc&";; *) loc="$loc?";; esac
curl -sSf -X PUT -H "Content-Type: application/octet-stream" --data-binary "@$TMP/config.json" "${loc}digest=$CFG_D" >/dev/null
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":3},"layers":[]}' "$CFG_D" >"$TMP/m.json"
curl -sSf -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' --data-binary "@$TMP/m.json" "http://127.0.0.1:$ORIGIN/v2/library/small/manifests/1" >/dev/null
ACCEPT='Accept: application/vnd.oci.image.manifest.v1+json'
head_url() { case $1 in origin) echo "http://127.0.0.1:$ORIGIN/v2/library/small/manifests/1";; proxy) echo "http://127.0.0.1:$PROXY/v2/library/small/manifests/1";; kagami) echo "http://127.0.0.1:$KPORT/v2/library/small/manifests/1?ns=docker.io";; esac; }
printf '%-44s %10s %10s %10s\n' "manifest HEAD by tag, warm (ms)" origin docker-reg kagami
declare -A P50 P99
for who in origin proxy kagami; do
  u=$(head_url "$who"); curl -sSf -I -H "$ACCEPT" -o /dev/null "$u"
  args=(); for _ in $(seq 200); do args+=(-o /dev/null "$u"); done
  curl -sS -I -H "$ACCEPT" -w '%{time_total}\n' "${args[@]}" >"$TMP/t.$who"
  P50[$who]=$(awk '{print $1*1000}' "$TMP/t.$who" | pct 50); P99[$who]=$(awk '{print $1*1000}' "$TMP/t.$who" | pct 99)
done
printf '%-44s %10s %10s %10s\n' "p50" "${P50[origin]}" "${P50[proxy]}" "${P50[kagami]}"
printf '%-44s %10s %10s %10s\n' "p99" "${P99[origin]}" "${P99[proxy]}" "${P99[kagami]}"
if command -v wrk >/dev/null; then
  rps() { wrk -t2 -c64 -d5s -H "$ACCEPT" -s <(echo 'wrk.method = "HEAD"') "$1" 2>/dev/null | awk '/Requests\/sec/{printf "%.0f", $2}'; }
  printf '%-44s %10s %10s %10s\n' "manifest HEAD req/s, 64 connections" "$(rps "$(head_url origin)")" "$(rps "$(head_url proxy)")" "$(rps "$(head_url kagami)")"
else
  echo "(wrk not installed: no requests/s figure)"
fi
echo

# Peak RSS while streaming 50 concurrent downloads of the warm blob.
for who in proxy kagami; do
  cpids=(); for _ in $(seq 50); do curl -sSf -o /dev/null "$(blob_url "$who" library/warm "$WARM_D")" & cpids+=($!); done; wait "${cpids[@]}"
done
printf '%-44s %10s %10s\n' "peak RSS after 50 concurrent warm downloads (MiB)" "$(rss_peak "$PPID_PROXY")" "$(rss_peak "$KPID")"

# Time to answer a request no source can serve (endpoints refuse connections).
DEAD=$(port)
cat >"$WORK/dead.yaml" <<YAML
mirrors:
  dead.example.test:
    endpoint: ["http://127.0.0.1:$DEAD"]
YAML
K2=$(port)
"$KAGAMI" serve --listen 127.0.0.1:$K2 --data-dir "$WORK/k2" --config "$WORK/dead.yaml" --disable-default-registry-endpoint 2>/dev/null &
PIDS+=($!); wait_port "$K2"
for _ in $(seq 5); do curl -s -o /dev/null -w '%{time_total}\n' "http://127.0.0.1:$K2/v2/a/b/manifests/1?ns=dead.example.test"; done | awk '{print $1*1000}' | median | xargs printf '%-44s %10s ms\n' "unservable request (refused endpoint), kagami"
echo
fi

# Many blobs in flight at once: MEM_N distinct cold blobs of MEM_MB MiB and MEM_N streams of
# the warm blob, every client reading at MEM_RATE (curl --limit-rate). Peak RSS of each
# mirror while they run (VmHWM reset first, and VmRSS sampled every 0.1 s), how many clients
# got the whole blob, and the wall time.
MEM_N=${MEM_N:-50}; MEM_MB=${MEM_MB:-20}; MEM_RATE=${MEM_RATE:-20M}
if [ -z "${WARM_D:-}" ]; then
  WARM_D=$(push_blob library/warm)
  for who in proxy kagami; do curl -sSf -o /dev/null "$(blob_url "$who" library/warm "$WARM_D")"; done
fi
declare -A MEM_D MEM_PEAK MEM_OK MEM_T
for who in proxy kagami; do for i in $(seq "$MEM_N"); do MEM_D[$who$i]=$(push_blob "library/mem$i$who" "$MEM_MB"); done; done
for who in proxy kagami; do
  pid=$KPID; [ "$who" = proxy ] && pid=$PPID_PROXY
  echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || true
  out=$WORK/mem.$who; mkdir -p "$out"; cpids=(); t0=$(date +%s.%N)
  for i in $(seq "$MEM_N"); do
    curl -sS --limit-rate "$MEM_RATE" -o /dev/null -w '%{http_code} %{size_download}\n' "$(blob_url "$who" "library/mem$i$who" "${MEM_D[$who$i]}")" >"$out/c$i" 2>/dev/null & cpids+=($!)
    curl -sS --limit-rate "$MEM_RATE" -o /dev/null -w '%{http_code} %{size_download}\n' "$(blob_url "$who" library/warm "$WARM_D")" >"$out/w$i" 2>/dev/null & cpids+=($!)
  done
  peak=0
  while kill -0 "${cpids[@]}" 2>/dev/null; do
    r=$(awk '/VmRSS/{print $2}' "/proc/$pid/status"); [ "$r" -gt "$peak" ] && peak=$r; sleep 0.1
  done
  wait "${cpids[@]}" || true
  MEM_T[$who]=$(echo "$(date +%s.%N) - $t0" | bc | xargs printf '%.1f')
  hwm=$(awk '/VmHWM/{print $2}' "/proc/$pid/status"); [ "$hwm" -gt "$peak" ] && peak=$hwm
  MEM_PEAK[$who]=$((peak / 1024))
  MEM_OK[$who]="$(cat "$out"/c* | awk -v s=$((MEM_MB*1048576)) '$1==200 && $2==s' | wc -l)+$(cat "$out"/w* | awk -v s=$((SIZE_MB*1048576)) '$1==200 && $2==s' | wc -l)"
done
printf '%-44s %10s %10s\n' "$MEM_N cold ${MEM_MB} MiB + $MEM_N warm, ${MEM_RATE}B/s each" docker-reg kagami
printf '%-44s %10s %10s\n' "peak RSS (MiB)" "${MEM_PEAK[proxy]}" "${MEM_PEAK[kagami]}"
printf '%-44s %10s %10s\n' "clients with the whole blob (cold+warm)" "${MEM_OK[proxy]}" "${MEM_OK[kagami]}"
printf '%-44s %10s %10s\n' "wall time (s)" "${MEM_T[proxy]}" "${MEM_T[kagami]}"
