#!/usr/bin/env bash
# kill -9 crash test: a python libnbd client writes (FUA and FLUSH mixed in) to a logged resource
# while marsd is killed with SIGKILL at random moments; after every restart the device must equal
# the replay of a prefix of the log holding every write acknowledged as durable, and the log must
# verify. CYCLES (default 24) rounds; prints PASS/FAIL per check.
set -u
MARSD=${MARSD:-.build/release/marsd}
MARSADM=${MARSADM:-.build/release/marsadm}
CYCLES=${CYCLES:-24}
HERE=$(cd "$(dirname "$0")" && pwd)
T=$(mktemp -d /tmp/marsd-crash.XXXXXX)
PID=
cleanup() { [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null; rm -rf "$T"; }
trap cleanup EXIT
URI="nbd+unix:///vol?socket=$T/nbd.sock"

start() {  # start [wait-for-export]
    "$MARSD" serve --root "$T/root" --unix "$T/nbd.sock" --control "$T/ctl.sock" --log-segment-mib 1 \
        --log-space-mib 128 --log-level notice 2>>"$T/marsd.log" &
    PID=$!
    for _ in $(seq 200); do
        if [ -S "$T/ctl.sock" ]; then
            [ -z "${1:-}" ] && return 0
            /usr/bin/python3 -c "import nbd; h = nbd.NBD(); h.connect_uri('$URI')" 2>/dev/null && return 0
        fi
        kill -0 "$PID" 2>/dev/null || break
        sleep 0.05
    done
    return 1
}

truncate -s 64M "$T/vol.img"
start || { echo "FAIL marsd does not start"; tail "$T/marsd.log"; exit 1; }
"$MARSADM" create-cluster --host crashtest --control "$T/ctl.sock" >/dev/null
"$MARSADM" create-resource vol "$T/vol.img" --control "$T/ctl.sock" >/dev/null || { echo "FAIL create-resource"; exit 1; }
fails=0
for cycle in $(seq "$CYCLES"); do
    /usr/bin/python3 "$HERE/crash/crash_client.py" work "$URI" "$T/state.json" "$cycle" &
    client=$!
    # A random moment between 0.05 and 1.5 s into the workload.
    sleep "$(awk -v s="$RANDOM" 'BEGIN { srand(s); printf "%.2f", 0.05 + rand() * 1.45 }')"
    kill -9 "$PID"; wait "$PID" 2>/dev/null; PID=
    wait "$client"
    if ! start export; then echo "FAIL cycle $cycle: marsd does not come back"; tail -20 "$T/marsd.log"; fails=$((fails + 1)); break; fi
    /usr/bin/python3 "$HERE/crash/crash_client.py" verify "$URI" "$T/state.json" || fails=$((fails + 1))
    if ! "$MARSADM" log-verify vol --root "$T/root" >"$T/verify.out"; then
        echo "FAIL cycle $cycle: log-verify"; cat "$T/verify.out"; fails=$((fails + 1))
    fi
done
if "$MARSADM" view --control "$T/ctl.sock" | grep -qE '^vol +primary +up +up'; then echo "PASS the resource is up after $CYCLES kills"; else
    echo "FAIL the resource is not up"; "$MARSADM" view --control "$T/ctl.sock"; fails=$((fails + 1)); fi
grep -q "replayed\|torn tail" "$T/marsd.log" && echo "recovery reports: $(grep -c 'recovery of vol' "$T/marsd.log") lines (replays and cut tails)"
kill -TERM "$PID"; wait "$PID"; PID=
[ "$fails" -eq 0 ]
