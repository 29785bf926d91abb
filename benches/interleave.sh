#!/usr/bin/env bash
# Scenario e in interleaved slices: every arm runs at once (proxies on CPU 1,
# three nghttpd on CPU 0), and `h2load -t1 -c16 -m32` loads each in turn for
# SECS seconds, ROUNDS times. A host that slows down for a minute slows every
# arm's slice of that round alike, which the protocol's back-to-back arms
# cannot promise. Prints each slice's req/s and the proxy's CPU µs per
# request (from /proc/<pid>/stat), then each arm's mean.
#
# usage: benches/interleave.sh ROUNDS SECS ARM... where an ARM is the path of
# an apilb binary, or `haproxy` (configured as benches/proxy.rs configures
# scenario e's HAProxy arm). Needs nghttpd, h2load, haproxy, openssl, taskset.
# Listens on 127.0.0.1: BASE+1.. (the arms), BASE+101..103 (nghttpd) and
# BASE+111.. (apilb's admin), BASE=29000 unless APILB_INTERLEAVE_BASE is set.
# APILB_INTERLEAVE_KEEP=1 keeps the temporary directory (configs, logs).
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 ROUNDS SECS ARM... (an ARM is an apilb binary or haproxy)" >&2
  exit 2
fi
rounds=$1 secs=$2
shift 2
base=${APILB_INTERLEAVE_BASE:-29000}
dir=$(mktemp -d)
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "${APILB_INTERLEAVE_KEEP:-}" ] && echo "kept $dir" >&2 || rm -rf "$dir"
}
trap cleanup EXIT
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

ports=() procs=()
n=0
for arm in "${given[@]}"; do
  n=$((n + 1))
  port=$((base + n))
  if [ "$arm" = haproxy ]; then
    haproxy_cfg "$port" > "h$n.cfg"
    taskset -c 1 haproxy -db -f "h$n.cfg" > "h$n.log" 2>&1 &
  else
    apilb_yaml "$port" $((base + 100 + 10 + n)) > "a$n.yaml"
    taskset -c 1 "$arm" --log-level warn run --no-watch -c "a$n.yaml" > "a$n.log" 2>&1 &
  fi
  pids+=($!)
  procs+=($!)
  ports+=("$port")
done

load() { # port, seconds
  taskset -c 0 h2load -t1 -c16 -m32 -D"$2" "https://127.0.0.1:$1/1k" 2>&1 |
    sed -n 's/^finished in .*, \([0-9.]*\) req\/s.*/\1/p'
}
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

sleep 1.5
for k in $(seq 0 $((n - 1))); do
  [ -n "$(load "${ports[$k]}" 2)" ] || { echo "arm ${given[$k]} did not answer" >&2; exit 1; }
done
: > results
for r in $(seq 1 "$rounds"); do
  line="round $r"
  for k in $(seq 0 $((n - 1))); do
    t0=$(ticks "${procs[$k]}")
    rps=$(load "${ports[$k]}" "$secs")
    t1=$(ticks "${procs[$k]}")
    us=$(echo "scale=2; ($t1 - $t0) * 10000 / ($rps * $secs)" | bc)
    line="$line | $((k + 1)) ${rps%.*} ${us} us"
    echo "$k ${rps%.*} $us" >> results
  done
  echo "$line"
done
for k in $(seq 0 $((n - 1))); do
  awk -v k="$k" -v name="${given[$k]}" '$1 == k { s += $2; u += $3; c++ }
    END { printf "arm %d (%s): mean %.0f req/s, %.2f CPU us per request\n", k + 1, name, s / c, u / c }' results
done
