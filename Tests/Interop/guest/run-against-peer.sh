#!/usr/bin/env bash
# Runs run-guest-tests.sh against a reference NBD server (qemu-nbd or nbdkit)
# serving a fresh sparse 256 MiB file on a Unix socket. This proves the guest
# test itself works, independently of marsd.
#
# Usage: run-against-peer.sh [--peer qemu-nbd|nbdkit] [run-guest-tests.sh options...]
#   default peer: qemu-nbd (GUEST_PEER overrides)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PEER=${GUEST_PEER:-qemu-nbd}
SIZE_MIB=${GUEST_PEER_SIZE_MIB:-256}
EXPORT=marsguest
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --peer) PEER=$2; shift 2 ;;
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
    *) echo "unknown peer $PEER (qemu-nbd or nbdkit)" >&2; exit 2 ;;
esac

for _ in $(seq 1 100); do
    [ -S "$SOCK" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$D/server.log" >&2; exit 1; }
    sleep 0.1
done
[ -S "$SOCK" ] || { echo "server did not create $SOCK" >&2; cat "$D/server.log" >&2; exit 1; }
echo "run-against-peer: $PEER serving $IMG ($SIZE_MIB MiB) as '$EXPORT' on $SOCK" >&2

rc=0
"$HERE/run-guest-tests.sh" --socket "$SOCK" --export "$EXPORT" --image "$IMG" "${ARGS[@]}" || rc=$?
exit $rc
