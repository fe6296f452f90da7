#!/usr/bin/env bash
# Three marsd "hosts" on loopback (alpha primary; beta and gamma secondaries), alpha's peer port
# behind Tools/faultproxy.py. Checks: join with initial sync while the primary writes; anytime
# consistency of beta's snapshots (pause-replay, copy, resume) while the link is cut, stalled,
# throttled and gamma is killed -9 and restarted; afterwards three byte-identical devices and no
# sync after the initial ones; bad input on the peer port. Prints PASS/FAIL lines.
#
#   MARSD=... MARSADM=... Tests/Interop/replication/replication.sh
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
MARSD=${MARSD:-$ROOT/.build/release/marsd}
MARSADM=${MARSADM:-$ROOT/.build/release/marsadm}
PYTHON=${PYTHON:-/usr/bin/python3}
CHECK="$PYTHON $HERE/consistency.py"
SEED=${MARS_TEST_SEED:-$RANDOM}
echo "seed $SEED"
W=$(mktemp -d /tmp/mars-repl.XXXXXX)
SIZE_MIB=128
BLOCKS=$((SIZE_MIB * 256))
. "$HERE/lib.sh"
trap stop_all EXIT

declare -A ADDR=([alpha]=127.0.0.21:17777 [beta]=127.0.0.22:17777 [gamma]=127.0.0.23:17777)
PROXY=127.0.0.20:17001
start() {  # start HOST [extra marsd args]
    local host=$1; shift
    mkdir -p "$W/$host"
    "$MARSD" serve --root "$W/$host/root" --unix "$W/$host/nbd.sock" --control "$W/$host/ctl.sock" \
        --peer "${ADDR[$host]}" --log-segment-mib 8 --log-space-mib 200 --log-level notice "$@" 2>>"$W/$host.log" &
    local pid=$!
    eval "PID_$host=$pid"
    pids+=("$pid")
    for _ in $(seq 100); do [ -S "$W/$host/ctl.sock" ] && return 0; sleep 0.1; done
    echo "marsd $host did not start:"; tail -5 "$W/$host.log"; return 1
}
adm() { local host=$1; shift; "$MARSADM" "$@" --control "$W/$host/ctl.sock"; }
proxy() { "$PYTHON" "$ROOT/Tools/faultproxy.py" --control "$W/proxy.sock" --send "$*" >/dev/null; }

"$PYTHON" "$ROOT/Tools/faultproxy.py" --listen "$PROXY" --target "${ADDR[alpha]}" --control "$W/proxy.sock" 2>"$W/proxy.log" &
pids+=($!)
start alpha --peer-advertise "$PROXY" && start beta && start gamma || { fail "three marsd start"; exit 1; }
for _ in $(seq 50); do [ -S "$W/proxy.sock" ] && break; sleep 0.1; done

TOKEN=$(adm alpha create-cluster --host alpha --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["token"])')
check "create-cluster prints a join token" test -n "$TOKEN"
check "join-cluster with a wrong token is refused" \
    bash -c "! '$MARSADM' join-cluster --host beta --token mars1-${TOKEN:6:32}-$(printf 'ab%.0s' $(seq 32)) $PROXY --control '$W/beta/ctl.sock' 2>/dev/null"
check "beta joins the cluster" adm beta join-cluster --host beta --token "$TOKEN" "$PROXY"
check "gamma joins the cluster" adm gamma join-cluster --host gamma --token "$TOKEN" "$PROXY"

for host in alpha beta gamma; do truncate -s ${SIZE_MIB}M "$W/$host.img"; done
check "create-resource on alpha" adm alpha create-resource vm1 "$W/alpha.img"
URI="nbd+unix:///vm1?socket=$W/alpha/nbd.sock"
# Data before the join: the initial sync must copy it.
$CHECK write --uri "$URI" --blocks $BLOCKS --count 3000 --seed "$SEED" --log "$W/pre.log" --flush-every 100 --run-id 1 >/dev/null

joined() {  # the gossip brings the resource within seconds
    local host=$1
    for _ in $(seq 50); do
        adm "$host" join-resource vm1 "$W/$host.img" >/dev/null 2>"$W/join.err" && return 0
        grep -q "has no resource" "$W/join.err" || { cat "$W/join.err"; return 1; }
        sleep 0.2
    done
    return 1
}
# A writer runs during the joins: the sync copies a live device.
$CHECK write --uri "$URI" --blocks $BLOCKS --count 4000 --seed $((SEED + 1)) --log "$W/during.log" --flush-every 50 --run-id 2 >/dev/null &
writer=$!
check "beta joins vm1 while alpha writes" joined beta
check "gamma joins vm1 while alpha writes" joined gamma
wait $writer
check "beta is UpToDate after its initial sync" adm beta wait-resource vm1 --until uptodate --timeout 120
check "gamma is UpToDate after its initial sync" adm gamma wait-resource vm1 --until uptodate --timeout 120
sleep 3  # a gossip round brings every member's state
adm beta view > "$W/view.txt"
sed 's/^/  /' "$W/view.txt"
check "view on beta shows both secondaries and the primary" \
    bash -c "grep -q 'alpha .*primary' '$W/view.txt' && grep -q 'beta\\* .*secondary .*UpToDate' '$W/view.txt' && grep -q 'gamma .*secondary' '$W/view.txt'"

