#!/usr/bin/python3
"""Functional NBD interoperability checks driven by python3-libnbd.

Usage:  /usr/bin/python3 libnbd_functional.py URI
        URI: nbd+unix:///EXPORT?socket=/path  or  nbd://127.0.0.1:PORT/EXPORT

(Run it with /usr/bin/python3: the pyenv python on PATH has no nbd module.)

Prints "PASS name" / "FAIL name: reason" per check and a summary line; exits
non-zero if any check failed.  The export must be >= 384 MiB; its contents are
overwritten in the regions listed in LAYOUT below and at the very end.

Expectations: NBD spec (proto.md) plus the marsd server contract (see
/work/shared/reference/nbd.md).  Where the spec only says SHOULD and
conformant servers differ (e.g. ENOSPC vs EINVAL for writes past the end) the
check accepts both but still requires an error.  Documented deviations of the
reference peers are tolerated only when NBD_PEER=nbdkit|qemu-nbd is set; the
default profile ("marsd") checks the full contract.
"""

import errno
import os
import random
import sys
import threading
import time
import traceback
from urllib.parse import urlparse, unquote

import nbd

KiB, MiB = 1 << 10, 1 << 20
PEER = os.environ.get("NBD_PEER", "marsd")
CHECK_TIMEOUT = 120          # seconds per check before the watchdog aborts

# Regions of the export owned by individual checks (offsets in bytes).
LAYOUT = {
    "first": 0,                   # first-block round trip
    "unaligned": 1 * MiB,         # 512-byte / odd-sized I/O
    "fua": 4 * MiB,               # FUA write, flush
    "zero": 8 * MiB,              # 8..12 MiB: zero / NO_HOLE / FAST_ZERO / trim, 1 MiB each
    "sread": 16 * MiB,            # 16..18 MiB: structured read + DF
    "bstatus": 20 * MiB,          # 20..24 MiB: block status
    "maxio": 32 * MiB,            # 32..64 MiB: maximum-size (32 MiB) I/O
    "aio": 64 * MiB,              # 64..68 MiB: 64 parallel reads
    "multi": 128 * MiB,           # 128..192 MiB: 8 connections x 8 MiB
    "visible": 200 * MiB,         # multi-conn visibility
    "big": 256 * MiB,             # 256..320 MiB: TRIM / WRITE_ZEROES above the max payload
}
MIN_EXPORT = 384 * MiB

# --------------------------------------------------------------------------
# Reporting, watchdog
# --------------------------------------------------------------------------
passed = failed = 0
current = {"name": None, "start": 0.0}
notes = []


class CheckFailed(Exception):
    pass


def require(cond, reason):
    if not cond:
        raise CheckFailed(reason)


def tolerated(peer, why):
    """True when NBD_PEER is `peer`, whose deviation is documented."""
    if PEER == peer:
        if why not in notes:
            notes.append(why)
        return True
    return False


def run_check(name, fn):
    global passed, failed
    current["name"], current["start"] = name, time.monotonic()
    del notes[:]
    try:
        info = fn()
        extra = ([str(info)] if info else []) + ["tolerated for %s: %s" % (PEER, n) for n in notes]
        print("PASS %s%s" % (name, (" (%s)" % "; ".join(extra)) if extra else ""), flush=True)
        passed += 1
    except CheckFailed as e:
        print("FAIL %s: %s" % (name, e), flush=True)
        failed += 1
    except nbd.Error as e:
        print("FAIL %s: unexpected libnbd error: %s (errno %s)" % (name, e.string, e.errnum), flush=True)
        failed += 1
    except Exception as e:  # noqa: BLE001
        tb = traceback.extract_tb(e.__traceback__)[-1]
        print("FAIL %s: %s: %s (line %d)" % (name, type(e).__name__, e, tb.lineno), flush=True)
        failed += 1
    current["name"] = None


def watchdog():
    while True:
        time.sleep(1)
        n = current["name"]
        if n and time.monotonic() - current["start"] > CHECK_TIMEOUT:
            print("FAIL %s: timed out after %ds (watchdog abort)" % (n, CHECK_TIMEOUT), flush=True)
            os._exit(3)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
URI = None
EXPORT = None


CONNECT_TIMEOUT = 15.0


def connect_bounded(h):
    """nbd_connect_uri with a deadline (libnbd 1.14 has no connect timeout;
    a server that never accepts or never answers must fail, not hang)."""
    h.aio_connect_uri(URI)
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while h.aio_is_connecting():
        if time.monotonic() > deadline:
            raise CheckFailed("connect/handshake did not complete within %ds" % CONNECT_TIMEOUT)
        h.poll(500)
    if not (h.aio_is_ready() or (h.get_opt_mode() and h.aio_is_negotiating())):
        raise CheckFailed("connection failed: state %s" % h.connection_state())


