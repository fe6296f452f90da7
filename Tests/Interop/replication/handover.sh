#!/usr/bin/env bash
# Planned handover (docs/handover.md §3) between three marsd "hosts" on loopback. Checks:
# 1. ping-pong alpha -> beta -> gamma -> alpha under consistency.py writers: a write round on the
#    current primary, 'marsadm primary vm1' on the next host, then the new primary's export holds
#    every flushed write and is the device after a prefix of the writes; the epoch grows with each
#    handover; the old primary refuses new clients and follows as a secondary. alpha's peer port
#    is behind Tools/faultproxy.py, which adds 50 ms each way from here on.
# 2. refusal: while an NBD client holds the primary's export, 'marsadm primary' on a secondary
#    fails naming the connection, nothing changes, and the primary goes on serving writes.
# 3. kill -9 during handovers: HANDOVER_KILLS rounds (default 6); in each one 'marsadm primary' runs
#    on the next host while the old or the new primary (alternating) is killed -9 at a random delay
#    of 0-1.5 s (skewed towards the start: a handover takes 0.1-0.5 s here) and restarted;
#    'marsadm primary' runs again; within 60 s exactly one host must be primary, the others
#    secondaries and UpToDate, with every flushed write kept.
# After each part the three devices are byte-identical, and no sync ran after the two initial ones.
# Prints PASS/FAIL lines; a state that does not converge prints the three views and the log tails.
#
#   MARSD=... MARSADM=... [MARS_TEST_SEED=S] [HANDOVER_KILLS=N] Tests/Interop/replication/handover.sh
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
MARSD=${MARSD:-$ROOT/.build/release/marsd}
MARSADM=${MARSADM:-$ROOT/.build/release/marsadm}
PYTHON=${PYTHON:-/usr/bin/python3}
CHECK="$PYTHON $HERE/consistency.py"
SEED=${MARS_TEST_SEED:-$RANDOM}
KILLS=${HANDOVER_KILLS:-6}
echo "seed $SEED (MARS_TEST_SEED=$SEED repeats this run), $KILLS kill rounds"
RANDOM=$SEED  # the kill victims' delays follow the seed
W=$(mktemp -d /tmp/mars-handover.XXXXXX)
SIZE_MIB=64
BLOCKS=$((SIZE_MIB * 256))
CONVERGE_S=60
# Part 3 starts no new round after this many seconds of the run: the script stays under 5 minutes.
KILL_ROUNDS_UNTIL_S=230
. "$HERE/lib.sh"
trap stop_all EXIT

declare -A ADDR=([alpha]=127.0.0.51:17851 [beta]=127.0.0.52:17851 [gamma]=127.0.0.53:17851)
PROXY=127.0.0.50:17850
declare -A PID
declare -A NEXT=([alpha]=beta [beta]=gamma [gamma]=alpha)
HOSTS="alpha beta gamma"

start() {  # start HOST: (re)starts its marsd and waits until it answers
    local host=$1
    mkdir -p "$W/$host"
    rm -f "$W/$host/ctl.sock" "$W/$host/nbd.sock"  # left by a kill -9
    local advertise=()
    [ "$host" = alpha ] && advertise=(--peer-advertise "$PROXY")
    "$MARSD" serve --root "$W/$host/root" --unix "$W/$host/nbd.sock" --control "$W/$host/ctl.sock" \
        --peer "${ADDR[$host]}" "${advertise[@]}" --log-segment-mib 8 --log-space-mib 200 --log-level notice 2>>"$W/$host.log" &
    PID[$host]=$!
    pids+=($!)
    eventually 20 adm "$host" view && return 0
    echo "marsd $host did not start:"; tail -5 "$W/$host.log"; return 1
}
kill9() {  # kill9 HOST
    kill -9 "${PID[$1]}" 2>/dev/null
    wait "${PID[$1]}" 2>/dev/null
}
adm() { local host=$1; shift; timeout 120 "$MARSADM" "$@" --control "$W/$host/ctl.sock"; }
proxy() { "$PYTHON" "$ROOT/Tools/faultproxy.py" --control "$W/proxy.sock" --send "$*" >/dev/null; }
uri() { echo "nbd+unix:///vm1?socket=$W/$1/nbd.sock"; }
field() {  # field HOST EXPRESSION: EXPRESSION over vm1's status r in HOST's view --json
    adm "$1" view --json --timeout 5 2>/dev/null | "$PYTHON" -c "
import json, sys
r = [r for r in json.load(sys.stdin)['resources'] if r['name'] == 'vm1'][0]
print($2)" 2>/dev/null
}
primaries() {  # the hosts whose view says they are primary of vm1 (a host that does not answer says nothing)
    local host
    for host in $HOSTS; do [ "$(field "$host" "r['role']")" = primary ] && echo "$host"; done
}
only_primary_is() { [ "$(primaries | tr '\n' ' ')" = "$1 " ]; }
dump_state() {  # the three views and the log tails, for a FAIL that needs them
    local host
    for host in $HOSTS; do
        echo "--- view on $host"; adm "$host" view --timeout 5 2>&1 | sed 's/^/  /'
    done
    for host in $HOSTS; do echo "--- $host.log (tail)"; tail -15 "$W/$host.log" | sed 's/^/  /'; done
}

