#!/usr/bin/env bash
# A true partition (nftables drops every packet between two loopback addresses: nothing is closed,
# nothing answers) between a primary and its secondary while the primary writes: the secondary
# notices the silence, says PrimaryUnreachable, retries with backoff, and after the partition heals
# catches up from the exact byte, with no new sync, ending byte-identical. Then a third host cut
# off from the primary alone fetches from the other secondary (transitive fetch) and stays
# UpToDate. Prints PASS/FAIL lines.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
MARSD=${MARSD:-$ROOT/.build/release/marsd}
MARSADM=${MARSADM:-$ROOT/.build/release/marsadm}
PYTHON=${PYTHON:-/usr/bin/python3}
if ! command -v nft >/dev/null || ! nft list tables >/dev/null 2>&1; then
    echo "SKIP partition test: nft is missing or not permitted here (Tools/setup installs nftables; it needs root)"
    exit 0
fi
W=$(mktemp -d /tmp/mars-part.XXXXXX)
TABLE=mars_partition_$$
. "$HERE/lib.sh"
cleanup() {
    nft delete table inet "$TABLE" 2>/dev/null
    stop_all
}
trap cleanup EXIT

A=127.0.0.41
B=127.0.0.42
C=127.0.0.43
start() {
    local host=$1 ip=$2
    mkdir -p "$W/$host"
    "$MARSD" serve --root "$W/$host/root" --unix "$W/$host/nbd.sock" --control "$W/$host/ctl.sock" --peer "$ip:17777" \
        --log-segment-mib 4 --log-space-mib 400 --log-level notice 2>>"$W/$host.log" &
    pids+=($!)
    for _ in $(seq 100); do [ -S "$W/$host/ctl.sock" ] && return 0; sleep 0.1; done
    return 1
}
adm() { local host=$1; shift; "$MARSADM" "$@" --control "$W/$host/ctl.sock"; }
state_is() { adm beta view --json | grep -q "\"replication\" : \"$1\""; }
json() {  # json HOST EXPRESSION over vm1's status (r)
    adm "$1" view --json | "$PYTHON" -c "
import json, sys
r = [r for r in json.load(sys.stdin)['resources'] if r['name'] == 'vm1'][0]
print($2)"
}
partition() {  # partition X Y: drop every packet between the two addresses
    nft add rule inet "$TABLE" out ip saddr "$1" ip daddr "$2" drop
    nft add rule inet "$TABLE" out ip saddr "$2" ip daddr "$1" drop
}
write() {  # write MIB: 64 KiB writes at random places, flushed (less than the retention limit)
    "$PYTHON" - "$W/alpha/nbd.sock" "$1" <<'PY'
import nbd, os, random, sys
h = nbd.NBD()
h.connect_uri(f"nbd+unix:///vm1?socket={sys.argv[1]}")
for _ in range(int(sys.argv[2]) * 16):
    h.pwrite(os.urandom(65536), random.randrange(1024) * 65536)
h.flush()
PY
}

start alpha $A && start beta $B || { echo "FAIL two marsd start"; exit 1; }
TOKEN=$(adm alpha create-cluster --host alpha --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["token"])')
adm beta join-cluster --host beta --token "$TOKEN" "$A:17777" >/dev/null
truncate -s 64M "$W/alpha.img" "$W/beta.img"
adm alpha create-resource vm1 "$W/alpha.img" >/dev/null
check "beta joins vm1" eventually 20 adm beta join-resource vm1 "$W/beta.img"
check "beta is UpToDate" adm beta wait-resource vm1 --timeout 60

nft add table inet "$TABLE"
nft add chain inet "$TABLE" out "{ type filter hook output priority 0 ; }"
partition $A $B
write 40
check "the partitioned secondary says PrimaryUnreachable" eventually 40 state_is PrimaryUnreachable
check "beta logged the silence" grep -q "no message from alpha" "$W/beta.log"
write 40
nft delete table inet "$TABLE"
check "after the partition heals beta is UpToDate" adm beta wait-resource vm1 --timeout 90
syncs=$(grep -c "sync of vm1 done" "$W/beta.log")
check "no new sync after the partition ($syncs)" test "$syncs" -eq 1
check "the primary never let beta go" bash -c "! grep -q 'let beta go' '$W/alpha.log'"

# gamma joins, then loses the primary alone: it fetches from beta.
start gamma $C || echo "FAIL gamma starts"
adm gamma join-cluster --host gamma --token "$TOKEN" "$A:17777" >/dev/null
truncate -s 64M "$W/gamma.img"
check "gamma joins vm1" eventually 20 adm gamma join-resource vm1 "$W/gamma.img"
check "gamma is UpToDate" adm gamma wait-resource vm1 --timeout 60
sleep 5  # gossip tells beta how far gamma is: beta keeps what gamma may still fetch from it
nft add table inet "$TABLE"
nft add chain inet "$TABLE" out "{ type filter hook output priority 0 ; }"
partition $A $C
write 30
durable=$(json alpha "r['log']['durableLSN']")
via_beta() { [ "$(json gamma "r['replication'].get('fetchSource'), r['replication']['replayedLSN'] >= $durable")" = "beta True" ]; }
check "gamma, cut off from the primary, fetches from beta" eventually 60 via_beta || adm gamma view
nft delete table inet "$TABLE"
check "the primary never let gamma go" bash -c "! grep -q 'let gamma go' '$W/alpha.log'"
adm beta pause-replay vm1 >/dev/null
adm gamma wait-resource vm1 --timeout 60 >/dev/null
adm gamma pause-replay vm1 >/dev/null
adm alpha down vm1 >/dev/null
check "the devices are byte-identical" cmp "$W/alpha.img" "$W/beta.img"
check "gamma's device is byte-identical" cmp "$W/alpha.img" "$W/gamma.img"
[ "$fails" -gt 0 ] && for host in alpha beta gamma; do echo "--- $host"; tail -15 "$W/$host.log"; done
exit $((fails > 0))
