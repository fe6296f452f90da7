#!/usr/bin/python3
"""Raw-socket malformed-input and robustness tests for an NBD server.

Usage:
    malformed.py --unix SOCKET --export NAME
    malformed.py --tcp HOST PORT --export NAME

Standard library only (socket, struct, ...). Every case opens its own
connection, misbehaves, and checks how the server reacted; afterwards a fresh,
well-behaved connection must still be able to read the export ("alive after").
Prints "PASS name" / "FAIL name: reason" per check and a final summary
"N passed, N failed"; exits non-zero if any check failed.

Expectations follow the NBD spec (NetworkBlockDevice/nbd doc/proto.md) and the
marsd server contract (see /work/shared/reference/nbd.md, sections 1 and 5).
Where the spec only says SHOULD and conformant servers differ, the check accepts
either documented answer but still requires an error.  Known deviations of the
peer servers used to validate this script are tolerated ONLY when the
environment variable NBD_PEER names that peer (nbdkit or qemu-nbd); the default
(NBD_PEER unset or "marsd") checks the full contract.

Only ever connects to the Unix socket or the loopback/host given on the
command line; everything is bounded by socket timeouts plus a global watchdog.
"""

import argparse
import concurrent.futures
import os
import random
import resource
import socket
import struct
import sys
import threading
import time

# --------------------------------------------------------------------------
# Protocol constants (values from the NBD spec, proto.md)
# --------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = {
    0x80000001: "ERR_UNSUP", 0x80000002: "ERR_POLICY", 0x80000003: "ERR_INVALID",
    0x80000004: "ERR_PLATFORM", 0x80000005: "ERR_TLS_REQD", 0x80000006: "ERR_UNKNOWN",
    0x80000007: "ERR_SHUTDOWN", 0x80000008: "ERR_BLOCK_SIZE_REQD", 0x80000009: "ERR_TOO_BIG",
    0x8000000A: "ERR_EXT_HEADER_REQD",
}
ERR_UNSUP, ERR_POLICY, ERR_INVALID, ERR_UNKNOWN = 0x80000001, 0x80000002, 0x80000003, 0x80000006

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

TF_HAS_FLAGS = 1 << 0
TF_SEND_DF = 1 << 7

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = range(8)
CMD_NAMES = {0: "READ", 1: "WRITE", 2: "DISC", 3: "FLUSH", 4: "TRIM", 5: "CACHE", 6: "WRITE_ZEROES",
             7: "BLOCK_STATUS"}
CMDF_FUA, CMDF_NO_HOLE, CMDF_DF, CMDF_REQ_ONE, CMDF_FAST_ZERO = 1, 2, 4, 8, 16

REPLY_FLAG_DONE = 1
CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, CHUNK_BLOCK_STATUS = 0, 1, 2, 5
CHUNK_ERROR, CHUNK_ERROR_OFFSET = 32769, 32770

EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108
ERRNAMES = {1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 28: "ENOSPC", 75: "EOVERFLOW",
            95: "ENOTSUP", 108: "ESHUTDOWN"}

MiB = 1 << 20
CONTRACT_MAX_PAYLOAD = 32 * MiB       # contract: block size max 32 MiB (advertised)
CONTRACT_ACCEPTED_PAYLOAD = 64 * MiB  # contract: READ/WRITE up to 64 MiB are served
DATA_BASE = 64 * MiB                  # region of the export this script may overwrite
IO_TIMEOUT = 5.0                      # per socket operation
CLOSE_TIMEOUT = 10.0                  # how long we wait for the server to hang up

PEER = os.environ.get("NBD_PEER", "marsd")


def errname(e):
    return ERRNAMES.get(e, str(e))


def repname(t):
    return {REP_ACK: "ACK", REP_SERVER: "SERVER", REP_INFO: "INFO", REP_META_CONTEXT: "META_CONTEXT"}.get(
        t, REP_ERR.get(t, hex(t)))


# --------------------------------------------------------------------------
# Results bookkeeping
# --------------------------------------------------------------------------
class Results:
    def __init__(self):
        self.passed = 0
        self.failed = 0
        self.lock = threading.Lock()

    def report(self, name, ok, reason=""):
        with self.lock:
            if ok:
                self.passed += 1
                print("PASS %s%s" % (name, (" (%s)" % reason) if reason else ""), flush=True)
            else:
                self.failed += 1
                print("FAIL %s: %s" % (name, reason), flush=True)


R = Results()


class CheckFailed(Exception):
    pass


def require(cond, reason):
    if not cond:
        raise CheckFailed(reason)


# --------------------------------------------------------------------------
# Raw connection helper
# --------------------------------------------------------------------------
class Closed(Exception):
    """The server closed (EOF or reset) the connection."""


class Timeout(Exception):
    """The server sent nothing within the timeout."""


class OptError(Exception):
    def __init__(self, rtype, msg=b""):
        super().__init__("%s %r" % (repname(rtype), msg[:200]))
        self.rtype = rtype