def connect(meta=True, strict=True):
    h = nbd.NBD()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    connect_bounded(h)
    if not strict:
        h.set_strict_mode(0)
    return h


def connect_opt():
    """Connection left in the option phase (opt mode)."""
    h = nbd.NBD()
    h.set_opt_mode(True)
    connect_bounded(h)
    return h


def close(h):
    try:
        h.shutdown()
    except nbd.Error:
        pass
    # libnbd 1.14's Python binding has no close(); the handle (and socket)
    # is released when the last reference goes away.


def errnum_of(fn):
    """Run fn; return 0 on success or the errno of the nbd.Error it raised."""
    try:
        fn()
        return 0
    except nbd.Error as e:
        return e.errnum or -1


def ename(e):
    return "success" if e == 0 else errno.errorcode.get(e, str(e))


def expect_err(fn, allowed, what):
    e = errnum_of(fn)
    require(e != 0, "%s succeeded, expected %s" % (what, "/".join(map(ename, allowed))))
    require(e in allowed, "%s failed with %s, expected %s" % (what, ename(e), "/".join(map(ename, allowed))))
    return e


def extents(h, length, offset, flags=0):
    """BLOCK_STATUS for base:allocation -> list of (offset, length, flags)."""
    got = []

    def cb(ctx, off, entries, err):
        require(ctx == nbd.CONTEXT_BASE_ALLOCATION, "unexpected context %r" % ctx)
        pos = off
        for i in range(0, len(entries), 2):
            got.append((pos, entries[i], entries[i + 1]))
            pos += entries[i]
        return 0

    h.block_status(length, offset, cb, flags)
    require(got, "BLOCK_STATUS returned no extents")
    require(got[0][0] == offset, "first extent starts at %d, not %d" % (got[0][0], offset))
    for (o, ln, fl) in got:
        require(ln > 0, "zero-length extent at %d" % o)
    # Spec: the first N-1 extents together must be shorter than the request.
    require(sum(ln for (_, ln, _) in got[:-1]) < length, "extents past the first cover the whole request")
    return got


def zero_flagged_ranges_read_zero(h, ext, limit):
    """Consistency: anything reported ZERO must read back as zeroes."""
    for (o, ln, fl) in ext:
        if fl & nbd.STATE_ZERO:
            ln = min(ln, limit - o)
            if ln > 0:
                require(h.pread(ln, o) == bytes(ln), "extent %d+%d reported ZERO but reads non-zero" % (o, ln))


def all_zero_flag(ext, start, end):
    """True if [start,end) is fully covered by extents with STATE_ZERO."""
    pos = start
    for (o, ln, fl) in ext:
        if o + ln <= pos:
            continue
        if o > pos or not (fl & nbd.STATE_ZERO):
            return False
        pos = o + ln
        if pos >= end:
            return True
    return pos >= end


# --------------------------------------------------------------------------
# Option phase
# --------------------------------------------------------------------------
state = {}


def chk_opt_list():
    # NBD_OPT_LIST (baseline) must show the export we are going to use.
    h = connect_opt()
    names = []
    h.opt_list(lambda name, desc: names.append(name) or 0)
    h.opt_abort()
    require(EXPORT in names, "export %r not in OPT_LIST reply %r" % (EXPORT, names))
    return "listed %r" % names


def chk_opt_info_and_meta():
    # NBD_OPT_INFO must carry NBD_INFO_EXPORT and (contract) block sizes
    # 1/4096/32M; LIST_META_CONTEXT must list base:allocation; INFO then an
    # identical GO MUST report the same data.
    h = connect_opt()
    require(h.get_protocol() == "newstyle-fixed", "protocol %r" % h.get_protocol())
    hf = h.get_handshake_flags()
    require(hf & nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE, "FIXED_NEWSTYLE not negotiated")
    require(hf & nbd.HANDSHAKE_FLAG_NO_ZEROES, "NO_ZEROES not negotiated")
    require(h.get_structured_replies_negotiated(), "structured replies not negotiated")
    h.opt_info()
    size = h.get_size()
    bs = tuple(h.get_block_size(k) for k in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM))
    ctxs = []
    h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
    h.opt_go()
    size_go = h.get_size()
    bs_go = tuple(h.get_block_size(k) for k in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM))
    close(h)
    state["size"] = size_go
    require(size == size_go, "OPT_INFO size %d != OPT_GO size %d" % (size, size_go))
    require(bs == bs_go, "OPT_INFO block sizes %r != OPT_GO block sizes %r" % (bs, bs_go))
    mn, pref, mx = bs
    # Spec validity of NBD_INFO_BLOCK_SIZE.
    require(mn > 0 and mn & (mn - 1) == 0 and mn <= 64 * KiB, "minimum %d invalid" % mn)
    require(pref & (pref - 1) == 0 and pref >= max(mn, 512), "preferred %d invalid" % pref)
    require(mx >= pref, "maximum %d < preferred %d" % (mx, pref))
    # Contract values.
    require(bs == (1, 4096, 32 * MiB), "block sizes %r, contract says (1, 4096, 33554432)" % (bs,))
    require("base:allocation" in ctxs, "LIST_META_CONTEXT did not list base:allocation: %r" % ctxs)
    require(size >= MIN_EXPORT, "export too small for this test (%d bytes)" % size)
    return "size %d, block sizes %r, contexts %r" % (size, bs, ctxs)


