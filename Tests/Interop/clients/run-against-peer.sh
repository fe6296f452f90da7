#!/bin/bash
# Run the three interop test scripts against one NBD server.
#
#   run-against-peer.sh nbdkit      # reference peer: nbdkit file plugin
#   run-against-peer.sh qemu-nbd    # reference peer: qemu-nbd on a raw file
#   run-against-peer.sh marsd       # our server ($MARSD, default: marsd on PATH), plain export
#   run-against-peer.sh marsd-logged  # our server with the export as a logged resource
#                                   # (create-cluster + create-resource through $MARSADM)
#
# The server is started on a fresh sparse file (2 GiB + 128 MiB) in a temp
# dir, first on a Unix socket (libnbd_functional.py, malformed.py --unix,
# clients.sh), then on a free loopback TCP port (libnbd_functional.py,
# malformed.py --tcp).  It is stopped by PID on exit (trap).  After every
# script the runner also checks that the server process is still alive.
#
# Environment: MARSD (path to marsd), MARSD_ARGS (extra args, e.g.
# "--io-engine posix"), NBDKIT_THREADS (default 1, see below), KEEP_TMP=1 to
# keep the temp dir, SKIP_CLIENTS=1, SKIP_TCP=1.
#
# The peers are configured to match the marsd contract as closely as they can
# (see comments below); NBD_PEER is exported so the scripts tolerate only the
# peer deviations documented in /work/shared/reference/nbd.md.
set -u

PEER=${1:-}
case "$PEER" in
    nbdkit|qemu-nbd|marsd|marsd-logged) ;;
    *) echo "usage: $0 nbdkit|qemu-nbd|marsd|marsd-logged" >&2; exit 2 ;;
esac

HERE=$(cd "$(dirname "$0")" && pwd)
PY=/usr/bin/python3            # the only python with the nbd module
EXPORT=disk
SIZE=${SIZE:-2176M}
TMP=$(mktemp -d /tmp/nbd-interop.XXXXXX)
IMG=$TMP/disk.img
SOCK=$TMP/nbd.sock
SPID=
export NBD_PEER=${PEER%-logged}

