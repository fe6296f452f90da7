#!/bin/sh
# /init of the swift-mars guest test initramfs (runs under busybox ash as PID 1).
#
# Built into the initramfs by run-guest-tests.sh; the per-run settings come
# from /etc/mars-test.conf, which the host appends as a second cpio archive.
#
# Results: the lines of guest-common.sh, and
#   GUEST-SUM <sha256> <path>     checksum of a file written to the filesystem

. /etc/guest-common.sh

PATTERN=/etc/pattern.awk
pattern() { # pattern START COUNT -> COUNT 64-byte lines
    awk -v seed="$SEED" -v start="$1" -v count="$2" -f "$PATTERN"
}

# ---- raw block I/O in the last TAIL_BYTES of the device (outside the fs).
# The host rebuilds the same expected region (see expected_tail in
# run-guest-tests.sh) and compares it with what it reads back over NBD.
build_expected_tail() { # build_expected_tail LBS OUTFILE
    _lbs=$1
    _f=$2
    dd if=/dev/zero of="$_f" bs=65536 count=$((TAIL_BYTES / 65536)) 2>/dev/null &&
    pattern 0 1024 >/tmp/pat1 &&
    dd if=/tmp/pat1 of="$_f" bs=65536 count=1 conv=notrunc 2>/dev/null &&
    pattern 5000 16 | head -c 1000 >/tmp/pat2 &&
    dd if=/tmp/pat2 of="$_f" bs=1000 count=1 seek=65636 oflag=seek_bytes conv=notrunc 2>/dev/null &&
    pattern 9000 $((7 * _lbs / 64)) >/tmp/pat3 &&
    dd if=/tmp/pat3 of="$_f" bs=$((7 * _lbs)) count=1 seek=$((131072 + _lbs)) oflag=seek_bytes conv=notrunc 2>/dev/null
}

raw_tail_write() { # raw_tail_write DEV LBS TAILOFF
    _dev=$1; _lbs=$2; _off=$3
    # mars-dio: real O_DIRECT with aligned buffers, one request per chunk
    # (busybox dd silently falls back to buffered I/O for unaligned buffers).
    # zero the whole tail with 64 KiB direct writes
    mars-dio zero "$_dev" "$_off" 65536 "$TAIL_BYTES" || return 1
    # 64 KiB of pattern as one direct write per logical block (512-byte
    # requests when the device has 512-byte logical blocks)
    mars-dio write "$_dev" "$_off" "$_lbs" /tmp/pat1 || return 1
    # 1000 bytes at an unaligned offset through the page cache (read-modify-write)
    dd if=/tmp/pat2 of="$_dev" bs=1000 count=1 seek=$((_off + 65636)) oflag=seek_bytes conv=notrunc,fsync || return 1
    # 7 logical blocks in one direct write, starting one logical block past a
    # 4 KiB boundary (so not page aligned when the logical block is 512)
    mars-dio write "$_dev" $((_off + 131072 + _lbs)) $((7 * _lbs)) /tmp/pat3 || return 1
    sync
    blockdev --flushbufs "$_dev"
}

raw_tail_verify() { # raw_tail_verify DEV LBS TAILOFF EXPECTED
    blockdev --flushbufs "$1"
    # the misaligned 7 blocks, read back one logical block per request
    mars-dio read "$1" $(($3 + 131072 + $2)) "$2" $((7 * $2)) /tmp/pat3.got || return 1
    cmp /tmp/pat3.got /tmp/pat3 || return 1
    # the whole region
    mars-dio read "$1" "$3" 65536 "$TAIL_BYTES" /tmp/tail.got || return 1
    cmp /tmp/tail.got "$4"
}

# ---- filesystem workload
write_files() { # write_files MOUNTPOINT
    _d=$1/data
    mkdir -p "$_d/small" "$_d/deep/a/b/c" || return 1
    head -c 1048576 /dev/urandom >"$_d/rand-1M.bin" || return 1
    head -c 4194304 /dev/urandom >"$_d/rand-4M.bin" || return 1
    head -c 3000001 /dev/urandom >"$_d/rand-odd.bin" || return 1
    pattern 0 $((TEXT_LINES)) >"$_d/text.txt" || return 1
    # overwrite inside an existing file (read-modify-write of partial blocks)
    head -c 50001 /dev/urandom | dd of="$_d/rand-4M.bin" bs=50001 count=1 seek=1000003 oflag=seek_bytes conv=notrunc 2>/dev/null || return 1
    # append
    head -c 12345 /dev/urandom >>"$_d/rand-1M.bin" || return 1
    # sparse file: one block of data after a 4 MiB hole
    dd if=/dev/urandom of="$_d/sparse.bin" bs=4096 count=1 seek=1024 2>/dev/null || return 1
    : >"$_d/empty"
    i=1
    while [ $i -le 40 ]; do
        head -c $((i * 517)) /dev/urandom >"$_d/small/f$i" || return 1
        i=$((i + 1))
    done
    echo "swift-mars guest test, scenario $SCENARIO" >"$_d/deep/a/b/c/leaf.txt" || return 1
    (cd "$_d" && find . -type f | sort | xargs sha256sum) >"$1/MANIFEST.sha256" || return 1
    sync
}

