#!/usr/bin/env bash
# marsd and marsadm end to end: operator errors, marsadm view (table and JSON) after real I/O,
# graceful shutdown on SIGTERM. Prints PASS/FAIL per check; exits non-zero on any failure.
set -u
MARSD=${MARSD:-.build/release/marsd}
MARSADM=${MARSADM:-.build/release/marsadm}
export PATH=/usr/bin:$PATH   # nbdsh needs Debian's python3 with the nbd module
T=$(mktemp -d /tmp/marsd-daemon.XXXXXX)
PID=
cleanup() { [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null; rm -rf "$T"; }
trap cleanup EXIT
fails=0
check() {  # check NAME COMMAND...
    local name=$1; shift
    if "$@" >"$T/out" 2>&1; then echo "PASS $name"; else echo "FAIL $name"; sed 's/^/    /' "$T/out" | head -20; fails=$((fails + 1)); fi
}
fails_with() {  # fails_with PATTERN COMMAND...: the command exits non-zero and says PATTERN
    local pattern=$1; shift
    ! "$@" >"$T/err" 2>&1 && grep -q -- "$pattern" "$T/err" || { cat "$T/err"; return 1; }
}
wait_for_socket() {
    for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.1; done
    return 1
}

check "marsd refuses to start without exports" fails_with "at least one --export" "$MARSD" serve --unix "$T/x.sock"
check "marsd refuses a malformed --tcp" fails_with "HOST:PORT" "$MARSD" serve --export d="$T/none" --tcp nonsense
check "marsd names a missing device" fails_with "$T/missing.img" "$MARSD" serve --export d="$T/missing.img" --unix "$T/x.sock"
check "marsd refuses a bad export" fails_with "NAME=PATH" "$MARSD" serve --export "=x" --unix "$T/x.sock"
check "marsadm explains an unreachable daemon" fails_with "Is marsd running" "$MARSADM" view --control "$T/nothing.sock"

truncate -s 256M "$T/a.img"
truncate -s 64M "$T/b.img"
"$MARSD" serve --export a="$T/a.img" --export b="$T/b.img":ro --unix "$T/nbd.sock" --control "$T/ctl.sock" --tcp 0 \
    --log-level notice 2>"$T/marsd.log" &
PID=$!
check "marsd starts and listens" wait_for_socket "$T/ctl.sock"
check "write and read back with nbdsh" nbdsh -u "nbd+unix:///a?socket=$T/nbd.sock" \
    -c 'import os; d = os.urandom(1 << 20); h.pwrite(d, 4096, nbd.CMD_FLAG_FUA); assert h.pread(1 << 20, 4096) == d'
check "read-only export refuses writes" nbdsh -u "nbd+unix:///b?socket=$T/nbd.sock" \
    -c 'import errno; assert h.is_read_only()' -c '
try:
    h.set_strict_mode(0); h.pwrite(b"x" * 512, 0); raise SystemExit("write succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EPERM, e'
check "--tcp PORT listens on loopback only" bash -c "'$MARSADM' view --control '$T/ctl.sock' | grep -E 'tcp:127\.0\.0\.1:[1-9][0-9]*'"
check "marsadm view shows both exports" bash -c "'$MARSADM' view --control '$T/ctl.sock' | tee /dev/stderr | grep -E '^a .*rw,buffered' && '$MARSADM' view --control '$T/ctl.sock' | grep -E '^b .*ro,buffered'"
check "marsadm view --json counts the traffic" bash -c "'$MARSADM' view --json --control '$T/ctl.sock' | /usr/bin/python3 -c '
import json, sys
s = json.load(sys.stdin)
a = next(e for e in s[\"exports\"] if e[\"name\"] == \"a\")
assert a[\"bytesWritten\"] == 1 << 20 and a[\"bytesRead\"] == 1 << 20, a
assert a[\"totalConnections\"] == 1 and a[\"activeConnections\"] == 0, a
assert s[\"pid\"] == $PID
'"
check "marsd refuses to replace a file that is not a socket" fails_with "not a socket" "$MARSD" serve --export a="$T/a.img" --unix "$T/marsd.log"
check "a second marsd cannot take over a live socket" fails_with "another process is listening" "$MARSD" serve --export a="$T/a.img" --unix "$T/nbd.sock"
check "the first marsd still serves" nbdsh -u "nbd+unix:///a?socket=$T/nbd.sock" -c 'assert h.pread(512, 0) is not None'
kill -TERM "$PID"
graceful() { wait "$PID"; local rc=$?; PID=; [ "$rc" -eq 0 ] && [ ! -e "$T/nbd.sock" ] && [ ! -e "$T/ctl.sock" ]; }
check "SIGTERM stops marsd gracefully and removes its sockets" graceful
[ "$fails" -eq 0 ]
