#!/usr/bin/env bash
# Sharing between nodes, on loopback: NODES kagami nodes (127.0.0.2, 127.0.0.3, ...), one
# origin docker-registry on 127.0.0.1, one image of SIZE_MB; every scenario with and
# without P2P in the same run.
#
#   bench/p2p.sh                     # builds kagami (release), prints the figures
#   NODES=10 SIZE_MB=200 bench/p2p.sh
#   SCALE="3 10 30" bench/p2p.sh     # lookup latency and convergence per network size only
#
# Scenarios (fresh data directories for each):
#   direct        kagami pull straight from the origin (the reference time), 3 runs
#   staggered     node 1 pulls, then nodes 2..N one after another
#   simultaneous  all N nodes pull at once
#   kill          node A holds the image, node B pulls from it; A is killed (-9) half-way
#                 through, B finishes from the origin at the same offset; KILL_RUNS runs (5)
#   lookup        LOOKUPS requests for a digest nobody holds (a peers-only registry):
#                 the answer is a 404 after one DHT lookup
# Upstream bytes are summed from the origin's access log. Pulls are `kagami pull` through a
# node (path-prefix form) into tmpfs; node stores are on tmpfs too, so that disk writeback
# does not drown the network figures.
# Needs: docker-registry, skopeo, umoci, curl, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=${NODES:-10}
SIZE_MB=${SIZE_MB:-200}
LOOKUPS=${LOOKUPS:-200}
SCALE=${SCALE:-}
# Which parts to run (all by default): direct shared kill lookup
ONLY=${ONLY:-direct shared kill lookup}
on() { [[ " $ONLY " == *" $1 "* ]]; }
if [ -n "${KAGAMI_BIN:-}" ]; then
  KAGAMI=$KAGAMI_BIN # a given binary (e.g. another commit's)
else
  cargo build --release -q -p kagami
  KAGAMI=${CARGO_TARGET_DIR:-$PWD/target}/release/kagami
fi
WORK=$(mktemp -d /dev/shm/kagami-bench-p2p.XXXXXX)
PIDS=()
NODE_PIDS=()
cleanup() {
  for p in "${NODE_PIDS[@]}" "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] && { cp -r "$WORK"/*.log /tmp/p2pbench-logs/ 2>/dev/null; } ; rm -rf "$WORK"
}
trap cleanup EXIT

. bench/lib.sh
. bench/nodes.sh

start_origin

# Every node: the origin as the endpoint of registry.bench, and registry.peers with no
# endpoint at all (only other nodes can serve it).
cat >"$WORK/registries.yaml" <<YAML
mirrors:
  registry.bench:
    endpoint: ["http://127.0.0.1:$ORIGIN"]
  registry.peers:
YAML
(umask 077; openssl rand -hex 32 >"$WORK/psk" 2>/dev/null || python3 -c 'import os; print(os.urandom(32).hex())' >"$WORK/psk")

# LOOKUPS requests, spread over nodes 1..$1, for digests nobody holds (a peers-only
# registry): each a 404 after one DHT lookup; times (s) in $WORK/missing.
missing_lookups() {
  : >"$WORK/missing"
  for j in $(seq "$LOOKUPS"); do
    local i=$((j % $1 + 1)) d
    d=$(head -c 32 /dev/urandom | sha256sum | cut -d' ' -f1)
    curl -s -o /dev/null -w '%{time_total}\n' "http://$(ip_of "$i"):5000/v2/x/manifests/sha256:$d?ns=registry.peers" >>"$WORK/missing"
  done
}

echo "machine: $(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo); kagami $("$KAGAMI" --version | cut -d' ' -f2); image $((IMAGE_BYTES / 1000000)) MB; $NODES nodes"

if [ -n "$SCALE" ]; then
  # Lookup latency (a digest nobody holds, and one digest another node holds) and time to
  # converge, per network size.
  printf '%-8s %-14s %-22s %-22s %-12s\n' nodes converged "missing p50/p99 (ms)" "held p50/p99 (ms)" "RSS/node MiB"
  for n in $SCALE; do
    start_network "$n" p2p
    # Node 1 holds the image's manifest; the others ask for it by digest (each once).
    pull 1 >/dev/null
    MD="sha256:$(echo -n "$RAW" | sha256sum | cut -d' ' -f1)"
    : >"$WORK/held"
    for i in $(seq 2 "$n"); do
      curl -s -o /dev/null -w '%{time_total}\n' "http://$(ip_of "$i"):5000/v2/bench/big/manifests/$MD?ns=registry.bench" >>"$WORK/held"
    done
    missing_lookups "$n"
    rss=$(for i in $(seq "$n"); do awk '/VmRSS/{print $2/1024}' "/proc/${NODE_PIDS[$i]}/status"; done | median)
    printf '%-8s %-14s %-22s %-22s %-12s\n' "$n" "$(printf '%.2f s' "$CONVERGED")" \
      "$(awk '{print $1*1000}' "$WORK/missing" | pct 50) / $(awk '{print $1*1000}' "$WORK/missing" | pct 99)" \
      "$(awk '{print $1*1000}' "$WORK/held" | pct 50) / $(awk '{print $1*1000}' "$WORK/held" | pct 99)" \
      "$(printf '%.0f' "$rss")"
    stop_nodes
  done
  exit 0
fi