disk_workflow() { # disk_workflow DEVICE  (checks are named with $P prefix)
    dev=$1
    name=${dev#/dev/}
    sectors=$(cat /sys/block/"$name"/size)
    size=$((sectors * 512))
    lbs=$(cat /sys/block/"$name"/queue/logical_block_size)
    info device "$dev"
    info size "$size"
    info lbs "$lbs"
    if [ "$EXPECT_SIZE" -gt 0 ] && [ "$size" -ne "$EXPECT_SIZE" ]; then
        fail "${P}size" "device has $size bytes, export has $EXPECT_SIZE"
        return 1
    fi
    pass "${P}size"
    tailoff=$((size - TAIL_BYTES))
    info tailoff "$tailoff"

    check "${P}build-expected-tail" build_expected_tail "$lbs" /tmp/tail.expected || return 1

    check "${P}mkfs" /sbin/mke2fs -t ext4 -F -q -L marsguest -b 4096 \
        -E lazy_itable_init=0,lazy_journal_init=0 "$dev" "$((tailoff / 1024))k" || return 1
    info time-mkfs "$(now)"

    check "${P}raw-write" raw_tail_write "$dev" "$lbs" "$tailoff" || return 1
    check "${P}raw-readback" raw_tail_verify "$dev" "$lbs" "$tailoff" /tmp/tail.expected
    info time-raw "$(now)"

    check "${P}mount" mount -t ext4 "$dev" /mnt || return 1
    check "${P}write-files" write_files /mnt || { umount /mnt; return 1; }
    while read -r sum path; do
        out "GUEST-SUM $sum $path"
    done </mnt/MANIFEST.sha256
    info time-write "$(now)"
    check "${P}umount" umount /mnt || return 1

    # drop every cache so the read-back really goes to the NBD server
    blockdev --flushbufs "$dev"
    echo 3 >/proc/sys/vm/drop_caches
    check "${P}remount" mount -t ext4 -o ro "$dev" /mnt || return 1
    check "${P}readback-files" sh -c 'cd /mnt/data && sha256sum -c -s ../MANIFEST.sha256'
    info time-readback "$(now)"
    check "${P}final-umount" umount /mnt || return 1
    return 0
}

kernel_log_clean() {
    if dmesg | grep -E 'I/O error|EXT4-fs error|EXT4-fs warning|JBD2: .*error|nbd[0-9]+: (Receive control failed|Send control failed|Connection timed out|Unexpected reply|Other side returned error|Double reply|Dead connection)|blk_update_request|critical medium error|Buffer I/O error'; then
        return 1
    fi
    return 0
}

case "$SCENARIO" in
A)
    # The disk is QEMU's NBD block driver behind virtio-blk.
    P=""
    if check disk-present wait_for /dev/vda 30; then
        disk_workflow /dev/vda
    fi
    check kernel-log-clean kernel_log_clean
    ;;
B)
    # The guest kernel's own NBD client, via QEMU user networking + guestfwd.
    P=""
    check nbd-module wait_for /sys/block/nbd0 10 || finish
    ip link set lo up
    check net-up sh -c 'ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0' || finish
    if /sbin/nbd-client -l "$NBD_HOST" "$NBD_PORT" >/tmp/list.out 2>&1; then
        info list-exports "$(tr '\n' ' ' </tmp/list.out)"
    else
        info list-exports "unsupported-or-failed: $(tr '\n' ' ' </tmp/list.out)"
    fi
    if check nbd-connect /sbin/nbd-client -N "$EXPORT" -b "$NBD_BS" "$NBD_HOST" "$NBD_PORT" /dev/nbd0; then
        info time-connect "$(now)"
        # the size appears once the kernel has the connection
        _i=0
        while [ "$(cat /sys/block/nbd0/size)" = 0 ] && [ $_i -lt 100 ]; do
            usleep 100000
            _i=$((_i + 1))
        done
        lbs=$(cat /sys/block/nbd0/queue/logical_block_size)
        if [ "$lbs" = "$NBD_BS" ]; then
            pass nbd-block-size
        else
            fail nbd-block-size "logical_block_size=$lbs, asked for $NBD_BS"
        fi
        disk_workflow /dev/nbd0
        check kernel-log-clean kernel_log_clean
        check nbd-disconnect /sbin/nbd-client -d /dev/nbd0
        _i=0
        while [ "$(cat /sys/block/nbd0/size)" != 0 ] && [ $_i -lt 100 ]; do
            usleep 100000
            _i=$((_i + 1))
        done
        if [ "$(cat /sys/block/nbd0/size)" = 0 ]; then
            pass nbd-disconnected
        else
            fail nbd-disconnected "nbd0 still has a size after nbd-client -d"
        fi
    fi
    ;;
*)
    fail config "unknown scenario '$SCENARIO'"
    ;;
esac

echo "---- dmesg (nbd/virtio/ext4) ----"
dmesg | grep -iE 'nbd|vda|virtio|ext4|jbd2|error' | tail -n 60
finish
