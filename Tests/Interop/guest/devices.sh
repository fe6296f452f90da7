#!/usr/bin/env bash
# Local devices in a QEMU guest (TCG, Debian's kernel): marsd and marsadm run inside the guest,
# with the kernel's nbd and device-mapper modules and the lvm2 tools, on two virtual disks
# (/dev/vda, /dev/vdb) for volume groups. devices-init.sh runs the scenarios in the guest and
# reports a PASS/FAIL line per check, which this script prints.
#
# Usage: devices.sh [--marsd PATH] [--scenarios "smoke ..."] [options]
#   --marsd PATH      a marsd built with --static-swift-stdlib (marsadm next to it);
#                     default .build/release/marsd                  [MARSD]
#   --scenarios LIST  default: every scenario devices-init.sh knows  [DEVICES_SCENARIOS]
#   --timeout SEC     QEMU time limit (default 420)
#   --kernel PATH     default: newest /boot/vmlinuz-*
#   --mem MIB         guest memory (default 1024)
#   --work-dir DIR    keep logs here (default: a temp dir, removed when everything passed)
#   --rebuild         rebuild the initramfs even if cached
#   -v                stream the guest console
#
# Output: "PASS devices/<check>" or "FAIL devices/<check>: detail" lines, then
# "devices: N passed, N failed". Exit 0 only when nothing failed.
# Wrap it in `flock /tmp/swiftmars-bench.lock` on a shared machine (Tools/test does).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
MARSD=${MARSD:-$ROOT/.build/release/marsd}
SCENARIOS=${DEVICES_SCENARIOS:-"smoke attach attach-ioctl lvm resize football"}
TIMEOUT=420
KERNEL=${GUEST_KERNEL:-}
MEM=1024
CACHE_DIR=${GUEST_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/swift-mars/guest}
WORK=""
KEEP_WORK=0
REBUILD=0
VERBOSE=0

die() { echo "devices: $*" >&2; exit 2; }
log() { echo "devices: $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --marsd) MARSD=$2; shift 2 ;;
        --scenarios) SCENARIOS=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --kernel) KERNEL=$2; shift 2 ;;
        --mem) MEM=$2; shift 2 ;;
        --work-dir) WORK=$2; KEEP_WORK=1; shift 2 ;;
        --rebuild) REBUILD=1; shift ;;
        -v|--verbose) VERBOSE=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

MARSADM=$(dirname "$MARSD")/marsadm
[ -x "$MARSD" ] && [ -x "$MARSADM" ] || die "no marsd/marsadm at $MARSD (swift build -c release --static-swift-stdlib)"
if ldd "$MARSD" | grep -q libswiftCore; then
    die "$MARSD loads the Swift runtime from the toolchain; build it with --static-swift-stdlib"
fi
for tool in qemu-system-x86_64 busybox mke2fs e2fsck resize2fs lvm dmsetup cpio modprobe ldd timeout; do
    command -v "$tool" >/dev/null 2>&1 || die "missing $tool; run Tools/setup"
done

source "$HERE/guestlib.sh"
guest_kernel "$KERNEL"

GUEST_MODULES=(virtio_pci virtio_blk crc32c_generic crc32c_intel ext4 nbd dm_mod)
BUSYBOX=$(command -v busybox)
GUEST_BINARIES=("$MARSD" "$MARSADM" "$(command -v mke2fs)" "$(command -v e2fsck)" "$(command -v resize2fs)"
                "$(command -v lvm)" "$(command -v dmsetup)")
LVM_COMMANDS=(pvcreate pvremove vgcreate vgremove vgs lvcreate lvremove lvextend lvs)
MODLINES=$(resolve_modules "${GUEST_MODULES[@]}")
MODFILES=$(printf '%s\n' "$MODLINES" | awk 'NF { print $1 }')
LIBFILES=$(resolve_libs "${GUEST_BINARIES[@]}")
# liblvm2cmd and libdevmapper are loaded by marsd itself and appear in its ldd; their
# plugins (dlopen) are not needed without dmeventd monitoring.

# ---- initramfs builder (everything between these markers is part of the cache key)
build_devices_initramfs() { # OUTFILE
    local out=$1 st f c
    st=$(mktemp -d "${TMPDIR:-/tmp}/mars-devices.XXXXXX")
    install_busybox "$st" mke2fs mkfs.ext2 e2fsck fsck resize2fs
    for f in "${GUEST_BINARIES[@]}"; do
        cp "$f" "$st/sbin/$(basename "$f")"
    done
    ln -s mke2fs "$st/sbin/mkfs.ext4"
    for c in "${LVM_COMMANDS[@]}"; do ln -s lvm "$st/sbin/$c"; done
    cp /etc/mke2fs.conf "$st/etc/mke2fs.conf"
    # No udev in the guest: lvm and libdevmapper create the /dev nodes and links themselves.
    mkdir -p "$st/etc/lvm"
    cat >"$st/etc/lvm/lvm.conf" <<'CONF'
devices {
    obtain_device_list_from_udev = 0
    external_device_info_source = "none"
}
activation {
    udev_sync = 0
    udev_rules = 0
    monitoring = 0
}
backup {
    backup = 0
    archive = 0
}
CONF
    # shellcheck disable=SC2086
    install_libs "$st" $LIBFILES
    install_modules "$st" "$MODLINES"
    cp "$HERE/devices-init.sh" "$st/init"
    chmod 755 "$st/init"
    cp "$HERE/guest-common.sh" "$st/etc/guest-common.sh"
    pack_cpio "$st" "$out"
    rm -rf "$st"
}
# ---- end initramfs builder