# Writer rounds. Each round writes through the current primary with its own run id and log; its
# image is checked against the device as it was before the round ($W/base.img, zero at first).
round=0
truncate -s ${SIZE_MIB}M "$W/base.img"
write_round() {  # write_round HOST COUNT: a flushed writer round through HOST's export
    local host=$1 count=$2
    round=$((round + 1))
    $CHECK write --uri "$(uri "$host")" --blocks $BLOCKS --count "$count" --seed $((SEED + round)) \
        --log "$W/round$round.log" --flush-every 50 --qd 4 --run-id "$round" --op-timeout-s 30 >"$W/writer.out" 2>&1
    local rc=$?
    flushed=$(awk '$1 == "flush" { f = $2 } END { print f + 0 }' "$W/round$round.log")
    check "round $round: $count writes through $host, flushed through seq $flushed (writer rc $rc)" test "$rc" -eq 0 -a "$flushed" -gt 0 \
        || sed 's/^/  /' "$W/writer.out"
}
check_round() {  # check_round HOST: HOST's export holds every flushed write of the last round, as a prefix
    local host=$1
    rm -f "$W/after.img"
    if ! timeout 60 nbdcopy "$(uri "$host")" "$W/after.img" 2>"$W/nbdcopy.err"; then
        fail "round $round: read $host's export after the handover: $(tail -1 "$W/nbdcopy.err")"
        return 1
    fi
    if $CHECK check --image "$W/after.img" --blocks $BLOCKS --log "$W/round$round.log" --initial "$W/base.img" \
        --min-seq "$flushed" >"$W/check.out" 2>&1; then
        pass "round $round: $host's export holds every flushed write (seq <= $flushed) and is a prefix of the writes"
        mv "$W/after.img" "$W/base.img"
    else
        fail "round $round: $host's export after the handover"
        sed 's/^/  /' "$W/check.out"
        return 1
    fi
}
identical() {  # identical PRIMARY LABEL: both secondaries UpToDate, paused, equal to the primary's export
    local primary=$1 label=$2 host ok=0
    rm -f "$W/primary.img"
    for host in $HOSTS; do
        [ "$host" = "$primary" ] && continue
        adm "$host" wait-resource vm1 --until uptodate --timeout $CONVERGE_S >/dev/null 2>&1 && adm "$host" pause-replay vm1 >/dev/null || ok=1
    done
    timeout 60 nbdcopy "$(uri "$primary")" "$W/primary.img" || ok=1
    for host in $HOSTS; do
        [ "$host" = "$primary" ] && continue
        $CHECK compare --a "$W/primary.img" --b "$W/$host.img" >"$W/compare.out" 2>&1 || { ok=1; sed "s/^/  $host: /" "$W/compare.out"; }
        adm "$host" resume-replay vm1 >/dev/null || ok=1
    done
    check "$label: both secondaries' devices are byte-identical to $primary's export" test $ok -eq 0
}

# Setup: alpha creates the cluster and vm1; beta and gamma join both.
"$PYTHON" "$ROOT/Tools/faultproxy.py" --listen "$PROXY" --target "${ADDR[alpha]}" --control "$W/proxy.sock" 2>"$W/proxy.log" &
pids+=($!)
for host in $HOSTS; do start "$host" || { fail "marsd $host starts"; exit 1; }; done
eventually 5 test -S "$W/proxy.sock"
TOKEN=$(adm alpha create-cluster --host alpha --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["token"])')
check "beta joins the cluster" adm beta join-cluster --host beta --token "$TOKEN" "$PROXY"
check "gamma joins the cluster" adm gamma join-cluster --host gamma --token "$TOKEN" "$PROXY"
for host in $HOSTS; do truncate -s ${SIZE_MIB}M "$W/$host.img"; done
check "create-resource vm1 on alpha" adm alpha create-resource vm1 "$W/alpha.img"
for host in beta gamma; do
    check "$host joins vm1" eventually 20 adm "$host" join-resource vm1 "$W/$host.img"
    check "$host is UpToDate" adm "$host" wait-resource vm1 --until uptodate --timeout $CONVERGE_S
