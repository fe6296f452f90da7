#!/usr/bin/env bash
# Membership and the retention cap with three marsd on loopback: a secondary that stays away past
# the primary's retention limit is let go (NeedsSync, visibly) while the primary's log space is
# released and the other secondary goes on; invalidate (with pause-sync/resume-sync) brings it
# back; lag in seconds; leave-resource, delete-resource and leave-cluster. Prints PASS/FAIL lines.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
MARSD=${MARSD:-$ROOT/.build/release/marsd}
MARSADM=${MARSADM:-$ROOT/.build/release/marsadm}
PYTHON=${PYTHON:-/usr/bin/python3}
W=$(mktemp -d /tmp/mars-life.XXXXXX)
. "$HERE/lib.sh"
trap stop_all EXIT

declare -A ADDR=([alpha]=127.0.0.31:17777 [beta]=127.0.0.32:17777 [gamma]=127.0.0.33:17777)
start() {
    local host=$1; shift
    mkdir -p "$W/$host"
    "$MARSD" serve --root "$W/$host/root" --unix "$W/$host/nbd.sock" --control "$W/$host/ctl.sock" --peer "${ADDR[$host]}" \
        --log-segment-mib 1 --log-space-mib 100 --log-retention-mib 8 --log-level notice "$@" 2>>"$W/$host.log" &
    pids+=($!)
    for _ in $(seq 100); do [ -S "$W/$host/ctl.sock" ] && return 0; sleep 0.1; done
    return 1
}
adm() { local host=$1; shift; "$MARSADM" "$@" --control "$W/$host/ctl.sock"; }
field() {  # field HOST PYTHON-EXPRESSION over the resource vm1 (r) of view --json
    adm "$1" view --json | "$PYTHON" -c "
import json, sys
status = json.load(sys.stdin)
r = next((r for r in status['resources'] if r['name'] == 'vm1'), None)
print($2)"
}
write_mib() {  # write_mib MIB SEED: random data at random 1 MiB slots, flushed
    "$PYTHON" - "$W/alpha/nbd.sock" "$1" "$2" <<'EOF'
import nbd, os, random, sys
sock, mib, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
h = nbd.NBD()
h.connect_uri(f"nbd+unix:///vm1?socket={sock}")
for _ in range(mib):
    h.pwrite(os.urandom(1 << 20), rng.randrange(64) << 20)
h.flush()
EOF
}

start alpha && start beta && start gamma || { fail "three marsd start"; exit 1; }
TOKEN=$(adm alpha create-cluster --host alpha --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["token"])')
adm beta join-cluster --host beta --token "$TOKEN" "${ADDR[alpha]}" >/dev/null
adm gamma join-cluster --host gamma --token "$TOKEN" "${ADDR[alpha]}" >/dev/null
for host in alpha beta gamma; do truncate -s 64M "$W/$host.img"; done
adm alpha create-resource vm1 "$W/alpha.img" >/dev/null
check "beta joins" eventually 20 adm beta join-resource vm1 "$W/beta.img"
check "gamma joins" eventually 20 adm gamma join-resource vm1 "$W/gamma.img"
check "both UpToDate" bash -c "'$MARSADM' wait-resource vm1 --timeout 60 --control '$W/beta/ctl.sock' >/dev/null && '$MARSADM' wait-resource vm1 --timeout 60 --control '$W/gamma/ctl.sock' >/dev/null"

# Lag in seconds: beta's replay paused while writes arrive.
adm beta pause-replay vm1 >/dev/null
write_mib 4 1
sleep 1.5
lag=$(field beta "r['replication'].get('lagSeconds', 0)")
check "a paused replay shows its lag in seconds ($lag s)" "$PYTHON" -c "import sys; sys.exit(0 if $lag >= 1.0 else 1)"
check "view names the lag in bytes and seconds" bash -c "'$MARSADM' view --control '$W/beta/ctl.sock' | grep -q 'behind the primary alpha'"
adm beta resume-replay vm1 >/dev/null

# gamma stays away: past the 8 MiB retention limit it is let go, and alpha's log is released.
adm gamma pause-fetch vm1 >/dev/null
check "pause-fetch shows PausedFetch" eventually 5 bash -c "'$MARSADM' view --json --control '$W/gamma/ctl.sock' | grep -q PausedFetch"
write_mib 24 2
check "gamma is marked NeedsSync by the primary" eventually 20 bash -c "'$MARSADM' view --json --control '$W/gamma/ctl.sock' | grep -q NeedsSync"
check "the primary's log is released below the limit" eventually 20 bash -c \
    "[ \$('$MARSADM' view --json --control '$W/alpha/ctl.sock' | $PYTHON -c 'import json,sys; print([r for r in json.load(sys.stdin)[\"resources\"] if r[\"name\"]==\"vm1\"][0][\"log\"][\"logBytes\"])') -lt $((12 << 20)) ]"
check "beta was not let go and is UpToDate" adm beta wait-resource vm1 --timeout 60
check "the primary logged why it let gamma go" grep -q "let gamma go" "$W/alpha.log"

# invalidate brings gamma back (with its sync paused and resumed on the way).
adm gamma resume-fetch vm1 >/dev/null
check "invalidate starts a new sync" adm gamma invalidate vm1
adm gamma pause-sync vm1 >/dev/null
check "pause-sync shows PausedSync" eventually 5 bash -c "'$MARSADM' view --json --control '$W/gamma/ctl.sock' | grep -q PausedSync"
adm gamma resume-sync vm1 >/dev/null
check "gamma is UpToDate after invalidate" adm gamma wait-resource vm1 --timeout 120
check "the NeedsSync mark is gone" eventually 10 bash -c "! '$MARSADM' view --json --control '$W/gamma/ctl.sock' | grep -q NeedsSync"
adm gamma pause-replay vm1 >/dev/null
adm beta pause-replay vm1 >/dev/null
adm alpha down vm1 >/dev/null
check "gamma's device equals alpha's" cmp "$W/alpha.img" "$W/gamma.img"
check "beta's device equals alpha's" cmp "$W/alpha.img" "$W/beta.img"
adm alpha up vm1 >/dev/null

# Leaving and deleting.
check "leave-resource on the primary is refused" bash -c "! '$MARSADM' leave-resource vm1 --control '$W/alpha/ctl.sock' 2>/dev/null"
check "delete-resource is refused while secondaries hold it" bash -c "'$MARSADM' delete-resource vm1 --control '$W/alpha/ctl.sock' 2>&1 | grep -q 'still hold'"
check "beta leaves vm1" adm beta leave-resource vm1
check "gamma leaves vm1" adm gamma leave-resource vm1
check "the primary drops the left members' holds" eventually 15 grep -q "gamma left vm1" "$W/alpha.log"
check "delete-resource on the primary once it is the last member" eventually 15 adm alpha delete-resource vm1
check "beta leaves the cluster" adm beta leave-cluster
check "view on beta shows no cluster" bash -c "'$MARSADM' view --control '$W/beta/ctl.sock' | grep -q 'no cluster yet'"
check "beta's resource directory is gone" test ! -e "$W/beta/root/resource-vm1"
if [ "$fails" -gt 0 ]; then
    for host in alpha beta gamma; do echo "--- $host.log"; tail -15 "$W/$host.log"; done
fi
exit $((fails > 0))
