#!/usr/bin/env bash
# Scenario e counted in instructions: each arm in turn runs under valgrind's
# callgrind (on CPU 1, behind three nghttpd on CPU 0), takes 2,000 requests
# of warm-up uncounted, then N requests of `h2load -t1 -c16 -m32` counted.
# Prints the instructions the proxy executed per request. Unlike req/s or
# CPU time this does not move with the host's load (twins agree within
# ~1 %), so it resolves a change of a few per cent on a shared machine.
# It counts user-space instructions only: not the kernel's share, not
# cycles (a `rep movsb` copy counts about one per byte, so memcpy weighs
# more here than in a `perf` profile), and a proxy under valgrind runs
# ~50 times slower, so its flushes gather more than at full speed.
#
# usage: benches/icount.sh N ARM... where an ARM is the path of an apilb
# binary, or `haproxy`. Needs valgrind, nghttpd, h2load, haproxy, openssl,
# taskset. Ports and environment: see benches/rig.sh; with
# APILB_INTERLEAVE_KEEP=1 the callgrind profiles (cg.<arm>) stay for
# callgrind_annotate.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 N ARM... (an ARM is an apilb binary or haproxy)" >&2
  exit 2
fi
requests=$1
shift
source "$(dirname "$(realpath "$0")")/rig.sh"

load() { # port, requests
  taskset -c 0 h2load -t1 -c16 -m32 -n"$2" "https://127.0.0.1:$1/1k" 2>&1 |
    sed -n 's/^requests: .* \([0-9]*\) succeeded.*/\1/p'
}
wait_for() { # what, command...: polls for up to 60 s
  local what=$1
  shift
  for _ in $(seq 1 300); do "$@" && return 0; sleep 0.2; done
  echo "timed out waiting for $what" >&2
  exit 1
}

for k in $(seq 1 ${#given[@]}); do
  port=$((base + k))
  start_arm "$k" valgrind --tool=callgrind --instr-atstart=no \
    --callgrind-out-file="$dir/cg.$k" --log-file="$dir/vg.$k"
  pid=$started
  wait_for "arm $k to listen" sh -c "ss -ltn | grep -q '127.0.0.1:$port '"
  [ "$(load "$port" 2000)" = 2000 ] || { echo "arm $k failed its warm-up" >&2; exit 1; }
  callgrind_control -i on "$pid" > /dev/null
  ok=$(load "$port" "$requests")
  callgrind_control -i off "$pid" > /dev/null
  kill "$pid"
  wait_for "arm $k's count" grep -q "Collected" "$dir/vg.$k"
  ir=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$dir/vg.$k")
  [ "$ok" = "$requests" ] || { echo "arm $k: only $ok of $requests requests succeeded" >&2; exit 1; }
  echo "arm $k (${given[$((k - 1))]}): $((ir / requests)) instructions per request ($ir for $requests)"
done
