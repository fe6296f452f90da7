#!/usr/bin/env python3
"""Page faults per large request in a running marsd (issue 18).

A steady stream of 1 MiB READs and WRITEs (8 in flight) must reuse marsd's request buffers: a
fresh buffer per request page-faults each of its 256 pages in (the kernel zeroes every one), which
cost a third of the event loop's time on 1 MiB reads over TCP. Counts the server's minor faults
(/proc/PID/stat) over the measured requests, after a warm-up, and prints PASS or FAIL per
transport and command.

usage: buffers.py PID URI LABEL COMMANDS [REQUESTS]   (COMMANDS: write,read or one of them)
"""
import sys

import nbd

MiB = 1 << 20
DEPTH = 8
# A request that page-faults its buffer in costs about 256 faults (1 MiB / 4 KiB); a reused one
# costs none. Other work of the daemon (gossip rounds, the page cache, NIO's own buffers, receive
# buffers of sizes the pool has not held yet) adds a few: up to 6.2 per TCP WRITE seen. Without the
# pool: 240 per READ over TCP, 51 over the Unix socket.
LIMIT_PER_REQUEST = 32


def minor_faults(pid):
    with open(f"/proc/{pid}/stat") as f:
        # Field 10 (minflt), counted after the parenthesised command name, which may hold spaces.
        return int(f.read().rsplit(")", 1)[1].split()[7])


def stream(h, command, count, size):
    """`count` requests of 1 MiB, DEPTH in flight, over the first `size` bytes."""
    buffers = [nbd.Buffer(MiB) for _ in range(DEPTH)]
    for b in buffers:
        # Written once, so the client's own buffers are mapped before the measurement.
        b.to_bytearray()[:] = bytes(MiB)
    submitted = completed = 0
    offsets = [(i * MiB) % size for i in range(count)]
    inflight = {}
    free = list(range(DEPTH))
    while completed < count:
        while free and submitted < count:
            slot = free.pop()
            if command == "read":
                cookie = h.aio_pread(buffers[slot], offsets[submitted])
            else:
                cookie = h.aio_pwrite(buffers[slot], offsets[submitted])
            inflight[cookie] = slot
            submitted += 1
        h.poll(-1)
        for cookie, slot in list(inflight.items()):
            if h.aio_command_completed(cookie):
                del inflight[cookie]
                free.append(slot)
                completed += 1


def main():
    pid, uri, label, commands = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4].split(",")
    requests = int(sys.argv[5]) if len(sys.argv) > 5 else 512
    h = nbd.NBD()
    h.connect_uri(uri)
    size = min(h.get_size(), 64 * MiB)
    failed = False
    for command in commands:
        stream(h, command, 64, size)  # warm-up: the pool fills, the page cache holds the range
        before = minor_faults(pid)
        stream(h, command, requests, size)
        per_request = (minor_faults(pid) - before) / requests
        verdict = "PASS" if per_request < LIMIT_PER_REQUEST else "FAIL"
        failed |= verdict == "FAIL"
        print(f"{verdict} {label}: 1 MiB {command}s, {DEPTH} in flight: {per_request:.1f} page faults per request "
              f"in marsd (limit {LIMIT_PER_REQUEST}, {requests} requests)")
    h.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
