#!/usr/bin/env python3
"""Fault-injecting TCP proxy for the swift-mars multi-host tests (asyncio, standard library only).

Proxy mode (one listen/target pair per process):

    faultproxy.py --listen 127.0.0.1:17001 --target 127.0.0.2:7777 --control /tmp/px1.sock

Client mode (send one control command, print the reply, exit 0 when it starts with "ok"):

    faultproxy.py --control /tmp/px1.sock --send 'cut'
    echo stats | socat - UNIX-CONNECT:/tmp/px1.sock

Control commands (one line in, one line out: "ok ..." or "error ..."):

    cut                    abort every connection (RST) and refuse new ones (accept + close at once)
    heal                   forward new connections again (also stops a running flap)
    stall                  keep connections open but forward no bytes in either direction
    resume                 undo stall; buffered bytes are delivered
    throttle BYTES_PER_SEC token bucket per direction (shared by all connections); 0 = unlimited
    delay MS               one-way added latency per direction: a chunk read at t is written at
                           t + MS (pipelined, so throughput is not limited by the latency)
    flap UP_MS DOWN_MS N   N times: cut for DOWN_MS, then healed for UP_MS; then stay healed
                           (starts with a cut at once; heal/cut/reset stop a running flap)
    stats                  ok conns=N accepted=N bytes_up=N bytes_down=N buffered_up=N
                           buffered_down=N state=up|cut[,stalled][,flapping] throttle=N delay_ms=N
    reset                  heal + resume + throttle 0 + delay 0 (and stop a flap)

"up" is client -> target, "down" is target -> client. Each direction buffers at most about 4 MiB
(BUFFER_LIMIT) before it stops reading from its source, so a stalled or throttled link applies
backpressure instead of growing without bound. One log line per event goes to stderr.
"""

import argparse
import asyncio
import collections
import os
import signal
import socket
import struct
import sys
import time

CHUNK = 64 * 1024
BUFFER_LIMIT = 4 * 1024 * 1024
BURST_S = 0.05  # token bucket depth, in seconds of the configured rate


def log(msg):
    t = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + ".%03d" % int((t % 1) * 1000)
    try:
        sys.stderr.write("%s faultproxy[%d] %s\n" % (stamp, os.getpid(), msg))
        sys.stderr.flush()
    except Exception:
        pass


def parse_hostport(s):
    host, sep, port = s.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError("expected HOST:PORT, got %r" % s)
    host = host.strip("[]")
    try:
        return host, int(port)
    except ValueError:
        raise argparse.ArgumentTypeError("bad port in %r" % s)