class Conn:
    def __init__(self, addr, timeout=IO_TIMEOUT):
        kind, where = addr
        if kind == "unix":
            self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            self.s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.s.settimeout(timeout)
        self.s.connect(where)
        self.export_size = None
        self.tflags = 0
        self.block = (1, 4096, CONTRACT_MAX_PAYLOAD)
        self.sr = False
        self.meta_ids = {}

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass

    # --- byte level -------------------------------------------------------
    def send(self, data):
        try:
            self.s.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise Closed("send: %s" % e)

    def recvn(self, n, timeout=None):
        if timeout is not None:
            self.s.settimeout(timeout)
        buf = bytearray()
        try:
            while len(buf) < n:
                chunk = self.s.recv(min(n - len(buf), 1 << 20))
                if not chunk:
                    raise Closed("EOF after %d of %d bytes" % (len(buf), n))
                buf += chunk
        except socket.timeout:
            raise Timeout("timeout after %d of %d bytes" % (len(buf), n))
        except ConnectionResetError:
            raise Closed("connection reset after %d of %d bytes" % (len(buf), n))
        finally:
            if timeout is not None:
                self.s.settimeout(IO_TIMEOUT)
        return bytes(buf)

    def wait_closed(self, timeout=CLOSE_TIMEOUT):
        """Drain until EOF/reset. Returns (closed, bytes_received_meanwhile)."""
        deadline = time.monotonic() + timeout
        got = bytearray()
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False, bytes(got)
                self.s.settimeout(left)
                chunk = self.s.recv(65536)
                if not chunk:
                    return True, bytes(got)
                got += chunk
        except socket.timeout:
            return False, bytes(got)
        except (ConnectionResetError, BrokenPipeError):
            return True, bytes(got)
        finally:
            self.s.settimeout(IO_TIMEOUT)

    # --- handshake --------------------------------------------------------
    def greeting(self):
        magic, opt, hflags = struct.unpack(">QQH", self.recvn(18))
        require(magic == NBDMAGIC and opt == IHAVEOPT, "bad greeting magic %x %x" % (magic, opt))
        return hflags

    def send_client_flags(self, flags=FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
        self.send(struct.pack(">I", flags))

    def send_opt(self, opt, data=b""):
        self.send(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def recv_opt_reply(self, timeout=None):
        magic, opt, rtype, ln = struct.unpack(">QIII", self.recvn(20, timeout))
        require(magic == OPT_REPLY_MAGIC, "bad option reply magic %x" % magic)
        data = self.recvn(ln) if ln else b""
        return opt, rtype, data

    def opt_simple(self, opt, data=b""):
        """Send an option whose answer is a single reply; return its type."""
        self.send_opt(opt, data)
        o, rtype, _ = self.recv_opt_reply()
        require(o == opt, "option reply echoes option %d, expected %d" % (o, opt))
        return rtype

    def opt_list(self):
        """NBD_OPT_LIST: returns list of names or raises OptError."""
        self.send_opt(OPT_LIST)
        names = []
        while True:
            o, rtype, data = self.recv_opt_reply()
            require(o == OPT_LIST, "LIST reply echoes option %d" % o)
            if rtype == REP_SERVER:
                (nl,) = struct.unpack(">I", data[:4])
                names.append(data[4:4 + nl].decode("utf-8", "replace"))
            elif rtype == REP_ACK:
                return names
            else:
                raise OptError(rtype, data)

    def opt_structured_reply(self):
        rtype = self.opt_simple(OPT_STRUCTURED_REPLY)
        if rtype != REP_ACK:
            raise OptError(rtype)
        self.sr = True

    def opt_set_meta(self, export, queries):
        data = struct.pack(">I", len(export)) + export + struct.pack(">I", len(queries))
        for q in queries:
            data += struct.pack(">I", len(q)) + q
        self.send_opt(OPT_SET_META_CONTEXT, data)
        while True:
            o, rtype, rdata = self.recv_opt_reply()
            if rtype == REP_META_CONTEXT:
                (cid,) = struct.unpack(">I", rdata[:4])
                self.meta_ids[rdata[4:].decode()] = cid
            elif rtype == REP_ACK:
                return self.meta_ids
            else:
                raise OptError(rtype, rdata)

    def opt_go(self, export, infos=(INFO_BLOCK_SIZE,), opt=OPT_GO):
        data = struct.pack(">I", len(export)) + export + struct.pack(">H", len(infos))
        data += b"".join(struct.pack(">H", i) for i in infos)
        self.send_opt(opt, data)
        got_export = False
        while True:
            o, rtype, rdata = self.recv_opt_reply()
            require(o == opt, "GO reply echoes option %d" % o)
            if rtype == REP_INFO:
                (itype,) = struct.unpack(">H", rdata[:2])
                if itype == INFO_EXPORT:
                    self.export_size, self.tflags = struct.unpack(">QH", rdata[2:12])
                    got_export = True
                elif itype == INFO_BLOCK_SIZE:
                    self.block = struct.unpack(">III", rdata[2:14])
            elif rtype == REP_ACK:
                require(got_export, "GO/INFO ACK without NBD_INFO_EXPORT")
                return self.export_size, self.tflags
            else:
                raise OptError(rtype, rdata)

    def handshake(self, export, sr=False, meta=False):
        hflags = self.greeting()
        require(hflags & FLAG_FIXED_NEWSTYLE, "server does not set FIXED_NEWSTYLE")
        self.send_client_flags(FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES))
        if sr or meta:
            self.opt_structured_reply()
        if meta:
            ids = self.opt_set_meta(export, [b"base:allocation"])
            require("base:allocation" in ids, "base:allocation not selected")
        self.opt_go(export)
        return self

    # --- transmission -----------------------------------------------------
    def request(self, cmd, offset=0, length=0, flags=0, cookie=None, payload=b"", magic=REQUEST_MAGIC):
        if cookie is None:
            cookie = random.getrandbits(64)
        self.send(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + payload)
        return cookie

    def reply(self, cookie, read_len=0):
        """Read one complete reply to `cookie` (single outstanding request).

        Returns ("ok", data) or ("err", errno).  Raises Closed/Timeout, or
        CheckFailed on a protocol violation in the reply itself."""
        (magic,) = struct.unpack(">I", self.recvn(4))
        if magic == SIMPLE_REPLY_MAGIC:
            err, ck = struct.unpack(">IQ", self.recvn(12))
            require(ck == cookie, "reply cookie %x != %x" % (ck, cookie))
            if err:
                return ("err", err)
            return ("ok", self.recvn(read_len) if read_len else b"")
        require(magic == STRUCTURED_REPLY_MAGIC, "bad reply magic %#x" % magic)
        require(self.sr, "structured reply sent although not negotiated (spec MUST NOT)")
        buf = bytearray(read_len)
        covered = 0
        error = 0
        first = True
        while True:
            if not first:
                (magic,) = struct.unpack(">I", self.recvn(4))
                require(magic == STRUCTURED_REPLY_MAGIC, "bad chunk magic %#x" % magic)
            first = False
            flags, ctype, ck, ln = struct.unpack(">HHQI", self.recvn(16))
            require(ck == cookie, "chunk cookie %x != %x" % (ck, cookie))
            payload = self.recvn(ln) if ln else b""
            if ctype == CHUNK_NONE:
                require(ln == 0 and flags & REPLY_FLAG_DONE, "NONE chunk must be empty and DONE")
            elif ctype == CHUNK_OFFSET_DATA:
                require(ln > 8, "OFFSET_DATA chunk with length %d" % ln)
                (off,) = struct.unpack(">Q", payload[:8])
                self._check_inside(off, ln - 8, read_len)
                covered += ln - 8
                self._place(buf, off, payload[8:])
            elif ctype == CHUNK_OFFSET_HOLE:
                require(ln == 12, "OFFSET_HOLE chunk with length %d" % ln)
                off, hl = struct.unpack(">QI", payload[:12])
                require(hl > 0, "OFFSET_HOLE of size 0")
                self._check_inside(off, hl, read_len)
                covered += hl
            elif ctype == CHUNK_BLOCK_STATUS:
                buf = payload            # caller parses
            elif ctype in (CHUNK_ERROR, CHUNK_ERROR_OFFSET):
                (e,) = struct.unpack(">I", payload[:4])
                require(e != 0, "error chunk with error 0")
                error = error or e
            else:
                raise CheckFailed("unknown chunk type %d" % ctype)
            if flags & REPLY_FLAG_DONE:
                break
        if error:
            return ("err", error)
        if read_len:
            require(covered == read_len, "structured READ chunks cover %d of %d bytes" % (covered, read_len))
        return ("ok", bytes(buf))

    def _check_inside(self, off, n, read_len):
        base = getattr(self, "_read_base", 0)
        require(base <= off and off + n <= base + read_len,
                "content chunk %d+%d outside the request %d+%d" % (off, n, base, read_len))

    def _place(self, buf, off, data):
        base = getattr(self, "_read_base", 0)
        buf[off - base:off - base + len(data)] = data

    def cmd(self, cmd, offset=0, length=0, flags=0, payload=b""):
        """Send one request and wait for its reply."""
        self._read_base = offset
        cookie = self.request(cmd, offset, length, flags, payload=payload)
        return self.reply(cookie, length if cmd == CMD_READ else 0)

    def disc(self):
        try:
            self.request(CMD_DISC)
        except Closed:
            pass
        self.close()


# --------------------------------------------------------------------------
# Helpers used by many cases
# --------------------------------------------------------------------------
ADDR = None
EXPORT = b""


def connect(timeout=IO_TIMEOUT):
    return Conn(ADDR, timeout)


def good(sr=False, meta=False):
    """Fresh, fully negotiated connection."""
    return connect().handshake(EXPORT, sr=sr, meta=meta)


def liveness():
    """A fresh well-behaved client can negotiate and read (raises on failure)."""
    c = good()
    try:
        n = max(512, c.block[0])
        res = c.cmd(CMD_READ, 0, n)
        require(res[0] == "ok" and len(res[1]) == n, "READ on fresh connection gave %r" % (res[0],))
    finally:
        c.disc()


def write_good(offset, data):
    c = good()
    try:
        res = c.cmd(CMD_WRITE, offset, len(data), CMDF_FUA, data)
        require(res == ("ok", b""), "setup WRITE failed: %r" % (res,))
    finally:
        c.disc()


def read_good(offset, length):
    c = good()
    try:
        res = c.cmd(CMD_READ, offset, length)
        require(res[0] == "ok", "READ failed: %r" % (res,))
        return res[1]
    finally:
        c.disc()


def expect_errno(res, allowed, what):
    require(res[0] == "err", "%s: expected error %s, got success" % (what, "/".join(map(errname, allowed))))
    require(res[1] in allowed, "%s: expected %s, got %s" % (what, "/".join(map(errname, allowed)), errname(res[1])))


def still_usable(c, what="connection"):
    """The same connection still answers a valid READ (server kept it open)."""
    try:
        res = c.cmd(CMD_READ, 0, 512)
    except (Closed, Timeout) as e:
        raise CheckFailed("%s not usable afterwards (%s)" % (what, e))
    require(res[0] == "ok" and len(res[1]) == 512, "%s: follow-up READ failed: %r" % (what, res[0]))


def expect_closed(c, what):
    """Server must hang up.  Whatever it sent first must not be a success
    reply; the caller checks `got` further where nothing may be sent."""
    closed, got = c.wait_closed()
    require(closed, "%s: server did not close the connection within %ds (got %d bytes)"
            % (what, CLOSE_TIMEOUT, len(got)))
    if got and len(got) >= 16 and struct.unpack(">I", got[:4])[0] == SIMPLE_REPLY_MAGIC:
        (err,) = struct.unpack(">I", got[4:8])
        require(err != 0, "%s: server replied success before closing" % what)
    return got


TOLERATED = []


def tolerated(peer, why):
    """True when running against `peer` (NBD_PEER) whose deviation from the
    contract is documented; the reason is appended to the PASS line."""
    if PEER == peer:
        if why not in TOLERATED:
            TOLERATED.append(why)
        return True
    return False


CASES = []


def case(name):
    def deco(fn):
        CASES.append((name, fn))
        return fn
    return deco


# --------------------------------------------------------------------------
# Handshake-phase cases (nbd.md section 5 table, first half)
# --------------------------------------------------------------------------
@case("bad_client_flags")
def _():
    # Spec: the server MUST close if the client sets an unknown client flag.
    c = connect()
    c.greeting()
    c.send_client_flags(0x80000001)
    try:
        c.send_opt(OPT_LIST)           # if the server carries on, it would answer this
    except Closed:
        return
    got = expect_closed(c, "unknown client flag")
    require(not got, "server answered an option after unknown client flags (%d bytes)" % len(got))


@case("truncated_greeting")
def _():
    # Client sends 2 of its 4 flag bytes and hangs up: server must just survive.
    c = connect()
    c.greeting()
    c.send(b"\x00\x00")
    c.close()


@case("bad_option_magic")
def _():
    # Garbage instead of IHAVEOPT: framing is lost, server hard-disconnects.
    c = connect()
    c.greeting()
    c.send_client_flags()
    c.send(struct.pack(">QII", 0xDEADBEEFDEADBEEF, OPT_LIST, 0))
    got = expect_closed(c, "bad option magic")
    require(not got or len(got) < 20 or struct.unpack(">I", got[12:16])[0] != REP_ACK,
            "server ACKed an option with bad magic")


@case("giant_option_length")
def _():
    # Unknown option claiming 0xFFFFFFFF bytes: server must not try to buffer
    # 4 GiB; it may disconnect (DoS clause).  It must not sit waiting for data
    # that will never come while holding the connection forever.
    c = connect()
    c.greeting()
    c.send_client_flags()
    c.send(struct.pack(">QII", IHAVEOPT, 0x1234, 0xFFFFFFFF) + os.urandom(1024))
    got = expect_closed(c, "option length 0xFFFFFFFF")
    if len(got) >= 20:
        (rtype,) = struct.unpack(">I", got[12:16])
        require(rtype & 0x80000000, "non-error reply %s to giant option" % repname(rtype))


@case("unknown_option")
def _():
    # Baseline MUST: ERR_UNSUP for an unknown option, and keep parsing the
    # next option (LIST must then list our export).
    c = connect()
    c.greeting()
    c.send_client_flags()
    rtype = c.opt_simple(0x1234, b"junkjunk")
    require(rtype == ERR_UNSUP, "unknown option answered with %s, expected ERR_UNSUP" % repname(rtype))
    names = c.opt_list()
    require(EXPORT.decode() in names, "LIST after unknown option does not show %r: %r" % (EXPORT, names))
    c.close()


@case("go_inconsistent_len")
def _():
    # GO whose name length (1000) exceeds the option length (8): ERR_INVALID,
    # and the option phase goes on (ABORT is still ACKed).
    c = connect()
    c.greeting()
    c.send_client_flags()
    rtype = c.opt_simple(OPT_GO, struct.pack(">I", 1000) + b"abcd")
    require(rtype == ERR_INVALID, "got %s, expected ERR_INVALID" % repname(rtype))
    require(c.opt_simple(OPT_ABORT) == REP_ACK, "ABORT after ERR_INVALID not ACKed")
    c.close()


@case("go_bad_info_count")
def _():
    # GO announcing 5 information requests but carrying only 1: malformed
    # length -> ERR_INVALID; option phase continues.
    c = connect()
    c.greeting()
    c.send_client_flags()
    data = struct.pack(">I", len(EXPORT)) + EXPORT + struct.pack(">HH", 5, INFO_BLOCK_SIZE)
    rtype = c.opt_simple(OPT_GO, data)
    require(rtype == ERR_INVALID, "got %s, expected ERR_INVALID" % repname(rtype))
    require(c.opt_simple(OPT_ABORT) == REP_ACK, "ABORT after ERR_INVALID not ACKed")
    c.close()


@case("go_nul_in_name")
def _():
    # Strings MUST NOT contain NUL. The spec names no reply; ERR_INVALID is
    # expected, ERR_UNKNOWN also rejects the name.  Never an ACK.
    c = connect()
    c.greeting()
    c.send_client_flags()
    name = b"a\0b"
    rtype = c.opt_simple(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    require(rtype in (ERR_INVALID, ERR_UNKNOWN), "got %s, expected ERR_INVALID" % repname(rtype))
    require(c.opt_simple(OPT_ABORT) == REP_ACK, "ABORT afterwards not ACKed")
    c.close()


@case("go_unknown_export")
def _():
    # Contract: GO for an unknown export -> ERR_UNKNOWN (spec: ERR_UNKNOWN,
    # SHOULD send no INFO first), and the option phase continues.
    c = connect()
    c.greeting()
    c.send_client_flags()
    name = b"no-such-export-" + str(random.getrandbits(32)).encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    c.send_opt(OPT_GO, data)
    o, rtype, _ = c.recv_opt_reply()
    require(rtype != REP_INFO, "server sent NBD_REP_INFO for an unknown export")
    require(rtype == ERR_UNKNOWN, "got %s, expected ERR_UNKNOWN" % repname(rtype))
    require(c.opt_simple(OPT_ABORT) == REP_ACK, "ABORT afterwards not ACKed")
    c.close()


@case("export_name_unknown")
def _():
    # EXPORT_NAME cannot carry an error: for an unknown export the server MUST
    # terminate the session (and must not send a size/flags block).
    c = connect()
    c.greeting()
    c.send_client_flags()
    c.send_opt(OPT_EXPORT_NAME, b"no-such-export-" + str(random.getrandbits(32)).encode())
    got = expect_closed(c, "EXPORT_NAME for unknown export")
    require(len(got) < 10, "server sent %d bytes (an export block?) for an unknown export" % len(got))


@case("export_name_good")
def _():
    # EXPORT_NAME for the real export: 8-byte size + 2-byte flags, no padding
    # because both sides set NO_ZEROES; then the connection is usable.
    c = connect()
    hflags = c.greeting()
    require(hflags & FLAG_NO_ZEROES, "server does not offer NO_ZEROES")
    c.send_client_flags()
    c.send_opt(OPT_EXPORT_NAME, EXPORT)
    size, tflags = struct.unpack(">QH", c.recvn(10))
    g = good()
    size_go = g.export_size
    g.disc()
    require(size == size_go, "EXPORT_NAME size %d != GO size %d" % (size, size_go))
    require(tflags & TF_HAS_FLAGS, "HAS_FLAGS not set")
    still_usable(c, "connection after EXPORT_NAME")
    c.disc()


@case("list_with_payload")
def _():
    # LIST carrying data: server SHOULD answer ERR_INVALID.
    c = connect()
    c.greeting()
    c.send_client_flags()
    rtype = c.opt_simple(OPT_LIST, b"abcd")
    require(rtype == ERR_INVALID, "got %s, expected ERR_INVALID" % repname(rtype))
    require(c.opt_simple(OPT_ABORT) == REP_ACK, "ABORT afterwards not ACKed")
    c.close()


@case("set_meta_without_sr")
def _():
    # SET_META_CONTEXT before STRUCTURED_REPLY: SHOULD be ERR_INVALID.
    c = connect()
    c.greeting()
    c.send_client_flags()
    data = struct.pack(">I", len(EXPORT)) + EXPORT + struct.pack(">II", 1, 15) + b"base:allocation"
    c.send_opt(OPT_SET_META_CONTEXT, data)
    o, rtype, _ = c.recv_opt_reply()
    require(rtype == ERR_INVALID, "got %s, expected ERR_INVALID" % repname(rtype))
    require(c.opt_simple(OPT_ABORT) == REP_ACK, "ABORT afterwards not ACKed")
    c.close()


@case("list_meta_bad_query_len")
def _():
    # LIST_META_CONTEXT whose query length runs past the option: MUST ERR_INVALID.
    c = connect()
    c.greeting()
    c.send_client_flags()
    c.opt_structured_reply()
    data = struct.pack(">I", len(EXPORT)) + EXPORT + struct.pack(">II", 1, 200) + b"base:allocation"
    c.send_opt(OPT_LIST_META_CONTEXT, data)
    o, rtype, _ = c.recv_opt_reply()
    require(rtype == ERR_INVALID, "got %s, expected ERR_INVALID" % repname(rtype))
    require(c.opt_simple(OPT_ABORT) == REP_ACK, "ABORT afterwards not ACKed")
    c.close()


@case("starttls_notls")
def _():
    # Contract: STARTTLS -> ERR_POLICY (spec allows ERR_POLICY or ERR_UNSUP for
    # a NOTLS server, never ERR_TLS_REQD).  The session continues in plain text.
    c = connect()
    c.greeting()
    c.send_client_flags()
    rtype = c.opt_simple(OPT_STARTTLS)
    require(rtype == ERR_POLICY, "got %s, expected ERR_POLICY" % repname(rtype))
    c.opt_go(EXPORT)
    still_usable(c, "connection after refused STARTTLS")
    c.disc()


@case("opt_abort")
def _():
    # ABORT: server MUST reply ACK, then close.
    c = connect()
    c.greeting()
    c.send_client_flags()
    rtype = c.opt_simple(OPT_ABORT)
    require(rtype == REP_ACK, "got %s, expected ACK" % repname(rtype))
    expect_closed(c, "after ABORT")


@case("structured_reply_twice")
def _():
    # Second STRUCTURED_REPLY MAY get ERR_INVALID (or ACK); afterwards GO works
    # and READ is answered with structured chunks.
    c = connect()
    c.greeting()
    c.send_client_flags()
    require(c.opt_simple(OPT_STRUCTURED_REPLY) == REP_ACK, "first STRUCTURED_REPLY not ACKed")
    c.sr = True
    rtype = c.opt_simple(OPT_STRUCTURED_REPLY)
    require(rtype in (REP_ACK, ERR_INVALID), "second STRUCTURED_REPLY got %s" % repname(rtype))
    c.opt_go(EXPORT)
    c._read_base = 0
    cookie = c.request(CMD_READ, 0, 4096)
    (magic,) = struct.unpack(">I", c.recvn(4, ))
    require(magic == STRUCTURED_REPLY_MAGIC, "READ reply not structured (magic %#x)" % magic)
    # consume the rest of that reply through the generic reader
    flags, ctype, ck, ln = struct.unpack(">HHQI", c.recvn(16))
    c.recvn(ln)
    while not flags & REPLY_FLAG_DONE:
        (magic,) = struct.unpack(">I", c.recvn(4))
        flags, ctype, ck, ln = struct.unpack(">HHQI", c.recvn(16))
        c.recvn(ln)
    still_usable(c)
    c.disc()


@case("option_flood")
def _():
    # 200 unknown options, each answered ERR_UNSUP.  A server MAY cut off an
    # abusive client (nbdkit stops after 32), but it must answer at least a
    # reasonable number (>= 8) correctly before doing so, and never garbage.
    c = connect()
    c.greeting()
    c.send_client_flags()
    answered = 0
    for i in range(200):
        try:
            rtype = c.opt_simple(0x1000 + i, b"x" * (i % 7))
        except Closed:
            break
        require(rtype == ERR_UNSUP, "option %d answered %s" % (i, repname(rtype)))
        answered += 1
    require(answered >= 8, "server dropped the client after only %d options" % answered)
    c.close()
    return "%d/200 answered" % answered


@case("disconnect_mid_option")
def _():
    # GO claims 100 bytes, we send 10 and hang up: server must just survive.
    c = connect()
    c.greeting()
    c.send_client_flags()
    c.send(struct.pack(">QII", IHAVEOPT, OPT_GO, 100) + b"0123456789")
    c.close()


# --------------------------------------------------------------------------
# Transmission-phase cases
# --------------------------------------------------------------------------
@case("bad_request_magic")
def _():
    # Bad request magic: framing lost -> contract: disconnect (an error reply
    # before closing is tolerated; success never).
    c = good()
    c.request(CMD_READ, 0, 512, magic=0x12345678)
    expect_closed(c, "bad request magic")


@case("read_beyond_end")
def _():
    # READ at offset == size and straddling the end: EINVAL, connection kept.
    c = good()
    size = c.export_size
    expect_errno(c.cmd(CMD_READ, size, 512), (EINVAL,), "READ at size")
    expect_errno(c.cmd(CMD_READ, size - 512, 1024), (EINVAL,), "READ straddling end")
    still_usable(c)
    c.disc()


@case("offset_wraparound_read")
def _():
    # offset 2^64-4096 + length 8192 wraps to 4096: must be an error, not a
    # read of offset 0..4096.  Structured replies too (must use error chunk).
    for sr in (False, True):
        c = good(sr=sr)
        res = c.cmd(CMD_READ, 0xFFFFFFFFFFFFF000, 0x2000)
        expect_errno(res, (EINVAL, EOVERFLOW), "wrapping READ (sr=%s)" % sr)
        still_usable(c)
        c.disc()


@case("offset_wraparound_write")
def _():
    # Wrapping WRITE must fail and must not touch offset 0..4096 (the wrapped
    # range).  Contract allows EINVAL or ENOSPC (spec: out of range).
    canary = os.urandom(0x2000)
    write_good(0, canary)
    c = good()
    res = c.cmd(CMD_WRITE, 0xFFFFFFFFFFFFF000, 0x2000, 0, b"\xee" * 0x2000)
    expect_errno(res, (EINVAL, ENOSPC), "wrapping WRITE")
    res = c.cmd(CMD_WRITE_ZEROES, 0xFFFFFFFFFFFFF000, 0x2000)
    expect_errno(res, (EINVAL, ENOSPC), "wrapping WRITE_ZEROES")
    res = c.cmd(CMD_TRIM, 0xFFFFFFFFFFFFF000, 0x2000)
    expect_errno(res, (EINVAL, ENOSPC), "wrapping TRIM")
    still_usable(c)
    c.disc()
    require(read_good(0, 0x2000) == canary, "data at offset 0 changed by wrapping requests")


@case("write_beyond_end")
def _():
    # WRITE straddling the end: SHOULD ENOSPC (qemu 7.2: EINVAL); the payload
    # must be consumed so the connection stays in sync; nothing written.
    c = good()
    size = c.export_size
    before = read_good(size - 512, 512)
    res = c.cmd(CMD_WRITE, size - 512, 1024, 0, b"\xab" * 1024)
    expect_errno(res, (ENOSPC, EINVAL), "WRITE straddling end")
    res = c.cmd(CMD_WRITE_ZEROES, size - 512, 1024)
    expect_errno(res, (ENOSPC, EINVAL), "WRITE_ZEROES straddling end")
    still_usable(c)
    c.disc()
    require(read_good(size - 512, 512) == before, "last 512 bytes modified by a rejected write")


@case("zero_length")
def _():
    # Length 0: SHOULD NOT disconnect; contract answers EINVAL (spec leaves the
    # reply unspecified, so ENOSPC for the write-type commands is accepted).
    c = good()
    bad = []
    for cmd in (CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE):
        res = c.cmd(cmd, 4096, 0)
        if res[0] == "ok" and tolerated("qemu-nbd", "nbd.md 5: qemu returns OK for length 0"):
            continue
        if res[0] != "err" or res[1] not in (EINVAL, ENOSPC):
            bad.append("%s -> %s" % (CMD_NAMES[cmd], res[0] if res[0] == "ok" else errname(res[1])))
    still_usable(c)
    c.disc()
    require(not bad, "expected EINVAL: " + ", ".join(bad))


@case("unaligned")
def _():
    # With minimum block size 1, READ(1,511) and WRITE(3,5) are legal and must
    # work byte-exactly; with a larger advertised minimum they SHOULD be EINVAL.
    c = good()
    minimum = c.block[0]
    base = DATA_BASE
    write_good(base, b"\0" * 4096)
    r = c.cmd(CMD_READ, base + 1, 511)
    w = c.cmd(CMD_WRITE, base + 3, 5, 0, b"HELLO")
    if minimum == 1:
        require(r[0] == "ok" and len(r[1]) == 511, "unaligned READ failed: %r" % (r[0],))
        require(w == ("ok", b""), "unaligned WRITE failed: %r" % (w,))
        after = c.cmd(CMD_READ, base, 16)
        require(after == ("ok", b"\0\0\0HELLO" + b"\0" * 8), "unaligned WRITE read back %r" % (after,))
    else:
        expect_errno(r, (EINVAL,), "READ misaligned to minimum %d" % minimum)
        expect_errno(w, (EINVAL,), "WRITE misaligned to minimum %d" % minimum)
    still_usable(c)
    c.disc()


@case("unknown_command")
def _():
    # Unknown command type: contract EINVAL, connection kept.
    c = good()
    expect_errno(c.cmd(0x55, 0, 512), (EINVAL,), "command 0x55")
    still_usable(c)
    c.disc()


@case("unknown_flag")
def _():
    # Unknown command flag 0x4000 on READ: contract EINVAL, connection kept.
    # Also REQ_ONE (a BLOCK_STATUS flag) on READ: SHOULD EINVAL.
    c = good()
    expect_errno(c.cmd(CMD_READ, 0, 512, 0x4000), (EINVAL,), "READ with flag 0x4000")
    expect_errno(c.cmd(CMD_READ, 0, 512, CMDF_REQ_ONE), (EINVAL,), "READ with REQ_ONE")
    still_usable(c)
    c.disc()


@case("df_without_sr")
def _():
    # Without structured replies, SEND_DF MUST be clear and a DF read is EINVAL.
    c = good(sr=False)
    require(not (c.tflags & TF_SEND_DF), "SEND_DF advertised without structured replies (MUST be clear)")
    expect_errno(c.cmd(CMD_READ, 0, 512, CMDF_DF), (EINVAL,), "READ+DF without structured replies")
    still_usable(c)
    c.disc()


@case("block_status_no_meta")
def _():
    # BLOCK_STATUS without structured replies, and with structured replies but
    # no meta context selected: SHOULD EINVAL, connection kept.
    for sr in (False, True):
        c = good(sr=sr)
        expect_errno(c.cmd(CMD_BLOCK_STATUS, 0, 4096), (EINVAL,), "BLOCK_STATUS (sr=%s, no context)" % sr)
        still_usable(c)
        c.disc()


@case("block_status_beyond_end")
def _():
    # BLOCK_STATUS past the end: SHOULD EINVAL.  A valid one must work.
    c = good(meta=True)
    size = c.export_size
    expect_errno(c.cmd(CMD_BLOCK_STATUS, size, 4096), (EINVAL,), "BLOCK_STATUS at size")
    res = c.cmd(CMD_BLOCK_STATUS, 0, 4096)
    require(res[0] == "ok" and len(res[1]) >= 12, "valid BLOCK_STATUS failed: %r" % (res[0],))
    c.disc()


@case("block_status_zero_length")
def _():
    # BLOCK_STATUS with length 0: EINVAL (contract: zero length -> EINVAL).
    c = good(meta=True)
    expect_errno(c.cmd(CMD_BLOCK_STATUS, 0, 0), (EINVAL,), "BLOCK_STATUS length 0")
    still_usable(c)
    c.disc()


@case("flush_nonzero")
def _():
    # FLUSH with offset/length != 0 (client MUST send 0): server's choice of
    # OK or EINVAL, but it must answer and keep the connection.
    c = good()
    res = c.cmd(CMD_FLUSH, 4096, 4096)
    require(res == ("ok", b"") or res == ("err", EINVAL), "FLUSH(4096,4096) -> %r" % (res,))
    still_usable(c)
    c.disc()


@case("oversize_read")
def _():
    # READ above the accepted 64 MiB (simple replies): contract EINVAL, the
    # connection stays usable.  Tried at 64 MiB + 4 KiB and 96 MiB.
    for ln in (CONTRACT_ACCEPTED_PAYLOAD + 4096, 96 * MiB):
        c = good()
        res = c.cmd(CMD_READ, 0, ln)
        if (ln > 64 * MiB and res == ("err", ENOMEM)
                and tolerated("nbdkit", "nbd.md 2.1: nbdkit answers ENOMEM above its 64 MiB buffer")):
            pass
        else:
            expect_errno(res, (EINVAL,), "READ of %d bytes" % ln)
        still_usable(c)
        c.disc()


@case("oversize_write_header_only")
def _():
    # WRITE header claiming 0xFFFFFFF0 bytes, no payload: the server must not
    # wait for (or allocate) 4 GiB.  Contract: EINVAL reply, then disconnect.
    c = good()
    cookie = c.request(CMD_WRITE, 0, 0xFFFFFFF0)
    try:
        res = c.reply(cookie)
    except (Closed, Timeout) as e:
        if isinstance(e, Closed) and tolerated("nbdkit", "nbd.md 5: nbdkit disconnects without a reply"):
            return
        raise CheckFailed("expected an EINVAL reply before the disconnect: %s" % e)
    expect_errno(res, (EINVAL,), "oversized WRITE")
    expect_closed(c, "after oversized WRITE header")


@case("oversize_write_with_payload")
def _():
    # WRITE of 64 MiB + 4 KiB (above the accepted 64 MiB) with its full
    # payload: contract EINVAL then disconnect; nothing of it may be applied.
    canary = os.urandom(64 * 1024)
    write_good(DATA_BASE, canary)
    c = good()
    ln = CONTRACT_ACCEPTED_PAYLOAD + 4096
    cookie = random.getrandbits(64)
    hdr = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, cookie, DATA_BASE, ln)
    sent_all = True
    try:
        c.s.settimeout(CLOSE_TIMEOUT)
        c.s.sendall(hdr + b"\x5a" * ln)
    except (BrokenPipeError, ConnectionResetError, socket.timeout):
        sent_all = False       # the server stopped reading: fine
    c.s.settimeout(IO_TIMEOUT)
    try:
        res = c.reply(cookie)
    except (Closed, Timeout) as e:
        raise CheckFailed("no EINVAL reply before disconnect (%s; payload fully sent: %s)" % (e, sent_all))
    expect_errno(res, (EINVAL,), "oversized WRITE")
    closed, _ = c.wait_closed(timeout=5)
    c.close()
    if not closed and not tolerated("nbdkit", "nbd.md 5: nbdkit drains oversize payloads <= 128 MiB "
                                              "and keeps the connection"):
        raise CheckFailed("contract: the server disconnects after an oversized WRITE")
    require(read_good(DATA_BASE, len(canary)) == canary, "oversized WRITE modified the export")


@case("write_payload_cut_short")
def _():
    # WRITE of 64 KiB with only 1000 payload bytes, then SHUT_WR: the server
    # must close without a success reply and must not apply a partial write.
    canary = os.urandom(65536)
    write_good(DATA_BASE, canary)
    c = good()
    hdr = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 7, DATA_BASE, 65536)
    c.send(hdr + b"\xcc" * 1000)
    c.s.shutdown(socket.SHUT_WR)
    expect_closed(c, "truncated WRITE payload")
    require(read_good(DATA_BASE, 65536) == canary, "partial WRITE payload was applied")