stop_server() {
    if [ -n "$SPID" ] && kill -0 "$SPID" 2>/dev/null; then
        kill "$SPID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$SPID" 2>/dev/null
        wait "$SPID" 2>/dev/null
    fi
    SPID=
}
cleanup() {
    stop_server
    if [ "${KEEP_TMP:-0}" = 1 ]; then echo "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_server unix|tcp  -> sets URI (and PORT for tcp)
start_server() {
    local mode=$1 listen
    rm -f "$SOCK"
    if [ "$mode" = unix ]; then
        URI="nbd+unix:///$EXPORT?socket=$SOCK"
    else
        PORT=$(free_port)
        URI="nbd://127.0.0.1:$PORT/$EXPORT"
    fi
    case "$PEER" in
    nbdkit)
        # exportname filter: list and accept only "disk" (ERR_UNKNOWN for
        # others), like the contract.  blocksize-policy: advertise and enforce
        # 1 / 4096 / 32 MiB.  nozero fastzeromode=slow: advertise FAST_ZERO and
        # answer it with ENOTSUP (conformant; the file plugin alone does not
        # advertise it).
        # -t 1 (one worker thread per connection): nbdkit 1.32.5 with the
        # default 16 threads intermittently aborts with "raw_send_socket:
        # Assertion `sock >= 0' failed" when a client hangs up with many
        # requests in flight (malformed.py disconnect_with_inflight, TCP and
        # Unix).  Set NBDKIT_THREADS=16 to reproduce.
        if [ "$mode" = unix ]; then listen=(-U "$SOCK"); else listen=(-i 127.0.0.1 -p "$PORT"); fi
        nbdkit -f --exit-with-parent -t "${NBDKIT_THREADS:-1}" "${listen[@]}" \
            --filter=exportname --filter=blocksize-policy --filter=nozero \
            file "$IMG" \
            exportname="$EXPORT" exportname-list=explicit exportname-strict=true \
            blocksize-minimum=1 blocksize-preferred=4096 blocksize-maximum=32M \
            blocksize-error-policy=error zeromode=plugin fastzeromode=slow \
            2>"$TMP/server-$mode.log" &
        SPID=$! ;;
    qemu-nbd)
        # -e 0: unlimited clients (=> CAN_MULTI_CONN); -t: persistent;
        # --discard=unmap: TRIM / WRITE_ZEROES may punch holes in the file.
        if [ "$mode" = unix ]; then listen=(-k "$SOCK"); else listen=(-b 127.0.0.1 -p "$PORT"); fi
        qemu-nbd -f raw -x "$EXPORT" "${listen[@]}" -e 0 -t --discard=unmap "$IMG" \
            2>"$TMP/server-$mode.log" &
        SPID=$! ;;
    marsd)
        if [ "$mode" = unix ]; then listen=(--unix "$SOCK"); else listen=(--tcp "127.0.0.1:$PORT"); fi
        # shellcheck disable=SC2086
        "${MARSD:-marsd}" serve --root "$TMP/root" --export "$EXPORT=$IMG" "${listen[@]}" ${MARSD_ARGS:-} \
            2>"$TMP/server-$mode.log" &
        SPID=$! ;;
    marsd-logged)
        # The first start creates the resource; the second (TCP) restores it from the root.
        if [ "$mode" = unix ]; then listen=(--unix "$SOCK"); else listen=(--tcp "127.0.0.1:$PORT"); fi
        # shellcheck disable=SC2086
        "${MARSD:-marsd}" serve --root "$TMP/root" --control "$TMP/ctl.sock" "${listen[@]}" ${MARSD_ARGS:-} \
            2>"$TMP/server-$mode.log" &
        SPID=$!
        for _ in $(seq 100); do [ -S "$TMP/ctl.sock" ] && break; sleep 0.1; done
        if [ ! -d "$TMP/root/resource-$EXPORT" ]; then
            "${MARSADM:-marsadm}" create-cluster --host interop --control "$TMP/ctl.sock" >/dev/null \
                && "${MARSADM:-marsadm}" create-resource "$EXPORT" "$IMG" --control "$TMP/ctl.sock" >/dev/null \
                || { echo "FAIL start_server: cannot create the resource" >&2; return 1; }
        fi ;;
    esac
    for _ in $(seq 100); do
        if timeout 2 nbdinfo --size "$URI" >/dev/null 2>&1; then return 0; fi
        kill -0 "$SPID" 2>/dev/null || break
        sleep 0.1
    done
    echo "FAIL start_server: $PEER ($mode) did not come up; log:" >&2
    cat "$TMP/server-$mode.log" >&2
    return 1
}

declare -a SUMMARY
OVERALL=0
# run NAME TIMEOUT CMD... : run one script with a time limit, record rc + time
run() {
    local name=$1 limit=$2 t0 rc dt
    shift 2
    echo "=== $name ($PEER) ==="
    t0=$(date +%s%N)
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    dt=$(( ($(date +%s%N) - t0) / 100000000 ))
    dt="$((dt / 10)).$((dt % 10))"
    if ! kill -0 "$SPID" 2>/dev/null; then
        echo "FAIL server_alive_after_$name: $PEER process is gone"
        rc=99
    fi
    SUMMARY+=("$(printf '%-28s rc=%-3s %6ss' "$name" "$rc" "$dt")")
    [ "$rc" = 0 ] || OVERALL=1
}

truncate -s "$SIZE" "$IMG" || exit 1
T_START=$(date +%s)

# Phase 1: Unix socket
start_server unix || exit 1
run functional-unix 300 $PY "$HERE/libnbd_functional.py" "$URI"
run malformed-unix 600 $PY "$HERE/malformed.py" --unix "$SOCK" --export "$EXPORT"
if [ "${SKIP_CLIENTS:-0}" != 1 ]; then
    mkdir -p "$TMP/work"
    run clients-unix 600 env NBD_URI="$URI" NBD_UNIX="$SOCK" EXPORT="$EXPORT" WORKDIR="$TMP/work" \
        bash "$HERE/clients.sh"
    rm -rf "$TMP/work"
fi
stop_server

# Phase 2: loopback TCP
if [ "${SKIP_TCP:-0}" != 1 ]; then
    start_server tcp || exit 1
    run functional-tcp 300 $PY "$HERE/libnbd_functional.py" "$URI"
    run malformed-tcp 600 $PY "$HERE/malformed.py" --tcp 127.0.0.1 "$PORT" --export "$EXPORT"
    stop_server
fi

echo "=== summary ($PEER, $(( $(date +%s) - T_START ))s total) ==="
printf '%s\n' "${SUMMARY[@]}"
exit $OVERALL
