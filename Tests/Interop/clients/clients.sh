#!/bin/bash
# Real-client interoperability checks: nbdinfo, qemu-img, qemu-io, nbdcopy, fio.
#
# Environment:
#   NBD_URI   nbd+unix:///EXPORT?socket=PATH or nbd://127.0.0.1:PORT/EXPORT
#   NBD_UNIX  Unix socket path of the server (optional if NBD_URI is nbd://)
#   EXPORT    export name
#   WORKDIR   scratch directory (needs ~4.5 GiB free; left for the caller)
#   NBD_PEER  optional: nbdkit|qemu-nbd to tolerate documented peer deviations
#
# The export must be >= 2 GiB + 64 MiB; it is overwritten.  Prints
# "PASS name" / "FAIL name: reason" per check and "N passed, N failed";
# exits non-zero on any failure.  Every client runs under `timeout`.
set -u
export PATH=/usr/bin:/bin:/usr/sbin:/sbin:$PATH   # nbdsh/nbdcopy helpers need the system python
: "${NBD_URI:?set NBD_URI}" "${EXPORT:?set EXPORT}" "${WORKDIR:?set WORKDIR}"
NBD_UNIX=${NBD_UNIX:-}
PY=/usr/bin/python3
MiB=$((1 << 20))
GiB=$((1 << 30))
mkdir -p "$WORKDIR" || exit 2
WORKDIR=$(cd "$WORKDIR" && pwd)
cd "$WORKDIR" || exit 2          # fio drops *-verify.state files into the cwd
LOG=$WORKDIR/log
mkdir -p "$LOG"
PASSED=0
FAILED=0
T0=$(date +%s)

pass() { echo "PASS $1${2:+ ($2)}"; PASSED=$((PASSED + 1)); }
fail() { echo "FAIL $1: $2"; FAILED=$((FAILED + 1)); }
# show the tail of a log on failure
tailof() { tail -n 5 "$1" 2>/dev/null | tr '\n' '|' | cut -c1-400; }

# Refuse anything that is not loopback or a Unix socket.
case "$NBD_URI" in
    nbd+unix://*) ;;
    nbd://127.0.0.1:*|nbd://localhost:*|nbd://\[::1\]:*) ;;
    *) echo "FAIL setup: NBD_URI must be nbd+unix:// or nbd://127.0.0.1:PORT/..."; exit 2 ;;
esac

