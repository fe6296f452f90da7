#!/usr/bin/env bash
# Runs run-guest-tests.sh against an NBD server it starts on a fresh sparse
# 256 MiB file behind a Unix socket:
#   qemu-nbd (default) or nbdkit  reference servers: prove the guest test works
#   marsd                         the project's server, started as
#                                 `marsd serve --export NAME=PATH --unix SOCK`
#   marsd-logged                  the file as a logged resource (create-cluster and
#                                 create-resource through marsadm next to marsd)
#
# Usage: run-against-peer.sh [--peer qemu-nbd|nbdkit|marsd|marsd-logged] [--marsd PATH]
#                            [--marsd-args "ARGS"] [run-guest-tests.sh options...]
#   GUEST_PEER, MARSD, GUEST_MARSD_ARGS and GUEST_PEER_SIZE_MIB also set these.
#   marsd defaults to .build/debug/marsd of this package.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
PEER=${GUEST_PEER:-qemu-nbd}
MARSD=${MARSD:-$ROOT/.build/debug/marsd}
MARSD_ARGS=${GUEST_MARSD_ARGS:-}
SIZE_MIB=${GUEST_PEER_SIZE_MIB:-256}
EXPORT=marsguest
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --peer) PEER=$2; shift 2 ;;
        --marsd) MARSD=$2; shift 2 ;;
        --marsd-args) MARSD_ARGS=$2; shift 2 ;;
        *) ARGS+=("$1"); shift ;;
    esac
done

D=$(mktemp -d "${TMPDIR:-/tmp}/mars-peer.XXXXXX")
SOCK=$D/nbd.sock
IMG=$D/disk.img
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$D"
}
trap cleanup EXIT

truncate -s "${SIZE_MIB}M" "$IMG"
case "$PEER" in
    qemu-nbd)
        # -t: keep serving after a client disconnects; -e: several clients
        # (QEMU's block driver, the guest, nbdcopy, nbdinfo come one after another)
        qemu-nbd -t -e 4 -f raw -x "$EXPORT" -k "$SOCK" --discard=unmap "$IMG" \
            >"$D/server.log" 2>&1 &
        SERVER_PID=$!
        ;;
    nbdkit)
        nbdkit -f -U "$SOCK" file file="$IMG" >"$D/server.log" 2>&1 &
        SERVER_PID=$!
        ;;
    marsd)
        [ -x "$MARSD" ] || { echo "run-against-peer: no marsd at $MARSD (swift build first, or --marsd PATH)" >&2; exit 2; }
        # shellcheck disable=SC2086
        "$MARSD" serve --root "$D/root" --export "$EXPORT=$IMG" --unix "$SOCK" $MARSD_ARGS >"$D/server.log" 2>&1 &
        SERVER_PID=$!
        ;;
    marsd-logged)
        MARSADM=$(dirname "$MARSD")/marsadm
        [ -x "$MARSD" ] && [ -x "$MARSADM" ] || { echo "run-against-peer: no marsd/marsadm at $MARSD" >&2; exit 2; }
        # shellcheck disable=SC2086
        "$MARSD" serve --root "$D/root" --control "$D/ctl.sock" --unix "$SOCK" $MARSD_ARGS >"$D/server.log" 2>&1 &
        SERVER_PID=$!
        for _ in $(seq 1 150); do [ -S "$D/ctl.sock" ] && break; sleep 0.1; done
        "$MARSADM" create-cluster --host guest --control "$D/ctl.sock" >&2
        "$MARSADM" create-resource "$EXPORT" "$IMG" --control "$D/ctl.sock" >&2
        ;;
    *) echo "unknown peer $PEER (qemu-nbd, nbdkit, marsd or marsd-logged)" >&2; exit 2 ;;
esac

for _ in $(seq 1 150); do
    [ -S "$SOCK" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$D/server.log" >&2; exit 1; }
    sleep 0.1
done
[ -S "$SOCK" ] || { echo "server did not create $SOCK" >&2; cat "$D/server.log" >&2; exit 1; }
echo "run-against-peer: $PEER serving $IMG ($SIZE_MIB MiB) as '$EXPORT' on $SOCK" >&2

rc=0
"$HERE/run-guest-tests.sh" --socket "$SOCK" --export "$EXPORT" --image "$IMG" "${ARGS[@]}" || rc=$?
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "FAIL $PEER/server-alive: the server exited during the tests" >&2
    echo "---- server log ----" >&2
    tail -n 40 "$D/server.log" >&2
    rc=1
fi
if [ "$rc" -ne 0 ]; then
    echo "---- $PEER log (last 40 lines) ----" >&2
    tail -n 40 "$D/server.log" >&2
fi
exit $rc
