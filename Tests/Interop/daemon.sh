#!/usr/bin/env bash
# marsd and marsadm end to end: operator errors, marsadm view (table and JSON) after real I/O,
# graceful shutdown on SIGTERM. Prints PASS/FAIL per check; exits non-zero on any failure.
set -u
MARSD=${MARSD:-.build/release/marsd}
MARSADM=${MARSADM:-.build/release/marsadm}
export PATH=/usr/bin:$PATH   # nbdsh needs Debian's python3 with the nbd module
T=$(mktemp -d /tmp/marsd-daemon.XXXXXX)
PID=
cleanup() { [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null; umount "$T/small" 2>/dev/null; rm -rf "$T"; }
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

check "marsd refuses to start without a listener" fails_with "give --unix" "$MARSD" serve --root "$T/root"
check "marsd refuses a malformed --tcp" fails_with "HOST:PORT" "$MARSD" serve --root "$T/root" --export d="$T/none" --tcp nonsense
check "marsd names a missing device" fails_with "$T/missing.img" "$MARSD" serve --root "$T/root" --export d="$T/missing.img" --unix "$T/x.sock"
check "marsd refuses a bad export" fails_with "NAME=PATH" "$MARSD" serve --root "$T/root" --export "=x" --unix "$T/x.sock"
check "marsd refuses a log space limit below two segments" fails_with "log-space-mib must be at least" "$MARSD" serve --root "$T/root" --unix "$T/x.sock" --log-segment-mib 64 --log-space-mib 100
check "marsd names a root it cannot use" fails_with "$T/a-file/root" bash -c "touch '$T/a-file'; '$MARSD' serve --root '$T/a-file/root' --unix '$T/x.sock'"
check "marsadm explains an unreachable daemon" fails_with "Is marsd running" "$MARSADM" view --control "$T/nothing.sock"
check "... and with --json prints the error as JSON" bash -c "! '$MARSADM' view --json --control '$T/nothing.sock' > '$T/json' 2>/dev/null && /usr/bin/python3 -c '
import json, sys
r = json.load(sys.stdin)
assert \"Is marsd running\" in r[\"error\"], r
' < '$T/json'"
check "marsadm does not wait forever for a silent peer" bash -c "
    /usr/bin/python3 -c 'import socket, time; s = socket.socket(socket.AF_UNIX); s.bind(\"$T/silent.sock\"); s.listen(); c = s.accept(); time.sleep(30)' &
    for i in \$(seq 100); do [ -S '$T/silent.sock' ] && break; sleep 0.1; done
    ! timeout 20 '$MARSADM' view --timeout 1 --control '$T/silent.sock' > '$T/silent' 2>&1; rc=\$?; kill %1; cat '$T/silent'
    grep -F 'no reply from $T/silent.sock within 1' '$T/silent'"
check "marsadm says when a peer answers with something else" bash -c "
    /usr/bin/python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); s.bind(\"$T/other.sock\"); s.listen(); c, _ = s.accept(); c.recv(100); c.sendall(b\"hello\\n\"); c.close()' &
    for i in \$(seq 100); do [ -S '$T/other.sock' ] && break; sleep 0.1; done
    ! timeout 20 '$MARSADM' view --timeout 10 --control '$T/other.sock' > '$T/other' 2>&1; wait; cat '$T/other'
    grep -F '$T/other.sock answered with something that is not a marsd control reply' '$T/other'"
check "marsadm refuses a zero --timeout" fails_with "timeout must be" "$MARSADM" view --timeout 0 --control "$T/nothing.sock"

truncate -s 256M "$T/a.img"
truncate -s 64M "$T/b.img"
"$MARSD" serve --root "$T/root" --export a="$T/a.img" --export b="$T/b.img":ro --unix "$T/nbd.sock" --control "$T/ctl.sock" --tcp 0 \
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
check "marsd refuses to replace a file that is not a socket" fails_with "not a socket" "$MARSD" serve --root "$T/root2" --export a="$T/a.img" --unix "$T/marsd.log"
check "a second marsd cannot take over a live socket" fails_with "another process is listening" "$MARSD" serve --root "$T/root2" --export a="$T/a.img" --unix "$T/nbd.sock"
check "the first marsd still serves" nbdsh -u "nbd+unix:///a?socket=$T/nbd.sock" -c 'assert h.pread(512, 0) is not None'

# Resources: create, operator errors, log inspection, down/up, restart, corruption.
adm() { "$MARSADM" "$@" --control "$T/ctl.sock"; }
truncate -s 128M "$T/r.img"
check "create-resource before create-cluster says what to do" fails_with "create-cluster' first" adm create-resource r1 "$T/r.img"
check "create-cluster" adm create-cluster --host alpha
check "a second create-cluster is refused" fails_with "already in cluster" adm create-cluster --host beta
for bad in "../x" "a/b" ".hidden" ".." "$(printf 'x%.0s' $(seq 65))" "sp ace"; do
    check "resource name '${bad:0:12}' is refused" fails_with "is not allowed" adm create-resource "$bad" "$T/r.img"
done
check "a missing data device is named" fails_with "$T/nope.img" adm create-resource r0 "$T/nope.img"
check "a failed create leaves the name free" test ! -e "$T/root/resource-r0"
check "create-resource r1 (a relative device path is the caller's)" bash -c "cd '$T' && '$MARSADM' create-resource r1 r.img --control '$T/ctl.sock'"
check "the resource records the absolute device path" grep -q "\"device\" : \"$T/r.img\"" "$T/root/resource-r1/resource.json"
check "a second create-resource r1 is refused" fails_with "exists already" adm create-resource r1 "$T/r.img"
check "a resource name that is an export is refused" fails_with "already served" adm create-resource a "$T/r.img"
ln -s "$T/r.img" "$T/r-link.img"
check "r1's device is refused for another resource" fails_with "is already the device of resource 'r1'" adm create-resource r2 "$T/r.img"
check "... also through a symbolic link" fails_with "is already the device of resource 'r1'" adm create-resource r2 "$T/r-link.img"
check "an export's device is refused" fails_with "is already served as export 'a'" adm create-resource r2 "$T/a.img"
check "a file in marsd's root is refused" fails_with "inside marsd's root" adm create-resource r2 "$T/root/resource-r1/resource.json"
check "a second marsd on the same root is refused and names the first" fails_with "is in use by marsd (pid $PID)" \
    timeout 20 "$MARSD" serve --root "$T/root" --unix "$T/other.sock" --control "$T/other-ctl.sock"
check "the first marsd still serves r1" nbdsh -u "nbd+unix:///r1?socket=$T/nbd.sock" -c 'assert h.pread(512, 0) is not None'
check "write to the resource with FUA, trim, zero and flush" nbdsh -u "nbd+unix:///r1?socket=$T/nbd.sock" -c '
import os
d = os.urandom(1 << 20)
h.pwrite(d, 0, nbd.CMD_FLAG_FUA)
h.pwrite(b"\xab" * 65536, 4 << 20)
h.trim(65536, 4 << 20)
h.zero(8192, 8192)
h.flush()
assert h.pread(1 << 20, 0) == d[:8192] + bytes(8192) + d[16384:]
open("'"$T/expected"'", "wb").write(d)'
check "marsadm view shows r1 up as primary with its log" bash -c "adm() { '$MARSADM' \"\$@\" --control '$T/ctl.sock'; }; adm view | tee /dev/stderr | grep -E '^r1 +primary +up +up +1 '"
check "marsadm view --json has the log positions" bash -c "'$MARSADM' view --json --control '$T/ctl.sock' | /usr/bin/python3 -c '
import json, sys
s = json.load(sys.stdin)
assert s[\"host\"] == \"alpha\", s
r = s[\"resources\"][0]
assert r[\"name\"] == \"r1\" and r[\"state\"] == \"up\" and r[\"role\"] == \"primary\", r
log = r[\"log\"]
assert log[\"appendedLSN\"] > 1 << 20 and log[\"durableLSN\"] == log[\"appendedLSN\"], log
assert log[\"currentSegment\"].startswith(\"log-\") and log[\"currentSegment\"].endswith(\"-alpha\"), log
'"
check "marsadm up --json reports what marsd holds afterwards" bash -c "'$MARSADM' up r1 --json --control '$T/ctl.sock' | /usr/bin/python3 -c '
import json, sys
r = json.load(sys.stdin)
assert r[\"message\"] == \"resource r1 is up\", r
assert [(x[\"name\"], x[\"state\"]) for x in r[\"status\"][\"resources\"]] == [(\"r1\", \"up\")], r
'"
check "marsadm pointed at the NBD socket says what it reached" fails_with "$T/nbd.sock closed the connection without a reply. Is it marsd's control socket" \
    "$MARSADM" view --timeout 10 --control "$T/nbd.sock"
check "marsadm log-verify says OK" bash -c "'$MARSADM' log-verify r1 --root '$T/root' | grep -E '^r1: OK: .*, written back to [0-9]+$'"
check "log-verify checks the writeback position too" bash -c "mkdir '$T/copy' && cp -r '$T/root/resource-r1' '$T/copy/' && rm '$T/copy/resource-r1/writeback-position'
    ! '$MARSADM' log-verify r1 --root '$T/copy' > '$T/verify' 2>&1; cat '$T/verify'; grep -F 'BROKEN: log recovery stopped: cannot read writeback-position' '$T/verify'"
check "marsadm log-dump lists the records" bash -c "'$MARSADM' log-dump r1 --root '$T/root' | grep -E ' write epoch 1 offset 0 length 1048576 \[fua\]'"
check "marsadm log-dump --json" bash -c "'$MARSADM' log-dump r1 --root '$T/root' --json | /usr/bin/python3 -c '
import json, sys
r = json.load(sys.stdin)
assert r[\"ok\"], r
types = [x[\"type\"] for s in r[\"segments\"] for x in s[\"recordList\"]]
assert \"write\" in types and \"trim\" in types and \"writeZeroes\" in types, types
'"
check "log-dump of a missing resource says so" fails_with "cannot open the log of resource 'nope'" "$MARSADM" log-dump nope --root "$T/root"
check "log-dump refuses a path in the name" fails_with "not allowed" "$MARSADM" log-dump ../etc --root "$T/root"
check "log-verify --json of a missing resource prints the problem as JSON" bash -c "! '$MARSADM' log-verify nope --json --root '$T/root' > '$T/json' 2>/dev/null && /usr/bin/python3 -c '
import json, sys
r = json.load(sys.stdin)
assert not r[\"ok\"] and \"cannot open the log of resource\" in r[\"problem\"], r
' < '$T/json'"
check "log-verify mentions a newest segment whose creation was interrupted" bash -c "rm -rf '$T/copy2' && mkdir '$T/copy2' && cp -r '$T/root/resource-r1' '$T/copy2/'
    last=\$(ls '$T/copy2/resource-r1' | grep '^log-' | tail -1); seq=\${last#log-}; seq=\$((10#\${seq%%-*} + 1))
    : > '$T/copy2/resource-r1/'\$(printf 'log-%09d-alpha' \$seq)
    '$MARSADM' log-verify r1 --root '$T/copy2' | tee /dev/stderr | grep -E '^log-[0-9]{9}-alpha: its creation was interrupted'"
check "down r1 writes the log back" adm down r1
check "the export is gone while r1 is down" bash -c "! nbdinfo 'nbd+unix:///r1?socket=$T/nbd.sock' 2>/dev/null"
check "the data device holds every write after down" /usr/bin/python3 -c "
d = open('$T/expected', 'rb').read()
img = open('$T/r.img', 'rb').read(1 << 20)
assert img == d[:8192] + bytes(8192) + d[16384:]"
check "up r1" adm up r1
check "r1 serves its data again" nbdsh -u "nbd+unix:///r1?socket=$T/nbd.sock" -c "
d = open('$T/expected', 'rb').read()
assert h.pread(1 << 20, 0) == d[:8192] + bytes(8192) + d[16384:]"
check "down of a missing resource is refused" fails_with "no resource 'nope'" adm down nope
# A data device that fails during writeback (a full filesystem): down says so and exits non-zero.
mkdir -p "$T/small"
if mount -t tmpfs -o size=8m tmpfs "$T/small" 2>"$T/mount.err"; then
    truncate -s 64M "$T/small/full.img"
    adm create-resource full "$T/small/full.img" >/dev/null
    head -c 7M /dev/zero > "$T/small/filler"
    nbdsh -u "nbd+unix:///full?socket=$T/nbd.sock" -c 'h.pwrite(b"\x5a" * (4 << 20), 0); h.flush()'
    check "down of a resource whose device is full exits non-zero and says what the device lacks" \
        fails_with "resource full is down, but the data device does not hold every acknowledged write: the changes at LSN .* are in the log but not on the data device" adm down full
    check "... view shows it" bash -c "'$MARSADM' view --control '$T/ctl.sock' | tee /dev/stderr | grep -E '^full: down with acknowledged writes missing from the data device'"
    rm "$T/small/filler"
    check "... up replays what the log holds" adm up full
    check "... and down then writes it all back" adm down full
    check "... so the device holds every write" /usr/bin/python3 -c "assert open('$T/small/full.img', 'rb').read(4 << 20) == b'\x5a' * (4 << 20)"
    umount "$T/small"
else
    echo "SKIP down with a failing data device: cannot mount a small tmpfs ($(cat "$T/mount.err"))"
fi
kill -TERM "$PID"; wait "$PID"; PID=
"$MARSD" serve --root "$T/root" --unix "$T/nbd.sock" --control "$T/ctl.sock" --log-level notice 2>>"$T/marsd.log" &
PID=$!
wait_for_socket "$T/ctl.sock"
check "a restart restores r1 (up) with its data" nbdsh -u "nbd+unix:///r1?socket=$T/nbd.sock" -c "
d = open('$T/expected', 'rb').read()
assert h.pread(1 << 20, 0) == d[:8192] + bytes(8192) + d[16384:]
h.pwrite(b'\\x77' * 4096, 2 << 20, nbd.CMD_FLAG_FUA)"
check "down survives a restart" bash -c "
    '$MARSADM' down r1 --control '$T/ctl.sock' && kill -TERM $PID && while kill -0 $PID 2>/dev/null; do sleep 0.1; done
    '$MARSD' serve --root '$T/root' --unix '$T/nbd.sock' --control '$T/ctl.sock' 2>>'$T/marsd.log' & echo \$! > '$T/pid'
    for i in \$(seq 100); do [ -S '$T/ctl.sock' ] && break; sleep 0.1; done
    '$MARSADM' view --control '$T/ctl.sock' | grep -E '^r1 +primary +down +down'"
PID=$(cat "$T/pid")
# A bit flip in the middle of the log: the resource stays down and says where.
"$MARSADM" up r1 --control "$T/ctl.sock" >/dev/null
nbdsh -u "nbd+unix:///r1?socket=$T/nbd.sock" -c 'h.pwrite(b"\x11" * 65536, 0, nbd.CMD_FLAG_FUA); h.pwrite(b"\x22" * 65536, 65536, nbd.CMD_FLAG_FUA)'
kill -9 "$PID"; wait "$PID" 2>/dev/null; rm -f "$T/ctl.sock"  # stale after SIGKILL
SEG=$(ls "$T/root/resource-r1" | grep '^log-' | tail -1)
/usr/bin/python3 -c "
f = open('$T/root/resource-r1/$SEG', 'r+b'); f.seek(64 + 48 + 1000); b = f.read(1); f.seek(64 + 48 + 1000); f.write(bytes([b[0] ^ 1]))"
check "log-verify names the corrupt segment and offset" fails_with "$SEG at byte 64" "$MARSADM" log-verify r1 --root "$T/root"
check "... and does not send the operator to itself" bash -c "! '$MARSADM' log-verify r1 --root '$T/root' | grep -F 'marsadm log-verify'"
check "log-dump still lists the log, up to the damage" bash -c "! '$MARSADM' log-dump r1 --root '$T/root' > '$T/dump' 2>&1; cat '$T/dump'; grep -E '^$SEG: .*corrupt at 64' '$T/dump' && grep -q '^PROBLEM:' '$T/dump'"
"$MARSD" serve --root "$T/root" --unix "$T/nbd.sock" --control "$T/ctl.sock" 2>>"$T/marsd.log" &
PID=$!
wait_for_socket "$T/ctl.sock"
check "a corrupt log keeps the resource down and view says why" bash -c "'$MARSADM' view --control '$T/ctl.sock' | tee /dev/stderr | grep -E '^r1 +primary +up +failed' && '$MARSADM' view --control '$T/ctl.sock' | grep -F '$SEG at byte 64'"
check "... and what to do next" bash -c "'$MARSADM' view --json --control '$T/ctl.sock' | grep -F 'When recovery stops'"
check "no export is served from a corrupt log" bash -c "! nbdinfo 'nbd+unix:///r1?socket=$T/nbd.sock' 2>/dev/null"
kill -TERM "$PID"
graceful() { wait "$PID"; local rc=$?; PID=; [ "$rc" -eq 0 ] && [ ! -e "$T/nbd.sock" ] && [ ! -e "$T/ctl.sock" ]; }
check "SIGTERM stops marsd gracefully and removes its sockets" graceful
mkdir "$T/root/resource-broken" && echo '{"name": "broken", "dev' > "$T/root/resource-broken/resource.json"
"$MARSD" serve --root "$T/root" --unix "$T/nbd.sock" --control "$T/ctl.sock" 2>>"$T/marsd.log" &
PID=$!
wait_for_socket "$T/ctl.sock"
check "an unreadable resource.json keeps only its resource down" bash -c "'$MARSADM' view --control '$T/ctl.sock' | tee /dev/stderr | grep -E '^broken .* failed' && '$MARSADM' view --control '$T/ctl.sock' | grep -E '^r1 +primary +up +failed'"
check "... view names the file" bash -c "'$MARSADM' view --control '$T/ctl.sock' | grep -F 'resource-broken/resource.json is unreadable'"
check "... up says why it cannot" fails_with "resource 'broken' cannot be used" "$MARSADM" up broken --control "$T/ctl.sock"
check "... and its name is not taken again" fails_with "exists already" "$MARSADM" create-resource broken "$T/b.img" --control "$T/ctl.sock"
kill -TERM "$PID"; wait "$PID"; PID=
check "an export with a resource's name is refused at start" fails_with "has the name of resource 'r1'" \
    timeout 20 "$MARSD" serve --root "$T/root" --export r1="$T/a.img" --unix "$T/nbd.sock"
# README, "When recovery stops": with the damaged log moved out of the root, the device serves again.
mv "$T/root/resource-r1" "$T/r1-damaged"
"$MARSD" serve --root "$T/root" --unix "$T/nbd.sock" --control "$T/ctl.sock" 2>>"$T/marsd.log" &
PID=$!
wait_for_socket "$T/ctl.sock"
check "a resource whose log was damaged is created again on its device" adm create-resource r1 "$T/r.img"
check "... and serves the device as it is" nbdsh -u "nbd+unix:///r1?socket=$T/nbd.sock" -c "
assert h.get_size() == $(stat -c %s "$T/r.img")
assert h.pread(4096, 2 << 20) == b'\x77' * 4096"
kill -TERM "$PID"; wait "$PID"; PID=
# The size rule: a resource's size is resource.json's, whatever the device's size is now.
restart() { "$MARSD" serve --root "$T/root" --unix "$T/nbd.sock" --control "$T/ctl.sock" 2>>"$T/marsd.log" & PID=$!; wait_for_socket "$T/ctl.sock"; }
size_rule() {  # size_rule: the export of sz is 64 MiB, writes past it fail with ENOSPC, FUA writes at its end work
    nbdsh -u "nbd+unix:///sz?socket=$T/nbd.sock" -c '
import errno
assert h.get_size() == 64 << 20, h.get_size()
h.set_strict_mode(0)
try:
    h.pwrite(b"\x01" * 4096, 64 << 20); raise SystemExit("a write past the resource size succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ENOSPC, e
h.pwrite(b"\x33" * 4096, (64 << 20) - 4096, nbd.CMD_FLAG_FUA)'
}
restart
truncate -s 64M "$T/sz.img"
adm create-resource sz "$T/sz.img" >/dev/null
truncate -s 128M "$T/sz.img"
check "a device that grows while its resource is up: the export keeps the resource's size" size_rule
kill -TERM "$PID"; wait "$PID"; PID=
truncate -s 192M "$T/sz.img"
restart
check "a device that grew while marsd was stopped: the export still has the resource's size" size_rule
check "... and view shows the resource's size" bash -c "'$MARSADM' view --json --control '$T/ctl.sock' | /usr/bin/python3 -c '
import json, sys
s = json.load(sys.stdin)
assert [e[\"size\"] for e in s[\"exports\"] if e[\"name\"] == \"sz\"] == [64 << 20], s[\"exports\"]
'"
kill -9 "$PID"; wait "$PID" 2>/dev/null; rm -f "$T/ctl.sock"
restart
check "... and a restart after kill -9 recovers it" bash -c "'$MARSADM' view --control '$T/ctl.sock' | grep -E '^sz +primary +up +up' && nbdsh -u 'nbd+unix:///sz?socket=$T/nbd.sock' -c 'assert h.pread(4096, (64 << 20) - 4096) == b\"\\x33\" * 4096'"
kill -TERM "$PID"; wait "$PID"; PID=
truncate -s 32M "$T/sz.img"
restart
check "a device that shrank below the resource's size keeps it down and says why" bash -c "'$MARSADM' view --control '$T/ctl.sock' | tee /dev/stderr | grep -E '^sz +primary +up +failed' && '$MARSADM' view --control '$T/ctl.sock' | grep -F 'has 33554432 bytes, the resource needs 67108864: it shrank'"
check "... up refuses it with the same message" fails_with "has 33554432 bytes, the resource needs 67108864" adm up sz
check "... and a client is told the reason" bash -c "! qemu-io -f raw -c 'read 0 512' 'nbd+unix:///sz?socket=$T/nbd.sock' > '$T/q' 2>&1; cat '$T/q'; grep -F 'resource sz failed to come up' '$T/q'"
kill -TERM "$PID"; wait "$PID"; PID=
[ "$fails" -eq 0 ]
