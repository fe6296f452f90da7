#!/usr/bin/env bash
# Joins and restarts with real marsd processes on loopback. Prints PASS/FAIL lines, exits non-zero
# on any FAIL, and stays under 6 minutes (a watchdog stops it at JOIN_TEST_LIMIT_S, 360 s; a run
# takes about 2 minutes on 2 cores). Each marsd's stderr (--log-level notice) is in $W/HOST.log;
# their tails are printed when a check failed. JOIN_KEEP=1 keeps $W.
#
#   1. join of a 4 GiB device (300 MiB of random data spread over it, written-zero and sparse
#      regions, garbage on the secondary's device) while the primary writes; UpToDate; identical.
#   2. a join interrupted halfway resumes: (a) kill -9 of the secondary's marsd mid-sync,
#      (b) kill -9 of the primary's marsd mid-sync; the primary sits behind Tools/faultproxy.py,
#      throttled, so the sync of random data takes long enough to be caught in the middle.
#   3. restart in any order: one primary, two secondaries; all stopped (SIGTERM; then kill -9 of
#      the primary) and started again in mixed orders: roles unchanged, fetch resumes, UpToDate,
#      identical, and no new sync; then a secondary that joined just before a restart of the primary.
#   4. a re-join of an identical device (a copy of case 1's primary device) sends < 1% of it.
#
#   MARSD=... MARSADM=... MARS_TEST_SEED=... JOIN_CASES="1 2a 2b 3 4" JOIN_NET=127.73 \
#       Tests/Interop/replication/join.sh
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
MARSD=${MARSD:-$ROOT/.build/release/marsd}
MARSADM=${MARSADM:-$ROOT/.build/release/marsadm}
PYTHON=${PYTHON:-/usr/bin/python3}
CHECK="$PYTHON $HERE/consistency.py"
WATCH="$PYTHON $HERE/joinwatch.py"
SEED=${MARS_TEST_SEED:-$RANDOM}
CASES=${JOIN_CASES:-1 2a 2b 3 4}
LIMIT=${JOIN_TEST_LIMIT_S:-360}
NET=${JOIN_NET:-127.73}   # hosts listen on $NET.CASE.N:17777 (other tests use 127.0.0.x)
echo "seed $SEED (MARS_TEST_SEED=$SEED to repeat); cases: $CASES"
W=$(mktemp -d /tmp/mars-join.XXXXXX)
T0=$(date +%s)
pids=()
cleanup() {  # SIGTERM to every process started here; kill -9 what still runs after 20 s
    trap - EXIT TERM
    [ -n "${watchdog:-}" ] && kill "$watchdog" 2>/dev/null
    local pid left
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    for _ in $(seq 200); do
        left=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
        [ $left = 0 ] && break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null; done
    wait 2>/dev/null
    [ -n "${JOIN_KEEP:-}" ] && { echo "kept $W"; return; }
    rm -rf "$W"
}
trap cleanup EXIT
trap 'echo "FAIL the whole run within ${LIMIT}s"; tails; exit 1' TERM
# The watchdog: past the limit it ends the script's children (by parent pid; a foreground command
# would delay the TERM trap) and then the script, whose EXIT trap stops the rest.
main=$$
( for _ in $(seq "$LIMIT"); do sleep 1; done
  for pid in $(pgrep -P "$main"); do [ "$pid" != "$BASHPID" ] && kill -9 "$pid"; done
  kill -TERM "$main" ) >/dev/null 2>&1 &
watchdog=$!