# qemu block-layer options for a byte window [off, off+size) of the export
# (raw driver over the nbd driver), so that qemu-img sees exactly the window.
qemu_window() {
    local off=$1 size=$2 srv
    if [ -n "$NBD_UNIX" ]; then
        srv="file.server.type=unix,file.server.path=$NBD_UNIX"
    else
        local hp=${NBD_URI#nbd://}; hp=${hp%%/*}
        srv="file.server.type=inet,file.server.host=${hp%:*},file.server.port=${hp##*:}"
    fi
    echo "driver=raw,offset=$off,size=$size,file.driver=nbd,$srv,file.export=$EXPORT"
}

# qio NAME CMD... : run qemu-io on the whole export in writeback mode (so that
# FUA is only sent where asked for); fail on non-zero exit or any
# "fail"/"error"/"mismatch" in its output.
qio() {
    local name=$1; shift
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    if timeout 60 qemu-io -t writeback -f raw "${args[@]}" "$NBD_URI" >"$LOG/$name.log" 2>&1 \
        && ! grep -qiE 'fail|error|mismatch' "$LOG/$name.log"; then
        return 0
    fi
    return 1
}

# ----------------------------------------------------------------------------
# nbdinfo
# ----------------------------------------------------------------------------
# --list: OPT_LIST + per-export INFO must show our export and its
# base:allocation meta context.
if timeout 30 nbdinfo --list "$NBD_URI" >"$LOG/nbdinfo-list.log" 2>&1 \
    && grep -q "^export=\"$EXPORT\":" "$LOG/nbdinfo-list.log" \
    && grep -q "^[[:space:]]*base:allocation" "$LOG/nbdinfo-list.log"; then
    pass nbdinfo_list
else
    fail nbdinfo_list "export $EXPORT not listed: $(tailof "$LOG/nbdinfo-list.log")"
fi

# --size: GO size; the export must be large enough for this script.
SIZE=$(timeout 30 nbdinfo --size "$NBD_URI" 2>"$LOG/nbdinfo-size.log")
if [[ "$SIZE" =~ ^[0-9]+$ ]] && [ "$SIZE" -ge $((2 * GiB + 64 * MiB)) ]; then
    pass nbdinfo_size "$SIZE"
else
    fail nbdinfo_size "got '$SIZE' (need >= 2 GiB + 64 MiB) $(tailof "$LOG/nbdinfo-size.log")"
    echo "$PASSED passed, $FAILED failed"
    exit 1
fi

# --json: contract block sizes 1/4096/32M, base:allocation context, fixed
# newstyle with structured replies, size identical to --size.
if timeout 30 nbdinfo --json "$NBD_URI" >"$LOG/nbdinfo-json.log" 2>&1 \
    && msg=$($PY - "$LOG/nbdinfo-json.log" "$EXPORT" "$SIZE" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
e = [x for x in j["exports"] if x["export-name"] == sys.argv[2]]
assert e, "export missing"
e = e[0]
bs = (e.get("block_size_minimum"), e.get("block_size_preferred"), e.get("block_size_maximum"))
assert bs == (1, 4096, 33554432), "block sizes %r" % (bs,)
assert "base:allocation" in e.get("contexts", []), "contexts %r" % e.get("contexts")
assert j["protocol"] == "newstyle-fixed", j["protocol"]
assert j.get("structured"), "no structured replies"
assert e["export-size"] == int(sys.argv[3]), "size %r" % e["export-size"]
print("block sizes %r, contexts %r" % (bs, e["contexts"]))
EOF
); then
    pass nbdinfo_json "$msg"
else
    fail nbdinfo_json "$(tailof "$LOG/nbdinfo-json.log") ${msg:-}"
fi

# --can: every capability of the contract (exit 0 = true, 2 = false).
for cap in multi-conn flush fua trim zero fast-zero df cache structured-reply; do
    timeout 30 nbdinfo --can "$cap" "$NBD_URI" >/dev/null 2>&1
    rc=$?
    if [ $rc = 0 ]; then pass "nbdinfo_can_$cap"; else fail "nbdinfo_can_$cap" "exit $rc (2 = not advertised)"; fi
done
timeout 30 nbdinfo --is read-only "$NBD_URI" >/dev/null 2>&1
rc=$?
if [ $rc = 2 ]; then pass nbdinfo_not_read_only; else fail nbdinfo_not_read_only "exit $rc"; fi

# ----------------------------------------------------------------------------
# nbdcopy: 2 GiB of random data in (multi-conn, --flush) and back out.
# ----------------------------------------------------------------------------
SRC=$WORKDIR/random-2g.img
OUT=$WORKDIR/out.img
# openssl rand is ~3x faster than /dev/urandom (but takes at most 2^31-1 bytes)
if command -v openssl >/dev/null; then
    { openssl rand $GiB && openssl rand $GiB; } >"$SRC" 2>"$LOG/gen.log"
else
    head -c $((2 * GiB)) /dev/urandom >"$SRC"
fi
if [ "$(stat -c %s "$SRC" 2>/dev/null)" != $((2 * GiB)) ]; then
    fail setup_random_source "could not create 2 GiB of random data: $(tailof "$LOG/gen.log")"
    echo "$PASSED passed, $FAILED failed"
    exit 1
fi
t=$(date +%s%N)
if timeout 180 nbdcopy -v -C 4 -T 4 -R 64 --request-size=262144 --flush "$SRC" "$NBD_URI" \
    >"$LOG/nbdcopy-in.log" 2>&1; then
    dt=$(( ($(date +%s%N) - t) / 1000000 ))
    # nbdcopy only uses several connections if the server advertises CAN_MULTI_CONN
    if grep -q "connections=4" "$LOG/nbdcopy-in.log"; then
        pass nbdcopy_in_2g_multiconn "${dt} ms, 4 connections"
    else
        fail nbdcopy_in_2g_multiconn "copy ok but nbdcopy did not use 4 connections: $(grep -m1 -o 'connections=[0-9]*' "$LOG/nbdcopy-in.log")"
    fi
else
    fail nbdcopy_in_2g_multiconn "nbdcopy failed: $(tailof "$LOG/nbdcopy-in.log")"
fi
t=$(date +%s%N)
if timeout 180 nbdcopy -C 4 -T 4 "$NBD_URI" "$OUT" >"$LOG/nbdcopy-out.log" 2>&1; then
    dt=$(( ($(date +%s%N) - t) / 1000000 ))
    osz=$(stat -c %s "$OUT")
    if [ "$osz" != "$SIZE" ]; then
        fail nbdcopy_out_cmp "downloaded $osz bytes, export is $SIZE"
    elif cmp -n $((2 * GiB)) "$SRC" "$OUT" >"$LOG/cmp.log" 2>&1; then
        pass nbdcopy_out_cmp "${dt} ms, first 2 GiB identical"
    else
        fail nbdcopy_out_cmp "$(tailof "$LOG/cmp.log")"
    fi
else
    fail nbdcopy_out_cmp "nbdcopy failed: $(tailof "$LOG/nbdcopy-out.log")"
fi
# streaming (synchronous, single connection) download of a 64 MiB window via
# nbdcopy to stdout must match too
if timeout 60 nbdcopy --synchronous "$NBD_URI" - 2>"$LOG/nbdcopy-sync.log" | head -c $((64 * MiB)) \
        | cmp - <(head -c $((64 * MiB)) "$SRC") >"$LOG/cmp-sync.log" 2>&1; then
    pass nbdcopy_stream_sync_cmp
else
    fail nbdcopy_stream_sync_cmp "$(tailof "$LOG/cmp-sync.log")"
fi
rm -f "$OUT"

# ----------------------------------------------------------------------------
# qemu-img convert -n of a sparse source with data islands, compare, map.
# Window: first 256 MiB of the export (currently full of random data, so the
# holes MUST be written as zeroes by the conversion).
# ----------------------------------------------------------------------------
WIN=$((256 * MiB))
SPARSE=$WORKDIR/sparse.img
rm -f "$SPARSE"
truncate -s $WIN "$SPARSE"
ISLANDS="1:3 37:1 100:2 200:16 255:1"       # MiB offset:length
for isl in $ISLANDS; do
    dd if="$SRC" of="$SPARSE" bs=1M skip=$((RANDOM % 512)) seek="${isl%%:*}" count="${isl##*:}" \
        conv=notrunc status=none
done
WOPTS=$(qemu_window 0 $WIN)
if timeout 120 qemu-img convert -n -W -m 16 -f raw "$SPARSE" --target-image-opts "$WOPTS" \
    >"$LOG/convert.log" 2>&1; then
    pass qemu_img_convert_n
else
    fail qemu_img_convert_n "$(tailof "$LOG/convert.log")"
fi
# compare: byte-identical, including the holes (zeroes on the target)
# (--image-opts applies to both images, so the source is an option string too)
if timeout 120 qemu-img compare --image-opts "driver=raw,file.driver=file,file.filename=$SPARSE" "$WOPTS" \
        >"$LOG/compare.log" 2>&1 \
    && grep -q "Images are identical" "$LOG/compare.log"; then
    pass qemu_img_compare
else
    fail qemu_img_compare "$(tailof "$LOG/compare.log")"
fi
# map: the non-zero extents reported by BLOCK_STATUS on the target must be
# exactly the data islands of the source.
if timeout 60 qemu-img map --output=json -f raw "$SPARSE" >"$LOG/map-src.json" 2>&1 \
    && timeout 60 qemu-img map --output=json --image-opts "$WOPTS" >"$LOG/map-dst.json" 2>&1 \
    && msg=$($PY - "$LOG/map-src.json" "$LOG/map-dst.json" "$ISLANDS" <<'EOF'
import json, sys
def nonzero(path):
    out = []
    for e in json.load(open(path)):
        if not e["zero"] and e["data"]:
            if out and out[-1][1] == e["start"]:
                out[-1][1] = e["start"] + e["length"]
            else:
                out.append([e["start"], e["start"] + e["length"]])
    return out
M = 1 << 20
want = [[int(o) * M, (int(o) + int(l)) * M] for o, l in (x.split(":") for x in sys.argv[3].split())]
src, dst = nonzero(sys.argv[1]), nonzero(sys.argv[2])
assert src == want, "source map %r != islands %r" % (src, want)
assert dst == want, "target data extents %r != islands %r" % (dst, want)
print("%d data extents match" % len(dst))
EOF
); then
    pass qemu_img_map "$msg"
else
    fail qemu_img_map "${msg:-} $(tailof "$LOG/map-dst.json")"
fi

# ----------------------------------------------------------------------------
# qemu-io (region 300 MiB ...); -t writeback so FUA only where requested.
# ----------------------------------------------------------------------------
R=$((300 * MiB))
# plain write with pattern, read back verifying the pattern
if qio qio_write_read "write -P 0xab $R 1M" "read -P 0xab $R 1M"; then pass qemu_io_write_read
else fail qemu_io_write_read "$(tailof "$LOG/qio_write_read.log")"; fi
# the harness itself detects a mismatch (guards against checks that cannot fail)
if qio qio_mismatch "read -P 0x5a $R 4k"; then
    fail qemu_io_detects_mismatch "reading 0xab with pattern 0x5a was not reported"
else pass qemu_io_detects_mismatch; fi
# FUA write (write -f)
if qio qio_fua "write -f -P 0xcd $((R + MiB)) 64k" "read -P 0xcd $((R + MiB)) 64k"; then pass qemu_io_write_fua
else fail qemu_io_write_fua "$(tailof "$LOG/qio_fua.log")"; fi
# flush
if qio qio_flush "write -P 0x11 $((R + 2 * MiB)) 64k" "flush" "read -P 0x11 $((R + 2 * MiB)) 64k"; then
    pass qemu_io_flush
else fail qemu_io_flush "$(tailof "$LOG/qio_flush.log")"; fi
# write -z: WRITE_ZEROES with NO_HOLE; must read back as zero
if qio qio_wz "write -P 0xee $((R + 3 * MiB)) 1M" "write -z $((R + 3 * MiB)) 1M" "read -P 0 $((R + 3 * MiB)) 1M"; then
    pass qemu_io_write_zeroes
else fail qemu_io_write_zeroes "$(tailof "$LOG/qio_wz.log")"; fi
# write -z -u: WRITE_ZEROES allowing holes; must read back as zero
if qio qio_wzu "write -P 0xee $((R + 4 * MiB)) 1M" "write -z -u $((R + 4 * MiB)) 1M" "read -P 0 $((R + 4 * MiB)) 1M"; then
    pass qemu_io_write_zeroes_unmap
else fail qemu_io_write_zeroes_unmap "$(tailof "$LOG/qio_wzu.log")"; fi
# discard: TRIM succeeds (contents afterwards undefined), and the range can be
# rewritten afterwards
if qio qio_discard "write -P 0x33 $((R + 5 * MiB)) 1M" "discard $((R + 5 * MiB)) 1M" \
        "write -P 0x34 $((R + 5 * MiB)) 4k" "read -P 0x34 $((R + 5 * MiB)) 4k"; then
    pass qemu_io_discard
else fail qemu_io_discard "$(tailof "$LOG/qio_discard.log")"; fi
# aio_write x2 + aio_flush, then verify both
if qio qio_aio "aio_write -P 0x11 $((R + 8 * MiB)) 64k" "aio_write -P 0x22 $((R + 9 * MiB)) 64k" "aio_flush" \
        "read -P 0x11 $((R + 8 * MiB)) 64k" "read -P 0x22 $((R + 9 * MiB)) 64k"; then
    pass qemu_io_aio_write_flush
else fail qemu_io_aio_write_flush "$(tailof "$LOG/qio_aio.log")"; fi

# ----------------------------------------------------------------------------
# fio --ioengine=nbd with crc32c verification (region 512 MiB ...)
# ----------------------------------------------------------------------------
fio_ok() { [ "$1" = 0 ] && grep -q "err= 0" "$2" && ! grep -qiE "verify: bad|fio: .*error|bad magic" "$2"; }
FIO_BASE=$((512 * MiB))
timeout 180 fio --name=randwrite-verify --ioengine=nbd --uri="$NBD_URI" --rw=randwrite --bs=4k \
    --iodepth=16 --offset=$FIO_BASE --size=64M --verify=crc32c --verify_fatal=1 --do_verify=1 \
    >"$LOG/fio-1.log" 2>&1
rc=$?
if fio_ok $rc "$LOG/fio-1.log"; then pass fio_randwrite_verify
else fail fio_randwrite_verify "rc=$rc $(grep -m2 -iE 'err=|verify|error' "$LOG/fio-1.log" | tr '\n' '|')"; fi

# 4 jobs = 4 connections (needs multi-conn), 64 MiB each, 64 KiB blocks
timeout 180 fio --name=multijob-verify --ioengine=nbd --uri="$NBD_URI" --rw=randwrite --bs=64k \
    --iodepth=8 --numjobs=4 --offset=$((FIO_BASE + 64 * MiB)) --offset_increment=64M --size=64M \
    --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting >"$LOG/fio-4.log" 2>&1
rc=$?
if fio_ok $rc "$LOG/fio-4.log"; then pass fio_multijob_verify
else fail fio_multijob_verify "rc=$rc $(grep -m2 -iE 'err=|verify|error' "$LOG/fio-4.log" | tr '\n' '|')"; fi

# Persistence across connections + the verifier can fail: write a verified
# sequential pattern, re-verify it from a new connection (must pass), corrupt
# 4 KiB behind fio's back with qemu-io, re-verify (must FAIL).
FIO_SEQ=(--name=seq --ioengine=nbd --uri="$NBD_URI" --rw=write --bs=64k --iodepth=4
         --offset=$((FIO_BASE + 384 * MiB)) --size=8M --verify=crc32c --verify_fatal=1)
timeout 60 fio "${FIO_SEQ[@]}" --do_verify=1 >"$LOG/fio-seq.log" 2>&1
rc1=$?
timeout 60 fio "${FIO_SEQ[@]}" --verify_only >"$LOG/fio-seq-reverify.log" 2>&1
rc2=$?
if fio_ok $rc1 "$LOG/fio-seq.log" && fio_ok $rc2 "$LOG/fio-seq-reverify.log"; then
    pass fio_reverify_new_connection
else fail fio_reverify_new_connection "rc=$rc1/$rc2 $(grep -m2 -iE 'verify|error' "$LOG/fio-seq-reverify.log" | tr '\n' '|')"; fi
# The corruption must really happen (and be read back), and fio must fail because verification
# found it: not a timeout, not a connection or option error.
CORRUPT=$((FIO_BASE + 384 * MiB + 2 * MiB))
if ! qio qio_corrupt "write -P 0x42 $CORRUPT 4k" "read -P 0x42 $CORRUPT 4k"; then
    fail fio_detects_corruption "could not corrupt the block behind fio's back: $(tailof "$LOG/qio_corrupt.log")"
else
    timeout 60 fio "${FIO_SEQ[@]}" --verify_only >"$LOG/fio-seq-corrupt.log" 2>&1
    rc=$?
    if [ $rc != 0 ] && [ $rc != 124 ] && grep -qE "verify: bad (magic header|header|crc32c)" "$LOG/fio-seq-corrupt.log" \
        && grep -qE "offset $CORRUPT|at file .* offset $CORRUPT" "$LOG/fio-seq-corrupt.log"; then
        pass fio_detects_corruption "rc=$rc, $(grep -m1 -oE 'verify: bad [a-z0-9 ]+' "$LOG/fio-seq-corrupt.log")"
    else
        fail fio_detects_corruption "fio verify did not report the corrupted block at $CORRUPT (rc=$rc): $(grep -m3 -iE 'verify|error' "$LOG/fio-seq-corrupt.log" | tr '\n' '|')"
    fi
fi

rm -f "$SRC" "$SPARSE"
echo "$PASSED passed, $FAILED failed ($(( $(date +%s) - T0 ))s)"
[ "$FAILED" = 0 ]