def chk_opt_unknown_export():
    # Contract: GO (and INFO) for an unknown export -> NBD_REP_ERR_UNKNOWN
    # (libnbd maps it to ENOENT); the option phase MUST continue, so a GO for
    # the real export afterwards succeeds.
    h = connect_opt()
    h.set_export_name("no-such-export-%d" % random.getrandbits(32))
    e_info = errnum_of(h.opt_info)
    e_go = errnum_of(h.opt_go)
    require(h.aio_is_negotiating(), "handle left the option phase after a refused GO")
    h.set_export_name(EXPORT)
    h.opt_go()
    require(h.get_size() == state.get("size", h.get_size()), "size differs after retry")
    close(h)
    require(e_info == errno.ENOENT, "OPT_INFO on unknown export: %s, expected ERR_UNKNOWN" % ename(e_info))
    require(e_go == errno.ENOENT, "OPT_GO on unknown export: %s, expected ERR_UNKNOWN" % ename(e_go))


def chk_flags():
    # Contract: FLUSH, FUA, TRIM, WRITE_ZEROES, FAST_ZERO, DF, MULTI_CONN,
    # CACHE advertised, base:allocation negotiable, writable.
    h = connect()
    missing = []
    for what, ok in (("flush", h.can_flush()), ("fua", h.can_fua()), ("trim", h.can_trim()),
                     ("zero", h.can_zero()), ("df", h.can_df()), ("multi_conn", h.can_multi_conn()),
                     ("cache", h.can_cache()), ("fast_zero", h.can_fast_zero()),
                     ("base:allocation", h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))):
        if not ok:
            missing.append(what)
    require(not h.is_read_only(), "export is read-only")
    close(h)
    require(not missing, "not advertised: " + ", ".join(missing))


# --------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------
def chk_first_block():
    # Write / read back the first 4 KiB.
    h = connect()
    d = os.urandom(4096)
    h.pwrite(d, LAYOUT["first"])
    require(h.pread(4096, LAYOUT["first"]) == d, "first block mismatch")
    close(h)


def chk_last_block():
    # Last 4 KiB and the very last byte; the bytes before must be untouched.
    h = connect()
    size = h.get_size()
    d = os.urandom(4096)
    h.pwrite(d, size - 4096)
    require(h.pread(4096, size - 4096) == d, "last block mismatch")
    h.pwrite(b"\xa5", size - 1)
    require(h.pread(4096, size - 4096) == d[:-1] + b"\xa5", "last byte write wrong or clobbered neighbours")
    close(h)


def chk_unaligned():
    # Minimum block 1: 512-byte I/O at non-4K offsets and odd sizes at odd
    # offsets must work byte-exactly without disturbing neighbours.
    h = connect()
    base = LAYOUT["unaligned"]
    shadow = bytearray(os.urandom(64 * KiB))
    h.pwrite(bytes(shadow), base)
    for off, ln in ((512, 512), (3 * 512, 512), (4095, 2), (7, 1), (777, 12345), (4096 + 1, 4095), (60001, 1)):
        d = os.urandom(ln)
        h.pwrite(d, base + off)
        shadow[off:off + ln] = d
        require(h.pread(ln, base + off) == d, "read-back of %d@%d mismatch" % (ln, off))
    require(h.pread(len(shadow), base) == bytes(shadow), "neighbouring bytes were clobbered")
    close(h)


def chk_max_io():
    # The contract maximum payload (32 MiB) must work for READ and WRITE.
    h = connect()
    mx = h.get_block_size(nbd.SIZE_MAXIMUM)      # 0 if not advertised
    n = min(mx, 32 * MiB) if mx else 32 * MiB
    d = os.urandom(n)
    h.pwrite(d, LAYOUT["maxio"])
    require(h.pread(n, LAYOUT["maxio"]) == d, "%d-byte read-back mismatch" % n)
    close(h)
    return "%d bytes" % n


def chk_fua_write():
    # WRITE with FUA: reply only once durable; data reads back.
    h = connect()
    d = os.urandom(64 * KiB)
    h.pwrite(d, LAYOUT["fua"], nbd.CMD_FLAG_FUA)
    require(h.pread(len(d), LAYOUT["fua"]) == d, "FUA write mismatch")
    close(h)