fails=0
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1"; fails=$((fails + 1)); }
check() { if "${@:2}"; then pass "$1"; else fail "$1"; fi; }
elapsed() { echo $(($(date +%s) - T0)); }
note() { echo "  [$(elapsed)s] $*"; }
# Deterministic random bytes from the seed: rnd LABEL MIB > file
rnd() { "$PYTHON" -c 'import random,sys
r = random.Random("%s-%s" % (sys.argv[1], sys.argv[2]))
out = sys.stdout.buffer
for _ in range(int(sys.argv[3])): out.write(r.randbytes(1 << 20))' "$SEED" "$1" "$2"; }

# ---- hosts: each a marsd with its own root and sockets under $W/HOST, stderr in $W/HOST.log
declare -A ADDR ARGS PID
HOSTS=()
start() {  # start HOST [extra marsd args]; a restart (start HOST again) reuses the first arguments
    local host=$1; shift
    [ -z "${ARGS[$host]+x}" ] && { ARGS[$host]="$*"; HOSTS+=("$host"); }
    mkdir -p "$W/$host"
    echo "=== start $(date +%T.%N)" >>"$W/$host.log"
    # shellcheck disable=SC2086
    "$MARSD" serve --root "$W/$host/root" --unix "$W/$host/nbd.sock" --control "$W/$host/ctl.sock" \
        --peer "${ADDR[$host]}" --log-segment-mib 16 --log-space-mib 1024 --log-level notice ${ARGS[$host]} \
        2>>"$W/$host.log" &
    PID[$host]=$!
    pids+=($!)
    for _ in $(seq 150); do
        [ -S "$W/$host/ctl.sock" ] && "$MARSADM" view --control "$W/$host/ctl.sock" --timeout 2 >/dev/null 2>&1 && return 0
        kill -0 "${PID[$host]}" 2>/dev/null || break
        sleep 0.1
    done
    echo "  marsd $host did not start:"; tail -5 "$W/$host.log" | sed 's/^/    /'; return 1
}
stop() { stop_ "$@" 3>&1 2>/dev/null; }  # (bash's "Killed" notice for kill -9 goes to /dev/null)
stop_() {  # stop HOST SIGNAL: signal marsd and wait until it is gone (at most 60 s)
    local host=$1 sig=$2 pid=${PID[$1]}
    kill "-$sig" "$pid" 2>/dev/null
    for _ in $(seq 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "  marsd $host still runs 60 s after SIG$sig; kill -9" >&3; kill -9 "$pid"; wait "$pid" 2>/dev/null; return 1
    fi
    wait "$pid" 2>/dev/null
    rm -f "$W/$host/ctl.sock"
    return 0
}
stop_all() {  # stop_all SIGNAL HOST...: signal them all at once, then wait for each
    local sig=$1 h ok=0; shift
    for h in "$@"; do kill "-$sig" "${PID[$h]}" 2>/dev/null; done
    for h in "$@"; do stop "$h" "$sig" || ok=1; done
    return $ok
}
adm() {  # adm HOST marsadm-arguments: its output indented (errors on stderr as they are)
    local host=$1; shift
    "$MARSADM" "$@" --control "$W/$host/ctl.sock" | sed 's/^/    /'
    return "${PIPESTATUS[0]}"
}
compare() { $CHECK compare --a "$1" --b "$2" | sed 's/^/    /'; return "${PIPESTATUS[0]}"; }
state() { $WATCH state --marsadm "$MARSADM" --control "$W/$1/ctl.sock" --resource "$2"; }
tails() {
    for host in "${HOSTS[@]}"; do echo "--- tail of $host's marsd stderr ($W/$host.log)"; tail -25 "$W/$host.log" | sed 's/^/  /'; done
}
token() { adm "$1" create-cluster --host "$1" --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["token"])'; }
joined() {  # joined HOST RESOURCE DEVICE: join-resource, retried until gossip brought the resource
    local host=$1
    for _ in $(seq 50); do
        adm "$host" join-resource "$2" "$3" >/dev/null 2>"$W/join.err" && return 0
        grep -q "has no resource" "$W/join.err" || { cat "$W/join.err"; return 1; }
        sleep 0.2
    done
    cat "$W/join.err"; return 1
}
persisted_offset() {  # the sync offset in HOST's resource.json ("-" without a sync section)
    "$PYTHON" -c 'import json,sys
d = json.load(open(sys.argv[1])); print((d.get("sync") or {}).get("offset", "-"))' "$W/$1/root/resource-$2/resource.json" 2>/dev/null || echo "-"
}
syncs_done() { grep -c "sync of $2 done" "$W/$1.log"; }
proxy() { "$PYTHON" "$ROOT/Tools/faultproxy.py" --control "$W/$1.sock" --send "${*:2}" >/dev/null; }
start_proxy() {  # start_proxy NAME LISTEN TARGET
    "$PYTHON" "$ROOT/Tools/faultproxy.py" --listen "$2" --target "$3" --control "$W/$1.sock" 2>"$W/$1.log" &
    pids+=($!)
    for _ in $(seq 50); do [ -S "$W/$1.sock" ] && return 0; sleep 0.1; done
    return 1
}
is_num() { [[ "$1" =~ ^[0-9]+$ ]]; }
has() { [[ " $CASES " == *" $1 "* ]]; }

MIB=$((1 << 20))
GIB=$((1 << 30))

# =============================================================================================
# Case 1: join of a 4 GiB device while the primary writes (hosts p1, s1; s4 re-joins in case 4)
# =============================================================================================
case1() {
    echo "# case 1: join of a 4 GiB device while the primary writes"
    ADDR[p1]=$NET.1.1:17777; ADDR[s1]=$NET.1.2:17777; ADDR[s4]=$NET.1.3:17777
    local size=$((4 * GIB)) blocks=$((4 * GIB / 4096))
    truncate -s $size "$W/p1.img" "$W/s1.img"
    # 30 extents of 10 MiB of random data spread over the device (300 MiB), the rest sparse, and
    # 32 MiB of written zeros; garbage on the secondary where the primary has zeros, holes and data.
    rnd p1 300 >"$W/p1.data"
    for i in $(seq 0 29); do
        dd if="$W/p1.data" of="$W/p1.img" bs=1M count=10 skip=$((i * 10)) seek=$((i * 136 + 3)) conv=notrunc status=none
    done
    rm -f "$W/p1.data"
    dd if=/dev/zero of="$W/p1.img" bs=1M count=32 seek=2000 conv=notrunc status=none
    rnd s1 24 >"$W/s1.data"
    dd if="$W/s1.data" of="$W/s1.img" bs=1M count=8 skip=0 seek=2010 conv=notrunc status=none   # over written zeros
    dd if="$W/s1.data" of="$W/s1.img" bs=1M count=8 skip=8 seek=3100 conv=notrunc status=none   # over a hole
    dd if="$W/s1.data" of="$W/s1.img" bs=1M count=8 skip=16 seek=139 conv=notrunc status=none   # over data
    rm -f "$W/s1.data"
    start p1 && start s1 || { fail "case 1: marsd p1 and s1 start"; return; }
    local tok; tok=$(token p1)
    check "case 1: s1 joins p1's cluster" adm s1 join-cluster --host s1 --token "$tok" "${ADDR[p1]}"
    TOKEN1=$tok
    check "case 1: create-resource big (4 GiB) on p1" adm p1 create-resource big "$W/p1.img"
    local uri="nbd+unix:///big?socket=$W/p1/nbd.sock"
    # Tagged writes before the join (spread over the 4 GiB): on the primary's device or log.
    check "case 1: 4000 tagged writes on p1 before the join" \
        $CHECK write --uri "$uri" --blocks $blocks --count 4000 --seed "$SEED" --log "$W/c1-pre.log" --flush-every 100 --qd 4 --run-id 11 >/dev/null
    note "p1's device: $(du -m "$W/p1.img" | cut -f1) MiB allocated of 4096"
    # A writer runs during the join, on the first GiB (the rest keeps its holes and zero regions).
    $CHECK write --uri "$uri" --blocks $((blocks / 4)) --count 100000000 --duration-s 30 --seed $((SEED + 1)) --log "$W/c1-during.log" \
        --flush-every 50 --qd 4 --run-id 12 >"$W/c1-writer.out" 2>&1 &
    local writer=$! t=$SECONDS
    sleep 1
    check "case 1: s1 joins big while p1 writes" joined s1 big "$W/s1.img"
    $WATCH follow --marsadm "$MARSADM" --control "$W/s1/ctl.sock" --resource big --timeout 150 --interval 0.5 \
        --samples "$W/c1-samples.txt" >"$W/c1-follow.out" &
    local follower=$!
    check "case 1: wait-resource --until uptodate on s1 while p1 writes" adm s1 wait-resource big --until uptodate --timeout 150
    note "s1 UpToDate $((SECONDS - t)) s after the join (writer still running: $(kill -0 $writer 2>/dev/null && echo yes || echo no))"
    wait $follower; note "s1 during the sync: $(cat "$W/c1-follow.out")"
    wait $writer
    local rc=$?
    check "case 1: the writer ran through the join (rc $rc, $(grep -c '^[0-9]' "$W/c1-during.log") writes acknowledged)" test $rc -eq 0
    check "case 1: s1 UpToDate again after the writer stopped" adm s1 wait-resource big --until uptodate --timeout 60
    adm s1 pause-replay big >/dev/null
    check "case 1: down on p1 (log written back)" adm p1 down big
    t=$SECONDS
    check "case 1: p1 and s1 devices are byte-identical" compare "$W/p1.img" "$W/s1.img"
    note "compare of 4 GiB took $((SECONDS - t)) s"
    check "case 1: exactly one sync on s1 ($(syncs_done s1 big))" test "$(syncs_done s1 big)" -eq 1
}

# =============================================================================================
# Case 4: re-join of an identical device (after case 1): under 1% of the size crosses
# =============================================================================================
case4() {
    echo "# case 4: re-join of an identical 4 GiB device sends < 1% of it"
    [ -n "${TOKEN1:-}" ] || { fail "case 4: needs case 1"; return; }
    cp --sparse=always "$W/p1.img" "$W/s4.img"
    check "case 4: up on p1 again" adm p1 up big
    start s4 || { fail "case 4: marsd s4 starts"; return; }
    check "case 4: s4 joins the cluster" adm s4 join-cluster --host s4 --token "$TOKEN1" "${ADDR[p1]}"
    local t=$SECONDS size=$((4 * GIB))
    check "case 4: s4 joins big with a copy of p1's device" joined s4 big "$W/s4.img"
    local out
    out=$($WATCH follow --marsadm "$MARSADM" --control "$W/s4/ctl.sock" --resource big --timeout 150 --interval 0.2 --samples "$W/c4-samples.txt")
    local rc=$?
    note "s4: $out ($((SECONDS - t)) s)"
    check "case 4: s4 UpToDate after the re-join" test $rc -eq 0
    check "case 4: wait-resource on s4" adm s4 wait-resource big --until uptodate --timeout 30
    local sent; sent=$(sed -n 's/.*maxsent=\([0-9-]*\).*/\1/p' <<<"$out")
    check "case 4: syncBytesSent seen ($sent)" is_num "$sent"
    is_num "$sent" || sent=$size
    check "case 4: the re-join sent $sent bytes, under 1% of $size" test "$sent" -lt $((size / 100))
    check "case 4: exactly one sync on s4 ($(syncs_done s4 big))" test "$(syncs_done s4 big)" -eq 1
    adm s4 pause-replay big >/dev/null
    adm p1 down big >/dev/null
    check "case 4: p1 and s4 devices are byte-identical" compare "$W/p1.img" "$W/s4.img"
}

# =============================================================================================
# Case 2: a join interrupted halfway resumes (a: secondary killed, b: primary killed)
# =============================================================================================
case2() {  # case2 a|b
    local v=$1 p=p2$1 s=s2$1 px=px2$1 res=r2$1
    local who; [ "$v" = a ] && who="secondary" || who="primary"
    echo "# case 2$v: kill -9 of the $who's marsd mid-sync, the sync resumes"
    local n; [ "$v" = a ] && n=2 || n=3
    ADDR[$p]=$NET.$n.1:17777; ADDR[$s]=$NET.$n.2:17777
    local padv=$NET.$n.10:17001
    local mib=320 size=$((320 * MIB)) blocks=$((320 * MIB / 4096))
    rnd "$p" $mib >"$W/$p.img"                                  # every chunk differs and travels
    dd if=/dev/zero of="$W/$p.img" bs=1M count=16 seek=100 conv=notrunc status=none   # and one zero region
    truncate -s $size "$W/$s.img"
    start_proxy "$px" "$padv" "${ADDR[$p]}" || { fail "case 2$v: proxy starts"; return; }
    start "$p" --peer-advertise "$padv" && start "$s" || { fail "case 2$v: marsd $p and $s start"; return; }
    local tok; tok=$(token "$p")
    check "case 2$v: $s joins the cluster through the proxy" adm "$s" join-cluster --host "$s" --token "$tok" "$padv"
    check "case 2$v: create-resource $res on $p" adm "$p" create-resource "$res" "$W/$p.img"
    local uri="nbd+unix:///$res?socket=$W/$p/nbd.sock"
    proxy "$px" throttle 20000000
    local t=$SECONDS
    check "case 2$v: $s joins $res (sync through a proxy throttled to 20 MB/s)" joined "$s" "$res" "$W/$s.img"
    # Writes while the sync runs (before the kill): the log from the sync's start must replay.
    $CHECK write --uri "$uri" --blocks $blocks --count 1500 --seed $((SEED + 20)) --log "$W/c2$v-w1.log" \
        --flush-every 50 --qd 2 --run-id 21 >/dev/null 2>&1 &
    local writer=$!
    local mid
    # The kill comes once the sync is between 20% and 80% and the replica has checkpointed an
    # offset (marsd stores one after a device sync, every 5 s or 256 MiB).
    mid=$($WATCH mid --marsadm "$MARSADM" --control "$W/$s/ctl.sock" --resource "$res" --lo 0.2 --hi 0.8 --timeout 60 \
        --persisted "$W/$s/root/resource-$res/resource.json")
    local rc=$?
    check "case 2$v: syncOffset on $s reaches 20-80% with a checkpoint stored (offset size persisted: $mid, $((SECONDS - t)) s)" test $rc -eq 0
    wait $writer
    local victim; [ "$v" = a ] && victim=$s || victim=$p
    check "case 2$v: kill -9 $victim's marsd mid-sync" stop "$victim" 9
    sleep 0.5
    local pers; pers=$(persisted_offset "$s" "$res")
    local seen=${mid%% *}
    note "$s: last syncOffset seen $seen, persisted sync.offset $pers (of $size)"
    check "case 2$v: $s's resource.json holds a sync offset > 0 ($pers)" bash -c "[[ '$pers' =~ ^[0-9]+$ ]] && [ '$pers' -gt 0 ]"
    is_num "$pers" || pers=0
    local followout="$W/c2$v-follow.out"
    local follower
    if [ "$v" = a ]; then
        check "case 2$v: restart $s with the same arguments" start "$s"
        $WATCH follow --marsadm "$MARSADM" --control "$W/$s/ctl.sock" --resource "$res" --timeout 60 --interval 0.05 \
            --samples "$W/c2$v-samples.txt" >"$followout" &
        follower=$!
    else
        $WATCH follow --marsadm "$MARSADM" --control "$W/$s/ctl.sock" --resource "$res" --timeout 60 --interval 0.05 \
            --samples "$W/c2$v-samples.txt" >"$followout" &
        follower=$!
        sleep 2   # the secondary sees its primary gone
        note "$s while $p is down: $(state "$s" "$res")"
        check "case 2$v: restart $p with the same arguments" start "$p"
    fi
    wait $follower
    rc=$?
    local out; out=$(cat "$followout")
    note "$s after the restart: $out ($((SECONDS - t)) s since the join)"
    check "case 2$v: $s ends UpToDate and Replicating" test $rc -eq 0
    local first low
    first=$(sed -n 's/.*first=\([0-9-]*\).*/\1/p' <<<"$out"); low=$(sed -n 's/.* min=\([0-9-]*\).*/\1/p' <<<"$out")
    local after; [ "$v" = a ] && after="after $s's restart" || after="after $p's kill and restart"
    if is_num "$first"; then
        check "case 2$v: the first syncOffset $after ($first) >= the persisted $pers" test "$first" -ge "$pers"
        check "case 2$v: no syncOffset $after below the persisted one (min $low)" test "$low" -ge "$pers"
    else
        # No sample while syncing: the rest of the sync was over before the first poll.
        check "case 2$v: the sync went on after the restart (no syncOffset seen: it ended at once?)" false
    fi
    # The writes after the restart must reach the secondary too.
    check "case 2$v: 1500 writes on $p after the restart" $CHECK write --uri "$uri" --blocks $blocks --count 1500 \
        --seed $((SEED + 21)) --log "$W/c2$v-w2.log" --flush-every 50 --qd 2 --run-id 22 >/dev/null
    proxy "$px" throttle 0
    check "case 2$v: wait-resource on $s" adm "$s" wait-resource "$res" --until uptodate --timeout 30
    adm "$s" pause-replay "$res" >/dev/null
    adm "$p" down "$res" >/dev/null
    check "case 2$v: $p and $s devices are byte-identical" compare "$W/$p.img" "$W/$s.img"
    check "case 2$v: one sync completed on $s ($(syncs_done "$s" "$res"))" test "$(syncs_done "$s" "$res")" -eq 1
    stop "$p" TERM; stop "$s" TERM
}

# =============================================================================================
# Case 3: restart in any order (p3 primary, s3a and s3b secondaries)
# =============================================================================================
roles() {  # roles HOST RESOURCE: "primary" or "secondary of PRIMARY" (from view --json)
    local st; st=$(state "$1" "$2"); set -- $st
    if [ "$1" = secondary ]; then echo "secondary of $7"; else echo "$1"; fi
}
members() {  # members HOST RESOURCE: what HOST's stored cluster metadata says of the resource's members
    "$PYTHON" -c 'import json, sys
d = json.load(open(sys.argv[1]))["entries"]
pre = "resource/%s/" % sys.argv[2]
out = []
for k, e in sorted(d.items()):
    if not k.startswith(pre): continue
    v = e.get("value")
    try: v = json.loads(v); v = "%s %s fetched %s" % (v.get("role"), v.get("replication"), v.get("fetchedLSN"))
    except Exception: pass
    out.append("%s: %s" % (k[len(pre):], v))
print("; ".join(out))' "$W/$1/root/cluster-metadata.json" "$2" 2>&1
}
segments() {  # segments HOST RESOURCE: the log segments under HOST's root, with their LSN ranges
    "$MARSADM" log-dump "$2" --root "$W/$1/root" 2>&1 | sed -n 's/^\(log-[^:]*\): LSN \([^,]*\),.*/\1 [\2)/p' | tr '\n' ' '
}
case3() {
    echo "# case 3: restart in any order"
    ADDR[p3]=$NET.4.1:17777; ADDR[s3a]=$NET.4.2:17777; ADDR[s3b]=$NET.4.3:17777
    local size=$((64 * MIB)) blocks=$((64 * MIB / 4096)) res=r3
    truncate -s $size "$W/p3.img" "$W/s3a.img" "$W/s3b.img"
    start p3 && start s3a && start s3b || { fail "case 3: three marsd start"; return; }
    local tok; tok=$(token p3)
    check "case 3: s3a joins the cluster" adm s3a join-cluster --host s3a --token "$tok" "${ADDR[p3]}"
    check "case 3: s3b joins the cluster" adm s3b join-cluster --host s3b --token "$tok" "${ADDR[p3]}"
    check "case 3: create-resource r3 on p3" adm p3 create-resource $res "$W/p3.img"
    local uri="nbd+unix:///$res?socket=$W/p3/nbd.sock"
    $CHECK write --uri "$uri" --blocks $blocks --count 2000 --seed $((SEED + 30)) --log "$W/c3-0.log" --flush-every 50 --run-id 30 >/dev/null
    check "case 3: s3a joins r3" joined s3a $res "$W/s3a.img"
    check "case 3: s3b joins r3" joined s3b $res "$W/s3b.img"
    check "case 3: s3a UpToDate" adm s3a wait-resource $res --until uptodate --timeout 60
    check "case 3: s3b UpToDate" adm s3b wait-resource $res --until uptodate --timeout 60
    # The primary keeps a member's segments across its restart only once gossip brought it the
    # member's position (see round 3): the rounds start when p3 lists both secondaries.
    local heard=""
    for _ in $(seq 50); do
        heard=$($WATCH members --marsadm "$MARSADM" --control "$W/p3/ctl.sock" --resource $res)
        [[ "$heard" == *s3a=secondary/*s3b=secondary/* ]] && break
        sleep 0.2
    done
    check "case 3: p3 hears of both secondaries by gossip ($heard)" eval '[[ "$heard" == *s3a=secondary/*s3b=secondary/* ]]'
    declare -A before
    local h
    for h in p3 s3a s3b; do before[$h]=$(roles $h $res); done
    note "roles: p3=${before[p3]} s3a=${before[s3a]} s3b=${before[s3b]}"
    check "case 3: roles before the restarts (p3 primary, s3a/s3b secondaries of p3)" \
        test "${before[p3]}, ${before[s3a]}, ${before[s3b]}" = "primary, secondary of p3, secondary of p3"
    local round order
    for round in 1 2; do
        if [ $round = 1 ]; then
            check "case 3 round 1: SIGTERM stops p3, s3a and s3b" stop_all TERM p3 s3a s3b
            order="s3a s3b p3"
        else
            stop p3 9
            check "case 3 round 2: kill -9 p3, then SIGTERM stops s3a and s3b" stop_all TERM s3a s3b
            order="s3b p3 s3a"
        fi
        note "p3's log when stopped: $(segments p3 $res); s3a's: $(segments s3a $res); s3b's: $(segments s3b $res)"
        note "p3's stored view of the members: $(members p3 $res)"
        local ok=1
        for h in $order; do start $h || ok=0; sleep 0.5; done
        check "case 3 round $round: marsd started again in the order $order" test $ok -eq 1
        sleep 1
        local got=""
        for h in p3 s3a s3b; do
            local r=""
            for _ in $(seq 30); do r=$(roles $h $res); [ "$r" = "${before[$h]}" ] && break; sleep 0.2; done
            got+="$h=$r, "
        done
        note "roles after restart: $got; p3's log now: $(segments p3 $res)"
        local want="p3=${before[p3]}, s3a=${before[s3a]}, s3b=${before[s3b]}, "
        check "case 3 round $round: roles unchanged (got '$got', want '$want')" test "$got" = "$want"
        check "case 3 round $round: writes on p3 after the restart" $CHECK write --uri "$uri" --blocks $blocks --count 3000 \
            --seed $((SEED + 30 + round)) --log "$W/c3-$round.log" --flush-every 50 --qd 2 --run-id $((30 + round)) >/dev/null
        check "case 3 round $round: s3a UpToDate (wait-resource)" adm s3a wait-resource $res --until uptodate --timeout 30
        check "case 3 round $round: s3b UpToDate (wait-resource)" adm s3b wait-resource $res --until uptodate --timeout 30
        note "s3a: $(state s3a $res); s3b: $(state s3b $res)  (role disk replication syncOffset syncSize syncBytesSent primary state fetchSource)"
    done
    adm s3a pause-replay $res >/dev/null
    adm s3b pause-replay $res >/dev/null
    check "case 3: down on p3" adm p3 down $res
    check "case 3: p3 and s3a devices are byte-identical" compare "$W/p3.img" "$W/s3a.img"
    check "case 3: p3 and s3b devices are byte-identical" compare "$W/p3.img" "$W/s3b.img"
    check "case 3: no sync after the initial ones (s3a $(syncs_done s3a $res), s3b $(syncs_done s3b $res))" \
        test "$(syncs_done s3a $res)" -eq 1 -a "$(syncs_done s3b $res)" -eq 1
    # Round 3: a secondary that joined a new resource just before its primary restarts (before a
    # gossip round brought its position to the primary) must not lose its place either.
    stop_all TERM s3a s3b
    local r3c=r3c
    ADDR[s3c]=$NET.4.4:17777
    truncate -s $size "$W/p3c.img" "$W/s3c.img"
    check "case 3 round 3: create-resource r3c on p3" adm p3 create-resource $r3c "$W/p3c.img"
    local uric="nbd+unix:///$r3c?socket=$W/p3/nbd.sock"
    $CHECK write --uri "$uric" --blocks $blocks --count 500 --seed $((SEED + 33)) --log "$W/c3-3a.log" --run-id 33 >/dev/null
    start s3c && adm s3c join-cluster --host s3c --token "$tok" "${ADDR[p3]}" >/dev/null \
        && joined s3c $r3c "$W/s3c.img" && adm s3c wait-resource $r3c --until uptodate --timeout 30 >/dev/null
    check "case 3 round 3: s3c joins r3c and is UpToDate" test $? -eq 0
    note "p3 knows of: $($WATCH members --marsadm "$MARSADM" --control "$W/p3/ctl.sock" --resource $r3c); p3's log: $(segments p3 $r3c); s3c's: $(segments s3c $r3c)"
    stop p3 TERM
    note "p3's stored view of r3c's members: $(members p3 $r3c)"
    start p3
    note "p3's log after the restart: $(segments p3 $r3c)"
    check "case 3 round 3: writes on p3 after its restart" $CHECK write --uri "$uric" --blocks $blocks --count 500 \
        --seed $((SEED + 34)) --log "$W/c3-3b.log" --run-id 34 >/dev/null
    check "case 3 round 3: s3c, joined just before p3's restart, UpToDate after it (wait-resource)" \
        adm s3c wait-resource $r3c --until uptodate --timeout 20
    note "s3c: $(state s3c $r3c)"
    adm s3c pause-replay $r3c >/dev/null
    adm p3 down $r3c >/dev/null
    check "case 3 round 3: p3 and s3c devices are byte-identical" compare "$W/p3c.img" "$W/s3c.img"
    stop p3 TERM; stop s3c TERM
}

for c in $CASES; do
    t=$SECONDS
    case $c in
        1) case1 ;;
        2a) case2 a ;;
        2b) case2 b ;;
        3) case3 ;;
        4) case4 ;;
        *) fail "unknown case $c" ;;
    esac
    note "case $c took $((SECONDS - t)) s"
done
if has 1 || has 4; then stop p1 TERM; stop s1 TERM; has 4 && stop s4 TERM; fi

echo "total $(elapsed) s, $fails failed"
[ "$fails" -gt 0 ] && tails
exit $((fails > 0))
