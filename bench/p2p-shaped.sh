#!/usr/bin/env bash
# Sharing between nodes on a shaped network: loopback with `tc` limits, so that the figures
# measure what a real cluster is bound by — the link to the registry (a WAN, a VPN into an
# air-gapped site) and each node's NIC — and not the CPU.
#
#   sudo bench/p2p-shaped.sh                        # N=10, one 24 MB layer, U=80, B=400 Mbit/s
#   sudo NODES=20 RUNS=3 bench/p2p-shaped.sh
#   sudo NODES=50 SIZE_MB=8 ONLY="all" bench/p2p-shaped.sh
#
# Shaping (an htb qdisc on `lo`, removed on exit, also on failure or Ctrl-C):
#   - the origin registry's upload (127.0.0.1, its port) is limited to U_MBIT: the slow link;
#   - each node's peer traffic (127.0.0.(i+1):5002, the P2P HTTP API) to B_MBIT: its NIC;
#   - everything else (a node and the `kagami pull` client on it, the DHT) is not shaped.
#   The slow link queues in htb's default FIFO, a deep buffer; ORIGIN_QDISC gives it
#   another queue, e.g. ORIGIN_QDISC="bfifo limit 262144" (256 KiB, ~26 ms at 80 Mbit/s).
# The physical limit of getting the image into the cluster is image ÷ U: every byte must
# cross the slow link once.
#
# Scenarios (fresh nodes for each, every scenario with P2P and without it in the same run):
#   all      every node pulls at the same moment
#   rolling  one node after another (a rolling update)
#   batch    batches of 20% of the nodes, each batch at once, one after another
#   kill     nodes 1 and 2 hold the image, node 3 pulls; the node sending to it is killed
#            (-9) half-way (P2P only)
#   holder   every node pulls at the same moment, and the node fetching from the origin for
#            the cluster (the most bytes served from upstream) is killed (-9) at half the
#            limit (P2P only): nobody else holds the whole blob yet
# Reported per scenario, as the spread over RUNS runs (min-max, median):
#   all:     time until all hold ÷ (image ÷ U); per-node time p50/p99 ÷ (image ÷ U);
#            bytes the origin sent ÷ image; peak RSS and CPU seconds per node; the CPU
#            all processes on the machine used during the pulls ÷ (cores × that time),
#            which says whether the machine's CPU, not the network, was the limit
#   rolling: each later node's time ÷ (image ÷ B), median and slowest
#   batch:   each batch's time ÷ (image ÷ B) after the first
#   kill:    time added by the kill (ms), against the same pull without it
#   holder:  time until the other nodes hold ÷ (image ÷ U), bytes the origin sent ÷ image
#            (its access log) and bytes across the slow link ÷ image (tc),
#            and the time added against "all" of the same run (when both ran)
# PERF_OUT=FILE records the whole machine with `perf record -a -g` during each P2P "all at
# once" pull (FILE.1, FILE.2, ...: `perf report -i FILE.1 --sort comm,dso`).
# NODE_LOG sets the nodes' log filter (e.g. info,kagami_server=debug); KEEP_LOGS=DIR keeps
# the nodes' logs (appended across runs), the pull clients' and the origin's access log.
# Needs root (tc), docker-registry, skopeo, umoci, curl, python3, bc.
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=${NODES:-10}
SIZE_MB=${SIZE_MB:-24}
LAYERS=${LAYERS:-1}
U_MBIT=${U_MBIT:-80}
B_MBIT=${B_MBIT:-400}
RUNS=${RUNS:-3}
ONLY=${ONLY:-all rolling batch kill holder}
MODES=${MODES:-solo p2p}
# Pulls start once every node knows every other (WANT_MEMBERS=3: once each knows 3): a
# settled cluster, where nodes agree on each blob's claim coordinator.
WANT_MEMBERS=${WANT_MEMBERS:-all}
on() { [[ " $ONLY " == *" $1 "* ]]; }
[ "$(id -u)" = 0 ] || { echo "p2p-shaped.sh: needs root for tc" >&2; exit 1; }
for tool in tc docker-registry skopeo umoci curl python3 bc; do
  command -v "$tool" >/dev/null || { echo "p2p-shaped.sh: $tool is not installed" >&2; exit 1; }
done
if [ -n "${KAGAMI_BIN:-}" ]; then
  KAGAMI=$KAGAMI_BIN # a given binary (e.g. another commit's)
else
  cargo build --release -q -p kagami
  KAGAMI=${CARGO_TARGET_DIR:-$PWD/target}/release/kagami
fi
WORK=$(mktemp -d /dev/shm/kagami-bench-shaped.XXXXXX)
PIDS=()
NODE_PIDS=()
shape_off() { tc qdisc del dev lo root 2>/dev/null || true; }
cleanup() {
  shape_off
  for p in "${NODE_PIDS[@]}" "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP_LOGS:-}" ]; then
    mkdir -p "$KEEP_LOGS"
    cp "$WORK"/node-*.log "$WORK"/pull.log "$WORK"/origin/log "$KEEP_LOGS"/ 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

