#!/usr/bin/env python3
"""Bad input on marsd's peer port: each case must end with marsd closing the connection (or
answering `refused`), never a crash or a stall. Prints `ok CASE` or `bad CASE: why`.

    badpeer.py HOST:PORT CLUSTER-ID
"""
import os
import socket
import struct
import sys
import time

host, port = sys.argv[1].rsplit(":", 1)
cluster = sys.argv[2]
ADDRESS = (host, int(port))


def string(text):
    data = text.encode()
    return struct.pack("<H", len(data)) + data


def blob(data):
    return struct.pack("<I", len(data)) + data


def frame(kind, body):
    return struct.pack("<I", len(body) + 1) + bytes([kind]) + body


def hello(cluster_id, version=2, nonce=None):
    return frame(1, struct.pack("<H", version) + string(cluster_id) + string("intruder") + string("x") + blob(nonce or os.urandom(32)))


def session(payload, expect_refused=False, close_after=True, timeout=15):
    """Sends `payload`; returns (closed_by_server, got_refused)."""
    s = socket.create_connection(ADDRESS, timeout=timeout)
    try:
        s.sendall(payload)
        if not close_after:
            s.shutdown(socket.SHUT_WR)
        received = b""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                return True, refused_in(received)
            if not chunk:
                return True, refused_in(received)
            received += chunk
        return False, refused_in(received)
    finally:
        s.close()


def refused_in(data):
    # frames: u32 length, type byte; type 5 = refused
    while len(data) >= 5:
        length = struct.unpack("<I", data[:4])[0]
        if data[4] == 5:
            return True
        data = data[4 + length:]
    return False


cases = [
    ("garbage bytes", os.urandom(4096), False),
    ("a frame longer than the 4 MiB limit", struct.pack("<I", 0xFFFFFFF0) + b"\x01", False),
    ("an empty frame body", struct.pack("<I", 0), False),
    ("an unknown message type", frame(99, b"abc"), False),
    ("a truncated hello", hello(cluster)[:20], False),
    ("a message before the handshake", frame(7, string("vm1") + string("log-000000001-alpha") + struct.pack("<QQQ", 0, 1 << 20, 1)), True),
    ("a hello for another cluster", hello("0" * 32), True),
    ("a hello with protocol version 9", hello(cluster, version=9), True),
    ("a hello with protocol version 1 (an older marsd)", hello(cluster, version=1), True),
    ("a hello with a short nonce", hello(cluster, nonce=b"12345"), False),
]
for name, payload, refusal in cases:
    try:
        closed, refused = session(payload, close_after=name != "a truncated hello")
    except OSError as error:
        print(f"bad {name}: {error}")
        continue
    if not closed:
        print(f"bad {name}: marsd kept the connection open")
    elif refusal and not refused:
        print(f"bad {name}: closed without a 'refused' message")
    else:
        print(f"ok {name}")

# A wrong secret: the server's challenge arrives; our authenticate carries a wrong proof.
try:
    s = socket.create_connection(ADDRESS, timeout=15)
    s.sendall(hello(cluster))
    s.recv(65536)
    s.sendall(frame(3, blob(os.urandom(32))))
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    print("ok a wrong cluster secret" if refused_in(data) else "bad a wrong cluster secret: no refusal")
except OSError as error:
    print(f"ok a wrong cluster secret (closed: {error})")

# Many bad connections at once: marsd keeps accepting.
sockets = []
for _ in range(50):
    s = socket.create_connection(ADDRESS, timeout=15)
    s.sendall(os.urandom(64))
    sockets.append(s)
for s in sockets:
    s.close()
try:
    closed, refused = session(hello("0" * 32), timeout=15)
    print("ok 50 garbage connections, then a refused hello" if refused else "bad after 50 garbage connections: no refusal")
except OSError as error:
    print(f"bad after 50 garbage connections: {error}")