done

# Part 1: ping-pong alpha -> beta -> gamma -> alpha, a writer round before each handover. From here
# on every message to alpha is 50 ms late each way, which also widens the window of part 3's kills.
check "the proxy in front of alpha delays by 50 ms" proxy delay 50
epoch=$(field alpha "r['log']['epoch']")
current=alpha
for _ in 1 2 3; do
    next=${NEXT[$current]}
    write_round "$current" 2000
    # Right after the writer stops, as an operator would: the new primary may still be replaying.
    adm "$next" primary vm1 --timeout 60 >"$W/primary.out" 2>&1
    rc=$?
    check "'marsadm primary vm1' on $next right after the writer stopped is not refused (rc $rc: $(head -c 300 "$W/primary.out"))" test $rc -eq 0
    if [ $rc -ne 0 ]; then  # once UpToDate, for the checks that follow
        adm "$next" wait-resource vm1 --until uptodate --timeout $CONVERGE_S >/dev/null
        began=$(date +%s%N)
        adm "$next" primary vm1 --timeout 60 >"$W/primary.out" 2>&1
        rc=$?
        echo "  again once $next is UpToDate: the handover $current -> $next took $((($(date +%s%N) - began) / 1000000)) ms"
    fi
    new_epoch=$(sed -n 's/.*at epoch \([0-9]*\).*/\1/p' "$W/primary.out")
    if ! check "'marsadm primary vm1' on $next answers 'vm1 is primary on this host at epoch N from LSN L' (rc $rc: $(head -c 300 "$W/primary.out"))" \
        bash -c "[ $rc -eq 0 ] && grep -q '^vm1 is primary on this host at epoch [0-9]* from LSN [0-9]*' '$W/primary.out'"; then
        dump_state
        check_round "$current"  # the round stays on the primary that kept it
        break
    fi
    check "the handover $current -> $next raised the epoch ($epoch -> $new_epoch)" test "${new_epoch:-0}" -gt "$epoch"
    check "$next's view shows log.epoch $new_epoch" test "$(field "$next" "r['log']['epoch']")" = "$new_epoch"
    check "$next waits as primary" adm "$next" wait-resource vm1 --until primary --timeout 10
    check "$current follows $next as a secondary" adm "$current" wait-resource vm1 --until secondary --timeout $CONVERGE_S
    timeout 10 nbdinfo --size "$(uri "$current")" >"$W/nbdinfo.out" 2>&1
    rc=$?
    check "$current's export refuses new clients (rc $rc: $(tail -1 "$W/nbdinfo.out"))" test $rc -ne 0
    check_round "$next"
    epoch=${new_epoch:-$epoch}
    current=$next
done
check "after the ping-pong exactly one host, $current, is primary" only_primary_is "$current" || dump_state
identical "$current" "after the ping-pong"

# Part 2: an NBD client holds the primary's export; a handover is refused and changes nothing.
"$PYTHON" - "$(uri "$current")" >"$W/holder.out" 2>&1 <<'PY' &
import nbd, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("connected", flush=True)
time.sleep(120)
PY
holder=$!
pids+=($holder)
check "an NBD client holds $current's export" eventually 10 grep -q connected "$W/holder.out" || cat "$W/holder.out"
target=${NEXT[$current]}
adm "$target" primary vm1 --timeout 20 >"$W/refused.out" 2>&1
rc=$?
check "'marsadm primary vm1' on $target fails while a client holds $current's export (rc $rc)" test $rc -ne 0
check "the refusal names $current, vm1 and the connection: $(head -c 300 "$W/refused.out")" \
    grep -q "$current refused the handover of vm1: .*1 NBD connection" "$W/refused.out"
check "after the refusal $current is still the only primary" only_primary_is "$current"
check "after the refusal $target is a secondary" adm "$target" wait-resource vm1 --until secondary --timeout 10
check "after the refusal $current's epoch is unchanged ($epoch)" test "$(field "$current" "r['log']['epoch']")" = "$epoch"
write_round "$current" 1000
check_round "$current"
kill "$holder" 2>/dev/null
wait "$holder" 2>/dev/null