if on direct || on shared; then
# direct: the reference.
direct=()
for _ in 1 2 3; do
  out="$WORK/out-direct"; rm -rf "$out"; t0=$(now)
  "$KAGAMI" pull "127.0.0.1:$ORIGIN/bench/big:1" --output "$out" >/dev/null
  direct+=("$(since "$t0")"); rm -rf "$out"
done
T_DIRECT=$(printf '%s\n' "${direct[@]}" | median)
echo "direct pull from the origin: median ${T_DIRECT} s (${direct[*]})"
echo
fi

if on shared; then
declare -A R
for mode in solo p2p; do
  # staggered
  start_network "$NODES" "$mode"
  mark=$(log_mark)
  first=$(pull 1)
  rest=()
  for i in $(seq 2 "$NODES"); do rest+=("$(pull "$i")"); done
  R[$mode-stag-up]=$(ratio "$(upstream_bytes "$mark")" "$IMAGE_BYTES")
  R[$mode-first]=$first
  R[$mode-rest]=$(printf '%s\n' "${rest[@]}" | median)
  R[$mode-rest-max]=$(printf '%s\n' "${rest[@]}" | sort -n | tail -1)
  stop_nodes
  # simultaneous
  start_network "$NODES" "$mode"
  mark=$(log_mark)
  t0=$(now)
  pids=()
  for i in $(seq "$NODES"); do pull "$i" >"$WORK/sim-$i" & pids+=($!); done
  wait "${pids[@]}"
  R[$mode-sim]=$(since "$t0")
  R[$mode-sim-up]=$(ratio "$(upstream_bytes "$mark")" "$IMAGE_BYTES")
  stop_nodes
done

printf '%-58s %12s %12s\n' "" "without P2P" "with P2P"
printf '%-58s %12s %12s\n' "staggered: upstream bytes / image" "${R[solo-stag-up]}x" "${R[p2p-stag-up]}x"
printf '%-58s %12s %12s\n' "staggered: node 1 (cold) pull (s)" "${R[solo-first]}" "${R[p2p-first]}"
printf '%-58s %12s %12s\n' "staggered: nodes 2..N, median pull (s)" "${R[solo-rest]}" "${R[p2p-rest]}"
printf '%-58s %12s %12s\n' "staggered: nodes 2..N, median / direct" "$(ratio "${R[solo-rest]}" "$T_DIRECT")x" "$(ratio "${R[p2p-rest]}" "$T_DIRECT")x"
printf '%-58s %12s %12s\n' "staggered: nodes 2..N, slowest pull (s)" "${R[solo-rest-max]}" "${R[p2p-rest-max]}"
printf '%-58s %12s %12s\n' "simultaneous: upstream bytes / image" "${R[solo-sim-up]}x" "${R[p2p-sim-up]}x"
printf '%-58s %12s %12s\n' "simultaneous: time until all hold it (s)" "${R[solo-sim]}" "${R[p2p-sim]}"
printf '%-58s %12s %12s\n' "simultaneous: that / one node's cold pull" "$(ratio "${R[solo-sim]}" "${R[solo-first]}")x" "$(ratio "${R[p2p-sim]}" "${R[p2p-first]}")x"
echo
fi

if on kill; then
# kill: A (node 1) holds the image; B (node 2) pulls it from A; A dies part-way.
start_network 2 p2p
pull 1 >/dev/null
A_DATA=$(cat "$WORK/data-1")
clean=(); killed=()
for _ in $(seq "${KILL_RUNS:-5}"); do
  # B fresh each time (its own store would answer otherwise).
  kill "${NODE_PIDS[2]}"; wait "${NODE_PIDS[2]}" 2>/dev/null || true
  start_node 2 p2p; wait_http "$(ip_of 2):5000"
  for _ in $(seq 300); do [ "$(members 2)" -ge 1 ] && break; sleep 0.1; done
  clean+=("$(pull 2)")
  kill "${NODE_PIDS[2]}"; wait "${NODE_PIDS[2]}" 2>/dev/null || true
  start_node 2 p2p; wait_http "$(ip_of 2):5000"
  for _ in $(seq 300); do [ "$(members 2)" -ge 1 ] && break; sleep 0.1; done
  half=$(echo "${clean[-1]} / 2" | bc -l)
  ( sleep "$half"; kill -9 "${NODE_PIDS[1]}" ) &
  killer=$!
  killed+=("$(pull 2)")
  wait "$killer" 2>/dev/null || true
  # A back, with its store, for the next run.
  wait "${NODE_PIDS[1]}" 2>/dev/null || true
  start_node 1 p2p "$A_DATA"; wait_http "$(ip_of 1):5000"
  for _ in $(seq 300); do [ "$(members 1)" -ge 1 ] && break; sleep 0.1; done
  sleep 1
done
T_CLEAN=$(printf '%s\n' "${clean[@]}" | median)
T_KILLED=$(printf '%s\n' "${killed[@]}" | median)
echo "kill: pull from a peer ${T_CLEAN} s (${clean[*]}); with the peer killed half-way ${T_KILLED} s (${killed[*]}); added $(echo "($T_KILLED - $T_CLEAN) * 1000" | bc | cut -d. -f1) ms (median)"
stop_nodes
fi

if on lookup; then
# lookup: a digest nobody holds, on a peers-only registry.
start_network "$NODES" p2p
missing_lookups "$NODES"
echo "lookup of a missing digest ($LOOKUPS requests over $NODES nodes, answered 404): p50 $(awk '{print $1*1000}' "$WORK/missing" | pct 50) ms, p99 $(awk '{print $1*1000}' "$WORK/missing" | pct 99) ms"
stop_nodes
fi