def chk_flush():
    # FLUSH after writes succeeds; also FUA accepted on non-write commands
    # (spec: server MUST accept FUA on any command when SEND_FUA is set).
    h = connect(strict=False)
    d = os.urandom(64 * KiB)
    h.pwrite(d, LAYOUT["fua"] + 64 * KiB)
    h.flush()
    require(h.pread(len(d), LAYOUT["fua"] + 64 * KiB) == d, "data after flush mismatch")
    e1 = errnum_of(lambda: h.flush(nbd.CMD_FLAG_FUA))
    e2 = errnum_of(lambda: h.pread(512, 0, nbd.CMD_FLAG_FUA))
    e3 = errnum_of(lambda: h.cache(4096, 0, nbd.CMD_FLAG_FUA))
    close(h)
    require(e1 == 0, "FLUSH+FUA rejected: %s" % ename(e1))
    require(e2 == 0, "READ+FUA rejected: %s" % ename(e2))
    require(e3 == 0, "CACHE+FUA rejected: %s" % ename(e3))


def fill(h, off, n):
    d = os.urandom(n)
    h.pwrite(d, off)
    return d


def chk_zero_plain():
    # WRITE_ZEROES (may punch): MUST read back as zero; contract server
    # reports the freshly zeroed region with STATE_ZERO in base:allocation.
    h = connect()
    off = LAYOUT["zero"]
    fill(h, off - 4096, MiB + 8192)
    h.zero(MiB, off)
    require(h.pread(MiB, off) == bytes(MiB), "zeroed range not zero")
    require(h.pread(4096, off - 4096) != bytes(4096) and h.pread(4096, off + MiB) != bytes(4096),
            "WRITE_ZEROES touched bytes outside its range")
    ext = extents(h, MiB, off)
    zero_flagged_ranges_read_zero(h, ext, off + MiB)
    ok = all_zero_flag(ext, off, off + MiB)
    close(h)
    require(ok, "freshly zeroed range not reported as ZERO: %r" % ext[:4])


