#!/usr/bin/env python3
"""stdin/stdout <-> Unix-socket relay for QEMU's guestfwd=...-cmd:.

Used by run-guest-tests.sh only when socat is not installed. QEMU (libslirp)
starts the command once per guest TCP connection with stdin, stdout and
stderr all set to one end of a socketpair, so nothing may be written to
stderr here (the wrapper redirects it to a log file).

Usage: guestfwd-proxy.py UNIX_SOCKET_PATH
"""
import os
import socket
import sys
import threading


def pump(read_fd_or_sock, write, on_eof):
    try:
        while True:
            if isinstance(read_fd_or_sock, socket.socket):
                data = read_fd_or_sock.recv(1 << 16)
            else:
                data = os.read(read_fd_or_sock, 1 << 16)
            if not data:
                break
            write(data)
    except OSError:
        pass
    finally:
        on_eof()


def main():
    path = sys.argv[1]
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.connect(path)
    guest_in = 0
    guest_out = 1

    def write_guest(data):
        view = memoryview(data)
        while view:
            n = os.write(guest_out, view)
            view = view[n:]

    def guest_eof():
        try:
            server.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def server_eof():
        try:
            # stdin/stdout are one socket; shut down our sending direction.
            socket.socket(fileno=os.dup(guest_out)).shutdown(socket.SHUT_WR)
        except OSError:
            pass

    t = threading.Thread(target=pump, args=(guest_in, server.sendall, guest_eof), daemon=True)
    t.start()
    pump(server, write_guest, server_eof)
    t.join(timeout=5)


if __name__ == "__main__":
    main()