# Part 3: kill -9 the old or the new primary at a random moment of a handover, restart it.
kills=0
in_flight=0  # kills that hit a handover still under way (the first 'marsadm primary' had not answered)
for n in $(seq "$KILLS"); do
    if [ $SECONDS -ge $KILL_ROUNDS_UNTIL_S ]; then
        fail "kill rounds: only $kills of $KILLS rounds fit in ${KILL_ROUNDS_UNTIL_S} s"
        break
    fi
    next=${NEXT[$current]}
    write_round "$current" 600
    if [ $((n % 2)) -eq 1 ]; then victim=$current; else victim=$next; fi
    delay_ms=$(((RANDOM % 1501) * (RANDOM % 1501) / 1500 * (RANDOM % 1501) / 1500))  # the product of three uniform draws
    # UpToDate first, so the kill meets a handover and not the refusal of part 1's first check.
    adm "$next" wait-resource vm1 --until uptodate --timeout $CONVERGE_S >/dev/null
    adm "$next" primary vm1 --timeout 45 >"$W/primary.out" 2>&1 &
    asking=$!
    sleep "$(printf '%d.%03d' $((delay_ms / 1000)) $((delay_ms % 1000)))"
    if kill -0 $asking 2>/dev/null; then moment="during the handover"; in_flight=$((in_flight + 1)); else moment="after it"; fi
    kill9 "$victim"
    echo "kill round $n: $current -> $next, kill -9 $victim after $delay_ms ms ($moment)"
    start "$victim" || fail "kill round $n: $victim restarts"
    wait $asking
    echo "  first 'marsadm primary' on $next: $(head -c 300 "$W/primary.out")"
    adm "$next" primary vm1 --timeout 45 >"$W/primary.out" 2>&1
    rc=$?
    answer=$(head -c 300 "$W/primary.out")
    check "kill round $n: 'marsadm primary vm1' again on $next succeeds (rc $rc: $answer)" \
        bash -c "[ $rc -eq 0 ] && grep -q 'vm1 is \(already \)\?primary on this host' '$W/primary.out'"
    if ! check "kill round $n: within $CONVERGE_S s exactly one host, $next, is primary" eventually $CONVERGE_S only_primary_is "$next"; then
        echo "  primaries now: $(primaries | tr '\n' ' ')"
        dump_state
        echo "kill rounds stop here: the cluster did not converge"
        break
    fi
    current=$next
    check "kill round $n: $next exports vm1 as primary" adm "$next" wait-resource vm1 --until primary --timeout $CONVERGE_S
    settled=0
    for host in $HOSTS; do
        [ "$host" = "$next" ] && continue
        adm "$host" wait-resource vm1 --until secondary --timeout $CONVERGE_S >"$W/wait.out" 2>&1 \
            && adm "$host" wait-resource vm1 --until uptodate --timeout $CONVERGE_S >"$W/wait.out" 2>&1 \
            || { settled=1; sed "s/^/  $host: /" "$W/wait.out"; }
    done
    if ! check "kill round $n: the two others are secondaries and UpToDate within $CONVERGE_S s" test $settled -eq 0; then
        dump_state
        break
    fi
    new_epoch=$(field "$next" "r['log']['epoch']")
    check "kill round $n: the epoch grew ($epoch -> $new_epoch)" test "${new_epoch:-0}" -gt "$epoch"
    epoch=${new_epoch:-$epoch}
    check_round "$current" || { dump_state; break; }
    kills=$((kills + 1))
done
check "$kills kill rounds converged ($in_flight kills hit a handover under way)" test "$kills" -eq "$KILLS"
identical "$current" "after the kill rounds"

# The end: every device byte-identical on disk, and no handover needed a sync.
for host in $HOSTS; do [ "$host" != "$current" ] && adm "$host" pause-replay vm1 >/dev/null; done
adm "$current" down vm1 >/dev/null
for host in $HOSTS; do
    [ "$host" = "$current" ] && continue
    check "$current's and $host's data devices are byte-identical" $CHECK compare --a "$W/$current.img" --b "$W/$host.img"
done
syncs=$(cat "$W/alpha.log" "$W/beta.log" "$W/gamma.log" | grep -c "sync of vm1 done")
check "no sync ran after the two initial ones ($syncs)" test "$syncs" -eq 2
echo "took $SECONDS s"
[ "$fails" -gt 0 ] && for host in $HOSTS; do echo "--- $host.log"; tail -20 "$W/$host.log"; done
exit $((fails > 0))
