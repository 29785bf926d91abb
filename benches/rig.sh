# Scenario e's rig, sourced by benches/interleave.sh and benches/icount.sh:
# a temporary directory with an openssl-made CA and server certificate, a
# 1 KiB file served by three `nghttpd` on CPU 0, and the configurations of
# the arms (an apilb binary, or `haproxy` configured as benches/proxy.rs
# configures scenario e's HAProxy arm). Listens on 127.0.0.1: BASE+1.. (the
# arms), BASE+101..103 (nghttpd) and BASE+111.. (apilb's admin),
# BASE=29000 unless APILB_INTERLEAVE_BASE is set. APILB_INTERLEAVE_KEEP=1
# keeps the directory (configs, logs) at exit.
base=${APILB_INTERLEAVE_BASE:-29000}
dir=$(mktemp -d)
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "${APILB_INTERLEAVE_KEEP:-}" ] && echo "kept $dir" >&2 || rm -rf "$dir"
}
trap cleanup EXIT

# The arms named on the command line, apilb binaries as absolute paths.
given=()
for arm in "$@"; do
  if [ "$arm" = haproxy ]; then given+=(haproxy); else given+=("$(realpath "$arm")"); fi
done
cd "$dir"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout ca.key -out ca.crt -days 2 -subj /CN=interleave-ca 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout srv.key -out srv.csr -subj /CN=localhost 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > ext.cnf
openssl x509 -req -in srv.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
  -out srv.crt -days 2 -extfile ext.cnf 2>/dev/null
cat srv.crt srv.key > srv.pem
mkdir www && head -c 1024 /dev/zero | tr '\0' s > www/1k

backends=()
for i in 1 2 3; do
  port=$((base + 100 + i))
  taskset -c 0 nghttpd -d www "$port" srv.key srv.crt > /dev/null 2>&1 &
  pids+=($!)
  backends+=("127.0.0.1:$port")
done

apilb_yaml() { # listen port, admin port
  printf 'admin:\n  listen: 127.0.0.1:%s\nworkers: 1\nshutdown_grace: 1s\nfrontends:\n' "$2"
  printf '  - name: l7\n    listen: 127.0.0.1:%s\n    mode: http\n    pool: tls\n    max_connections: 50000\n' "$1"
  printf '    tls:\n      cert_file: %s/srv.crt\n      key_file: %s/srv.key\n' "$dir" "$dir"
  printf 'pools:\n  - name: tls\n    connect_timeout: 5s\n    servers:\n'
  printf '      - %s\n' "${backends[@]}"
  printf '    tls:\n      ca_file: %s/ca.crt\n    health:\n      check: none\n' "$dir"
}

haproxy_cfg() { # listen port
  printf 'global\n    nbthread 1\n    maxconn 7500\ndefaults\n    mode http\n    maxconn 7500\n'
  printf '    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n'
  printf 'frontend fe_l7\n    bind 127.0.0.1:%s ssl crt %s/srv.pem alpn h2,http/1.1\n' "$1" "$dir"
  printf '    default_backend be_l7\nbackend be_l7\n    balance roundrobin\n'
  printf '    option forwardfor\n    http-reuse always\n'
  local i=0
  for b in "${backends[@]}"; do
    i=$((i + 1))
    printf '    server s%s %s ssl verify none alpn h2\n' "$i" "$b"
  done
}

# Starts arm number $1 (1-based) on CPU 1, listening on BASE+$1, with any
# further arguments as a command to run it under; sets `started` to its pid.
start_arm() {
  local n=$1 arm=${given[$(($1 - 1))]}
  shift
  if [ "$arm" = haproxy ]; then
    haproxy_cfg $((base + n)) > "h$n.cfg"
    taskset -c 1 "$@" haproxy -db -f "h$n.cfg" > "h$n.log" 2>&1 &
  else
    apilb_yaml $((base + n)) $((base + 110 + n)) > "a$n.yaml"
    taskset -c 1 "$@" "$arm" --log-level warn run --no-watch -c "a$n.yaml" > "a$n.log" 2>&1 &
  fi
  started=$!
  pids+=("$started")
}