def chk_zero_no_hole():
    # WRITE_ZEROES with NO_HOLE (MUST be supported with WRITE_ZEROES); also
    # with FUA.  Reads back as zero.
    h = connect()
    off = LAYOUT["zero"] + MiB
    fill(h, off, MiB)
    h.zero(MiB // 2, off, nbd.CMD_FLAG_NO_HOLE)
    h.zero(MiB // 2, off + MiB // 2, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
    require(h.pread(MiB, off) == bytes(MiB), "NO_HOLE zeroed range not zero")
    ext = extents(h, MiB, off)
    zero_flagged_ranges_read_zero(h, ext, off + MiB)
    close(h)


def chk_zero_fast():
    # FAST_ZERO (only when advertised): either succeeds and reads as zero, or
    # fails fast with ENOTSUP and SHOULD leave the data unchanged.  Any other
    # error is wrong.  Without FAST_ZERO, ENOTSUP MUST NOT be returned.
    h = connect()
    if not h.can_fast_zero():
        close(h)
        raise CheckFailed("server does not advertise FAST_ZERO (contract requires it)")
    off = LAYOUT["zero"] + 2 * MiB
    d = fill(h, off, MiB)
    t0 = time.monotonic()
    e = errnum_of(lambda: h.zero(MiB, off, nbd.CMD_FLAG_FAST_ZERO))
    dt = time.monotonic() - t0
    after = h.pread(MiB, off)
    close(h)
    if e == 0:
        require(after == bytes(MiB), "FAST_ZERO succeeded but range not zero")
        return "zeroed in %.3fs" % dt
    require(e == errno.ENOTSUP, "FAST_ZERO failed with %s; only ENOTSUP allowed" % ename(e))
    require(after == d, "FAST_ZERO failed with ENOTSUP but modified the data (SHOULD leave it)")
    return "ENOTSUP (allowed), data unchanged"


def chk_trim():
    # TRIM (a hint; contents undefined afterwards).  Contract server on a
    # sparse file punches holes: the range must then be reported ZERO, and
    # anything reported ZERO must read as zero.
    h = connect()
    off = LAYOUT["zero"] + 3 * MiB
    fill(h, off, MiB)
    h.trim(MiB, off)
    h.trim(4096, off, nbd.CMD_FLAG_FUA)          # FUA allowed on TRIM
    ext = extents(h, MiB, off)
    zero_flagged_ranges_read_zero(h, ext, off + MiB)
    ok = all_zero_flag(ext, off, off + MiB)
    close(h)
    require(ok, "freshly trimmed range not reported as ZERO: %r" % ext[:4])


def chk_big_trim_zero():
    # TRIM / WRITE_ZEROES / CACHE carry no payload and may exceed the maximum
    # payload size (spec: server SHOULD NOT disconnect; it may fail them with
    # EINVAL or EOVERFLOW).  If WRITE_ZEROES succeeds the range reads as zero.
    h = connect(strict=False)
    off, n = LAYOUT["big"], 64 * MiB
    h.pwrite(b"\xff" * MiB, off + 40 * MiB)
    got = []
    for what, fn in (("WRITE_ZEROES", lambda: h.zero(n, off)),
                     ("TRIM", lambda: h.trim(n, off)),
                     ("CACHE", lambda: h.cache(n, off))):
        e = errnum_of(fn)
        require(e in (0, errno.EINVAL, errno.EOVERFLOW), "64 MiB %s failed with %s" % (what, ename(e)))
        alive(h, "64 MiB %s" % what)
        got.append("%s %s" % (what, ename(e)))
        if what == "WRITE_ZEROES" and e == 0:
            require(h.pread(MiB, off + 40 * MiB) == bytes(MiB), "64 MiB WRITE_ZEROES left data behind")
    close(h)
    return ", ".join(got)


def chk_cache():
    # CACHE is a hint with no semantic effect: must succeed, data unchanged.
    h = connect()
    d = fill(h, LAYOUT["fua"] + 256 * KiB, 64 * KiB)
    h.cache(64 * KiB, LAYOUT["fua"] + 256 * KiB)
    h.cache(8 * MiB, 0)
    require(h.pread(64 * KiB, LAYOUT["fua"] + 256 * KiB) == d, "data changed by CACHE")
    close(h)


# --------------------------------------------------------------------------
# Structured replies, DF, block status
# --------------------------------------------------------------------------
def sread_setup(h):
    """2 MiB region: zeros with two data islands; returns expected bytes."""
    base = LAYOUT["sread"]
    h.zero(2 * MiB, base)
    exp = bytearray(2 * MiB)
    for (o, n) in ((64 * KiB, 128 * KiB), (MiB, 4096), (MiB + 300 * KiB, 1000)):
        d = os.urandom(n)
        h.pwrite(d, base + o)
        exp[o:o + n] = d
    return base, bytes(exp)


def chk_structured_read():
    # pread_structured: chunks lie inside the request, never overlap, cover
    # it exactly (no error), data chunks carry the right bytes and hole
    # chunks are only where the data is zero.
    h = connect()
    base, exp = sread_setup(h)
    chunks = []

    def cb(buf, off, status, err):
        chunks.append((off, len(buf), status, bytes(buf)))
        return 0

    buf = h.pread_structured(len(exp), base, cb)
    close(h)
    require(bytes(buf) == exp, "reassembled structured read mismatch")
    covered = bytearray(len(exp))
    kinds = {}
    for (off, n, st, data) in chunks:
        rel = off - base
        require(st in (nbd.READ_DATA, nbd.READ_HOLE), "chunk status %d (error chunk?)" % st)
        require(0 <= rel and rel + n <= len(exp), "chunk %d+%d outside the request" % (off, n))
        require(not any(covered[rel:rel + n]), "chunk %d+%d overlaps an earlier chunk" % (off, n))
        covered[rel:rel + n] = b"\1" * n
        require(data == exp[rel:rel + n], "chunk %d+%d content wrong" % (off, n))
        kinds[st] = kinds.get(st, 0) + 1
    require(all(covered), "chunks do not cover the whole request")
    return "%d chunks (%d data, %d hole)" % (len(chunks), kinds.get(nbd.READ_DATA, 0), kinds.get(nbd.READ_HOLE, 0))


def chk_df():
    # DF: at most one content chunk; a hole inside MUST be sent as data;
    # reads <= 64 KiB MUST be served unfragmented.
    h = connect()
    require(h.can_df(), "DF not advertised")
    base, exp = sread_setup(h)
    chunks = []

    def cb(buf, off, status, err):
        chunks.append((off, len(buf), status))
        return 0

    # 64 KiB spanning the hole/data boundary at +64 KiB
    start = base + 32 * KiB
    buf = h.pread_structured(64 * KiB, start, cb, nbd.CMD_FLAG_DF)
    close(h)
    require(bytes(buf) == exp[32 * KiB:96 * KiB], "DF read content mismatch")
    require(len(chunks) == 1, "DF read came in %d chunks: %r" % (len(chunks), chunks))
    require(chunks[0] == (start, 64 * KiB, nbd.READ_DATA), "DF chunk %r is not one full data chunk" % (chunks[0],))


def chk_block_status():
    # BLOCK_STATUS base:allocation without REQ_ONE: data never reported ZERO,
    # zeroed range reported ZERO, everything ZERO reads as zero.
    h = connect()
    base = LAYOUT["bstatus"]
    h.zero(4 * MiB, base)
    d = os.urandom(MiB)
    h.pwrite(d, base + MiB)
    ext = extents(h, 4 * MiB, base)
    zero_flagged_ranges_read_zero(h, ext, base + 4 * MiB)
    for (o, ln, fl) in ext:
        if o < base + 2 * MiB and o + ln > base + MiB:
            require(not fl & nbd.STATE_ZERO, "data range reported ZERO: extent %d+%d flags %d" % (o, ln, fl))
    require(all_zero_flag(ext, base, base + MiB), "zeroed range [0,1M) not ZERO: %r" % ext[:6])
    ext2 = extents(h, 2 * MiB, base + 2 * MiB)
    require(all_zero_flag(ext2, base + 2 * MiB, base + 4 * MiB), "zeroed range [2M,4M) not ZERO: %r" % ext2[:6])
    close(h)
    return "%d extents" % len(ext)


def chk_block_status_req_one():
    # REQ_ONE: exactly one extent, not longer than the request; on the data
    # island it must not claim ZERO, on the zeroed range it reports ZERO.
    h = connect()
    base = LAYOUT["bstatus"]
    ext_data = extents(h, 3 * MiB, base + MiB, nbd.CMD_FLAG_REQ_ONE)
    ext_zero = extents(h, 256 * KiB, base + 2 * MiB, nbd.CMD_FLAG_REQ_ONE)
    close(h)
    for ext, ln in ((ext_data, 3 * MiB), (ext_zero, 256 * KiB)):
        require(len(ext) == 1, "REQ_ONE returned %d extents" % len(ext))
        require(ext[0][1] <= ln, "REQ_ONE extent length %d > request %d" % (ext[0][1], ln))
    require(not ext_data[0][2] & nbd.STATE_ZERO, "REQ_ONE on data reported ZERO: %r" % ext_data)
    require(ext_zero[0][2] & nbd.STATE_ZERO, "REQ_ONE on zeroed range not ZERO: %r" % ext_zero)
    return "data %r, zero %r" % (ext_data[0][1:], ext_zero[0][1:])


# --------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------
def wait_all(h, cookies, deadline):
    """Poll until every cookie completed; raise on command error/timeout."""
    pending = set(cookies)
    while pending:
        require(time.monotonic() < deadline, "timed out with %d commands in flight" % len(pending))
        for c in list(pending):
            if h.aio_command_completed(c):
                pending.discard(c)
        if pending:
            h.poll(1000)


def chk_parallel_reads():
    # 64 READs in flight on one connection; replies may come out of order
    # but each must carry its own data (cookie echoed correctly).
    h = connect()
    base, n = LAYOUT["aio"], 64 * KiB
    data = os.urandom(64 * n)
    h.pwrite(data, base)
    bufs, cookies = [], []
    for i in range(64):
        b = nbd.Buffer.from_buffer(bytearray(n))
        bufs.append(b)
        cookies.append(h.aio_pread(b, base + ((i * 37) % 64) * n))
    inflight = h.aio_in_flight()
    wait_all(h, cookies, time.monotonic() + 60)
    close(h)
    for i, b in enumerate(bufs):
        j = (i * 37) % 64
        require(bytes(b.to_buffer()) == data[j * n:(j + 1) * n], "parallel read %d returned wrong data" % i)
    return "%d in flight at peak" % inflight


def chk_multi_conn_writers():
    # 8 connections write disjoint 8 MiB regions concurrently (aio, up to 32
    # in flight each, random order, varied sizes) against a shadow copy; then
    # each flushes, and a fresh connection verifies all 64 MiB.
    base, per = LAYOUT["multi"], 8 * MiB
    shadow = bytearray(os.urandom(8 * per))
    errors = []

    def writer(k):
        try:
            h = connect()
            region = base + k * per
            # split the region into chunks of varying size
            cuts, pos = [], 0
            rng = random.Random(k)
            while pos < per:
                ln = min(rng.choice((4 * KiB, 16 * KiB, 64 * KiB, 128 * KiB, 512 + 4096)), per - pos)
                cuts.append((pos, ln))
                pos += ln
            rng.shuffle(cuts)
            inflight = []
            deadline = time.monotonic() + 90
            for (pos, ln) in cuts:
                buf = nbd.Buffer.from_bytearray(shadow[k * per + pos:k * per + pos + ln])
                inflight.append((h.aio_pwrite(buf, region + pos), buf))
                inflight = [(c, b) for (c, b) in inflight if not h.aio_command_completed(c)]
                while len(inflight) >= 32:
                    require(time.monotonic() < deadline, "writer %d timed out" % k)
                    h.poll(1000)
                    inflight = [(c, b) for (c, b) in inflight if not h.aio_command_completed(c)]
            wait_all(h, [c for (c, _) in inflight], deadline)
            h.flush()
            close(h)
        except Exception as e:  # noqa: BLE001
            errors.append("writer %d: %s" % (k, e))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    require(not any(t.is_alive() for t in threads), "writer threads hung")
    require(not errors, "; ".join(errors[:3]))
    h = connect()
    for k in range(8):
        got = h.pread(per, base + k * per)
        if got != bytes(shadow[k * per:(k + 1) * per]):
            bad = next(i for i in range(per) if got[i] != shadow[k * per + i])
            close(h)
            raise CheckFailed("region %d differs from shadow at +%d" % (k, bad))
    close(h)


def chk_multi_conn_visibility():
    # CAN_MULTI_CONN: after a FLUSH on A is answered, B (connected before the
    # write, having read the old data) sees A's write; same for FUA.
    a, b = connect(), connect()
    require(a.can_multi_conn(), "CAN_MULTI_CONN not advertised")
    off = LAYOUT["visible"]
    b.pread(128 * KiB, off)                    # prime any per-connection cache on B
    d1 = os.urandom(64 * KiB)
    a.pwrite(d1, off)
    a.flush()
    r1 = b.pread(64 * KiB, off)
    d2 = os.urandom(64 * KiB)
    b.pwrite(d2, off + 64 * KiB, nbd.CMD_FLAG_FUA)
    r2 = a.pread(64 * KiB, off + 64 * KiB)
    close(a)
    close(b)
    require(r1 == d1, "write+flush on A not visible on B")
    require(r2 == d2, "FUA write on B not visible on A")


# --------------------------------------------------------------------------
# Server-side error codes (libnbd strict mode off so bad requests go out)
# --------------------------------------------------------------------------
def errors_handle():
    h = connect(strict=False)
    return h, h.get_size()


def alive(h, what):
    try:
        require(len(h.pread(512, 0)) == 512, "short read")
    except nbd.Error as e:
        raise CheckFailed("connection unusable after %s: %s" % (what, e.string))


def chk_err_beyond_end():
    # READ / TRIM / BLOCK_STATUS / CACHE past the end: EINVAL (CACHE: any
    # error); WRITE / WRITE_ZEROES past the end: SHOULD ENOSPC (EINVAL accepted,
    # qemu 7.2 uses it).  The connection stays usable.
    h, size = errors_handle()
    cb = lambda *a: 0  # noqa: E731
    got = []
    got.append(expect_err(lambda: h.pread(512, size), (errno.EINVAL,), "READ at size"))
    got.append(expect_err(lambda: h.pread(1024, size - 512), (errno.EINVAL,), "READ straddling end"))
    got.append(expect_err(lambda: h.trim(1024, size - 512), (errno.EINVAL,), "TRIM straddling end"))
    got.append(expect_err(lambda: h.block_status(1024, size, cb), (errno.EINVAL,), "BLOCK_STATUS at size"))
    got.append(expect_err(lambda: h.cache(1024, size - 512), (errno.EINVAL, errno.ENOSPC), "CACHE straddling end"))
    got.append(expect_err(lambda: h.pwrite(b"x" * 1024, size - 512), (errno.ENOSPC, errno.EINVAL),
                          "WRITE straddling end"))
    got.append(expect_err(lambda: h.zero(1024, size - 512), (errno.ENOSPC, errno.EINVAL),
                          "WRITE_ZEROES straddling end"))
    alive(h, "out-of-range requests")
    close(h)
    return "write/zero gave %s/%s" % (ename(got[-2]), ename(got[-1]))


def chk_err_overflow():
    # offset + length overflowing 2^64 must be rejected, not wrapped.
    h, size = errors_handle()
    off = (1 << 64) - 4096
    expect_err(lambda: h.pread(8192, off), (errno.EINVAL,), "wrapping READ")
    expect_err(lambda: h.pwrite(b"w" * 8192, off), (errno.EINVAL, errno.ENOSPC), "wrapping WRITE")
    expect_err(lambda: h.trim(8192, off), (errno.EINVAL, errno.ENOSPC), "wrapping TRIM")
    expect_err(lambda: h.zero(8192, off), (errno.EINVAL, errno.ENOSPC), "wrapping WRITE_ZEROES")
    expect_err(lambda: h.block_status(8192, off, lambda *a: 0), (errno.EINVAL,), "wrapping BLOCK_STATUS")
    alive(h, "wrapping requests")
    close(h)


def chk_err_zero_length():
    # Length 0: contract EINVAL (spec: unspecified, SHOULD NOT disconnect;
    # ENOSPC accepted for the write-type commands).
    h, size = errors_handle()
    bad = []
    for what, fn in (("READ", lambda: h.pread(0, 4096)), ("WRITE", lambda: h.pwrite(b"", 4096)),
                     ("TRIM", lambda: h.trim(0, 4096)), ("WRITE_ZEROES", lambda: h.zero(0, 4096)),
                     ("CACHE", lambda: h.cache(0, 4096)),
                     ("BLOCK_STATUS", lambda: h.block_status(0, 4096, lambda *a: 0))):
        e = errnum_of(fn)
        if e == 0 and what != "BLOCK_STATUS" and tolerated(
                "qemu-nbd", "nbd.md 1.12/5: qemu answers length-0 requests with success"):
            continue
        if e not in (errno.EINVAL, errno.ENOSPC):
            bad.append("%s -> %s" % (what, ename(e)))
    alive(h, "zero-length requests")
    close(h)
    require(not bad, "expected EINVAL: " + ", ".join(bad))


def chk_err_flags():
    # Unknown flag, and a known flag on the wrong command: EINVAL, connection
    # kept.  (REQ_ONE on READ, NO_HOLE on WRITE, DF on WRITE.)
    h, size = errors_handle()
    expect_err(lambda: h.pread(512, 0, 1 << 10), (errno.EINVAL,), "READ with unknown flag 1<<10")
    expect_err(lambda: h.pread(512, 0, 1 << 14), (errno.EINVAL,), "READ with unknown flag 1<<14")
    expect_err(lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE), (errno.EINVAL,), "READ with REQ_ONE")
    expect_err(lambda: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_NO_HOLE), (errno.EINVAL,), "WRITE with NO_HOLE")
    expect_err(lambda: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_DF), (errno.EINVAL,), "WRITE with DF")
    alive(h, "bad flags")
    close(h)


