#!/usr/bin/env python3
"""Anytime-consistency writer and checker for swift-mars replication tests.

Device model: N blocks of 4096 bytes. Every write is one whole self-describing block:
    bytes  0..7   b"MARSCHK1"
    bytes  8..15  sequence number (u64 LE, from 1)
    bytes 16..23  block index (u64 LE)
    bytes 24..31  run id (u64 LE)
    bytes 32..    sha256(run || seq || block) (each u64 LE) repeated 127 times
so a torn or mixed block never verifies.

    consistency.py write --uri NBD_URI --blocks N --count C [--seed S] --log FILE
                         [--flush-every K] [--qd D] [--run-id R] [--duration-s T] [--op-timeout-s T]
    consistency.py check --image FILE --blocks N --log FILE [--run-id R]
                         [--initial zero|FILE] [--min-seq M|flush] [--strict-order]
    consistency.py compare --a FILE --b FILE

Log format (text, one record per line; the writer creates/truncates it):
    run RUN_ID seed SEED blocks N        header
    issued SEQ BLOCK                     written (and flushed to the OS) before the write is sent
    SEQ BLOCK                            the write was acknowledged
    flush SEQ                            a flush completed: every write with seq <= SEQ is durable
                                         (the file is fsynced after each flush line)

check decides whether the image equals the device after some prefix of the issued writes:
there is a k such that every block holds the last write to it with seq < k (or its initial content).
NBD does not order requests that are in flight together (with --qd > 1 a server may apply and log
them in any order), so by default check accepts a *causal* prefix: the set of applied writes must
contain every write that was acknowledged before an applied write was sent (the log's line order
is the writer's event order). With --qd 1 this is exactly the strict prefix; --strict-order demands
the strict seq prefix anyway. The writer never has two writes to one block in flight together.
Exit codes: 0 consistent / equal, 1 inconsistent / different, 2 usage or I/O error,
3 (write) NBD connection error, 4 (write) an operation timed out.
"""

import argparse
import bisect
import hashlib
import os
import random
import struct
import sys
import time

BS = 4096
MAGIC = b"MARSCHK1"
HDR = struct.Struct("<8sQQQ")
ZERO = bytes(BS)
READ_CHUNK = 16 * 1024 * 1024


