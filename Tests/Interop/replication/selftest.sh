#!/usr/bin/env bash
# Self-tests for the replication test tools: consistency.py (checker on synthetic images, writer
# against nbdkit, writer behind a cut proxy) and Tools/faultproxy.py (pass-through, cut, heal, stall,
# resume, backpressure, throttle, delay, flap, stats, control errors, SIGTERM).
# Prints PASS/FAIL lines, exits non-zero on any failure. Bounded: every step has a timeout and the
# whole script finishes well within ~60 s. Only 127.0.0.1 and Unix sockets are used.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
PY=${PYTHON:-/usr/bin/python3}          # needs python3-libnbd for the writer
CONS="$HERE/consistency.py"
PROXY="$ROOT/Tools/faultproxy.py"
T=$(mktemp -d /tmp/mars-repl-selftest.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$T"
}
trap cleanup EXIT
fails=0
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1"; fails=$((fails + 1)); [ -n "${2:-}" ] && [ -f "$2" ] && sed 's/^/    /' "$2" | tail -15; }

# expect RC NAME PATTERN -- cmd...: the command must exit RC and (if PATTERN non-empty) print a
# line matching the extended regex PATTERN.
expect() {
    local rc=$1 name=$2 pat=$3; shift 4
    timeout 30 "$@" >"$T/out" 2>&1
    local got=$?
    if [ "$got" -eq "$rc" ] && { [ -z "$pat" ] || grep -Eq -- "$pat" "$T/out"; }; then
        pass "$name"
    else
        echo "    (exit $got, expected $rc; pattern '$pat')"
        fail "$name" "$T/out"
    fi
}

# --------------------------------------------------------------------------------------------
# 1. checker on synthetic images
cat >"$T/synth.py" <<'EOF'
import os, random, sys
sys.path.insert(0, sys.argv[1])
import consistency as c
T = sys.argv[2]
BS, N, RUN = c.BS, 64, 42
rng = random.Random(1)
writes = [(s, rng.randrange(N)) for s in range(1, 61)]   # seq 1..60
with open(T + "/s.log", "w") as f:
    f.write("run %d seed 1 blocks %d\n" % (RUN, N))
    for s, b in writes:
        f.write("issued %d %d\n" % (s, b))
        f.write("%d %d\n" % (s, b))
        if s % 20 == 0:
            f.write("flush %d\n" % s)

def image(k, base=None):
    img = bytearray(base if base is not None else bytes(N * BS))
    for s, b in writes:
        if s < k:
            img[b * BS:(b + 1) * BS] = c.make_block(RUN, s, b)
    return img

def save(name, img):
    with open(T + "/" + name, "wb") as f:
        f.write(img)

save("empty.img", image(1))
save("p25.img", image(25))
save("p15.img", image(15))
save("full.img", image(61))
save("full2.img", image(61))
# non-prefix: prefix 10 plus write 40 (writes 10..39 to other blocks are missing)
img = image(10)
s40, b40 = writes[39]
assert any(b != b40 for s, b in writes[9:39])
img[b40 * BS:(b40 + 1) * BS] = c.make_block(RUN, s40, b40)
save("nonprefix.img", img)
# non-prefix the other way: full image with the last write to one block rolled back one version
img = image(61)
last = {}
for s, b in writes:
    last.setdefault(b, []).append(s)