# The state every main-run snapshot starts from: beta's device once UpToDate, before the run.
adm beta pause-replay vm1 >/dev/null && cp --sparse=always "$W/beta.img" "$W/base.img" && adm beta resume-replay vm1 >/dev/null
# The main run: tagged writes while the link and the hosts misbehave; beta's snapshots checked.
$CHECK write --uri "$URI" --blocks $BLOCKS --count 40000 --duration-s 40 --seed $((SEED + 2)) --log "$W/main.log" \
    --flush-every 20 --qd 8 --run-id 3 >"$W/writer.out" 2>&1 &
writer=$!
snapshots=0
snapshot_fail=0
snapshot() {
    adm beta pause-replay vm1 >/dev/null || { snapshot_fail=$((snapshot_fail + 1)); return; }
    cp --sparse=always "$W/beta.img" "$W/snap.img"
    adm beta resume-replay vm1 >/dev/null
    snapshots=$((snapshots + 1))
    if ! $CHECK check --image "$W/snap.img" --blocks $BLOCKS --log "$W/main.log" --initial "$W/base.img" >"$W/check.out" 2>&1; then
        snapshot_fail=$((snapshot_fail + 1)); echo "snapshot $snapshots:"; cat "$W/check.out"
    fi
}
sleep 2; snapshot
proxy cut; sleep 2; snapshot; proxy heal
proxy stall; sleep 1; snapshot; proxy resume
proxy throttle 2000000; sleep 3; snapshot; proxy throttle 0
proxy flap 300 300 5; sleep 3; snapshot
kill -9 "$PID_gamma"; wait "$PID_gamma" 2>/dev/null
sleep 1; start gamma; sleep 2; snapshot
wait $writer
writer_rc=$?
check "the writer ran through the faults (rc $writer_rc)" test "$writer_rc" -eq 0
check "$snapshots snapshots of beta, each a prefix of the acknowledged writes" test "$snapshot_fail" -eq 0 -a "$snapshots" -ge 5
check "beta catches up after the faults" adm beta wait-resource vm1 --until uptodate --timeout 120
check "gamma catches up after its kill -9" adm gamma wait-resource vm1 --until uptodate --timeout 120
# fio through NBD while the link flaps: random 4 KiB writes with verify, then the replicas catch up.
fio --name=flap --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=16 --size=64M --offset=64M --io_size=48M \
    --verify=crc32c --verify_fatal=1 --output="$W/fio.out" >/dev/null 2>&1 &
fio_pid=$!
sleep 1; proxy flap 400 400 8
wait $fio_pid
check "fio writes with verify through NBD while the link flaps" test $? -eq 0
check "beta is UpToDate after the flapping fio run" adm beta wait-resource vm1 --until uptodate --timeout 120
check "gamma is UpToDate after the flapping fio run" adm gamma wait-resource vm1 --until uptodate --timeout 120
adm beta pause-replay vm1 >/dev/null
adm gamma pause-replay vm1 >/dev/null
adm alpha down vm1 >/dev/null
check "alpha and beta devices are byte-identical" $CHECK compare --a "$W/alpha.img" --b "$W/beta.img"
check "alpha and gamma devices are byte-identical" $CHECK compare --a "$W/alpha.img" --b "$W/gamma.img"
syncs=$(cat "$W/beta.log" "$W/gamma.log" | grep -c "sync of vm1 done")
check "no sync ran after the two initial ones ($syncs)" test "$syncs" -eq 2

# Bad input on the peer port: each refused with a log line, marsd serving on.
"$PYTHON" "$HERE/badpeer.py" "${ADDR[alpha]}" "${TOKEN:6:32}" >"$W/badpeer.out" 2>&1
check "bad input on the peer port is refused, marsd stays up" bash -c "grep -q '^ok' '$W/badpeer.out' && ! grep -q '^bad' '$W/badpeer.out'"
cat "$W/badpeer.out" | sed 's/^/  /'
check "marsd answers view after the bad input" adm alpha view >/dev/null
check "refusals name the peer address and the reason" grep -q "peer 127.0.0.1:[0-9]*: refused: wrong cluster" "$W/alpha.log"

if [ "$fails" -gt 0 ]; then
    for host in alpha beta gamma; do echo "--- $host.log"; grep -v "refused: \(frame\|wrong cluster\|the peer could not\|read(\)" "$W/$host.log" | tail -20; done
fi
exit $((fails > 0))
