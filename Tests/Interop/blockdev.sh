#!/usr/bin/env bash
# A block device as the data device: a loop device over a file, served by marsd in both cache modes.
# Checks the size (BLKGETSIZE64), round trips (512-byte granular too), FUA, flush, write-zeroes with
# and without NO_HOLE, trim, and block status (a block device reports everything as data).
# Where loop devices cannot be set up it prints "SKIP reason" and exits 0: Tools/test counts that
# as skipped, never as passed.
set -u
MARSD=${MARSD:-.build/release/marsd}
export PATH=/usr/bin:$PATH
T=$(mktemp -d /tmp/marsd-blockdev.XXXXXX)
LOOP=
PID=
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null
    rm -rf "$T"
}
trap cleanup EXIT
truncate -s 96M "$T/backing.img"
if ! LOOP=$(losetup --find --show "$T/backing.img" 2>"$T/losetup.err"); then
    echo "SKIP block device tests: no loop device here ($(cat "$T/losetup.err"))"
    LOOP=
    exit 0
fi
fails=0
MARSADM=${MARSADM:-$(dirname "$MARSD")/marsadm}
for cache in buffered direct logged; do
    if [ "$cache" = logged ]; then
        # The loop device as the data device of a logged resource.
        "$MARSD" serve --root "$T/root" --control "$T/ctl.sock" --unix "$T/nbd.sock" --log-level warning 2>"$T/marsd.log" &
        PID=$!
        for _ in $(seq 100); do [ -S "$T/ctl.sock" ] && break; sleep 0.1; done
        "$MARSADM" create-cluster --host blk --control "$T/ctl.sock" >/dev/null
        "$MARSADM" create-resource blk "$LOOP" --control "$T/ctl.sock" >/dev/null || echo "FAIL create-resource on $LOOP"
    else
        "$MARSD" serve --root "$T/root-plain" --export blk="$LOOP" --unix "$T/nbd.sock" --cache "$cache" --log-level warning 2>"$T/marsd.log" &
        PID=$!
    fi
    for _ in $(seq 100); do [ -S "$T/nbd.sock" ] && break; sleep 0.1; done
    if nbdsh -u "nbd+unix:///blk?socket=$T/nbd.sock" -c '
import os
assert h.get_size() == 96 << 20, h.get_size()
d = os.urandom(1 << 20)
h.pwrite(d, 4 << 20)
assert h.pread(1 << 20, 4 << 20) == d
small = os.urandom(512)
h.pwrite(small, 512 * 7, nbd.CMD_FLAG_FUA)          # 512-byte granular, FUA
assert h.pread(512, 512 * 7) == small
assert h.pread(4096, 0)[512 * 7 - 0:512 * 8] == small
h.flush()
h.zero(1 << 20, 4 << 20, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(1 << 20, 4 << 20) == bytes(1 << 20)
h.pwrite(d, 8 << 20)
h.zero(1 << 20, 8 << 20)
assert h.pread(1 << 20, 8 << 20) == bytes(1 << 20)
h.trim(1 << 20, 16 << 20, nbd.CMD_FLAG_FUA)
last = os.urandom(4096)
h.pwrite(last, (96 << 20) - 4096)
assert h.pread(4096, (96 << 20) - 4096) == last
h.pwrite(b"\xa5" * (1 << 20), 32 << 20)
h.flush()
' 2>"$T/err"; then
        echo "PASS block device ($cache): size, round trips, FUA, flush, zero, trim"
    else
        echo "FAIL block device ($cache)"; sed 's/^/    /' "$T/err" "$T/marsd.log" | tail -20; fails=$((fails + 1))
    fi
    if nbdsh --base-allocation -u "nbd+unix:///blk?socket=$T/nbd.sock" -c '
entries = []
h.block_status(1 << 20, 0, lambda ctx, off, e, err: entries.extend(e))
assert entries[0] >= 1 << 20 and entries[1] == 0, entries
' 2>"$T/err"; then
        echo "PASS block device ($cache): block status reports data"
    else
        echo "FAIL block device ($cache): block status"; sed 's/^/    /' "$T/err" | tail -10; fails=$((fails + 1))
    fi
    kill "$PID"; wait "$PID" 2>/dev/null; PID=
done
cmp <(head -c 1048576 /dev/zero | tr '\0' '\245') <(dd if="$LOOP" bs=1M skip=32 count=1 status=none) \
    && echo "PASS data reached the block device" || { echo "FAIL data reached the block device"; fails=$((fails + 1)); }
[ "$fails" -eq 0 ]