b = next(b for b, ss in last.items() if len(ss) >= 2 and ss[-1] < 55)
img[b * BS:(b + 1) * BS] = c.make_block(RUN, last[b][-2], b)
save("rollback.img", img)
# torn: block of write 60, first half from its last write, second half from an earlier write to it
img = image(61)
b = next(b for b, ss in last.items() if len(ss) >= 2)
new, old = c.make_block(RUN, last[b][-1], b), c.make_block(RUN, last[b][-2], b)
img[b * BS:(b + 1) * BS] = new[:BS // 2] + old[BS // 2:]
save("torn.img", img)
# torn against zero: a written block whose second half never arrived
img = image(61)
img[b * BS + 2048:(b + 1) * BS] = bytes(2048)
save("halfzero.img", img)
# a block from another run (valid in itself)
img = image(61)
b = writes[-1][1]
img[b * BS:(b + 1) * BS] = c.make_block(RUN + 1, writes[-1][0], b)
save("otherrun.img", img)
# garbage in a never-written block
unwritten = [b for b in range(N) if b not in last]
img = image(61)
g = unwritten[0] if unwritten else 0
img[g * BS:(g + 1) * BS] = os.urandom(BS)
save("garbage.img", img)
# a seq beyond the log
img = image(61)
img[b * BS:(b + 1) * BS] = c.make_block(RUN, 61, b)
save("beyond.img", img)
# writes in flight together (qd 2 style event order): 1 and 2 overlap, 1 is acked before 3 is sent
with open(T + "/q.log", "w") as f:
    f.write("run %d seed 1 blocks %d\n" % (RUN, N))
    f.write("issued 1 0\nissued 2 1\n1 0\nissued 3 2\n2 1\n3 2\nissued 4 3\n4 3\nflush 4\n")
def qimage(seqs):
    img = bytearray(N * BS)
    for s in seqs:
        img[(s - 1) * BS:s * BS] = c.make_block(RUN, s, s - 1)
    return img
save("q-2-not-1.img", qimage([2]))
save("q-3-not-1.img", qimage([2, 3]))
# non-zero initial content
init = bytearray(os.urandom(N * BS))
save("init.img", init)
save("p30init.img", image(30, init))
EOF
if timeout 20 "$PY" "$T/synth.py" "$HERE" "$T"; then
    C=("$PY" "$CONS" check --blocks 64 --log "$T/s.log")
    expect 0 "check: empty image is the prefix k=1" 'consistent prefix k in \[1, ' -- "${C[@]}" --image "$T/empty.img"
    expect 0 "check: true prefix (k=25) passes" 'consistent prefix k in \[[0-9]+, [0-9]+\]' -- "${C[@]}" --image "$T/p25.img"
    if grep -q 'consistent prefix' "$T/out" && "$PY" - "$T/out" <<'EOF'
import re, sys
lo, hi = map(int, re.search(r"k in \[(\d+), (\d+)\]", open(sys.argv[1]).read()).groups())
sys.exit(0 if lo <= 25 <= hi else 1)
EOF
    then pass "check: reported interval contains 25"; else fail "check: reported interval contains 25" "$T/out"; fi
    expect 0 "check: full image passes with k=61" 'consistent prefix k in \[61, 61\]' -- "${C[@]}" --image "$T/full.img"
    expect 1 "check: non-prefix (later write present, earlier missing) fails" 'no prefix fits' -- "${C[@]}" --image "$T/nonprefix.img"
    expect 1 "check: rolled-back block fails" 'no prefix fits' -- "${C[@]}" --image "$T/rollback.img"
    expect 1 "check: torn block (two writes mixed) fails" 'torn' -- "${C[@]}" --image "$T/torn.img"
    expect 1 "check: torn block (half zero) fails" 'torn' -- "${C[@]}" --image "$T/halfzero.img"
    expect 1 "check: block from another run fails" 'another run' -- "${C[@]}" --image "$T/otherrun.img"
    expect 1 "check: garbage block fails" 'garbage' -- "${C[@]}" --image "$T/garbage.img"
    expect 1 "check: seq beyond the log fails" 'beyond the log' -- "${C[@]}" --image "$T/beyond.img"
    expect 0 "check: --min-seq 20 on prefix 25 passes" 'min-seq: ok' -- "${C[@]}" --image "$T/p25.img" --min-seq 20
    expect 1 "check: --min-seq 20 on prefix 15 fails" 'min-seq: FAIL' -- "${C[@]}" --image "$T/p15.img" --min-seq 20
    expect 1 "check: --min-seq flush (=60) on prefix 25 fails" 'min-seq: FAIL: need every write with seq <= 60' -- "${C[@]}" --image "$T/p25.img" --min-seq flush
    Q=("$PY" "$CONS" check --blocks 64 --log "$T/q.log")
    expect 0 "check: concurrent writes may land out of order (causal prefix)" 'consistent causal prefix' -- "${Q[@]}" --image "$T/q-2-not-1.img"
    expect 1 "check: ... but not with --strict-order" 'INCONSISTENT \(--strict-order\)' -- "${Q[@]}" --image "$T/q-2-not-1.img" --strict-order
    expect 1 "check: write acked before an applied write was sent must be present" 'no prefix fits' -- "${Q[@]}" --image "$T/q-3-not-1.img"
    expect 0 "check: --initial FILE prefix passes" 'consistent prefix' -- "${C[@]}" --image "$T/p30init.img" --initial "$T/init.img"
    expect 1 "check: same image against --initial zero fails" 'garbage' -- "${C[@]}" --image "$T/p30init.img"
    expect 1 "check: wrong --run-id fails" 'another run' -- "${C[@]}" --image "$T/full.img" --run-id 7
    expect 0 "compare: identical images" 'identical' -- "$PY" "$CONS" compare --a "$T/full.img" --b "$T/full2.img"
    expect 1 "compare: reports first differing block" 'first differing block [0-9]+' -- "$PY" "$CONS" compare --a "$T/full.img" --b "$T/torn.img"
else
    fail "synthetic image generator"
fi

# --------------------------------------------------------------------------------------------
# 2. writer against nbdkit
wait_sock() { for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.05; done; return 1; }
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
if ! command -v nbdkit >/dev/null; then
    fail "nbdkit not installed"
else
    timeout 40 nbdkit -U "$T/nbd.sock" -f --exit-with-parent memory 64M 2>"$T/nbdkit.log" &
    PIDS+=($!); NBDKIT=$!
    URI="nbd+unix:///?socket=$T/nbd.sock"
    if wait_sock "$T/nbd.sock"; then
        expect 0 "write: 4000 writes (qd 8, flush every 250) to nbdkit" 'write: done: 4000 writes' -- \
            "$PY" "$CONS" write --uri "$URI" --blocks 16384 --count 4000 --seed 1234 --qd 8 --flush-every 250 --log "$T/w.log"
        if timeout 20 nbdcopy "$URI" "$T/dev.img" 2>"$T/out"; then pass "nbdcopy device to file"; else fail "nbdcopy device to file" "$T/out"; fi
        expect 0 "check: written device is the full prefix, durable through the last flush" 'consistent prefix k in \[4001, 4001\]' -- \
            "$PY" "$CONS" check --image "$T/dev.img" --blocks 16384 --log "$T/w.log" --min-seq flush
        # corrupt: torn block; and an earlier version of a block
        timeout 20 "$PY" - "$T/w.log" "$T/dev.img" "$T/torn-dev.img" "$T/old-dev.img" "$HERE" <<'EOF'
import shutil, sys
sys.path.insert(0, sys.argv[5])
import consistency as c
lg = c.Log(sys.argv[1])
b, ss = next((b, ss) for b, ss in lg.by_block.items() if len(ss) >= 2 and ss[-1] < lg.last - 10)
shutil.copy(sys.argv[2], sys.argv[3]); shutil.copy(sys.argv[2], sys.argv[4])
with open(sys.argv[3], "r+b") as f:
    f.seek(b * c.BS + 1000); f.write(b"\xff" * 100)
with open(sys.argv[4], "r+b") as f:
    f.seek(b * c.BS); f.write(c.make_block(lg.run_id, ss[-2], b))
EOF
        expect 1 "check: device copy with one corrupted block fails" 'INCONSISTENT: block [0-9]+: torn' -- \
            "$PY" "$CONS" check --image "$T/torn-dev.img" --blocks 16384 --log "$T/w.log"
        expect 1 "check: device copy with one block rolled back fails" 'no prefix fits' -- \
            "$PY" "$CONS" check --image "$T/old-dev.img" --blocks 16384 --log "$T/w.log"
        expect 1 "compare: device copy vs corrupted copy" 'first differing block' -- \
            "$PY" "$CONS" compare --a "$T/dev.img" --b "$T/torn-dev.img"
    else
        fail "nbdkit did not start" "$T/nbdkit.log"
    fi
    kill "$NBDKIT" 2>/dev/null

    # writer through the proxy to a TCP nbdkit; cut the link mid-run: exit 3, and the log still
    # describes the device (issued writes cover the unacknowledged ones).
    NP=$(free_port)
    timeout 40 nbdkit -i 127.0.0.1 -p "$NP" -f --exit-with-parent memory 16M 2>"$T/nbdkit2.log" &
    PIDS+=($!); NBDKIT2=$!
    timeout 40 "$PY" "$PROXY" --listen 127.0.0.1:0 --target "127.0.0.1:$NP" --control "$T/pxw.sock" \
        --port-file "$T/pxw.port" 2>"$T/pxw.log" &
    PIDS+=($!); PXW=$!
    for _ in $(seq 100); do [ -s "$T/pxw.port" ] && break; sleep 0.05; done
    if [ -s "$T/pxw.port" ]; then
        PP=$(cat "$T/pxw.port")
        timeout 20 "$PY" "$CONS" write --uri "nbd://127.0.0.1:$PP" --blocks 4096 --duration-s 10 --seed 5 \
            --qd 4 --flush-every 50 --log "$T/cut.log" >"$T/out" 2>&1 &
        WP=$!
        sleep 1
        timeout 5 "$PY" "$PROXY" --control "$T/pxw.sock" --send cut >/dev/null
        wait "$WP"; rc=$?
        if [ "$rc" -eq 3 ] && grep -q 'NBD error' "$T/out"; then pass "write: exits 3 when the proxy cuts the link"; else echo "    (exit $rc)"; fail "write: exits 3 when the proxy cuts the link" "$T/out"; fi
        timeout 20 nbdcopy "nbd://127.0.0.1:$NP" "$T/cut.img" 2>"$T/out"
        expect 0 "check: device after the cut is a prefix including every flushed write" 'min-seq: ok' -- \
            "$PY" "$CONS" check --image "$T/cut.img" --blocks 4096 --log "$T/cut.log" --min-seq flush
    else
        fail "proxy for the writer did not start" "$T/pxw.log"
    fi
    kill "$PXW" "$NBDKIT2" 2>/dev/null
fi

# --------------------------------------------------------------------------------------------
# 3. fault proxy
cat >"$T/proxytest.py" <<'EOF'
import os, re, signal, socket, struct, subprocess, sys, threading, time
PY, PROXY, T = sys.argv[1], sys.argv[2], sys.argv[3]
CTL = T + "/px.sock"
fails = 0

def report(ok, name, detail=""):
    global fails
    print(("PASS " if ok else "FAIL ") + name + ("" if ok or not detail else "\n    " + str(detail)), flush=True)
    if not ok:
        fails += 1

# echo server
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", 0)); ls.listen(64)
EPORT = ls.getsockname()[1]
def echo(c):
    try:
        while True:
            d = c.recv(65536)
            if not d:
                break
            c.sendall(d)
    except OSError:
        pass
    finally:
        c.close()
def acceptor():
    while True:
        try:
            c, _ = ls.accept()
        except OSError:
            return
        threading.Thread(target=echo, args=(c,), daemon=True).start()
threading.Thread(target=acceptor, daemon=True).start()

errlog = open(T + "/px.log", "w")
px = subprocess.Popen([PY, PROXY, "--listen", "127.0.0.1:0", "--target", "127.0.0.1:%d" % EPORT,
                       "--control", CTL, "--port-file", T + "/px.port"], stderr=errlog)
for _ in range(100):
    if os.path.exists(T + "/px.port") and os.path.exists(CTL):
        break
    time.sleep(0.05)
PPORT = int(open(T + "/px.port").read())

def ctl(cmd):
    r = subprocess.run([PY, PROXY, "--control", CTL, "--send", cmd], capture_output=True, text=True, timeout=10)
    return r.returncode, r.stdout.strip()

def stats():
    return dict(kv.split("=", 1) for kv in ctl("stats")[1].split()[1:])

def conn(timeout=5):
    s = socket.create_connection(("127.0.0.1", PPORT), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s

def roundtrip(s, data, timeout=30):
    """Send data (from a thread) and read it back; return seconds taken."""
    t0 = time.monotonic()
    err = []
    def sender():
        try:
            s.sendall(data)
        except OSError as e:
            err.append(e)
    th = threading.Thread(target=sender, daemon=True); th.start()
    got = bytearray()
    s.settimeout(timeout)
    while len(got) < len(data):
        d = s.recv(1 << 20)
        if not d:
            raise ConnectionError("EOF after %d of %d bytes" % (len(got), len(data)))
        got += d
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("timeout")
    th.join(5)
    if bytes(got) != data:
        raise ValueError("echoed bytes differ")
    return time.monotonic() - t0

def dead(s, within=2.0):
    """True if the connection is closed/reset (or stops echoing) within the given time."""
    s.settimeout(within)
    try:
        s.sendall(b"x" * 10)
        d = s.recv(100)
        return d == b""
    except (ConnectionError, OSError):
        return True

def step(name, fn):
    try:
        r = fn()
        report(r is None or r is True, name, "" if r in (None, True) else r)
    except Exception as e:
        report(False, name, "%s: %s" % (type(e).__name__, e))

data = os.urandom(200000)
s1 = conn()
step("proxy: 200 KB pass through both ways", lambda: roundtrip(s1, data) and True)
def t_stats():
    st = stats()
    ok = int(st["bytes_up"]) >= 200000 and int(st["bytes_down"]) >= 200000 and st["conns"] == "1" and st["state"] == "up"
    return True if ok else "stats %s" % st
step("proxy: stats reports conns and bytes", t_stats)
def t_socat():
    r = subprocess.run("echo stats | socat - UNIX-CONNECT:" + CTL, shell=True, capture_output=True, text=True, timeout=5)
    return True if r.stdout.startswith("ok conns=") else repr(r.stdout + r.stderr)
step("proxy: control usable with socat", t_socat)
def t_err():
    rc, out = ctl("bogus 1")
    rc2, out2 = ctl("throttle abc")
    return True if rc != 0 and out.startswith("error") and rc2 != 0 and out2.startswith("error") else (rc, out, rc2, out2)
step("proxy: bad commands get 'error' and exit non-zero", t_err)

def t_cut():
    rc, out = ctl("cut")
    if rc != 0:
        return out
    if not dead(s1):
        return "existing connection still works after cut"
    try:
        s2 = conn()
    except OSError:
        return True  # refused outright is fine too
    if not dead(s2):
        return "new connection works while cut"
    return True if stats()["state"] == "cut" else "state not cut"
step("proxy: cut kills the connection and refuses new ones", t_cut)
def t_heal():
    ctl("heal")
    s = conn()
    roundtrip(s, data[:50000], 10)
    s.close()
step("proxy: heal restores forwarding", t_heal)

def t_resets():
    for _ in range(20):
        s = conn()
        s.sendall(b"y" * 1000)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    time.sleep(0.3)
    if px.poll() is not None:
        return "proxy died"
    s = conn(); roundtrip(s, b"z" * 1000, 5); s.close()
step("proxy: survives peer resets", t_resets)

def t_stall():
    s = conn()
    roundtrip(s, b"warmup", 5)
    ctl("stall")
    s.sendall(b"hello")
    s.settimeout(1.0)
    try:
        d = s.recv(100)
        return "got %r while stalled" % d
    except socket.timeout:
        pass
    ctl("resume")
    s.settimeout(3)
    got = b""
    while len(got) < 5:
        d = s.recv(100)
        if not d:
            break
        got += d
    s.close()
    return True if got == b"hello" else "after resume got %r" % got
step("proxy: stall holds bytes, resume delivers them", t_stall)

def t_backpressure():
    ctl("stall")
    s = conn()
    s.setblocking(False)
    sent, chunk, t0, last_progress = 0, b"b" * 65536, time.monotonic(), time.monotonic()
    while time.monotonic() - t0 < 6 and time.monotonic() - last_progress < 1.0 and sent < (64 << 20):
        try:
            sent += s.send(chunk)
            last_progress = time.monotonic()
        except BlockingIOError:
            time.sleep(0.01)
    st = stats()
    buf = int(st["buffered_up"])
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    ctl("resume")
    ok = buf <= (4 << 20) + 65536 and sent < (64 << 20)
    return True if ok else "client sent %d bytes, proxy buffered %d" % (sent, buf)
step("proxy: stalled direction buffers at most ~4 MiB (backpressure)", t_backpressure)

def t_throttle():
    ctl("reset")
    ctl("throttle 100000")
    s = conn()
    dt = roundtrip(s, os.urandom(500000), 30)
    s.close()
    ctl("throttle 0")
    return True if dt >= 3.0 else "500 KB took only %.2f s" % dt
step("proxy: throttle 100000 makes 500 KB take >= 3 s", t_throttle)

def t_delay():
    ctl("delay 200")
    s = conn()
    dt = roundtrip(s, b"ping", 10)
    dt_bulk = roundtrip(s, os.urandom(4 << 20), 30)
    s.close()
    ctl("delay 0")
    if dt < 0.35:
        return "round trip %.3f s" % dt
    # 4 MiB in 64 KiB chunks would take > 25 s if latency were paid per chunk
    return True if dt_bulk < 10 else "4 MiB with delay took %.2f s (not pipelined?)" % dt_bulk
step("proxy: delay 200 makes a round trip >= 0.35 s, bulk stays pipelined", t_delay)

def fast_ctl(cmd):
    u = socket.socket(socket.AF_UNIX)
    u.settimeout(5)
    u.connect(CTL)
    u.sendall(cmd.encode() + b"\n")
    r = u.makefile().readline().strip()
    u.close()
    return r

def fast_state():
    return dict(kv.split("=", 1) for kv in fast_ctl("stats").split()[1:])["state"]

def t_flap():
    out = fast_ctl("flap 300 700 2")   # cut 0-0.7 s, up 0.7-1.0, cut 1.0-1.7, up from 1.7
    if not out.startswith("ok"):
        return out
    t0 = time.monotonic()
    time.sleep(0.2)
    st1 = fast_state()
    try:
        s = conn()
        refused = dead(s, 1.0)
        s.close()
    except OSError:
        refused = True
    time.sleep(max(0, 2.5 - (time.monotonic() - t0)))
    st2 = fast_state()
    s = conn(); roundtrip(s, b"after flap", 5); s.close()
    if not refused:
        return "connection worked during the cut phase"
    return True if st1 == "cut,flapping" and st2 == "up" else "states %s then %s" % (st1, st2)
step("proxy: flap cuts and heals, then stays healed", t_flap)

def t_term():
    s = conn()
    px.send_signal(signal.SIGTERM)
    try:
        rc = px.wait(5)
    except subprocess.TimeoutExpired:
        px.kill()
        return "did not exit on SIGTERM"
    s.close()
    return True if rc == 0 and not os.path.exists(CTL) else "exit %d, control socket left: %s" % (rc, os.path.exists(CTL))
step("proxy: SIGTERM exits cleanly", t_term)
if px.poll() is None:
    px.kill()
sys.exit(1 if fails else 0)
EOF
timeout 60 "$PY" "$T/proxytest.py" "$PY" "$PROXY" "$T" || {
    rc=$?
    [ "$rc" -eq 124 ] && echo "FAIL proxy tests timed out"
    fails=$((fails + 1))
    sed 's/^/    /' "$T/px.log" | tail -10
}

if [ "$fails" -eq 0 ]; then echo "selftest: all passed"; else echo "selftest: $fails failure(s)"; fi
[ "$fails" -eq 0 ]
