# Shared by the bench scripts (sourced, not run). Everything listens on loopback.

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
pct() { sort -n | awk -v p="$1" '{a[NR]=$1} END {i=int(NR*p/100+0.5); if(i<1)i=1; print a[i]}'; }
# bash's own clock (microseconds), not date(1): the pull scenarios start dozens of timed
# clients at once on the cores they measure, and a process per reading is CPU taken from them.
now() { echo "$EPOCHREALTIME"; }
since() { echo "$(now) - $1" | bc; }
ratio() { echo "scale=2; $1 / $2" | bc; }
# wait_http HOST:PORT: until /v2/ answers (20 s at most).
wait_http() { for _ in $(seq 400); do curl -s -o /dev/null "http://$1/v2/" && return 0; sleep 0.05; done; echo "$1 never answered" >&2; exit 1; }

# start_registry DIR PORT ACCESSLOG(true|false) [REMOTE_PORT]: a docker-registry on
# 127.0.0.1:PORT with its data under DIR (in pull-through mode for the registry on
# 127.0.0.1:REMOTE_PORT when given); appends its pid to PIDS and waits until it answers.
start_registry() {
  local dir=$1 port=$2 log=${3:-false} remote=${4:-}
  local disabled=true
  [ "$log" = true ] && disabled=false
  mkdir -p "$dir"
  cat >"$dir/config.yml" <<YAML
version: 0.1
log:
  level: error
  accesslog:
    disabled: $disabled
storage:
  filesystem:
    rootdirectory: $dir/data
http:
  addr: 127.0.0.1:$port
health:
  storagedriver:
    enabled: false
YAML
  if [ -n "$remote" ]; then printf 'proxy:\n  remoteurl: http://127.0.0.1:%s\n' "$remote" >>"$dir/config.yml"; fi
  docker-registry serve "$dir/config.yml" >"$dir/log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 200); do curl -s -o /dev/null "http://127.0.0.1:$port/v2/" && return 0; sleep 0.05; done
  echo "registry on port $port never answered" >&2
  exit 1
}

# push_big_image WORKDIR SIZE_MB DEST [LAYERS]: an image of SIZE_MB random bytes in LAYERS
# layers (1 by default; umoci: each layer is gzip of incompressible data, its size on the
# wire) pushed to DEST.
push_big_image() {
  local work=$1 size=$2 dest=$3 layers=${4:-1}
  (
    cd "$work"
    umoci init --layout oci >/dev/null
    umoci new --image oci:big >/dev/null
    for l in $(seq "$layers"); do
      head -c $((size * 1024 * 1024 / layers)) /dev/urandom >"big$l.bin"
      umoci insert --image oci:big "big$l.bin" "/big$l.bin" >/dev/null
      rm "big$l.bin"
    done
    umoci config --image oci:big --architecture amd64 --os linux --config.cmd /big1.bin >/dev/null
    skopeo copy --quiet --dest-tls-verify=false oci:oci:big "docker://$dest"
    rm -rf oci
  )
}

# push_blob REPO [MiB]: a fresh random blob of SIZE_MB (or MiB) pushed to the origin
# registry at 127.0.0.1:$ORIGIN (monolithic upload); prints its digest. Uses $WORK.
push_blob() {
  local f=$WORK/blob.bin
  head -c $((${2:-$SIZE_MB}*1024*1024)) /dev/urandom >"$f"
  local d="sha256:$(sha256sum "$f" | cut -d' ' -f1)"
  local loc; loc=$(curl -sSi -X POST "http://127.0.0.1:$ORIGIN/v2/$1/blobs/uploads/" | tr -d '\r' | awk -F': ' 'tolower($1)=="location"{print $2}')
  case $loc in http*) ;; *) loc="http://127.0.0.1:$ORIGIN$loc";; esac
  case $loc in *\?*) loc="$loc&";; *) loc="$loc?";; esac
  curl -sSf -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$f" "${loc}digest=$d" >/dev/null
  rm -f "$f"; echo "$d"
}
