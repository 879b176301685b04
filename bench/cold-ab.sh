#!/usr/bin/env bash
# Cold blob GETs through docker-registry's pull-through mode and one or more kagami binaries,
# alternating (run 1: docker-registry, A, B, ...; run 2: the same; ...), on one origin, with
# a fresh random blob per GET. For each GET: curl's MB/s, the mirror's CPU per byte
# (utime+stime of its process from before the GET to 1.5 s after it, so a commit's fsync is
# counted) and its minor page faults. On a shared machine MB/s moves a lot between runs;
# CPU per byte much less: compare binaries by the medians of many alternating runs.
#
#   bench/cold-ab.sh target/release/kagami /path/to/other/kagami
#   RUNS=7 SIZE_MB=200 bench/cold-ab.sh A B        # defaults: RUNS=5 SIZE_MB=200
#   PERF=1 bench/cold-ab.sh A   # also `perf record -g` each kagami GET (perf.kN.data here)
#   WARM=1 bench/cold-ab.sh A   # also a second (warm) GET of each blob, same figures
#   FLOOR="copy splice" bench/cold-ab.sh A   # also bench/relay-floor.py in those modes
#     (f-copy, f-splice...): the least a relay that stores and hashes costs on this machine
#
# A binary may be a wrapper script (e.g. one that sets GLIBC_TUNABLES and execs kagami).
# Needs: docker-registry, curl, python3 (and perf for PERF=1). Everything listens on
# 127.0.0.1 and is stopped at the end.
set -euo pipefail
RUNS=${RUNS:-5}; SIZE_MB=${SIZE_MB:-200}
WORK=$(mktemp -d /tmp/kagami-cold-ab.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
. "$(dirname "$0")/lib.sh"
wait_port() { wait_http "127.0.0.1:$1"; }
ORIGIN=$(port); PROXY=$(port)
start_registry "$WORK/origin" "$ORIGIN" true; start_registry "$WORK/proxy" "$PROXY" true "$ORIGIN"
declare -A PORTOF PIDOF
PIDOF[proxy]=${PIDS[1]}; PORTOF[proxy]=$PROXY
printf 'mirrors:\n  docker.io:\n    endpoint: ["http://127.0.0.1:%s"]\n' "$ORIGIN" >"$WORK/registries.yaml"
WHO=(proxy)
i=0
for bin in "$@"; do
  i=$((i+1)); p=$(port)
  "$bin" serve --listen 127.0.0.1:$p --data-dir "$WORK/k$i" --config "$WORK/registries.yaml" --disable-default-registry-endpoint 2>"$WORK/k$i.log" &
  PIDS+=($!); PIDOF[k$i]=$!; PORTOF[k$i]=$p; WHO+=(k$i); wait_port "$p"
done
for mode in ${FLOOR:-}; do
  p=$(port)
  python3 "$(dirname "$0")/relay-floor.py" "$mode" "$p" "$ORIGIN" "$WORK/floor-$mode" 2>"$WORK/f-$mode.log" &
  PIDS+=($!); PIDOF[f-$mode]=$!; PORTOF[f-$mode]=$p; WHO+=(f-$mode); wait_port "$p"
done
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
flt() { awk '{print $10}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
RESULTS=
for r in $(seq "$RUNS"); do
  for who in "${WHO[@]}"; do
    repo=library/c$r$who; d=$(push_blob "$repo"); sync; sleep 0.5
    url="http://127.0.0.1:${PORTOF[$who]}/v2/$repo/blobs/$d"; case $who in k*) url="$url?ns=docker.io" ;; esac
    t0=$(ticks "${PIDOF[$who]}"); f0=$(flt "${PIDOF[$who]}")
    if [ -n "${PERF:-}" ] && [[ $who == k* ]]; then perf record ${PERF_EV:--F 2000} -g -o "$PWD/perf.$who.data" -p "${PIDOF[$who]}" 2>/dev/null & PERFPID=$!; sleep 0.3; fi
    mbps=$(curl -sSf -o /dev/null -w '%{speed_download}' "$url" | awk '{printf "%.0f", $1/1e6}')
    sleep 1.5 # the commit (fsync) is counted too
    t1=$(ticks "${PIDOF[$who]}"); f1=$(flt "${PIDOF[$who]}")
    if [ -n "${PERF:-}" ] && [[ $who == k* ]]; then kill -INT $PERFPID; wait $PERFPID || true; fi
    ns=$(awk -v a="$t0" -v b="$t1" -v hz="$HZ" -v s=$((SIZE_MB*1048576)) 'BEGIN{printf "%.2f", (b-a)/hz*1e9/s}')
    line="run $r $who MBps $mbps nsB $ns faults $((f1-f0))"; echo "$line"; RESULTS+="$line"$'\n'
    if [ -n "${WARM:-}" ]; then
      t0=$(ticks "${PIDOF[$who]}"); f0=$(flt "${PIDOF[$who]}")
      mbps=$(curl -sSf -o /dev/null -w '%{speed_download}' "$url" | awk '{printf "%.0f", $1/1e6}')
      sleep 0.3
      t1=$(ticks "${PIDOF[$who]}"); f1=$(flt "${PIDOF[$who]}")
      ns=$(awk -v a="$t0" -v b="$t1" -v hz="$HZ" -v s=$((SIZE_MB*1048576)) 'BEGIN{printf "%.2f", (b-a)/hz*1e9/s}')
      echo "warm $r $who MBps $mbps nsB $ns faults $((f1-f0))"
    fi
  done
done
for mode in ${FLOOR:-}; do
  if grep -q 'mismatch\|relay-floor .*: ' "$WORK/f-$mode.log"; then echo "relay-floor $mode failed:" >&2; cat "$WORK/f-$mode.log" >&2; exit 1; fi
done
echo "medians (proxy = docker-registry, kN = the Nth binary given, f-MODE = relay-floor.py):"
for who in "${WHO[@]}"; do
  col() { echo "$RESULTS" | awk -v w="$who" -v c="$1" '$1=="run" && $3==w {print $c}' | median; }
  printf '%-6s %6s MB/s %6s ns CPU/byte %8s faults\n' "$who" "$(col 5)" "$(col 7)" "$(col 9)"
done