devices_cache_key() {
    {
        echo "swift-mars-devices-initramfs v1 $KVER"
        printf '%s\n' "$MODLINES"
        sed -n '/^# ---- initramfs builder/,/^# ---- end initramfs builder/p' "${BASH_SOURCE[0]}"
        # shellcheck disable=SC2086
        hash_inputs "$KERNEL" "$BUSYBOX" /etc/mke2fs.conf "${GUEST_BINARIES[@]}" "$HERE/devices-init.sh" \
            "$HERE/guest-common.sh" "$HERE/guestlib.sh" $MODFILES $LIBFILES
    } | sha256sum | cut -c1-16
}

INITRAMFS=$(cached_initramfs "$(devices_cache_key)" build_devices_initramfs)
[ -s "$INITRAMFS" ] || exit 2

if [ -z "$WORK" ]; then
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/mars-devices.XXXXXX")
else
    mkdir -p "$WORK"
    WORK=$(cd "$WORK" && pwd)
fi

NPASS=0
NFAIL=0
REPORT_PREFIX=devices/

# Two disks for volume groups, and the per-run settings as a second cpio archive.
truncate -s 0 "$WORK/disk-a.img" "$WORK/disk-b.img"
truncate -s 1G "$WORK/disk-a.img" "$WORK/disk-b.img"
mkdir -p "$WORK/config/etc"
printf "SCENARIO='%s'\n" "$SCENARIOS" >"$WORK/config/etc/mars-test.conf"
(cd "$WORK/config" && find etc | cpio -o -H newc -R 0:0 --quiet) >"$WORK/config.cpio"
cat "$INITRAMFS" "$WORK/config.cpio" >"$WORK/initrd.cpio"
: >"$WORK/console.log"
: >"$WORK/results.log"

cmd=(qemu-system-x86_64 -machine pc,accel=tcg -cpu max -smp 2 -m "$MEM"
    -nodefaults -no-user-config -display none -monitor none -no-reboot
    -kernel "$KERNEL" -initrd "$WORK/initrd.cpio"
    -append "console=ttyS0 quiet panic=-1 oops=panic rdinit=/init"
    -chardev "file,id=con,path=$WORK/console.log" -serial chardev:con
    -chardev "file,id=res,path=$WORK/results.log" -serial chardev:res
    -drive "file=$WORK/disk-a.img,format=raw,if=virtio,cache=unsafe"
    -drive "file=$WORK/disk-b.img,format=raw,if=virtio,cache=unsafe")
printf '%q ' "${cmd[@]}" >"$WORK/qemu.cmd"
tailpid=""
if [ "$VERBOSE" = 1 ]; then
    tail -n +1 -F "$WORK/console.log" 2>/dev/null | sed 's/^/[guest] /' >&2 &
    tailpid=$!
fi
log "scenarios: $SCENARIOS (timeout ${TIMEOUT}s, work dir $WORK)"
t0=$SECONDS
rc=0
timeout -k 10 "$TIMEOUT" "${cmd[@]}" </dev/null >"$WORK/qemu.out" 2>&1 || rc=$?
seconds=$((SECONDS - t0))
[ -z "$tailpid" ] || { sleep 0.5; kill "$tailpid" 2>/dev/null || true; wait "$tailpid" 2>/dev/null || true; }

tr -d '\r' <"$WORK/results.log" >"$WORK/results.clean"
while read -r line; do
    case "$line" in
        GUEST-PASS\ *) report PASS "${line#GUEST-PASS }" ;;
        GUEST-FAIL\ *)
            line=${line#GUEST-FAIL }
            check=${line%% *}
            detail=""
            [ "$check" = "$line" ] || detail=${line#* }
            report FAIL "$check" "$detail" ;;
    esac
done <"$WORK/results.clean"
if grep -q '^GUEST-DONE' "$WORK/results.clean"; then
    report PASS completed "qemu ${seconds}s"
elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    report FAIL completed "timed out after ${seconds}s (limit ${TIMEOUT}s)"
else
    report FAIL completed "qemu exited $rc after ${seconds}s without GUEST-DONE"
fi

echo "devices: $NPASS passed, $NFAIL failed"
if [ "$NFAIL" -eq 0 ] && [ "$NPASS" -gt 1 ]; then
    [ "$KEEP_WORK" = 1 ] || rm -rf "$WORK"
    exit 0
fi
echo "---- last console lines ($WORK/console.log) ----"
tr -d '\r' <"$WORK/console.log" | tail -n 60 | sed 's/^/  | /'
log "logs kept in $WORK"
exit 1
