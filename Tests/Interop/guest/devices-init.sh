#!/bin/sh
# /init of the devices guest (built by devices.sh): marsd and marsadm on this guest's own kernel,
# with nbd, device-mapper and lvm2. Runs the scenarios named in /etc/mars-test.conf in order and
# reports each check on the result port (see guest-common.sh).

. /etc/guest-common.sh

mkdir -p /run/lock /var/lock
mount -t tmpfs -o size=400m tmpfs /run

# ---- marsd instances: "a" and "b", each with its own root and sockets
start_marsd() { # start_marsd ID [marsd options...]
    _id=$1
    shift
    mkdir -p "/run/marsd-$_id" "/run/mars-$_id"
    rm -f "/run/marsd-$_id/control.sock"
    marsd serve --root "/run/mars-$_id" --unix "/run/marsd-$_id/nbd.sock" --control "/run/marsd-$_id/control.sock" \
        --log-segment-mib 16 --log-space-mib 128 --log-pending-mib 16 "$@" >>"/tmp/marsd-$_id.log" 2>&1 &
    eval "MARSD_PID_$_id=$!"
    wait_for "/run/marsd-$_id/control.sock" 60
}
marsd_pid() { eval "echo \$MARSD_PID_$1"; }
adm() { # adm ID marsadm-arguments...
    _id=$1
    shift
    marsadm "$@" --control "/run/marsd-$_id/control.sock"
}
marsd_log() { echo "---- marsd $1 log ----"; tail -n 30 "/tmp/marsd-$1.log"; }

# ---- scenarios
scenario_smoke() {
    check smoke/nbd-module wait_for /sys/block/nbd0 10
    check smoke/device-mapper wait_for /dev/mapper/control 10
    check smoke/vgcreate sh -c 'pvcreate -q /dev/vda && vgcreate -q vga /dev/vda' || return
    check smoke/lvcreate lvcreate -q -y -n smoke -L 64m vga || return
    check smoke/lv-node wait_for /dev/vga/smoke 5
    check smoke/marsd-starts start_marsd a || { marsd_log a; return; }
    check smoke/create-cluster adm a create-cluster --host guest
    check smoke/create-resource-on-lv adm a create-resource smoke /dev/vga/smoke
    check smoke/view-shows-it-up sh -c 'marsadm view smoke --json --control /run/marsd-a/control.sock | grep -q "\"state\" *: *\"up\""' ||
        adm a view
    check smoke/down adm a down smoke
    kill "$(marsd_pid a)"
    wait "$(marsd_pid a)"
    check smoke/marsd-stopped-cleanly test $? -eq 0 || marsd_log a
}

SCENARIOS_KNOWN=" smoke "
for s in $SCENARIO; do
    case "$SCENARIOS_KNOWN" in
        *" $s "*) info "time-$s" "$(now)"; "scenario_$s" ;;
        *) fail "$s" "unknown scenario (known:$SCENARIOS_KNOWN)" ;;
    esac
done
finish