@case("disconnect_mid_header")
def _():
    # 16 of 28 request-header bytes, then hang up: server must survive.
    c = good()
    c.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 1, 0, 512)[:16])
    c.close()


@case("disconnect_with_inflight")
def _():
    # 64 x 1 MiB READs queued, then vanish without reading the replies (three
    # times): the server must free everything and keep serving.
    for _ in range(3):
        c = good()
        reqs = b"".join(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, i, i * MiB, MiB) for i in range(64))
        c.send(reqs)
        c.close()
        liveness()


@case("data_after_disc")
def _():
    # DISC followed (in the same send) by a WRITE: the server closes after
    # DISC, sends no reply to either, and the WRITE is not applied.
    canary = os.urandom(4096)
    write_good(DATA_BASE + MiB, canary)
    c = good()
    disc = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 1, 0, 0)
    wr = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 2, DATA_BASE + MiB, 4096) + b"\x77" * 4096
    c.send(disc + wr)
    got = expect_closed(c, "after DISC")
    require(not got, "server sent %d bytes after DISC (DISC has no reply)" % len(got))
    require(read_good(DATA_BASE + MiB, 4096) == canary, "WRITE sent after DISC was applied")


@case("duplicate_cookies")
def _():
    # Four READs with the same cookie: the server echoes cookies opaquely, so
    # four replies with that cookie and the correct data.
    data = os.urandom(4096)
    write_good(DATA_BASE + 2 * MiB, data)
    c = good()
    cookie = 0x0123456789ABCDEF
    for _ in range(4):
        c.request(CMD_READ, DATA_BASE + 2 * MiB, 4096, cookie=cookie)
    for i in range(4):
        res = c.reply(cookie, 4096)
        require(res == ("ok", data), "reply %d wrong: %r" % (i, res[0]))
    still_usable(c)
    c.disc()


