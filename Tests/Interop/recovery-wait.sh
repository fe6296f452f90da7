#!/usr/bin/env bash
# A client that connects while a resource recovers is served, not refused. Each round writes
# 128 MiB to a logged resource (flushed, so it is durable in the log) and kills marsd with SIGKILL
# before the writeback position is stored (it follows a second of quiet), so the restart replays
# at least 100 MiB of log. The client connects as soon as the NBD socket exists: its first
# connection must be served (the handshake waits for the recovery) and read the new data.
# ROUNDS (default 10), MARSD_ARGS (e.g. --recovery-wait 0 shows what clients got before the wait). Also: a resource that cannot recover answers at once, with the reason.
set -u
MARSD=${MARSD:-.build/release/marsd}
MARSADM=${MARSADM:-.build/release/marsadm}
ROUNDS=${ROUNDS:-10}
export PATH=/usr/bin:$PATH
T=$(mktemp -d /tmp/marsd-recovery-wait.XXXXXX)
PID=
cleanup() { [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null; rm -rf "$T"; }
trap cleanup EXIT
URI="nbd+unix:///vm1?socket=$T/nbd.sock"
MiB=$((1 << 20))

start() {
    rm -f "$T/nbd.sock" "$T/ctl.sock"  # stale after SIGKILL
    "$MARSD" serve --root "$T/root" --unix "$T/nbd.sock" --control "$T/ctl.sock" --log-level notice ${MARSD_ARGS:-} 2>>"$T/marsd.log" &
    PID=$!
}
# Waits for the NBD socket only: nothing that would give the recovery time to finish.
wait_nbd_socket() { for _ in $(seq 1000); do [ -S "$T/nbd.sock" ] && return 0; sleep 0.01; done; return 1; }

truncate -s 256M "$T/vm1.img"
head -c $((128 * MiB)) /dev/urandom > "$T/a.bin"
head -c $((128 * MiB)) /dev/urandom > "$T/b.bin"
start
for _ in $(seq 100); do [ -S "$T/ctl.sock" ] && break; sleep 0.05; done
"$MARSADM" create-cluster --host rw --control "$T/ctl.sock" >/dev/null
"$MARSADM" create-resource vm1 "$T/vm1.img" --control "$T/ctl.sock" >/dev/null || { echo "FAIL create-resource"; exit 1; }

fails=0
served=0
for round in $(seq "$ROUNDS"); do
    data=$T/a.bin; [ $((round % 2)) -eq 0 ] && data=$T/b.bin
    if ! nbdcopy --flush "$data" "$URI" 2>"$T/err"; then
        echo "FAIL round $round: the write before the kill: $(cat "$T/err")"; fails=$((fails + 1)); break
    fi
    kill -9 "$PID"; wait "$PID" 2>/dev/null
    lines=$(wc -l < "$T/marsd.log")
    start
    if ! wait_nbd_socket; then echo "FAIL round $round: marsd does not listen"; tail "$T/marsd.log"; fails=$((fails + 1)); break; fi
    # The first connection after the restart: must be served and see the data of this round.
    if /usr/bin/python3 - "$URI" "$data" >"$T/client" 2>&1 <<'PY'
import nbd, random, sys
uri, path = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.connect_uri(uri)
assert h.get_size() == 256 << 20, h.get_size()
data = open(path, "rb").read()
for offset in [0, len(data) - (1 << 20)] + [random.randrange(0, len(data) - 65536) for _ in range(16)]:
    n = 1 << 20 if offset % 2 == 0 else 65536
    n = min(n, len(data) - offset)
    assert h.pread(n, offset) == data[offset:offset + n], "stale data at %d" % offset
PY
    then
        served=$((served + 1))
    else
        echo "FAIL round $round: the first connection after the restart was not served: $(tail -3 "$T/client" | tr '\n' ' ')"
        fails=$((fails + 1))
    fi
    # The round only counts if the restart really replayed at least 100 MiB.
    for _ in $(seq 100); do tail -n +"$((lines + 1))" "$T/marsd.log" | grep -q 'resource up' && break; sleep 0.05; done
    replay=$(tail -n +"$((lines + 1))" "$T/marsd.log" | grep -oE 'replayed [0-9]+ records from LSN [0-9]+ to [0-9]+' | tail -1)
    bytes=$(echo "$replay" | awk '{ print $8 - $6 }')
    if [ -z "$replay" ] || [ "$bytes" -lt $((100 * MiB)) ]; then
        echo "FAIL round $round: the restart replayed ${bytes:-no} bytes, not at least 100 MiB ($replay)"; fails=$((fails + 1))
    else
        echo "round $round: replayed $((bytes / MiB)) MiB"
    fi
done
[ "$served" -eq "$ROUNDS" ] && echo "PASS every first connection during recovery was served ($served of $ROUNDS rounds, >= 100 MiB replayed each)" \
    || echo "FAIL only $served of $ROUNDS first connections during recovery were served"

# A resource that cannot recover: the handshake is answered at once, with the reason.
kill -9 "$PID"; wait "$PID" 2>/dev/null
truncate -s 128M "$T/vm1.img"
start
wait_nbd_socket
begin=$(date +%s%N)
# qemu-io prints the server's message.
if ! timeout 30 qemu-io -f raw -c 'read 0 512' "$URI" >"$T/client" 2>&1 \
    && grep -q "resource vm1 failed to come up: the data device $T/vm1.img has 134217728 bytes, the resource needs 268435456" "$T/client"; then
    echo "PASS a resource that cannot come up is refused with the reason ($(( ($(date +%s%N) - begin) / 1000000 )) ms)"
else
    echo "FAIL a resource that cannot come up: $(cat "$T/client")"; fails=$((fails + 1))
fi
kill -TERM "$PID"; wait "$PID"; PID=
[ "$fails" -eq 0 ]
