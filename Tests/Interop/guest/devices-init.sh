#!/bin/sh
# /init of the devices guest (built by devices.sh): marsd and marsadm on this guest's own kernel,
# with nbd, device-mapper and lvm2. Runs the scenarios named in /etc/mars-test.conf in order and
# reports each check on the result port (see guest-common.sh). e2fsprogs by full path: busybox
# ash prefers its own applets of the same names.

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

# ---- shared setup: volume group vga on /dev/vda, marsd a with a cluster
ensure_vga() {
    vgs vga >/dev/null 2>&1 || { pvcreate -q /dev/vda && vgcreate -q vga /dev/vda; }
}
ensure_marsd_a() {
    if [ -z "$(marsd_pid a)" ] || ! kill -0 "$(marsd_pid a)" 2>/dev/null; then
        start_marsd a || return 1
    fi
    [ -f /run/mars-a/cluster.json ] || adm a create-cluster --host guest >/dev/null
}
# expect_refusal CHECK TEXT COMMAND...: COMMAND fails and its message contains TEXT.
expect_refusal() {
    _check=$1
    _text=$2
    shift 2
    if "$@" >/tmp/refusal.out 2>&1; then
        fail "$_check" "succeeded, should have been refused"
    elif grep -qF -e "$_text" /tmp/refusal.out; then
        pass "$_check"
        info "$_check" "$(tr '\n' ' ' </tmp/refusal.out)"
    else
        fail "$_check" "refused without naming '$_text': $(tr '\n' ' ' </tmp/refusal.out)"
    fi
}
write_set() { # write_set DIR NAME: 3 files of random data, their sums in DIR/NAME.sha256
    mkdir -p "$1/$2" &&
    head -c 3000001 /dev/urandom >"$1/$2/big" &&
    head -c 65536 /dev/urandom >"$1/$2/medium" &&
    echo "$2 written at $(now)" >"$1/$2/small" &&
    (cd "$1" && sha256sum "$2/big" "$2/medium" "$2/small" >"$2.sha256") &&
    sync
}
verify_set() { (cd "$1" && sha256sum -c -s "$2.sha256"); }
verify_sets() { # verify_sets DIR NAME...
    _dir=$1
    shift
    for _set; do verify_set "$_dir" "$_set" || { echo "files of $_set differ"; return 1; }; done
}
make_lv() { ensure_vga && lvcreate -q -y -n "$1" -L "$2" vga; }