class Bucket:
    """Token bucket kept as a virtual clock: each byte costs 1/rate seconds, BURST_S of credit."""

    def __init__(self):
        self.rate = 0
        self.t = 0.0

    def set_rate(self, rate):
        self.rate = rate
        self.t = 0.0

    def piece(self):
        if self.rate <= 0:
            return CHUNK
        return max(512, min(CHUNK, self.rate // 20))

    async def take(self, n):
        while self.rate > 0:
            rate = self.rate
            now = time.monotonic()
            self.t = max(self.t, now - BURST_S) + n / rate
            wait = self.t - now
            if wait > 0:
                await asyncio.sleep(wait)
            return


class Pump:
    """One direction of one connection: a reader task fills a bounded queue of timestamped chunks,
    a writer task drains it honouring delay, stall and throttle."""

    def __init__(self, proxy, conn, direction, reader, writer):
        self.proxy = proxy
        self.conn = conn
        self.direction = direction
        self.reader = reader
        self.writer = writer
        self.q = collections.deque()
        self.buffered = 0
        self.eof = False
        self.data_ev = asyncio.Event()
        self.space_ev = asyncio.Event()
        self.space_ev.set()

    async def read_loop(self):
        while True:
            while self.buffered >= BUFFER_LIMIT:
                self.space_ev.clear()
                await self.space_ev.wait()
            data = await self.reader.read(CHUNK)
            if not data:
                self.eof = True
                self.data_ev.set()
                return
            self.q.append((time.monotonic(), data))
            self.buffered += len(data)
            self.proxy.buffered[self.direction] += len(data)
            self.data_ev.set()

    async def write_loop(self):
        proxy = self.proxy
        bucket = proxy.buckets[self.direction]
        while True:
            if not self.q:
                if self.eof:
                    try:
                        if self.writer.can_write_eof():
                            self.writer.write_eof()
                    except (OSError, RuntimeError):
                        pass
                    return
                self.data_ev.clear()
                await self.data_ev.wait()
                continue
            t, data = self.q[0]
            due = t + proxy.delay_ms / 1000.0
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
                continue
            if not proxy.flowing.is_set():
                await proxy.flowing.wait()
                continue
            n = min(len(data), bucket.piece())
            await bucket.take(n)
            if not proxy.flowing.is_set():
                continue  # stalled while waiting for tokens; the tokens are simply lost
            self.writer.write(data[:n])
            await self.writer.drain()
            if n < len(data):
                self.q[0] = (t, data[n:])
            else:
                self.q.popleft()
            self.buffered -= n
            proxy.buffered[self.direction] -= n
            proxy.bytes[self.direction] += n
            if self.buffered < BUFFER_LIMIT:
                self.space_ev.set()

    def release(self):
        self.proxy.buffered[self.direction] -= self.buffered
        self.buffered = 0
        self.q.clear()


def hard_close(writer):
    """Close with SO_LINGER 0 so the peer sees a reset, not an orderly FIN."""
    if writer is None:
        return
    try:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        writer.transport.abort()
    except Exception:
        pass


class Conn:
    def __init__(self, proxy, cid, peer):
        self.proxy = proxy
        self.cid = cid
        self.peer = peer
        self.cw = None
        self.tw = None
        self.tasks = []
        self.pumps = []
        self.aborted = False

    def abort(self, why):
        if self.aborted:
            return
        self.aborted = True
        log("conn %d from %s: abort (%s)" % (self.cid, self.peer, why))
        hard_close(self.cw)
        hard_close(self.tw)
        for t in self.tasks:
            t.cancel()

    async def run(self, cr, cw):
        proxy = self.proxy
        self.cw = cw
        try:
            tr, tw = await asyncio.wait_for(
                asyncio.open_connection(proxy.target[0], proxy.target[1]), timeout=10)
        except (OSError, asyncio.TimeoutError) as e:
            log("conn %d from %s: connect to target %s:%d failed: %s"
                % (self.cid, self.peer, proxy.target[0], proxy.target[1], e))
            hard_close(cw)
            return
        self.tw = tw
        if self.aborted or proxy.cut:
            hard_close(tw)
            hard_close(cw)
            return
        for w in (cw, tw):
            try:
                w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
        log("conn %d from %s: connected to target %s:%d" % (self.cid, self.peer, *proxy.target))
        up = Pump(proxy, self, "up", cr, tw)
        down = Pump(proxy, self, "down", tr, cw)
        self.pumps = [up, down]
        self.tasks = [asyncio.ensure_future(c) for c in
                      (up.read_loop(), up.write_loop(), down.read_loop(), down.write_loop())]
        writers_left = {self.tasks[1], self.tasks[3]}
        pending = set(self.tasks)
        try:
            while pending and writers_left:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    writers_left.discard(t)
                    if t.cancelled():
                        continue
                    e = t.exception()
                    if e is not None:
                        self.abort("%s: %s" % (type(e).__name__, e))
                        pending = set()
                        break
        finally:
            for t in self.tasks:
                t.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            for p in self.pumps:
                p.release()
            if not self.aborted:
                log("conn %d from %s: closed" % (self.cid, self.peer))
                for w in (cw, tw):
                    try:
                        w.close()
                    except Exception:
                        pass


class Proxy:
    def __init__(self, listen, target):
        self.listen = listen
        self.target = target
        self.cut = False
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.delay_ms = 0
        self.buckets = {"up": Bucket(), "down": Bucket()}
        self.bytes = {"up": 0, "down": 0}
        self.buffered = {"up": 0, "down": 0}
        self.conns = set()
        self.accepted = 0
        self.next_id = 0
        self.flap_task = None

    async def on_client(self, reader, writer):
        self.next_id += 1
        cid = self.next_id
        peer = writer.get_extra_info("peername")
        peer = "%s:%s" % (peer[0], peer[1]) if peer else "?"
        if self.cut:
            log("conn %d from %s: refused (cut)" % (cid, peer))
            hard_close(writer)
            return
        self.accepted += 1
        log("conn %d from %s: accepted" % (cid, peer))
        conn = Conn(self, cid, peer)
        self.conns.add(conn)
        try:
            await conn.run(reader, writer)
        except Exception as e:  # never let one connection take the proxy down
            conn.abort("unexpected %s: %s" % (type(e).__name__, e))
        finally:
            self.conns.discard(conn)

    def do_cut(self, why="cut"):
        self.cut = True
        for c in list(self.conns):
            c.abort(why)

    def do_heal(self):
        self.cut = False

    def stop_flap(self):
        if self.flap_task is not None and not self.flap_task.done():
            self.flap_task.cancel()
            log("flap stopped")
        self.flap_task = None

    async def flap(self, up_ms, down_ms, count):
        try:
            for i in range(count):
                log("flap %d/%d: cut for %d ms" % (i + 1, count, down_ms))
                self.do_cut("flap")
                await asyncio.sleep(down_ms / 1000.0)
                log("flap %d/%d: healed for %d ms" % (i + 1, count, up_ms))
                self.do_heal()
                await asyncio.sleep(up_ms / 1000.0)
            log("flap done, staying healed")
        finally:
            self.do_heal()

    def state(self):
        s = "cut" if self.cut else "up"
        if not self.flowing.is_set():
            s += ",stalled"
        if self.flap_task is not None and not self.flap_task.done():
            s += ",flapping"
        return s

    def command(self, line):
        words = line.split()
        if not words:
            return "error empty command"
        cmd, args = words[0].lower(), words[1:]

        def ints(n):
            if len(args) != n:
                raise ValueError("%s takes %d argument(s)" % (cmd, n))
            vals = [int(a) for a in args]
            if any(v < 0 for v in vals):
                raise ValueError("negative argument")
            return vals

        try:
            if cmd == "cut":
                ints(0)
                self.stop_flap()
                n = len(self.conns)
                self.do_cut()
                return "ok cut conns_closed=%d" % n
            if cmd == "heal":
                ints(0)
                self.stop_flap()
                self.do_heal()
                return "ok healed"
            if cmd == "stall":
                ints(0)
                self.flowing.clear()
                return "ok stalled"
            if cmd == "resume":
                ints(0)
                self.flowing.set()
                return "ok resumed"
            if cmd == "throttle":
                (rate,) = ints(1)
                for b in self.buckets.values():
                    b.set_rate(rate)
                return "ok throttle=%d" % rate
            if cmd == "delay":
                (ms,) = ints(1)
                self.delay_ms = ms
                return "ok delay_ms=%d" % ms
            if cmd == "flap":
                up_ms, down_ms, count = ints(3)
                self.stop_flap()
                self.flap_task = asyncio.ensure_future(self.flap(up_ms, down_ms, count))
                return "ok flapping up_ms=%d down_ms=%d count=%d" % (up_ms, down_ms, count)
            if cmd == "stats":
                ints(0)
                return ("ok conns=%d accepted=%d bytes_up=%d bytes_down=%d buffered_up=%d "
                        "buffered_down=%d state=%s throttle=%d delay_ms=%d"
                        % (len(self.conns), self.accepted, self.bytes["up"], self.bytes["down"],
                           self.buffered["up"], self.buffered["down"], self.state(),
                           self.buckets["up"].rate, self.delay_ms))
            if cmd == "reset":
                ints(0)
                self.stop_flap()
                self.do_heal()
                self.flowing.set()
                for b in self.buckets.values():
                    b.set_rate(0)
                self.delay_ms = 0
                return "ok reset"
            return "error unknown command %r" % cmd
        except ValueError as e:
            return "error %s" % e

    async def on_control(self, reader, writer):
        try:
            while True:
                line = await asyncio.wait_for(reader.readline(), timeout=30)
                if not line:
                    break
                text = line.decode("utf-8", "replace").strip()
                if not text:
                    continue
                reply = self.command(text)
                log("control: %s -> %s" % (text, reply))
                writer.write((reply + "\n").encode())
                await writer.drain()
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            try:
                writer.close()
            except Exception:
                pass


def silence_reset_noise(loop, context):
    exc = context.get("exception")
    if isinstance(exc, (ConnectionError, OSError)):
        return
    log("asyncio: %s" % context.get("message"))


async def serve(args):
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(silence_reset_noise)
    proxy = Proxy(args.listen, args.target)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await asyncio.start_server(proxy.on_client, args.listen[0], args.listen[1],
                                        reuse_address=True, backlog=128)
    port = server.sockets[0].getsockname()[1]
    if os.path.exists(args.control):
        os.unlink(args.control)
    control = await asyncio.start_unix_server(proxy.on_control, path=args.control)
    log("listening on %s:%d, target %s:%d, control %s"
        % (args.listen[0], port, args.target[0], args.target[1], args.control))
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write("%d\n" % port)
        os.rename(args.port_file + ".tmp", args.port_file)
    await stop.wait()
    log("signal received, exiting")
    proxy.stop_flap()
    server.close()
    control.close()
    for c in list(proxy.conns):
        c.abort("shutdown")
    await asyncio.sleep(0)
    try:
        os.unlink(args.control)
    except OSError:
        pass


def send(path, command, timeout):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(command.strip().encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while b"\n" not in buf:
            d = s.recv(4096)
            if not d:
                break
            buf += d
    except OSError as e:
        print("error control socket %s: %s" % (path, e))
        return 1
    finally:
        s.close()
    reply = buf.decode("utf-8", "replace").strip()
    print(reply if reply else "error no reply")
    return 0 if reply.startswith("ok") else 1


def main():
    ap = argparse.ArgumentParser(description="fault-injecting TCP proxy (see module doc)")
    ap.add_argument("--listen", type=parse_hostport, help="HOST:PORT to accept on (port 0 = any)")
    ap.add_argument("--target", type=parse_hostport, help="HOST:PORT to forward to")
    ap.add_argument("--control", required=True, help="Unix socket path for control commands")
    ap.add_argument("--send", metavar="COMMAND", help="client mode: send COMMAND, print the reply")
    ap.add_argument("--timeout", type=float, default=10.0, help="client mode timeout (s)")
    ap.add_argument("--port-file", help="write the actual listening port here once listening")
    args = ap.parse_args()
    if args.send is not None:
        sys.exit(send(args.control, args.send, args.timeout))
    if args.listen is None or args.target is None:
        ap.error("proxy mode needs --listen and --target")
    try:
        asyncio.run(serve(args))
    except OSError as e:
        log("fatal: %s" % e)
        sys.exit(2)
    sys.exit(0)


if __name__ == "__main__":
    main()
