#!/usr/bin/env bash
# Large requests reuse marsd's buffers: page faults per 1 MiB READ and WRITE over TCP and the Unix
# socket on a plain export, and per READ on a logged resource (Tests/Interop/buffers.py says why
# and how). A logged WRITE copies its payload into arrays the log engine holds until writeback,
# which malloc serves: not pooled yet (about 30 faults per 1 MiB WRITE, BENCHMARKS.md).
# marsd runs with --page-cache-reads copy: by default a READ of cached pages is sent with sendfile
# and takes no buffer at all, and this test is about the READs that do.
set -u
MARSD=${MARSD:-.build/release/marsd}
MARSADM=${MARSADM:-.build/release/marsadm}
HERE=$(cd "$(dirname "$0")" && pwd)
T=$(mktemp -d /tmp/marsd-buffers.XXXXXX)
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; rm -rf "$T"; }
trap cleanup EXIT
PORT=$((20000 + RANDOM % 20000))

truncate -s 256M "$T/plain.img" "$T/vm1.img"
"$MARSD" serve --root "$T/root" --unix "$T/nbd.sock" --tcp "127.0.0.1:$PORT" --control "$T/ctl.sock" \
    --export "plain=$T/plain.img" --page-cache-reads copy --log-level notice 2>"$T/marsd.log" &
PID=$!
for _ in $(seq 200); do [ -S "$T/ctl.sock" ] && [ -S "$T/nbd.sock" ] && break; sleep 0.05; done
"$MARSADM" create-cluster --host bufhost --control "$T/ctl.sock" >/dev/null \
    && "$MARSADM" create-resource vm1 "$T/vm1.img" --control "$T/ctl.sock" >/dev/null \
    || { echo "FAIL buffers: set-up of the logged resource"; tail "$T/marsd.log"; exit 1; }

rc=0
/usr/bin/python3 "$HERE/buffers.py" "$PID" "nbd://127.0.0.1:$PORT/plain" "plain export over TCP" write,read || rc=1
/usr/bin/python3 "$HERE/buffers.py" "$PID" "nbd+unix:///plain?socket=$T/nbd.sock" "plain export over the Unix socket" write,read || rc=1
/usr/bin/python3 "$HERE/buffers.py" "$PID" "nbd+unix:///vm1?socket=$T/nbd.sock" "logged resource over the Unix socket" read || rc=1
[ $rc -eq 0 ] || tail -5 "$T/marsd.log"
exit $rc
