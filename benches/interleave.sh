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
# Ports and environment: see benches/rig.sh.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 ROUNDS SECS ARM... (an ARM is an apilb binary or haproxy)" >&2
  exit 2
fi
rounds=$1 secs=$2
shift 2
source "$(dirname "$(realpath "$0")")/rig.sh"

ports=() procs=()
n=${#given[@]}
for k in $(seq 1 "$n"); do
  start_arm "$k"
  procs+=("$started")
  ports+=($((base + k)))
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