# --------------------------------------------------------------------------
# Load / resource-exhaustion cases
# --------------------------------------------------------------------------
def normal_client_roundtrip(offset):
    """Write 64 KiB and read it back on a fresh connection; bounded in time."""
    data = os.urandom(65536)
    c = good()
    try:
        res = c.cmd(CMD_WRITE, offset, len(data), 0, data)
        require(res == ("ok", b""), "WRITE failed: %r" % (res,))
        res = c.cmd(CMD_READ, offset, len(data))
        require(res == ("ok", data), "READ back mismatch: %r" % (res[0],))
    finally:
        c.disc()


@case("slow_half_open_handshakes")
def _():
    # 32 clients trickle their handshake one byte every 0.25 s.  Meanwhile a
    # normal client must keep working promptly.  Each slow client must end up
    # either correctly answered or closed by the server (a handshake timeout
    # is allowed) - never with garbage.
    slow = []
    for _ in range(32):
        c = connect()
        c.greeting()
        slow.append(c)
    script = struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) + struct.pack(">QII", IHAVEOPT, OPT_LIST, 0)
    stop = threading.Event()
    problems = []
    rounds = [0]

    def prober():
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                normal_client_roundtrip(DATA_BASE + 4 * MiB)
            except Exception as e:  # noqa: BLE001 - reported below
                problems.append("normal client failed: %s" % e)
                return
            if time.monotonic() - t0 > 3.0:
                problems.append("normal client took %.1fs" % (time.monotonic() - t0))
            rounds[0] += 1
            time.sleep(0.2)

    th = threading.Thread(target=prober, daemon=True)
    th.start()
    alive = list(slow)
    for i in range(len(script)):
        for c in list(alive):
            try:
                c.s.send(script[i:i + 1])
            except OSError:
                alive.remove(c)       # server gave up on it: allowed
        time.sleep(0.25)
    stop.set()
    th.join(30)
    require(not th.is_alive(), "normal client hung")
    require(not problems, "; ".join(problems[:3]))
    require(rounds[0] >= 3, "normal client completed only %d round trips" % rounds[0])
    answered = 0
    for c in alive:
        try:
            names = []
            while True:
                o, rtype, data = c.recv_opt_reply()
                require(o == OPT_LIST, "slow client got reply for option %d" % o)
                if rtype == REP_ACK:
                    break
                require(rtype == REP_SERVER, "slow client got %s" % repname(rtype))
                names.append(data)
            answered += 1
        except Closed:
            pass
        c.close()
    return "%d/32 slow clients completed, %d normal round trips" % (answered, rounds[0])


