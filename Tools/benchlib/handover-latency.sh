#!/usr/bin/env bash
# Planned handover latency on loopback: two marsd (release build), one idle resource of 1 GiB, N
# handovers back and forth (`marsadm primary` on the host that is to become primary). Prints each
# handover's time from the command to its answer (the new primary serves then) and the median.
#   Tools/benchlib/handover-latency.sh [N]        (default 10)
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-10}
swift build -c release --product marsd >/dev/null && swift build -c release --product marsadm >/dev/null
MARSD=$PWD/.build/release/marsd
MARSADM=$PWD/.build/release/marsadm
T=$(mktemp -d /tmp/mars-holat.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$T"; }
trap cleanup EXIT
start() {
    mkdir -p "$T/$1"
    "$MARSD" serve --root "$T/$1/mars" --unix "$T/$1/nbd.sock" --control "$T/$1/ctl.sock" --peer "127.0.0.$2:17901" \
        --log-level error 2>>"$T/$1.log" &
    pids+=($!)
    for _ in $(seq 100); do [ -S "$T/$1/ctl.sock" ] && return 0; sleep 0.1; done
    echo "marsd $1 did not start"; exit 1
}
adm() { local host=$1; shift; "$MARSADM" "$@" --control "$T/$host/ctl.sock"; }
start a 61
start b 62
truncate -s 1G "$T/a/vm1.img" "$T/b/vm1.img"
token=$(adm a create-cluster --host alpha --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
adm b join-cluster --host beta --token "$token" 127.0.0.61:17901 >/dev/null
adm a create-resource vm1 "$T/a/vm1.img" >/dev/null
until adm b join-resource vm1 "$T/b/vm1.img" >/dev/null 2>&1; do sleep 0.2; done
adm b wait-resource vm1 --until uptodate >/dev/null
times=()
next=b
for i in $(seq "$N"); do
    start_ns=$(date +%s%N)
    adm $next primary vm1 >/dev/null
    ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
    times+=("$ms")
    echo "handover $i to $next: $ms ms"
    other=$([ $next = b ] && echo a || echo b)
    adm $other wait-resource vm1 --until uptodate >/dev/null
    next=$other
done
printf '%s\n' "${times[@]}" | sort -n | awk '{ v[NR] = $1 } END { printf "median %d ms, min %d ms, max %d ms over %d handovers\n", v[int((NR + 1) / 2)], v[1], v[NR], NR }'
