# The start every guest /init shares (sourced by guest-init.sh and devices-init.sh, runs under
# busybox ash as PID 1): mounts, the result channel, check helpers, settings, kernel modules.
#
# Results go to the second serial port (/dev/ttyS1) as lines:
#   GUEST-PASS <check>            a check passed
#   GUEST-FAIL <check> [detail]   a check failed
#   GUEST-INFO <key> <value...>   facts the host needs (block size, timings)
#   GUEST-DONE failed=0|1         the script ran to its end
# Everything (including these lines) is also echoed to the kernel console (ttyS0), which the
# host keeps as console.log.

export PATH=/sbin:/bin:/usr/sbin:/usr/bin
umask 022

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /mnt
mount -t tmpfs -o size=256m tmpfs /tmp

RES=/dev/ttyS1
stty -F "$RES" raw -echo 2>/dev/null

out() {
    echo "$*" >"$RES" 2>/dev/null
    echo "$*"
}
FAILED=0
pass() { out "GUEST-PASS $1"; }
fail() { out "GUEST-FAIL $*"; FAILED=1; }
info() { out "GUEST-INFO $*"; }
now() { cut -d' ' -f1 /proc/uptime; }

# check NAME COMMAND...: run COMMAND, report NAME as passed or failed.
check() {
    _name=$1
    shift
    if "$@" >/tmp/check.out 2>&1; then
        pass "$_name"
        return 0
    else
        _rc=$?
        sed 's/^/  | /' /tmp/check.out | tail -n 40
        fail "$_name" "rc=$_rc $(tail -n 1 /tmp/check.out | tr -d '\r')"
        return 1
    fi
}

finish() {
    info time-end "$(now)"
    out "GUEST-DONE failed=$FAILED"
    sync
    poweroff -f
    # poweroff -f should not return; if it does, panic=-1 + -no-reboot ends QEMU.
    exit 1
}

[ -r /etc/mars-test.conf ] || { fail config "no /etc/mars-test.conf"; finish; }
. /etc/mars-test.conf
info time-start "$(now)"
info scenario "$SCENARIO"
info kernel "$(uname -r)"

# ---- kernel modules (list and order resolved on the host from modules.dep)
while read -r mod args; do
    [ -n "$mod" ] || continue
    if ! insmod "$mod" $args 2>/tmp/insmod.err; then
        # crc32c-intel fails on CPUs without SSE4.2; anything really missing
        # shows up below when the device or filesystem does not appear.
        echo "insmod $mod: $(cat /tmp/insmod.err)"
    fi
done </etc/modules.list
info time-modules "$(now)"

wait_for() { # wait_for PATH SECONDS
    _i=0
    while [ ! -e "$1" ] && [ "$_i" -lt "$(( $2 * 10 ))" ]; do
        usleep 100000
        _i=$((_i + 1))
    done
    [ -e "$1" ]
}