@case("idle_connections_2000")
def _():
    # 2000 connections stay open and idle: 1000 completed the handshake (GO),
    # 500 stopped after the greeting, 500 stopped halfway through an option.
    # At least 1000 must be accepted; a normal client must still read and
    # write correctly meanwhile (the server may shed idle connections, e.g.
    # by a handshake timeout, but must not stop serving).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2000 + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
        require(min(want, hard) >= want, "cannot raise RLIMIT_NOFILE to %d (hard %d)" % (want, hard))
    conns = []
    counts = {"full": 0, "greet": 0, "half": 0, "refused": 0, "shed": 0}
    lock = threading.Lock()

    open_deadline = time.monotonic() + 90

    def open_one(i):
        if time.monotonic() > open_deadline:
            with lock:
                counts["refused"] += 1     # not even attempted: server too slow
            return
        try:
            c = connect(timeout=10.0)
        except OSError:
            with lock:
                counts["refused"] += 1
            return
        kind = i % 4
        with lock:
            conns.append((c, kind))
        try:
            if kind in (0, 1):          # complete handshake, then idle
                c.handshake(EXPORT)
                key = "full"
            elif kind == 2:             # read the greeting, then idle
                c.greeting()
                key = "greet"
            else:                       # stop in the middle of a GO option
                c.greeting()
                c.send_client_flags()
                c.send(struct.pack(">QII", IHAVEOPT, OPT_GO, 64) + b"abc")
                key = "half"
        except (Closed, Timeout, OSError, CheckFailed):
            key = "shed"                # server refused/shed it: acceptable
        with lock:
            counts[key] += 1

    t0 = time.monotonic()
    try:
        # 16 openers in parallel (keeps this fast even where each handshake
        # round trip suffers from Nagle/delayed-ACK latency).
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(open_one, range(2000)))
        accepted = counts["full"] + counts["greet"] + counts["half"]
        require(accepted >= 1000, "server took only %d of 2000 idle connections (%r)" % (accepted, counts))
        opened = time.monotonic() - t0
        # While all of them are open, a normal client must work, 3 times.
        t1 = time.monotonic()
        for k in range(3):
            normal_client_roundtrip(DATA_BASE + 5 * MiB + k * 65536)
        took = time.monotonic() - t1
        require(took < 15, "normal client needed %.1fs with idle connections open" % took)
        # A handshaked idle connection is still usable (unless the server shed it).
        usable = 0
        for c in [c for (c, kind) in conns if kind in (0, 1)][:10]:
            try:
                still_usable(c)
                usable += 1
            except CheckFailed:
                pass
    finally:
        for (c, _) in conns:
            c.close()
    return ("%d handshaked, %d greeting-only, %d half-option, %d shed, %d refused; opened in %.1fs; "
            "normal client %.2fs; %d/10 old idle conns still usable"
            % (counts["full"], counts["greet"], counts["half"], counts["shed"], counts["refused"],
               opened, took, usable))


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------
CURRENT = {"name": None, "start": 0.0}
CASE_LIMIT = 180          # seconds per case (the slowest normal case takes ~10 s)


