# kagami nodes on loopback for the bench scripts (sourced after lib.sh). Node I listens on
# 127.0.0.(I+1): its API on :5000, P2P on :5001, the peer HTTP API on :5002.
# Uses the caller's KAGAMI (binary), WORK (scratch directory, with registries.yaml and psk)
# and NODE_PIDS (an array); pulls go to registry.bench/bench/big:1 through the node.

ip_of() { echo "127.0.0.$(($1 + 1))"; }
# start_node I MODE [DATA]: MODE p2p or solo; the API is on <ip>:5000.
start_node() {
  local i=$1 mode=$2 ip; ip=$(ip_of "$1")
  local data=${3:-$WORK/nodes/$mode-$i-$RANDOM}
  local args=(serve --listen "$ip:5000" --data-dir "$data" --config "$WORK/registries.yaml"
    --disable-default-registry-endpoint)
  if [ "$mode" = p2p ]; then
    args+=(--p2p-listen "$ip:5001" --p2p-http-listen "$ip:5002" --p2p-psk-file "$WORK/psk"
      --p2p-bootstrap "$(ip_of 1):5001")
  fi
  # NODE_ARGS: more flags for every node (e.g. "--fetch-memory 64MiB"), split on spaces.
  # shellcheck disable=SC2206
  [ -n "${NODE_ARGS:-}" ] && args+=($NODE_ARGS)
  mkdir -p "$data"
  KAGAMI_LOG=${NODE_LOG:-warn} "$KAGAMI" "${args[@]}" 2>>"$WORK/node-$i.log" &
  NODE_PIDS[$i]=$!
  echo "$data" >"$WORK/data-$i"
}
stop_nodes() {
  for i in "${!NODE_PIDS[@]}"; do kill "${NODE_PIDS[$i]}" 2>/dev/null || true; done
  for i in "${!NODE_PIDS[@]}"; do wait "${NODE_PIDS[$i]}" 2>/dev/null || true; done
  NODE_PIDS=()
  rm -rf "$WORK/nodes"
}
# members I: how many members node I knows with an HTTP address (what claims and lookups
# use; a member whose address is not proven yet is listed without one).
members() { curl -s "http://$(ip_of "$1"):5000/p2p/status" | python3 -c 'import json,sys; print(sum(1 for m in json.load(sys.stdin).get("members", []) if m.get("http_addr")))' 2>/dev/null || echo 0; }
# start_network N MODE: N nodes, ready (P2P: each sees at least min(N-1, 3) others, or
# with WANT_MEMBERS=all every other node, within 60 s; MEMBERS_SEEN is then the fewest
# members a node saw).
start_network() {
  local n=$1 mode=$2 t0 deadline; t0=$(now)
  for i in $(seq "$n"); do start_node "$i" "$mode"; done
  for i in $(seq "$n"); do wait_http "$(ip_of "$i"):5000"; done
  MEMBERS_SEEN=$((n - 1))
  if [ "$mode" = p2p ]; then
    local want=$((n - 1 < 3 ? n - 1 : 3)) m
    [ "${WANT_MEMBERS:-3}" = all ] && want=$((n - 1))
    deadline=$(( $(date +%s) + 60 ))
    for i in $(seq "$n"); do
      while m=$(members "$i"); [ "$m" -lt "$want" ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.1; done
      [ "$m" -lt "$MEMBERS_SEEN" ] && MEMBERS_SEEN=$m
    done
  fi
  CONVERGED=$(since "$t0")
}
pull() { # node -> seconds
  local out="$WORK/out-$1" t0; if [ -e "$out" ]; then rm -rf "$out"; fi; t0=$EPOCHREALTIME
  "$KAGAMI" pull "$(ip_of "$1"):5000/registry.bench/bench/big:1" --output "$out" >/dev/null 2>>"$WORK/pull.log"
  since "$t0"; rm -rf "$out"
}
log_mark() { wc -l <"$WORK/origin/log"; }
# Bytes the origin sent for blobs of bench/big since line $1 of its access log.
upstream_bytes() {
  tail -n +"$(($1 + 1))" "$WORK/origin/log" | grep -o '"GET /v2/bench/big/blobs/[^"]*" 20[06] [0-9]*' | awk '{s += $NF} END {print s + 0}'
}

# start_origin [LAYERS]: the origin docker-registry on 127.0.0.1:$ORIGIN with an image of
# SIZE_MB in LAYERS layers at bench/big:1; sets ORIGIN, RAW (its manifest) and IMAGE_BYTES
# (what a pull moves: layers and config).
start_origin() {
  ORIGIN=$(port)
  start_registry "$WORK/origin" "$ORIGIN" true
  echo "building a ${SIZE_MB} MB image in ${1:-1} layer(s)..." >&2
  push_big_image "$WORK" "$SIZE_MB" "127.0.0.1:$ORIGIN/bench/big:1" "${1:-1}"
  RAW=$(skopeo inspect --tls-verify=false --raw "docker://127.0.0.1:$ORIGIN/bench/big:1")
  IMAGE_BYTES=$(echo "$RAW" | python3 -c 'import json,sys; m=json.load(sys.stdin); print(sum(l["size"] for l in m["layers"]) + m["config"]["size"])')
}