def make_block(run_id, seq, block):
    key = struct.pack("<QQQ", run_id, seq, block)
    return HDR.pack(MAGIC, seq, block, run_id) + hashlib.sha256(key).digest() * ((BS - 32) // 32)


def die(msg, code=2):
    print("error: %s" % msg, file=sys.stderr)
    sys.exit(code)


# ---------------------------------------------------------------------------------------------
# write

def import_nbd():
    try:
        import nbd  # noqa: F401
    except ImportError:
        # python3-libnbd lives in the system dist-packages; a pyenv/venv python may not see it.
        d = "/usr/lib/python3/dist-packages"
        if os.path.isdir(d) and d not in sys.path:
            sys.path.append(d)
        try:
            import nbd  # noqa: F401
        except ImportError as e:
            die("cannot import nbd (python3-libnbd); run with /usr/bin/python3 (%s)" % e)
    import nbd
    return nbd


def cmd_write(a):
    nbd = import_nbd()
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    run_id = a.run_id if a.run_id is not None else (int.from_bytes(os.urandom(8), "little") | 1)
    rng = random.Random(seed)
    print("write: seed=%d run_id=%d blocks=%d count=%d qd=%d flush_every=%d"
          % (seed, run_id, a.blocks, a.count, a.qd, a.flush_every), flush=True)
    logf = open(a.log, "w")
    logf.write("run %d seed %d blocks %d\n" % (run_id, seed, a.blocks))
    logf.flush()
    os.fsync(logf.fileno())

    h = nbd.NBD()
    h.set_handle_name("consistency-writer")
    try:
        h.connect_uri(a.uri)
        size = h.get_size()
    except nbd.Error as e:
        print("write: NBD connect to %s failed: %s" % (a.uri, e), file=sys.stderr)
        sys.exit(3)
    if size < a.blocks * BS:
        die("device %s has %d bytes, fewer than --blocks %d x 4096" % (a.uri, size, a.blocks))

    inflight = {}          # cookie -> (seq, block, buffer, issue time)
    busy = set()           # blocks with a write in flight
    flush_inflight = {}    # cookie -> (covered seq, issue time)
    acked = 0
    seq = 0
    last_flush = 0
    t0 = time.monotonic()
    deadline = t0 + a.duration_s if a.duration_s else None

    def settle():
        nonlocal acked, last_flush
        for cookie in list(inflight):
            if h.aio_command_completed(cookie):
                s, b, _, _ = inflight.pop(cookie)
                busy.discard(b)
                logf.write("%d %d\n" % (s, b))
                acked += 1
        for cookie in list(flush_inflight):
            if h.aio_command_completed(cookie):
                covered, _ = flush_inflight.pop(cookie)
                logf.write("flush %d\n" % covered)
                logf.flush()
                os.fsync(logf.fileno())
                last_flush = max(last_flush, covered)

    def wait_some():
        now = time.monotonic()
        if a.op_timeout_s:
            oldest = min([v[3] for v in inflight.values()] + [v[1] for v in flush_inflight.values()],
                         default=now)
            if now - oldest > a.op_timeout_s:
                logf.flush()
                os.fsync(logf.fileno())
                print("write: an operation has been in flight for more than %.1f s (seq issued=%d "
                      "acked=%d flushed=%d); giving up" % (a.op_timeout_s, seq, acked, last_flush),
                      file=sys.stderr)
                sys.exit(4)
        h.poll(200)
        settle()

    try:
        while True:
            done_issuing = seq >= a.count or (deadline is not None and time.monotonic() >= deadline)
            if done_issuing:
                break
            while len(inflight) + len(flush_inflight) >= a.qd:
                wait_some()
            seq += 1
            b = rng.randrange(a.blocks)
            # NBD does not order requests that are in flight together, so a write to a block waits
            # until the previous write to that block has been acknowledged.
            while b in busy:
                wait_some()
            buf = make_block(run_id, seq, b)
            logf.write("issued %d %d\n" % (seq, b))
            logf.flush()
            cookie = h.aio_pwrite(buf, b * BS)
            inflight[cookie] = (seq, b, buf, time.monotonic())
            busy.add(b)
            if a.flush_every and seq % a.flush_every == 0:
                # A flush covers the writes that completed before it was sent: drain first.
                while inflight:
                    wait_some()
                fc = h.aio_flush()
                flush_inflight[fc] = (seq, time.monotonic())
            settle()
        while inflight:
            wait_some()
        if not (a.flush_every and seq % a.flush_every == 0):
            fc = h.aio_flush()
            flush_inflight[fc] = (seq, time.monotonic())
        while flush_inflight:
            wait_some()
        try:
            h.shutdown()
        except nbd.Error:
            pass
    except nbd.Error as e:
        logf.flush()
        os.fsync(logf.fileno())
        print("write: NBD error after issuing seq %d (acked %d, flushed through %d): %s"
              % (seq, acked, last_flush, e), file=sys.stderr)
        sys.exit(3)
    logf.flush()
    os.fsync(logf.fileno())
    logf.close()
    dt = time.monotonic() - t0
    print("write: done: %d writes acknowledged, flushed through seq %d, %.2f s (%.0f writes/s)"
          % (acked, last_flush, dt, acked / dt if dt > 0 else 0.0), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# log

class Log:
    """Parsed writer log. The order of lines is the writer's event order: an `issued` line is written
    before the write is sent and an ack line after its completion was seen, so write i happened
    before write j (i was acknowledged before j was sent) iff ack_ev[i] < issue_ev[j]."""

    def __init__(self, path):
        self.run_id = None
        self.seed = None
        self.blocks = None
        self.issued = {}    # seq -> block
        self.acked = {}     # seq -> block
        self.issue_ev = {}  # seq -> line number of its issued line
        self.ack_ev = {}    # seq -> line number of its ack line
        self.flushed = 0
        try:
            f = open(path)
        except OSError as e:
            die("cannot read log %s: %s" % (path, e))
        with f:
            for n, line in enumerate(f, 1):
                w = line.split()
                if not w or w[0].startswith("#"):
                    continue
                try:
                    if w[0] == "run":
                        self.run_id = int(w[1])
                        kv = dict(zip(w[2::2], w[3::2]))
                        self.seed = int(kv["seed"]) if "seed" in kv else None
                        self.blocks = int(kv["blocks"]) if "blocks" in kv else None
                    elif w[0] == "issued":
                        self.issued[int(w[1])] = int(w[2])
                        self.issue_ev[int(w[1])] = n
                    elif w[0] == "flush":
                        self.flushed = max(self.flushed, int(w[1]))
                    elif len(w) == 2:
                        self.acked[int(w[0])] = int(w[1])
                        self.ack_ev[int(w[0])] = n
                    else:
                        raise ValueError
                except (ValueError, IndexError, KeyError):
                    if n == 1 or f.readline() != "":
                        die("log %s line %d is malformed: %r" % (path, n, line))
                    break  # a torn last line (writer killed mid-write) is ignored
        if not self.issued:
            # log without issued lines: acknowledged writes only, taken as strictly sequential
            self.issued = dict(self.acked)
            self.issue_ev = {s: e - 0.5 for s, e in self.ack_ev.items()}
        for s, b in self.acked.items():
            if self.issued.get(s) != b:
                die("log: acknowledged write %d %d was not issued" % (s, b))
        self.last = max(self.issued, default=0)
        if len(self.issued) != self.last:
            missing = next(s for s in range(1, self.last + 1) if s not in self.issued)
            die("log: issued sequence numbers are not contiguous (seq %d missing)" % missing)
        # per block: ascending list of seqs writing it
        self.by_block = {}
        for s in range(1, self.last + 1):
            self.by_block.setdefault(self.issued[s], []).append(s)
        self.last_acked = max(self.acked, default=0)
        # writes to one block must be ordered (each acked before the next is sent), else the
        # final content of that block is not defined by the log
        self.overlapping = []
        for b, ss in self.by_block.items():
            for x, y in zip(ss, ss[1:]):
                if self.ack_ev.get(x, float("inf")) > self.issue_ev[y]:
                    self.overlapping.append((b, x, y))


# ---------------------------------------------------------------------------------------------
# check

def classify(data, block, run_id):
    """Return (seq, None) for a valid block of this run, or (None, reason)."""
    magic, seq, idx, rid = HDR.unpack_from(data, 0)
    if magic != MAGIC:
        return None, "garbage (no magic, not initial content)"
    if rid != run_id:
        if make_block(rid, seq, idx) == data:
            return None, "block from another run (run id %d, seq %d, block %d)" % (rid, seq, idx)
        return None, "torn block (header says run id %d seq %d, body does not match)" % (rid, seq)
    if idx != block:
        if make_block(rid, seq, idx) == data:
            return None, "misdirected write (holds seq %d meant for block %d)" % (seq, idx)
        return None, "torn block (header says seq %d for block %d)" % (seq, idx)
    if make_block(rid, seq, idx) != data:
        return None, "torn block (header says seq %d, body does not match it)" % seq
    return seq, None


def cmd_check(a):
    lg = Log(a.log)
    run_id = a.run_id if a.run_id is not None else lg.run_id
    if run_id is None:
        die("no run id: give --run-id or use a log with a 'run' header")
    if lg.blocks is not None and lg.blocks != a.blocks:
        print("note: log header says blocks %d, checking --blocks %d" % (lg.blocks, a.blocks))
    if a.min_seq is None:
        min_seq = None
    elif a.min_seq == "flush":
        min_seq = lg.flushed
    else:
        try:
            min_seq = int(a.min_seq)
        except ValueError:
            die("--min-seq takes an integer or 'flush'")
    L = lg.last
    INF = float("inf")
    print("log: run_id=%d issued=%d acknowledged=%d (last acked seq %d) flushed through seq %d"
          % (run_id, L, len(lg.acked), lg.last_acked, lg.flushed))
    if lg.overlapping:
        b, x, y = lg.overlapping[0]
        print("warning: %d pairs of writes to one block were in flight together (first: block %d, "
              "seq %d and %d); their order on the device is undefined" % (len(lg.overlapping), b, x, y))
    try:
        img = open(a.image, "rb")
    except OSError as e:
        die("cannot open image %s: %s" % (a.image, e))
    init = None
    if a.initial != "zero":
        try:
            init = open(a.initial, "rb")
        except OSError as e:
            die("cannot open initial image %s: %s" % (a.initial, e))
    size = os.fstat(img.fileno()).st_size
    if size < a.blocks * BS:
        die("image %s has %d bytes, fewer than %d blocks" % (a.image, size, a.blocks))

    # Every block gives one write that must be present (the seq it shows) and/or one that must be
    # absent (the next write to it). Strict prefix: k (writes with seq < k applied) must lie in
    # (max present, min absent]. Causal (the default): the applied set only has to be closed under
    # happened-before, which allows writes that were in flight together to land in either order:
    # feasible iff no absent write was acknowledged before a present write was issued.
    lo, lo_why = 1, "start"            # strict: k >= lo
    hi, hi_why = L + 1, "end of log"   # strict: k <= hi (hi = min absent seq)
    pev, pev_why = -INF, None          # causal: max issue event of a present write
    aev, aev_why = INF, None           # causal: min ack event of an absent write
    bad = []          # (block, reason)
    causal_conflict = None
    counts = {"initial": 0, "written": 0}
    by_block = lg.by_block
    b = 0
    t0 = time.monotonic()
    while b < a.blocks:
        n = min(READ_CHUNK // BS, a.blocks - b)
        chunk = img.read(n * BS)
        ichunk = init.read(n * BS) if init is not None else None
        if len(chunk) != n * BS or (ichunk is not None and len(ichunk) < n * BS):
            die("short read at block %d" % b)
        for i in range(n):
            blk = b + i
            data = chunk[i * BS:(i + 1) * BS]
            writes = by_block.get(blk)
            if data[:8] == MAGIC:
                seq, reason = classify(data, blk, run_id)
            else:
                seq, reason = None, None
            if seq is not None:
                if writes is None or lg.issued.get(seq) != blk:
                    where = ("seq %d is beyond the log's last issued seq %d" % (seq, L)
                             if seq > L else "the log has seq %d writing block %d"
                             % (seq, lg.issued.get(seq, -1)))
                    bad.append((blk, "holds seq %d which is not a write to this block (%s)"
                                % (seq, where)))
                    continue
                counts["written"] += 1
                j = bisect.bisect_left(writes, seq)
                present = seq
                absent = writes[j + 1] if j + 1 < len(writes) else None
                desc = "block %d holds seq %d" % (blk, seq)
                desc += (" (next write to it is seq %d)" % absent) if absent else " (its last write)"
            else:
                initial = (data == ZERO) if ichunk is None else (data == ichunk[i * BS:(i + 1) * BS])
                if not initial:
                    bad.append((blk, reason or "garbage (no magic, not initial content)"))
                    continue
                counts["initial"] += 1
                if writes is None:
                    continue
                present, absent = None, writes[0]
                desc = "block %d holds initial content (first write to it is seq %d)" % (blk, absent)
            if present is not None:
                if present + 1 > lo:
                    lo, lo_why = present + 1, desc
                if lg.issue_ev[present] > pev:
                    pev, pev_why = lg.issue_ev[present], (present, desc)
            if absent is not None:
                if absent < hi:
                    hi, hi_why = absent, desc
                if lg.ack_ev.get(absent, INF) < aev:
                    aev, aev_why = lg.ack_ev[absent], (absent, desc)
            if aev < pev and causal_conflict is None:
                causal_conflict = (blk, pev_why, aev_why)
        b += n
    dt = time.monotonic() - t0
    print("scanned %d blocks in %.2f s: %d initial, %d written, %d bad"
          % (a.blocks, dt, counts["initial"], counts["written"], len(bad)))
    ok = True
    if bad:
        ok = False
        blk, why = bad[0]
        print("INCONSISTENT: block %d: %s" % (blk, why))
        for blk, why in bad[1:10]:
            print("  also block %d: %s" % (blk, why))
        if len(bad) > 10:
            print("  ... and %d more bad blocks" % (len(bad) - 10))
    strict = lo <= hi
    if causal_conflict is not None:
        ok = False
        blk, (ps, pdesc), (as_, adesc) = causal_conflict
        print("INCONSISTENT: no prefix fits at block %d: seq %d must be applied because %s, but "
              "seq %d (acknowledged before seq %d was sent) must not be because %s"
              % (blk, ps, pdesc, as_, ps, adesc))
    elif ok and strict:
        print("consistent prefix k in [%d, %d] (writes with seq < k applied; log issued %d)"
              % (lo, hi, L))
        print("  lower bound from: %s" % lo_why)
        print("  upper bound from: %s" % hi_why)
    elif ok:
        msg = ("not a strict prefix of the seq order: k >= %d because %s, but k <= %d because %s"
               % (lo, lo_why, hi, hi_why))
        if a.strict_order:
            ok = False
            print("INCONSISTENT (--strict-order): " + msg)
        else:
            print("consistent causal prefix: every write acknowledged before an applied write was "
                  "sent is applied; only writes in flight together landed out of seq order")
            print("  (" + msg + ")")
            print("  all writes with seq < %d applied, none from seq %d on that is absent" % (hi, hi))
    if min_seq is not None:
        # every write with seq <= min_seq must be applied: no forced-absent write may be <= min_seq
        if ok and hi > min_seq:
            print("min-seq: ok: every write with seq <= %d is applied (first absent write: %s)"
                  % (min_seq, "seq %d" % hi if hi <= L else "none"))
        elif ok:
            ok = False
            print("min-seq: FAIL: need every write with seq <= %d applied, but seq %d is not "
                  "because %s" % (min_seq, hi, hi_why))
        else:
            print("min-seq: FAIL: image is not a consistent prefix at all")
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------
# compare

def cmd_compare(a):
    try:
        fa, fb = open(a.a, "rb"), open(a.b, "rb")
    except OSError as e:
        die(str(e))
    sa, sb = os.fstat(fa.fileno()).st_size, os.fstat(fb.fileno()).st_size
    off = 0
    step = 1024 * 1024
    while True:
        ca, cb = fa.read(step), fb.read(step)
        if ca != cb:
            m = min(len(ca), len(cb))
            for i in range(0, max(len(ca), len(cb)), BS):
                if i >= m or ca[i:i + BS] != cb[i:i + BS]:
                    blk = (off + i) // BS
                    if i >= m:
                        print("differ: %s is %d bytes, %s is %d bytes (first block past the shorter: %d)"
                              % (a.a, sa, a.b, sb, blk))
                    else:
                        print("differ: first differing block %d (byte offset %d)" % (blk, blk * BS))
                        for name, c in ((a.a, ca), (a.b, cb)):
                            print("  %s: %s" % (name, describe(c[i:i + BS], blk)))
                    return 1
        if not ca:
            break
        off += len(ca)
    print("identical: %d bytes" % sa)
    return 0


def describe(data, blk):
    if data == bytes(len(data)):
        return "all zero"
    if data[:8] == MAGIC and len(data) == BS:
        _, seq, idx, rid = HDR.unpack_from(data, 0)
        ok = make_block(rid, seq, idx) == data
        return "tagged run %d seq %d block %d%s" % (rid, seq, idx, "" if ok else " (torn)")
    return "untagged data"


def main():
    ap = argparse.ArgumentParser(description="anytime-consistency writer and checker")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write self-describing blocks over NBD, logging them")
    w.add_argument("--uri", required=True)
    w.add_argument("--blocks", type=int, required=True)
    w.add_argument("--count", type=int, default=1 << 62)
    w.add_argument("--seed", type=int)
    w.add_argument("--log", required=True)
    w.add_argument("--flush-every", type=int, default=0)
    w.add_argument("--qd", type=int, default=1)
    w.add_argument("--run-id", type=int)
    w.add_argument("--duration-s", type=float, default=0)
    w.add_argument("--op-timeout-s", type=float, default=0,
                   help="exit 4 if one operation is in flight longer than this (0 = wait forever)")
    c = sub.add_parser("check", help="is an image the device after some prefix of the log?")
    c.add_argument("--image", required=True)
    c.add_argument("--blocks", type=int, required=True)
    c.add_argument("--log", required=True)
    c.add_argument("--run-id", type=int)
    c.add_argument("--initial", default="zero", help="'zero' or a file with the initial content")
    c.add_argument("--strict-order", action="store_true",
                   help="require a prefix of the seq order even for writes that were in flight together")
    c.add_argument("--min-seq", help="require every write with seq <= M present; 'flush' = last "
                                     "flush in the log")
    p = sub.add_parser("compare", help="byte-compare two images")
    p.add_argument("--a", required=True)
    p.add_argument("--b", required=True)
    a = ap.parse_args()
    if a.cmd == "write":
        if a.blocks <= 0 or a.qd <= 0 or a.count < 0:
            die("--blocks and --qd must be positive")
        if a.count == 1 << 62 and not a.duration_s:
            die("write needs --count or --duration-s")
        sys.exit(cmd_write(a))
    if a.cmd == "check":
        sys.exit(cmd_check(a))
    sys.exit(cmd_compare(a))


if __name__ == "__main__":
    main()