. bench/lib.sh
. bench/nodes.sh

if tc qdisc show dev lo | grep -q htb; then
  echo "p2p-shaped.sh: lo already has an htb qdisc; remove it first (tc qdisc del dev lo root)" >&2
  exit 1
fi

start_origin "${LAYERS:-1}"
cat >"$WORK/registries.yaml" <<YAML
mirrors:
  registry.bench:
    endpoint: ["http://127.0.0.1:$ORIGIN"]
YAML
(umask 077; python3 -c 'import os; print(os.urandom(32).hex())' >"$WORK/psk")

# The limits, in seconds: the image across the slow link, and across one node's NIC.
LIMIT_U=$(printf '%.4f' "$(echo "scale=6; $IMAGE_BYTES * 8 / ($U_MBIT * 1000000)" | bc)")
LIMIT_B=$(printf '%.4f' "$(echo "scale=6; $IMAGE_BYTES * 8 / ($B_MBIT * 1000000)" | bc)")

# htb on lo: unclassified traffic (no default class) is not shaped. Loopback packets are
# up to 64 KiB (GSO), so quantum and bursts are at least that.
shape_on() {
  shape_off
  tc qdisc add dev lo root handle 1: htb
  tc class add dev lo parent 1: classid 1:10 htb rate "${U_MBIT}mbit" ceil "${U_MBIT}mbit" \
    burst 128k cburst 128k quantum 65536
  tc filter add dev lo parent 1: protocol ip prio 1 u32 \
    match ip src 127.0.0.1/32 match ip sport "$ORIGIN" 0xffff flowid 1:10
  # The slow link's queue: htb's default FIFO (thousands of packets: a deep buffer), or
  # ORIGIN_QDISC, e.g. "bfifo limit 262144" (a short one) or "fq_codel" where the kernel
  # has it.
  if [ -n "${ORIGIN_QDISC:-}" ]; then
    # shellcheck disable=SC2086 # a qdisc and its parameters
    tc qdisc add dev lo parent 1:10 handle 10: $ORIGIN_QDISC
  fi
  for i in $(seq "$NODES"); do
    tc class add dev lo parent 1: classid "1:$((100 + i))" htb rate "${B_MBIT}mbit" \
      ceil "${B_MBIT}mbit" burst 128k cburst 128k quantum 65536
    tc filter add dev lo parent 1: protocol ip prio 1 u32 \
      match ip src "$(ip_of "$i")/32" match ip sport 5002 0xffff flowid "1:$((100 + i))"
  done
}
# Bytes node I has sent to peers so far (its class's counter).
peer_sent() { tc -s class show dev lo classid "1:$((100 + $1))" | awk '/Sent/{print $2; exit}'; }
# Bytes that crossed the slow link so far (the origin's class). The origin's access log
# counts what it wrote to its sockets, which includes what a killed node never received.
link_sent() { tc -s class show dev lo classid 1:10 | awk '/Sent/{print $2; exit}'; }
cpu_secs() { awk -v t="$(getconf CLK_TCK)" '{printf "%.2f\n", ($14 + $15) / t}' "/proc/$1/stat"; }
# Busy and total jiffies of the whole machine (all cores), from /proc/stat.
machine_cpu() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9; exit}' /proc/stat; }
# busy_share "BUSY0 TOTAL0" "BUSY1 TOTAL1": the share of the machine's CPU used in between.
busy_share() { echo "$1 $2" | awk '{printf "%.2f\n", ($3 - $1) / ($4 - $2)}'; }
# Most bytes served from upstream so far, transfers in progress included (/status.json's
# series; the served_bytes metric counts a response when it ends, so mid-transfer it names
# the node that fetched the small config blob): the node fetching the layer from the origin.
upstream_node() {
  python3 - "$NODES" <<'PY'
import json, sys, urllib.request
from concurrent.futures import ThreadPoolExecutor
def upstream(i):
    url = f"http://127.0.0.{i + 1}:5000/status.json"
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return sum(s["upstream"] for s in json.load(r)["series"]["samples"])
    except Exception:
        return -1
nodes = range(1, int(sys.argv[1]) + 1)
with ThreadPoolExecutor(len(nodes)) as pool:
    served = list(pool.map(upstream, nodes))
print(max(nodes, key=lambda i: served[i - 1]))
PY
}
rss_mib() { awk '/VmHWM/{printf "%.0f\n", $2/1024}' "/proc/$1/status"; }
spread() { sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.2f-%.2f (%.2f)", a[1], a[NR], m}'; }
# pull_timed I OUT: pull through node I; writes the seconds it took to OUT.
pull_timed() { pull "$1" >"$2"; }

echo "machine: $(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo); kagami $("$KAGAMI" --version | cut -d' ' -f2)"
echo "image $IMAGE_BYTES bytes in $LAYERS layer(s); $NODES nodes; U = $U_MBIT Mbit/s (limit image/U = ${LIMIT_U} s), B = $B_MBIT Mbit/s (image/B = ${LIMIT_B} s); $RUNS runs"
shape_on
declare -A R

if on all; then
  for mode in $MODES; do
    for run in $(seq "$RUNS"); do
      start_network "$NODES" "$mode"
      R[$mode-all-members]+="$MEMBERS_SEEN "
      mark=$(log_mark)
      c0=$(machine_cpu)
      perf_pid=
      if [ -n "${PERF_OUT:-}" ] && [ "$mode" = p2p ]; then
        perf record -a -g -o "$PERF_OUT.$run" >/dev/null 2>&1 & perf_pid=$!
        sleep 0.5
      fi
      t0=$(now); pids=()
      for i in $(seq "$NODES"); do pull_timed "$i" "$WORK/t-$i" & pids+=($!); done
      wait "${pids[@]}"
      total=$(since "$t0")
      if [ -n "$perf_pid" ]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; fi
      R[$mode-all-busy]+="$(busy_share "$c0" "$(machine_cpu)") "
      R[$mode-all-secs]+="$total "
      R[$mode-all-total]+="$(ratio "$total" "$LIMIT_U") "
      R[$mode-all-up]+="$(ratio "$(upstream_bytes "$mark")" "$IMAGE_BYTES") "
      per=$(for i in $(seq "$NODES"); do cat "$WORK/t-$i"; done)
      R[$mode-all-p50]+="$(ratio "$(echo "$per" | pct 50)" "$LIMIT_U") "
      R[$mode-all-p99]+="$(ratio "$(echo "$per" | pct 99)" "$LIMIT_U") "
      R[$mode-all-rss]+="$(for i in $(seq "$NODES"); do rss_mib "${NODE_PIDS[$i]}"; done | sort -n | tail -1) "
      R[$mode-all-cpu]+="$(for i in $(seq "$NODES"); do cpu_secs "${NODE_PIDS[$i]}"; done | median) "
      stop_nodes
    done
  done
fi

if on rolling; then
  for mode in $MODES; do
    for run in $(seq "$RUNS"); do
      start_network "$NODES" "$mode"
      pull 1 >/dev/null
      rest=$(for i in $(seq 2 "$NODES"); do pull "$i"; done)
      R[$mode-roll-p50]+="$(ratio "$(echo "$rest" | median)" "$LIMIT_B") "
      R[$mode-roll-max]+="$(ratio "$(echo "$rest" | sort -n | tail -1)" "$LIMIT_B") "
      stop_nodes
    done
  done
fi

if on batch; then
  size=$(( (NODES + 4) / 5 ))
  for mode in $MODES; do
    for run in $(seq "$RUNS"); do
      start_network "$NODES" "$mode"
      first=1; times=(); nodes_took=()
      while [ "$first" -le "$NODES" ]; do
        last=$((first + size - 1)); [ "$last" -gt "$NODES" ] && last=$NODES
        t0=$(now); pids=()
        for i in $(seq "$first" "$last"); do pull "$i" >"$WORK/b-$i" & pids+=($!); done
        wait "${pids[@]}"
        if [ "$first" -gt 1 ]; then
          times+=("$(since "$t0")")
          nodes_took+=("[$(for i in $(seq "$first" "$last"); do cat "$WORK/b-$i"; done | xargs)]")
        fi
        first=$((last + 1))
      done
      echo "$mode batches, run $run: later batches took ${times[*]} s, their nodes ${nodes_took[*]} s (image / B = $LIMIT_B s)"
      R[$mode-batch]+="$(ratio "$(printf '%s\n' "${times[@]}" | median)" "$LIMIT_B") "
      R[$mode-batch-max]+="$(ratio "$(printf '%s\n' "${times[@]}" | sort -n | tail -1)" "$LIMIT_B") "
      stop_nodes
    done
  done
fi

if on kill && [[ " $MODES " == *" p2p "* ]]; then
  clean=(); added=()
  for run in $(seq "$RUNS"); do
    # Without a kill: 1 and 2 hold the image, 3 pulls it from them.
    start_network 3 p2p
    pull 1 >/dev/null; pull 2 >/dev/null
    c=$(pull 3)
    stop_nodes
    # The same, and whichever of 1 and 2 is sending is killed half-way.
    start_network 3 p2p
    pull 1 >/dev/null; pull 2 >/dev/null
    s1=$(peer_sent 1); s2=$(peer_sent 2)
    pull_timed 3 "$WORK/kill-t" & puller=$!
    sleep "$(echo "$c / 2" | bc -l)"
    if [ $(( $(peer_sent 1) - s1 )) -ge $(( $(peer_sent 2) - s2 )) ]; then victim=1; else victim=2; fi
    kill -9 "${NODE_PIDS[$victim]}"
    wait "$puller"
    k=$(cat "$WORK/kill-t")
    clean+=("$c"); added+=("$(echo "($k - $c) * 1000" | bc)")
    stop_nodes
  done
fi

if on holder && [[ " $MODES " == *" p2p "* ]]; then
  half=$(echo "$LIMIT_U / 2" | bc -l)
  for run in $(seq "$RUNS"); do
    start_network "$NODES" p2p
    mark=$(log_mark)
    link0=$(link_sent)
    t0=$(now); pids=()
    for i in $(seq "$NODES"); do pull_timed "$i" "$WORK/h-$i" & pids+=($!); done
    sleep "$half"
    victim=$(upstream_node)
    kill -9 "${NODE_PIDS[$victim]}"
    # The victim's own pull fails; the others must complete.
    for p in "${pids[@]}"; do wait "$p" || true; done
    total=$(since "$t0")
    R[p2p-hold-total]+="$(ratio "$total" "$LIMIT_U") "
    R[p2p-hold-secs]+="$total "
    R[p2p-hold-up]+="$(ratio "$(upstream_bytes "$mark")" "$IMAGE_BYTES") "
    R[p2p-hold-link]+="$(ratio "$(( $(link_sent) - link0 ))" "$IMAGE_BYTES") "
    # (An `if`, not `&&`: with pipefail, a loop whose last test fails, when the victim is
    # node N, would end the script.)
    R[p2p-hold-done]+="$(for i in $(seq "$NODES"); do if [ "$i" != "$victim" ] && [ -s "$WORK/h-$i" ]; then echo x; fi; done | wc -l) "
    stop_nodes
  done
fi

row() { printf '%-62s %-22s %-22s\n' "$@"; }
val() { [ -n "${R[$1]:-}" ] && echo "${R[$1]}" | tr ' ' '\n' | grep -v '^$' | spread || echo "-"; }
echo
row "" "without P2P" "with P2P"
if on all; then
  row "all at once: time until all hold / (image / U)" "$(val solo-all-total)" "$(val p2p-all-total)"
  row "all at once: per-node time p50 / (image / U)" "$(val solo-all-p50)" "$(val p2p-all-p50)"
  row "all at once: per-node time p99 / (image / U)" "$(val solo-all-p99)" "$(val p2p-all-p99)"
  row "all at once: origin sent / image" "$(val solo-all-up)" "$(val p2p-all-up)"
  row "all at once: peak RSS of the largest node (MiB)" "$(val solo-all-rss)" "$(val p2p-all-rss)"
  row "all at once: CPU seconds per node (median)" "$(val solo-all-cpu)" "$(val p2p-all-cpu)"
  row "all at once: machine CPU busy during the pulls (share)" "$(val solo-all-busy)" "$(val p2p-all-busy)"
  row "all at once: fewest members a node knew (with an address) at the start" "-" "$(val p2p-all-members)"
fi
if on rolling; then
  row "rolling: later nodes, median time / (image / B)" "$(val solo-roll-p50)" "$(val p2p-roll-p50)"
  row "rolling: later nodes, slowest / (image / B)" "$(val solo-roll-max)" "$(val p2p-roll-max)"
fi
if on batch; then
  row "batches of 20%: later batches, median time / (image / B)" "$(val solo-batch)" "$(val p2p-batch)"
  row "batches of 20%: slowest later batch / (image / B)" "$(val solo-batch-max)" "$(val p2p-batch-max)"
fi
if on holder && [ -n "${R[p2p-hold-total]:-}" ]; then
  echo
  echo "holder killed at half the limit: the other $((NODES - 1)) nodes hold it after $(val p2p-hold-total) x (image / U); origin sent $(val p2p-hold-up) x the image (its log), $(val p2p-hold-link) x crossed the slow link (tc); nodes that completed (of $((NODES - 1))): $(val p2p-hold-done)"
  if [ -n "${R[p2p-all-secs]:-}" ]; then
    base=$(echo "${R[p2p-all-secs]}" | tr ' ' '\n' | grep -v '^$' | median)
    echo "holder killed: time added against all at once without a kill (ms): $(echo "${R[p2p-hold-secs]}" | tr ' ' '\n' | grep -v '^$' | while read -r t; do echo "($t - $base) * 1000" | bc; done | spread)"
  fi
fi
if on kill && [ "${#added[@]}" -gt 0 ]; then
  echo
  echo "kill: pull from two holders $(printf '%s\n' "${clean[@]}" | spread) s; the sender killed half-way adds $(printf '%s\n' "${added[@]}" | spread) ms"
fi