# /dev/mars/ct1 on an LV: ext4 on it, marsd killed -9 and restarted under the mounted filesystem
# (with a writer waiting for the device meanwhile), refusals while it is in use.
scenario_attach() {
    check attach/setup make_lv ct1 128m || return
    check attach/marsd ensure_marsd_a || { marsd_log a; return; }
    check attach/create-resource adm a create-resource ct1 /dev/vga/ct1 || return
    check attach/attach adm a attach ct1 || { marsd_log a; return; }
    check attach/link-is-a-block-device test -b /dev/mars/ct1
    kdev=$(readlink /dev/mars/ct1)
    check attach/size sh -c '[ "$(blockdev --getsize64 /dev/mars/ct1)" = 134217728 ]'
    check attach/view-shows-the-device sh -c 'marsadm view ct1 --control /run/marsd-a/control.sock | grep -q "local device /dev/mars/ct1 -> /dev/nbd"'
    check attach/mkfs /sbin/mke2fs -t ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 /dev/mars/ct1 || return
    mkdir -p /mnt/ct1
    check attach/mount mount -t ext4 /dev/mars/ct1 /mnt/ct1 || return
    check attach/write-before write_set /mnt/ct1 before
    expect_refusal attach/detach-refused-while-mounted "mounted at /mnt/ct1" adm a detach ct1
    expect_refusal attach/down-refused-while-mounted "mounted at /mnt/ct1" adm a down ct1

    # kill -9: the kernel keeps the device; a writer started meanwhile waits for the reconnect.
    kill -9 "$(marsd_pid a)"
    wait "$(marsd_pid a)" 2>/dev/null
    (write_set /mnt/ct1 during && echo ok >/tmp/writer.done || echo failed >/tmp/writer.done) &
    writer=$!
    sleep 3
    check attach/writer-waits-while-marsd-is-dead sh -c '[ ! -e /tmp/writer.done ]'
    check attach/marsd-restarts start_marsd a || { marsd_log a; return; }
    _i=0
    while [ ! -e /tmp/writer.done ] && [ $_i -lt 1200 ]; do usleep 100000; _i=$((_i + 1)); done
    check attach/writer-completes-after-restart sh -c 'grep -qx ok /tmp/writer.done' || kill "$writer" 2>/dev/null
    check attach/files-intact-after-restart verify_sets /mnt/ct1 before during
    check attach/write-after write_set /mnt/ct1 after

    # A process holding the device open is named too.
    check attach/umount umount /mnt/ct1
    sleep 600 </dev/mars/ct1 &
    holder=$!
    expect_refusal attach/detach-refused-while-open "process $holder (sleep) has it open" adm a detach ct1
    kill "$holder"
    wait "$holder" 2>/dev/null

    # Everything reached marsd: read back through a fresh mount with the caches dropped.
    echo 3 >/proc/sys/vm/drop_caches
    check attach/fsck /sbin/e2fsck -fn /dev/mars/ct1
    check attach/remount mount -t ext4 -o ro /dev/mars/ct1 /mnt/ct1 &&
        check attach/files-intact-after-remount verify_sets /mnt/ct1 before during after &&
        umount /mnt/ct1
    check attach/detach adm a detach ct1
    check attach/link-removed sh -c '[ ! -e /dev/mars/ct1 ] && [ ! -L /dev/mars/ct1 ]'
    check attach/kernel-device-disconnected test "$(cat "/sys/block/${kdev#/dev/}/size")" = 0
    expect_refusal attach/detach-twice-refused "is not attached" adm a detach ct1
    check attach/down adm a down ct1
    expect_refusal attach/attach-refused-while-down "is down" adm a attach ct1
}

# /dev/mars/io1 over the kernel's ioctl interface (marsd --nbd-interface ioctl, though this kernel
# has netlink): a thread of marsd blocks in NBD_DO_IT; ext4, files, an online resize (NBD_SET_SIZE),
# refusal while mounted, detach; the device ends with marsd.
scenario_attach_ioctl() {
    ensure_vga || return
    check attach-ioctl/marsd start_marsd i --nbd-interface ioctl || { marsd_log i; return; }
    adm i create-cluster --host guest >/dev/null
    check attach-ioctl/create-resource adm i create-resource io1 --lvm vga --size 64M || { marsd_log i; return; }
    check attach-ioctl/attach sh -c 'marsadm attach io1 --control /run/marsd-i/control.sock >/tmp/attach-ioctl.out' ||
        { cat /tmp/attach-ioctl.out; marsd_log i; return; }
    info attach-ioctl/attach-message "$(cat /tmp/attach-ioctl.out)"
    check attach-ioctl/attach-names-ioctl grep -q "over the ioctl interface" /tmp/attach-ioctl.out
    check attach-ioctl/view-names-ioctl view_says i io1 "over the ioctl interface: the device ends when marsd stops"
    kdev=$(readlink /dev/mars/io1)
    # /sys/block/nbdN/pid is the thread in NBD_DO_IT: one of marsd's, blocked in ioctl (16 on x86_64).
    _tid=$(cat "/sys/block/${kdev#/dev/}/pid")
    check attach-ioctl/served-by-a-marsd-thread test -d "/proc/$(marsd_pid i)/task/$_tid"
    check attach-ioctl/thread-blocked-in-ioctl sh -c "read nr rest </proc/$(marsd_pid i)/task/$_tid/syscall && [ \"\$nr\" = 16 ]"
    check attach-ioctl/size sh -c '[ "$(blockdev --getsize64 /dev/mars/io1)" = 67108864 ]'
    check attach-ioctl/mkfs /sbin/mke2fs -t ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 /dev/mars/io1 || return
    mkdir -p /mnt/io1
    check attach-ioctl/mount mount -t ext4 /dev/mars/io1 /mnt/io1 || return
    check attach-ioctl/write-before write_set /mnt/io1 before
    check attach-ioctl/grow adm i resize io1 96M || marsd_log i
    check attach-ioctl/kernel-device-grown sh -c '[ "$(blockdev --getsize64 /dev/mars/io1)" = 100663296 ]'
    _before=$(fs_kib /mnt/io1)
    check attach-ioctl/resize2fs-online /sbin/resize2fs /dev/mars/io1
    check attach-ioctl/filesystem-grew test "$(fs_kib /mnt/io1)" -gt $((_before + 20000))
    check attach-ioctl/write-beyond-the-old-end sh -c 'head -c 40000000 /dev/urandom >/mnt/io1/fill && sync'
    check attach-ioctl/write-after write_set /mnt/io1 after
    expect_refusal attach-ioctl/detach-refused-while-mounted "mounted at /mnt/io1" adm i detach io1
    check attach-ioctl/umount umount /mnt/io1
    echo 3 >/proc/sys/vm/drop_caches
    check attach-ioctl/fsck /sbin/e2fsck -fn /dev/mars/io1
    check attach-ioctl/remount mount -t ext4 -o ro /dev/mars/io1 /mnt/io1 &&
        check attach-ioctl/files-intact verify_sets /mnt/io1 before after &&
        umount /mnt/io1
    check attach-ioctl/detach adm i detach io1
    check attach-ioctl/kernel-device-disconnected sh -c "[ \"\$(cat /sys/block/${kdev#/dev/}/size)\" = 0 ] && [ ! -e /sys/block/${kdev#/dev/}/pid ]"
    check attach-ioctl/serving-thread-ended test ! -d "/proc/$(marsd_pid i)/task/$_tid"
    # The device ends with marsd: attached again, then marsd stops.
    check attach-ioctl/attach-again adm i attach io1
    kdev=$(readlink /dev/mars/io1)
    kill "$(marsd_pid i)"
    wait "$(marsd_pid i)" 2>/dev/null
    check attach-ioctl/device-ends-with-marsd sh -c "[ ! -e /sys/block/${kdev#/dev/}/pid ] && [ \"\$(cat /sys/block/${kdev#/dev/}/size)\" = 0 ]"
    # The restarted marsd attaches the resource anew: a new device, served by one of its threads.
    check attach-ioctl/marsd-restarts start_marsd i --nbd-interface ioctl || { marsd_log i; return; }
    check attach-ioctl/reattached-after-restart wait_view i io1 "over the ioctl interface" || { marsd_log i; return; }
    kdev=$(readlink /dev/mars/io1)
    check attach-ioctl/reattached-device-served-by-the-new-marsd sh -c "test -d /proc/$(marsd_pid i)/task/\$(cat /sys/block/${kdev#/dev/}/pid)"
    check attach-ioctl/remount-after-restart mount -t ext4 -o ro /dev/mars/io1 /mnt/io1 &&
        check attach-ioctl/files-intact-after-restart verify_sets /mnt/io1 before after &&
        umount /mnt/io1
    check attach-ioctl/detach-after-restart adm i detach io1
    check attach-ioctl/down adm i down io1
    kill "$(marsd_pid i)"
    wait "$(marsd_pid i)" 2>/dev/null
}

# Two hosts on loopback (marsd p: alpha, VG vga; marsd s: beta, VG vgb) for logical volumes made by marsd.
ensure_vgb() {
    vgs vgb >/dev/null 2>&1 || { pvcreate -q /dev/vdb && vgcreate -q vgb /dev/vdb; }
}
two_hosts() { # two_hosts [PRIMARY SECONDARY PORT]: marsd PRIMARY (alpha, 127.0.0.1:PORT), SECONDARY (beta, 127.0.0.2:PORT+1)
    _p=${1:-p}
    _s=${2:-s}
    _port=${3:-7701}
    ip link set lo up
    ensure_vga && ensure_vgb || return 1
    start_marsd "$_p" --peer "127.0.0.1:$_port" || return 1
    start_marsd "$_s" --peer "127.0.0.2:$((_port + 1))" || return 1
    token=$(adm "$_p" create-cluster --host alpha --json | sed -n 's/.*"token" *: *"\(mars1-[^"]*\)".*/\1/p')
    [ -n "$token" ] && adm "$_s" join-cluster --host beta --token "$token" "127.0.0.1:$_port"
}
nothing_left() { # nothing_left ROOT VG NAME: no resource directory, no logical volume
    [ ! -e "/run/mars-$1/resource-$3" ] && ! lvs "$2/$3" >/dev/null 2>&1 && [ ! -e "/dev/$2/$3" ]
}
lv_size_is() { [ "$(blockdev --getsize64 "$1")" = "$2" ]; }
lv_exists() { lvs "$1" >/dev/null 2>&1; }
# join_when_known ID NAME ARGS...: join-resource once the gossip has brought the resource (20 s at most).
join_when_known() {
    _id=$1
    shift
    _i=0
    while ! adm "$_id" join-resource "$@" >/tmp/join.out 2>&1; do
        grep -q "has no resource" /tmp/join.out && [ $_i -lt 200 ] || { cat /tmp/join.out; return 1; }
        usleep 100000
        _i=$((_i + 1))
    done
    cat /tmp/join.out
}

# create-resource --lvm, join-resource --lvm, leave-resource --remove-lv, and the bad input.
scenario_lvm() {
    check lvm/two-hosts two_hosts || { marsd_log p; marsd_log s; return; }
    expect_refusal lvm/no-such-vg "volume group nosuch does not exist" adm p create-resource r1 --lvm nosuch --size 64M
    check lvm/no-such-vg-leaves-nothing nothing_left p nosuch r1
    expect_refusal lvm/size-does-not-fit "insufficient free space" adm p create-resource r1 --lvm vga --size 100G
    check lvm/size-does-not-fit-leaves-nothing nothing_left p vga r1
    expect_refusal lvm/size-not-a-size "is not a size" adm p create-resource r1 --lvm vga --size 12X
    expect_refusal lvm/size-missing "--lvm needs --size" adm p create-resource r1 --lvm vga
    lvcreate -q -y -n taken -L 8m vga >/dev/null
    expect_refusal lvm/name-taken "logical volume vga/taken exists already" adm p create-resource taken --lvm vga --size 8M
    check lvm/name-taken-keeps-the-other-volume lv_exists vga/taken
    check lvm/name-taken-makes-no-resource test ! -e /run/mars-p/resource-taken
    lvremove -q -y vga/taken >/dev/null
    expect_refusal lvm/bad-vg-name "is not a valid volume group name" adm p create-resource r1 --lvm "bad/vg" --size 8M

    check lvm/create adm p create-resource r1 --lvm vga --size 64M || { marsd_log p; return; }
    check lvm/created-size lv_size_is /dev/vga/r1 67108864
    check lvm/join join_when_known s r1 --lvm vgb || { marsd_log s; return; }
    check lvm/joined-size lv_size_is /dev/vgb/r1 67108864
    check lvm/uptodate adm s wait-resource r1 --until uptodate --timeout 120
    expect_refusal lvm/join-twice "exists on this host already" adm s join-resource r1 --lvm vgb

    sleep 600 </dev/vgb/r1 &
    holder=$!
    expect_refusal lvm/remove-lv-refused-while-open "process $holder (sleep) has it open" adm s leave-resource r1 --remove-lv
    check lvm/still-a-member-after-refusal sh -c 'marsadm view r1 --control /run/marsd-s/control.sock >/dev/null'
    check lvm/volume-kept-after-refusal lv_exists vgb/r1
    kill "$holder"
    wait "$holder" 2>/dev/null
    check lvm/leave-remove-lv adm s leave-resource r1 --remove-lv
    check lvm/volume-removed nothing_left s vgb r1
    expect_refusal lvm/remove-lv-needs-lvm "was not made with --lvm" sh -c 'lvcreate -q -y -n plain -L 64m vgb >/dev/null &&
        marsadm join-resource r1 /dev/vgb/plain --control /run/marsd-s/control.sock >/dev/null &&
        marsadm leave-resource r1 --remove-lv --control /run/marsd-s/control.sock'
    kill "$(marsd_pid p)" "$(marsd_pid s)"
    wait "$(marsd_pid p)" "$(marsd_pid s)" 2>/dev/null
}

# resource_size ID NAME: the resource's size as marsd ID's view says.
resource_size() {
    marsadm view "$2" --json --control "/run/marsd-$1/control.sock" | sed -n 's/^ *"size" *: *\([0-9]*\).*/\1/p' | head -n 1
}
# wait_size ID NAME BYTES: until the view of marsd ID says the resource has BYTES (120 s at most).
wait_size() {
    _i=0
    while [ "$(resource_size "$1" "$2")" != "$3" ]; do
        [ $_i -lt 1200 ] || { echo "size of $2 on $1: $(resource_size "$1" "$2"), not $3"; adm "$1" view "$2"; return 1; }
        usleep 100000
        _i=$((_i + 1))
    done
}
fs_kib() { df -k "$1" | awk 'NR == 2 { print $2 }'; }
nothing_resized() { # r2 on q: still 64 MiB everywhere, no resize pending
    [ "$(resource_size q r2)" = 67108864 ] && lv_size_is /dev/vga/r2 67108864 && lv_size_is /dev/vgb/r2 67108864 &&
        [ "$(blockdev --getsize64 /dev/mars/r2)" = 67108864 ] && ! adm q view r2 | grep -q "r2: resize"
}

# resize on two marsd (LVs in vga and vgb): bad input refused with nothing changed; then online
# growth under a mounted ext4 on /dev/mars/r2: both LVs grown, the new tail copied to the
# secondary, the kernel's device resized, resize2fs online, files written beyond the old end,
# and the secondary's device equal to the primary's.
scenario_resize() {
    check resize/two-hosts two_hosts q t 7711 || { marsd_log q; marsd_log t; return; }
    check resize/create adm q create-resource r2 --lvm vga --size 64M || { marsd_log q; return; }
    check resize/join join_when_known t r2 --lvm vgb || { marsd_log t; return; }
    check resize/uptodate adm t wait-resource r2 --until uptodate --timeout 120
    check resize/attach adm q attach r2 || { marsd_log q; return; }
    check resize/mkfs /sbin/mke2fs -t ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 /dev/mars/r2 || return
    mkdir -p /mnt/r2
    check resize/mount mount -t ext4 /dev/mars/r2 /mnt/r2 || return
    check resize/write-before write_set /mnt/r2 before

    expect_refusal resize/shrink-refused "shrink the filesystem first, then resize with --force" adm q resize r2 32M
    expect_refusal resize/not-primary "this host is a secondary of r2: resize it on its primary (alpha)" adm t resize r2 128M
    expect_refusal resize/unknown-resource "there is no resource 'nope'" adm q resize nope 128M
    expect_refusal resize/not-a-size "SIZE 12X is not a size" adm q resize r2 12X
    expect_refusal resize/does-not-fit "free space" adm q resize r2 100G
    check resize/refusals-change-nothing nothing_resized

    # Old data where the primary's LV will grow (the extents a removed LV leaves behind), zeroes
    # where the secondary's will: only the tail copy makes the two devices equal.
    check resize/old-data-in-free-extents sh -c 'lvcreate -q -y -n junk -L 128m vga >/dev/null &&
        head -c 134217728 /dev/urandom >/dev/vga/junk && sync && lvremove -q -y vga/junk >/dev/null'
    check resize/grow adm q resize r2 128M || marsd_log q
    check resize/primary-lv-grown lv_size_is /dev/vga/r2 134217728
    check resize/primary-tail-holds-old-data sh -c '! cmp -s -n 67108864 /dev/vga/r2 /dev/zero 67108864 0'
    check resize/primary-size wait_size q r2 134217728 || { marsd_log q; marsd_log t; return; }
    check resize/secondary-lv-grown lv_size_is /dev/vgb/r2 134217728
    check resize/secondary-size wait_size t r2 134217728
    check resize/kernel-device-grown sh -c '[ "$(blockdev --getsize64 /dev/mars/r2)" = 134217728 ]'
    _before=$(fs_kib /mnt/r2)
    check resize/resize2fs-online /sbin/resize2fs /dev/mars/r2
    check resize/filesystem-grew test "$(fs_kib /mnt/r2)" -gt $((_before + 40000))
    # 70 MB more than the old device held: ext4 has to use blocks beyond its old end.
    check resize/write-beyond-the-old-end sh -c 'head -c 70000000 /dev/urandom >/mnt/r2/fill && sha256sum /mnt/r2/fill >/tmp/fill.sha256 && sync'
    check resize/write-after write_set /mnt/r2 after
    check resize/files-intact verify_sets /mnt/r2 before after
    check resize/secondary-uptodate adm t wait-resource r2 --until uptodate --timeout 120
    check resize/umount umount /mnt/r2
    check resize/fsck /sbin/e2fsck -fn /dev/mars/r2
    check resize/detach adm q detach r2
    check resize/down adm q down r2
    check resize/down-secondary adm t down r2
    check resize/devices-equal cmp -n 134217728 /dev/vga/r2 /dev/vgb/r2
    kill "$(marsd_pid q)" "$(marsd_pid t)"
    wait "$(marsd_pid q)" "$(marsd_pid t)" 2>/dev/null
}

# view_says ID NAME TEXT: the status of NAME on marsd ID contains TEXT.
view_says() { marsadm view "$2" --control "/run/marsd-$1/control.sock" | grep -qF -e "$3"; }
# wait_view ID NAME TEXT: until view_says (20 s at most).
wait_view() {
    _i=0
    while ! view_says "$@"; do
        [ $_i -lt 200 ] || { echo "the view of $2 on $1 never said '$3':"; adm "$1" view "$2"; return 1; }
        usleep 100000
        _i=$((_i + 1))
    done
}

# Football (issue 17): ext4 on an LV-backed resource, mounted on alpha, migrates to beta: beta
# joins, gets UpToDate, takes over with a planned handover (refused while alpha has it mounted,
# with nothing changed; the handover detaches alpha's device and attaches it on beta), and alpha
# leaves with its LV removed. Then alpha joins again to show that leave --remove-lv is refused
# while the secondary's LV is mounted, and accepted after the umount.
scenario_football() {
    check football/two-hosts two_hosts f g 7721 || { marsd_log f; marsd_log g; return; }
    check football/create adm f create-resource fb --lvm vga --size 64M || { marsd_log f; return; }
    check football/attach adm f attach fb || { marsd_log f; return; }
    alpha_kdev=$(readlink /dev/mars/fb)
    check football/mkfs /sbin/mke2fs -t ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 /dev/mars/fb || return
    mkdir -p /mnt/fb-alpha /mnt/fb-beta /mnt/fb-replica
    check football/mount-on-alpha mount -t ext4 /dev/mars/fb /mnt/fb-alpha || return
    check football/write-on-alpha write_set /mnt/fb-alpha alpha1
    check football/join join_when_known g fb --lvm vgb || { marsd_log g; return; }
    check football/uptodate adm g wait-resource fb --until uptodate --timeout 120 || { marsd_log f; marsd_log g; return; }

    expect_refusal football/handover-refused-while-mounted \
        "alpha refused the handover of fb: /dev/mars/fb ($alpha_kdev) it is mounted at /mnt/fb-alpha" \
        adm g primary fb --timeout 60
    check football/refusal-keeps-alpha-primary adm f wait-resource fb --until primary --timeout 10
    check football/refusal-keeps-beta-secondary adm g wait-resource fb --until secondary --timeout 10
    check football/refusal-keeps-the-mount grep -q " /mnt/fb-alpha " /proc/mounts
    check football/refusal-keeps-the-device view_says f fb "fb: local device /dev/mars/fb -> $alpha_kdev"
    check football/write-after-refusal write_set /mnt/fb-alpha alpha2
    check football/files-intact-after-refusal verify_sets /mnt/fb-alpha alpha1 alpha2

    # No detach on alpha: the handover detaches the device there and attaches it on beta.
    check football/umount-on-alpha umount /mnt/fb-alpha
    check football/handover adm g primary fb --timeout 120 || { marsd_log f; marsd_log g; return; }
    check football/beta-primary adm g wait-resource fb --until primary --timeout 10
    check football/handover-detaches-alpha sh -c '! marsadm view fb --control /run/marsd-f/control.sock | grep -q "fb: local device"'
    check football/beta-attached-automatically wait_view g fb "fb: local device /dev/mars/fb -> /dev/nbd" || marsd_log g
    check football/link-is-a-block-device test -b /dev/mars/fb
    check football/fsck-on-beta /sbin/e2fsck -fn /dev/mars/fb
    check football/mount-on-beta mount -t ext4 /dev/mars/fb /mnt/fb-beta || { marsd_log g; return; }
    check football/files-moved-to-beta verify_sets /mnt/fb-beta alpha1 alpha2
    check football/write-on-beta write_set /mnt/fb-beta beta1
    check football/alpha-secondary adm f wait-resource fb --until secondary --timeout 60
    check football/alpha-uptodate adm f wait-resource fb --until uptodate --timeout 120

    check football/leave-old-host adm f leave-resource fb --remove-lv || marsd_log f
    check football/old-host-has-nothing-left nothing_left f vga fb
    check football/write-after-leave write_set /mnt/fb-beta beta2

    # leave-resource --remove-lv on a secondary whose LV is mounted (read-only, beside marsd's replay).
    check football/rejoin join_when_known f fb --lvm vga || { marsd_log f; return; }
    check football/rejoined-uptodate adm f wait-resource fb --until uptodate --timeout 120
    check football/mount-replica mount -t ext4 -o ro,noload /dev/vga/fb /mnt/fb-replica
    expect_refusal football/remove-lv-refused-while-mounted \
        "/dev/vga/fb is in use: it is mounted at /mnt/fb-replica" adm f leave-resource fb --remove-lv
    check football/still-uptodate-after-refusal view_says f fb "fb here: UpToDate"
    check football/volume-kept-after-refusal lv_exists vga/fb
    check football/umount-replica umount /mnt/fb-replica
    check football/leave-after-umount adm f leave-resource fb --remove-lv
    check football/volume-removed-after-umount nothing_left f vga fb

    check football/umount-on-beta umount /mnt/fb-beta
    echo 3 >/proc/sys/vm/drop_caches
    check football/fsck-at-end /sbin/e2fsck -fn /dev/mars/fb
    check football/remount-on-beta mount -t ext4 -o ro /dev/mars/fb /mnt/fb-beta &&
        check football/files-intact-at-end verify_sets /mnt/fb-beta alpha1 alpha2 beta1 beta2 &&
        umount /mnt/fb-beta
    check football/detach adm g detach fb
    check football/down adm g down fb
    kill "$(marsd_pid f)" "$(marsd_pid g)"
    wait "$(marsd_pid f)" "$(marsd_pid g)" 2>/dev/null
}

SCENARIOS_KNOWN=" smoke attach attach-ioctl lvm resize football "
for s in $SCENARIO; do
    case "$SCENARIOS_KNOWN" in
        *" $s "*) info "time-$s" "$(now)"; "scenario_$(echo "$s" | tr - _)" ;;
        *) fail "$s" "unknown scenario (known:$SCENARIOS_KNOWN)" ;;
    esac
done
finish
