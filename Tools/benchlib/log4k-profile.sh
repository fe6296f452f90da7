#!/usr/bin/env bash
# One 4 KiB random-write run (fio nbd, qd32, 1 GiB region) against one marsd, with the CPU
# accounting of BENCHMARKS.md: IOPS and latency, machine ticks (user/sys/idle/iowait), and each
# marsd thread's user/sys ticks and voluntary/involuntary context switches.
#
#   Tools/benchlib/log4k-profile.sh logged|plain [marsd options...]
#
# Environment: RUNTIME (s, default 8); FILL=1 writes the 2 GiB image fully first (else sparse);
# WRAP="perf trace -a -e fdatasync --duration 5 -o trace.txt --" (or perf record/sched) wraps fio.
set -euo pipefail
mode=$1; shift
B=$(cd "$(dirname "$0")/../.." && pwd)/.build/release
W=$(mktemp -d /var/tmp/log4k.XXXXXX)
PID=
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT
if [ -n "${FILL:-}" ]; then
    dd if=/dev/zero of="$W/disk.img" bs=1M count=2048 oflag=direct status=none
else
    truncate -s 2G "$W/disk.img"
fi
args=(serve --root "$W/root" --unix "$W/nbd.sock" --control "$W/ctl.sock" --log-level warning "$@")
[ "$mode" = plain ] && args+=(--export "disk=$W/disk.img")
"$B/marsd" "${args[@]}" > "$W/marsd.log" 2>&1 &
PID=$!
for _ in $(seq 100); do [ -S "$W/ctl.sock" ] && break; sleep 0.05; done
if [ "$mode" = logged ]; then
    "$B/marsadm" create-cluster --host bench --control "$W/ctl.sock" > /dev/null
    "$B/marsadm" create-resource disk "$W/disk.img" --control "$W/ctl.sock" > /dev/null
fi
read -r _ u1 _ s1 i1 w1 _ < /proc/stat
${WRAP:-} fio --name=j --rw=randwrite --bs=4k --iodepth=32 --output-format=json --invalidate=0 --randrepeat=0 \
    --norandommap --size=1g --time_based --runtime="${RUNTIME:-8}" --ramp_time=1 --ioengine=nbd \
    --uri="nbd+unix:///disk?socket=$W/nbd.sock" > "$W/fio.json"
read -r _ u2 _ s2 i2 w2 _ < /proc/stat
/usr/bin/python3 - "$W/fio.json" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]["write"]
p = job["clat_ns"]["percentile"]
print(f"iops={job['iops']:.0f} p50={p['50.000000']/1e3:.0f}us p99={p['99.000000']/1e3:.0f}us "
      f"p99.9={p['99.900000']/1e3:.0f}us max={job['clat_ns']['max']/1e6:.1f}ms")
PY
echo "machine ticks: user=$((u2 - u1)) sys=$((s2 - s1)) idle=$((i2 - i1)) iowait=$((w2 - w1))"
echo "thread user sys voluntary involuntary:"
for t in /proc/$PID/task/*; do
    printf '  %-16s %s %s\n' "$(cat "$t/comm")" "$(awk '{print $14, $15}' "$t/stat")" \
        "$(awk '/^voluntary_ctxt|^nonvoluntary_ctxt/ {printf "%s ", $2}' "$t/status")"
done