def watchdog(limit):
    t0 = time.monotonic()

    def run():
        while True:
            time.sleep(1)
            now = time.monotonic()
            name = CURRENT["name"]
            if name and now - CURRENT["start"] > CASE_LIMIT:
                print("FAIL %s: hung for more than %ds (watchdog abort)" % (name, CASE_LIMIT), flush=True)
                os._exit(3)
            if now - t0 > limit:
                print("FAIL watchdog: malformed.py exceeded %ds, aborting" % limit, flush=True)
                os._exit(3)
    threading.Thread(target=run, daemon=True).start()


def main():
    global ADDR, EXPORT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--unix", metavar="SOCKET")
    g.add_argument("--tcp", nargs=2, metavar=("HOST", "PORT"))
    ap.add_argument("--export", required=True)
    ap.add_argument("--only", help="comma-separated case names to run")
    ap.add_argument("--timeout", type=int, default=600, help="global watchdog in seconds")
    args = ap.parse_args()
    if args.unix:
        ADDR = ("unix", args.unix)
    else:
        host = args.tcp[0]
        require(host in ("127.0.0.1", "localhost", "::1"), "refusing non-loopback host %s" % host)
        ADDR = ("tcp", (host, int(args.tcp[1])))
    EXPORT = args.export.encode()
    watchdog(args.timeout)
    random.seed()

    # Precondition: a good client works at all; export large enough.
    try:
        c = good()
        size = c.export_size
        c.disc()
        require(size >= DATA_BASE + 16 * MiB, "export too small (%d bytes)" % size)
    except Exception as e:  # noqa: BLE001
        R.report("precondition_connect", False, "%s: %s" % (type(e).__name__, e))
        print("%d passed, %d failed" % (R.passed, R.failed))
        return 1
    R.report("precondition_connect", True, "peer profile %s, export size %d" % (PEER, size))

    only = set(args.only.split(",")) if args.only else None
    for name, fn in CASES:
        if only and name not in only:
            continue
        t0 = time.monotonic()
        CURRENT["name"], CURRENT["start"] = name, t0
        del TOLERATED[:]
        try:
            info = fn()
            notes = ([info] if info else []) + ["tolerated for %s: %s" % (PEER, w) for w in TOLERATED]
            R.report(name, True, "; ".join(notes + ["%.2fs" % (time.monotonic() - t0)]))
        except CheckFailed as e:
            R.report(name, False, str(e))
        except (Closed, Timeout, OptError, OSError, struct.error) as e:
            R.report(name, False, "%s: %s" % (type(e).__name__, e))
        # Liveness after every case: a fresh, well-behaved client can read.
        try:
            liveness()
            R.report("alive_after_" + name, True)
        except Exception as e:  # noqa: BLE001
            R.report("alive_after_" + name, False, "%s: %s" % (type(e).__name__, e))
    print("%d passed, %d failed" % (R.passed, R.failed), flush=True)
    return 0 if R.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