def chk_read_beyond_advertised_max():
    # READ above the advertised 32 MiB maximum: the contract serves up to 64 MiB (clients such as
    # nbd-tester-client send such requests without negotiating); the READ of more than 64 MiB is
    # in malformed.py (libnbd refuses to send it).
    h, size = errors_handle()
    try:
        data = h.pread(32 * MiB + 4096, 0)
    except nbd.Error as e:
        if tolerated("qemu-nbd", "qemu-nbd refuses requests above its 32 MiB maximum"):
            alive(h, "oversized READ")
            close(h)
            return
        raise CheckFailed("READ of 32 MiB + 4 KiB failed (%s), contract: served up to 64 MiB" % e)
    require(len(data) == 32 * MiB + 4096, "READ of 32 MiB + 4 KiB returned %d bytes" % len(data))
    alive(h, "READ beyond the advertised maximum")
    close(h)


CHECKS = [
    ("opt_list_shows_export", chk_opt_list),
    ("opt_info_go_blocksize_meta", chk_opt_info_and_meta),
    ("opt_go_unknown_export", chk_opt_unknown_export),
    ("transmission_flags", chk_flags),
    ("roundtrip_first_block", chk_first_block),
    ("roundtrip_last_block", chk_last_block),
    ("roundtrip_unaligned_odd", chk_unaligned),
    ("roundtrip_max_payload", chk_max_io),
    ("write_fua", chk_fua_write),
    ("flush_and_fua_on_any_command", chk_flush),
    ("zero_plain_reports_zero", chk_zero_plain),
    ("zero_no_hole", chk_zero_no_hole),
    ("zero_fast_zero", chk_zero_fast),
    ("trim_reports_zero", chk_trim),
    ("cache", chk_cache),
    ("trim_zero_cache_above_max_payload", chk_big_trim_zero),
    ("structured_read_chunks", chk_structured_read),
    ("structured_read_df", chk_df),
    ("block_status", chk_block_status),
    ("block_status_req_one", chk_block_status_req_one),
    ("parallel_aio_reads_64", chk_parallel_reads),
    ("multi_conn_8_writers", chk_multi_conn_writers),
    ("multi_conn_visibility", chk_multi_conn_visibility),
    ("err_beyond_end", chk_err_beyond_end),
    ("err_offset_overflow", chk_err_overflow),
    ("err_zero_length", chk_err_zero_length),
    ("err_bad_flags", chk_err_flags),
    ("read_beyond_advertised_max", chk_read_beyond_advertised_max),
]


def main():
    global URI, EXPORT
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    URI = sys.argv[1]
    u = urlparse(URI)
    if u.scheme not in ("nbd", "nbd+unix"):
        print("only nbd:// and nbd+unix:// URIs are supported")
        return 2
    if u.scheme == "nbd" and u.hostname not in ("127.0.0.1", "localhost", "::1"):
        print("refusing non-loopback host %s" % u.hostname)
        return 2
    EXPORT = unquote(u.path[1:]) if u.path.startswith("/") else unquote(u.path)
    threading.Thread(target=watchdog, daemon=True).start()
    t0 = time.monotonic()
    print("# libnbd_functional: %s (peer profile %s, libnbd %s)" % (URI, PEER, nbd.NBD().get_version()))
    for name, fn in CHECKS:
        run_check(name, fn)
    print("%d passed, %d failed (%.1fs)" % (passed, failed, time.monotonic() - t0), flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
