#!/usr/bin/env bash
# Kernel-level interop test for an NBD server listening on a Unix socket.
#
# Boots a QEMU guest (TCG) with Debian's kernel and a small initramfs built
# here (and cached), and runs:
#   A      the guest's disk IS the export: QEMU's NBD block driver connects to
#          the server's socket; the guest sees it as virtio-blk /dev/vda.
#   B<bs>  the guest kernel's own NBD client (nbd.ko + nbd-client) with
#          logical block size <bs>, connecting to 10.0.2.100:10809 inside
#          QEMU user networking (restrict=on), which guestfwd relays to the
#          server's Unix socket. Nothing leaves the QEMU process and the relay.
# In each, the guest runs mkfs.ext4, raw O_DIRECT writes (512-byte granular
# when bs=512) in the last MiB outside the filesystem, writes files, syncs,
# drops caches and verifies them; then the host reads the whole export back
# over NBD (nbdcopy) and checks it with e2fsck -fn, debugfs dumps of every
# file against the checksums the guest reported, and the raw region against
# a copy it rebuilds itself.
#
# Usage:
#   run-guest-tests.sh --socket SOCK --export NAME [--image PATH] [options]
#   run-guest-tests.sh --install-deps      (apt-get install what is needed)
#   run-guest-tests.sh --build-only        (build/cache the initramfs only)
#
# Options (environment variable in brackets):
#   --socket PATH          server's Unix socket                  [GUEST_NBD_SOCKET]
#   --export NAME          export name                           [GUEST_NBD_EXPORT]
#   --image PATH           backing file of the export (only used with
#                          --check-image-file; the export is read over NBD)
#   --check-image-file     also e2fsck the backing file after each scenario
#                          (only valid if the server has no write cache)
#   --scenarios "A B"      scenarios to run; B means every --nbd-block-sizes,
#                          B512/B4096 pick one                   [GUEST_SCENARIOS]
#   --nbd-block-sizes "512 4096"                                 [GUEST_NBD_BLOCK_SIZES]
#   --timeout-a SEC        QEMU time limit for scenario A (default 240)  [GUEST_TIMEOUT_A]
#   --timeout-b SEC        QEMU time limit per B run (default 240)       [GUEST_TIMEOUT_B]
#   --kernel PATH          default: newest /boot/vmlinuz-*       [GUEST_KERNEL]
#   --smp N  --mem MIB     guest CPUs (default 2) and memory (default 512)
#   --cache-dir DIR        default ${XDG_CACHE_HOME:-$HOME/.cache}/swift-mars/guest
#   --work-dir DIR         keep logs and images here (default: a temp dir,
#                          removed when everything passed, kept otherwise)
#   --rebuild              rebuild the initramfs even if cached
#   --seed N               seed of the deterministic data (default 4242)
#   -v, --verbose          stream the guest console while it runs
#   GUEST_FWD_RELAY=python use guestfwd-proxy.py even if socat is installed
#
# Output: one "PASS <scenario>/<guest|host>/<check>" or "FAIL ..." line per
# check, then "guest-tests: N passed, N failed". Exit 0 only if all passed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

DEPS=(qemu-system-x86 linux-image-amd64 busybox-static e2fsprogs nbd-client
      qemu-utils libnbd-bin cpio kmod socat gcc libc6-dev)

SOCK=${GUEST_NBD_SOCKET:-}
EXPORT=${GUEST_NBD_EXPORT:-}
IMAGE=""
CHECK_IMAGE=0
SCENARIOS=${GUEST_SCENARIOS:-"A B"}
NBD_BLOCK_SIZES=${GUEST_NBD_BLOCK_SIZES:-"512 4096"}
TIMEOUT_A=${GUEST_TIMEOUT_A:-240}
TIMEOUT_B=${GUEST_TIMEOUT_B:-240}
KERNEL=${GUEST_KERNEL:-}
SMP=${GUEST_SMP:-2}
MEM=${GUEST_MEM:-512}
CACHE_DIR=${GUEST_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/swift-mars/guest}
WORK=""
KEEP_WORK=0
REBUILD=0
SEED=${GUEST_SEED:-4242}
VERBOSE=0
BUILD_ONLY=0
INSTALL_DEPS=0

TAIL_BYTES=1048576     # raw-I/O region at the end of the device
TEXT_LINES=32768       # 2 MiB deterministic text file
GUEST_NBD_HOST=10.0.2.100
GUEST_NBD_PORT=10809

die() { echo "run-guest-tests: $*" >&2; exit 2; }
log() { echo "run-guest-tests: $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --socket) SOCK=$2; shift 2 ;;
        --export) EXPORT=$2; shift 2 ;;
        --image) IMAGE=$2; shift 2 ;;
        --check-image-file) CHECK_IMAGE=1; shift ;;
        --scenarios) SCENARIOS=$2; shift 2 ;;
        --nbd-block-sizes) NBD_BLOCK_SIZES=$2; shift 2 ;;
        --timeout-a) TIMEOUT_A=$2; shift 2 ;;
        --timeout-b) TIMEOUT_B=$2; shift 2 ;;
        --kernel) KERNEL=$2; shift 2 ;;
        --smp) SMP=$2; shift 2 ;;
        --mem) MEM=$2; shift 2 ;;
        --cache-dir) CACHE_DIR=$2; shift 2 ;;
        --work-dir) WORK=$2; KEEP_WORK=1; shift 2 ;;
        --rebuild) REBUILD=1; shift ;;
        --seed) SEED=$2; shift 2 ;;
        -v|--verbose) VERBOSE=1; shift ;;
        --build-only) BUILD_ONLY=1; shift ;;
        --install-deps) INSTALL_DEPS=1; shift ;;
        --print-deps) echo "${DEPS[*]}"; exit 0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

if [ "$INSTALL_DEPS" = 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${DEPS[@]}"
    [ -n "$SOCK" ] || [ "$BUILD_ONLY" = 1 ] || exit 0
fi

for tool in "${CC:-gcc}" qemu-system-x86_64 busybox mke2fs e2fsck debugfs nbd-client nbdcopy nbdinfo cpio modprobe ldd awk sha256sum timeout; do
    command -v "$tool" >/dev/null 2>&1 || die "missing $tool; run with --install-deps (packages: ${DEPS[*]})"
done
file -L "$(command -v busybox)" 2>/dev/null | grep -q 'statically linked' ||
    ldd "$(command -v busybox)" 2>&1 | grep -q 'not a dynamic executable' ||
    die "busybox is not static; install busybox-static"

# ---------------------------------------------------------------- kernel
source "$HERE/guestlib.sh"
guest_kernel "$KERNEL"

# ---------------------------------------------------------------- initramfs
GUEST_MODULES=(virtio_pci virtio_blk virtio_net crc32c_generic crc32c_intel ext4 nbd)
GUEST_BINARIES=(/usr/sbin/nbd-client)
MKE2FS=$(command -v mke2fs)
CC=${CC:-gcc}

MODLINES=$(resolve_modules "${GUEST_MODULES[@]}")
[ -n "$MODLINES" ] || log "warning: no loadable modules resolved (all built in?)"
MODFILES=$(printf '%s\n' "$MODLINES" | awk 'NF { print $1 }')
LIBFILES=$(resolve_libs "$MKE2FS" "${GUEST_BINARIES[@]}")
BUSYBOX=$(command -v busybox)
INPUTS=$(printf '%s\n' "$KERNEL" "$BUSYBOX" "$MKE2FS" /etc/mke2fs.conf "${GUEST_BINARIES[@]}" \
         "$HERE/guest-init.sh" "$HERE/guest-common.sh" "$HERE/guestlib.sh" "$HERE/pattern.awk" "$HERE/mars-dio.c" \
         $MODFILES $LIBFILES)

cache_key() {
    {
        echo "swift-mars-guest-initramfs v2 $KVER"
        printf '%s\n' "$MODLINES"
        # the builder itself: this file from the build marker on
        sed -n '/^# ---- initramfs builder/,/^# ---- end initramfs builder/p' "${BASH_SOURCE[0]}"
        # shellcheck disable=SC2086
        hash_inputs $INPUTS
    } | sha256sum | cut -c1-16
}

# ---- initramfs builder (everything between these markers is part of the cache key)
build_initramfs() { # build_initramfs OUTFILE
    local out=$1 st f
    st=$(mktemp -d "${TMPDIR:-/tmp}/mars-initramfs.XXXXXX")
    install_busybox "$st" mke2fs mkfs.ext2
    cp "$MKE2FS" "$st/sbin/mke2fs"
    ln -sf mke2fs "$st/sbin/mkfs.ext4"
    cp /etc/mke2fs.conf "$st/etc/mke2fs.conf"
    "$CC" -O2 -static -o "$st/sbin/mars-dio" "$HERE/mars-dio.c" ||
        { rm -rf "$st"; die "cannot build mars-dio with $CC (needs gcc and libc6-dev)"; }
    for f in "${GUEST_BINARIES[@]}"; do
        cp "$f" "$st/sbin/$(basename "$f")"
    done
    # shellcheck disable=SC2086
    install_libs "$st" $LIBFILES
    install_modules "$st" "$MODLINES"
    cp "$HERE/guest-init.sh" "$st/init"
    chmod 755 "$st/init"
    cp "$HERE/guest-common.sh" "$st/etc/guest-common.sh"
    cp "$HERE/pattern.awk" "$st/etc/pattern.awk"
    pack_cpio "$st" "$out"
    rm -rf "$st"
}
# ---- end initramfs builder

INITRAMFS=$(cached_initramfs "$(cache_key)" build_initramfs)
[ -s "$INITRAMFS" ] || exit 2
if [ "$BUILD_ONLY" = 1 ]; then
    echo "$INITRAMFS"
    exit 0
fi

# ---------------------------------------------------------------- run setup
[ -n "$SOCK" ] || die "--socket is required"
[ -n "$EXPORT" ] || die "--export is required"
[ -S "$SOCK" ] || die "$SOCK is not a socket"
case "$SOCK$EXPORT" in *,*|*\'*|*\"*|*\\*|*' '*) die "socket path and export name must not contain commas, quotes, backslashes or spaces" ;; esac

if [ -z "$WORK" ]; then
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/mars-guest.XXXXXX")
else
    mkdir -p "$WORK"
    WORK=$(cd "$WORK" && pwd)
fi
case "$WORK" in *,*|*' '*) die "work dir must not contain commas or spaces" ;; esac

urlencode() {
    local s=$1 out="" c i
    for ((i = 0; i < ${#s}; i++)); do
        c=${s:i:1}
        case "$c" in
            [A-Za-z0-9._~-]) out+=$c ;;
            *) out+=$(printf '%%%02X' "'$c") ;;
        esac
    done
    printf '%s' "$out"
}
NBD_URI="nbd+unix:///$(urlencode "$EXPORT")?socket=$(urlencode "$SOCK")"

NPASS=0
NFAIL=0

EXPORT_SIZE=$(nbdinfo --size "$NBD_URI" 2>"$WORK/nbdinfo.err") || {
    report FAIL setup/host/nbdinfo-size "$(tail -n 1 "$WORK/nbdinfo.err")"
    echo "guest-tests: $NPASS passed, $NFAIL failed"
    exit 1
}
if [ "$EXPORT_SIZE" -lt $((64 * 1048576)) ] || [ $((EXPORT_SIZE % 1048576)) -ne 0 ]; then
    die "export size $EXPORT_SIZE must be a multiple of 1 MiB and at least 64 MiB"
fi
log "export '$EXPORT' on $SOCK: $EXPORT_SIZE bytes; work dir $WORK"

# guestfwd relay: socat if present, else the Python fallback.
PROXY=$WORK/guestfwd-proxy.sh
{
    echo '#!/bin/sh'
    echo "# started by QEMU (libslirp) once per guest connection; stdio is the guest socket"
    echo "exec 2>>'$WORK/guestfwd-proxy.log'"
    if [ "${GUEST_FWD_RELAY:-auto}" != python ] && command -v socat >/dev/null 2>&1; then
        echo "exec socat -b65536 STDIO 'UNIX-CONNECT:$SOCK'"
    else
        PY=$(command -v python3) || die "need socat or python3 for the guestfwd relay"
        echo "exec '$PY' '$HERE/guestfwd-proxy.py' '$SOCK'"
    fi
} >"$PROXY"
chmod 755 "$PROXY"

# ---------------------------------------------------------------- helpers
# expected_tail LBS OUT: the raw region the guest writes (mirror of
# build_expected_tail in guest-init.sh).
pattern() { awk -v seed="$SEED" -v start="$1" -v count="$2" -f "$HERE/pattern.awk"; }
expected_tail() {
    local lbs=$1 f=$2 d=$WORK/tailgen
    mkdir -p "$d"
    dd if=/dev/zero of="$f" bs=65536 count=$((TAIL_BYTES / 65536)) status=none
    pattern 0 1024 >"$d/pat1"
    dd if="$d/pat1" of="$f" bs=65536 count=1 conv=notrunc status=none
    pattern 5000 16 | head -c 1000 >"$d/pat2"
    dd if="$d/pat2" of="$f" bs=1000 count=1 seek=65636 oflag=seek_bytes conv=notrunc status=none
    pattern 9000 $((7 * lbs / 64)) >"$d/pat3"
    dd if="$d/pat3" of="$f" bs=$((7 * lbs)) count=1 seek=$((131072 + lbs)) oflag=seek_bytes conv=notrunc status=none
}

make_config_cpio() { # make_config_cpio SCENARIO NBD_BS OUT
    local d=$WORK/config.$1
    rm -rf "$d"
    mkdir -p "$d/etc"
    cat >"$d/etc/mars-test.conf" <<EOF
SCENARIO='$2'
EXPORT='$EXPORT'
NBD_BS='$3'
NBD_HOST='$GUEST_NBD_HOST'
NBD_PORT='$GUEST_NBD_PORT'
EXPECT_SIZE='$EXPORT_SIZE'
TAIL_BYTES='$TAIL_BYTES'
TEXT_LINES='$TEXT_LINES'
SEED='$SEED'
EOF
    (cd "$d" && find etc etc/mars-test.conf | cpio -o -H newc -R 0:0 --quiet) >"$4"
}

# run_qemu NAME TIMEOUT EXTRA-ARGS...: boots the guest; results in $WORK/NAME/
run_qemu() {
    local name=$1 tmo=$2 kind=$3 bs=$4
    shift 4
    local d=$WORK/$name
    mkdir -p "$d"
    make_config_cpio "$name" "$kind" "$bs" "$d/config.cpio"
    cat "$INITRAMFS" "$d/config.cpio" >"$d/initrd.cpio"
    : >"$d/console.log"
    : >"$d/results.log"
    # shellcheck disable=SC2054
    local cmd=(qemu-system-x86_64 -machine pc,accel=tcg -cpu max -smp "$SMP" -m "$MEM"
        -nodefaults -no-user-config -display none -monitor none -no-reboot
        -kernel "$KERNEL" -initrd "$d/initrd.cpio"
        -append "console=ttyS0 quiet panic=-1 oops=panic rdinit=/init"
        -chardev "file,id=con,path=$d/console.log" -serial chardev:con
        -chardev "file,id=res,path=$d/results.log" -serial chardev:res
        "$@")
    printf '%q ' "${cmd[@]}" >"$d/qemu.cmd"
    echo >>"$d/qemu.cmd"
    local tailpid="" rc=0 t0=$SECONDS
    if [ "$VERBOSE" = 1 ]; then
        tail -n +1 -F "$d/console.log" 2>/dev/null | sed "s/^/[$name] /" >&2 &
        tailpid=$!
    fi
    timeout -k 10 "$tmo" "${cmd[@]}" </dev/null >"$d/qemu.out" 2>&1 || rc=$?
    [ -z "$tailpid" ] || { sleep 0.5; kill "$tailpid" 2>/dev/null || true; wait "$tailpid" 2>/dev/null || true; }
    QEMU_SECONDS=$((SECONDS - t0))
    QEMU_RC=$rc
}

# host_verify NAME: read the export back and check it against what the
# guest reported in $WORK/NAME/results.log.
host_verify() {
    local name=$1 d=$WORK/$1 res=$WORK/$1/results.clean
    local img=$d/export.img
    rm -f "$img"
    if nbdcopy "$NBD_URI" "$img" 2>"$d/nbdcopy.err"; then
        report PASS "$name/host/read-export" "nbdcopy"
    else
        report FAIL "$name/host/read-export" "$(tail -n 1 "$d/nbdcopy.err")"
        return
    fi
    local sz
    sz=$(stat -c %s "$img")
    if [ "$sz" = "$EXPORT_SIZE" ]; then
        report PASS "$name/host/export-size"
    else
        report FAIL "$name/host/export-size" "read $sz bytes, expected $EXPORT_SIZE"
    fi

    # raw region at the end of the device
    local lbs
    lbs=$(awk '$1 == "GUEST-INFO" && $2 == "lbs" { print $3 }' "$res" | tail -n 1)
    if [ -n "$lbs" ] && grep -q '^GUEST-PASS raw-write$' "$res"; then
        expected_tail "$lbs" "$d/tail.expected"
        dd if="$img" of="$d/tail.got" bs=65536 skip=$(((EXPORT_SIZE - TAIL_BYTES) / 65536)) \
            count=$((TAIL_BYTES / 65536)) status=none
        if cmp -s "$d/tail.got" "$d/tail.expected"; then
            report PASS "$name/host/raw-region"
        else
            report FAIL "$name/host/raw-region" "$(cmp "$d/tail.got" "$d/tail.expected" 2>&1 | head -n 1)"
        fi
    else
        report FAIL "$name/host/raw-region" "guest did not complete the raw writes"
    fi

    # filesystem
    if e2fsck -fn "$img" >"$d/e2fsck.out" 2>&1; then
        report PASS "$name/host/e2fsck"
    else
        report FAIL "$name/host/e2fsck" "exit $?; see $d/e2fsck.out"
        sed 's/^/  | /' "$d/e2fsck.out" | tail -n 20
    fi

    local sums=$d/guest-sums
    awk '$1 == "GUEST-SUM" { print $2 "  " $3 }' "$res" >"$sums"
    local nsums
    nsums=$(wc -l <"$sums")
    if [ "$nsums" -lt 40 ]; then
        report FAIL "$name/host/files" "guest reported only $nsums checksums"
        return
    fi
    rm -rf "$d/dump"
    mkdir -p "$d/dump"
    if ! debugfs -R "rdump /data $d/dump" "$img" >"$d/debugfs.out" 2>&1 || [ ! -d "$d/dump/data" ]; then
        report FAIL "$name/host/files" "debugfs rdump failed; see $d/debugfs.out"
        return
    fi
    local nfiles
    nfiles=$(cd "$d/dump/data" && find . -type f | wc -l)
    if [ "$nfiles" = "$nsums" ] && (cd "$d/dump/data" && sha256sum -c --quiet "$sums") >"$d/sha.out" 2>&1; then
        report PASS "$name/host/files" "$nfiles files match the guest's checksums"
    else
        report FAIL "$name/host/files" "$nfiles files dumped, $nsums expected; $(head -n 3 "$d/sha.out" | tr '\n' ' ')"
    fi
    # the deterministic file, independently of the guest's checksum
    if pattern 0 "$TEXT_LINES" | cmp -s - "$d/dump/data/text.txt"; then
        report PASS "$name/host/pattern-file"
    else
        report FAIL "$name/host/pattern-file" "text.txt differs from the host-generated pattern"
    fi
    # the manifest stored in the filesystem equals what the guest reported
    if debugfs -R "cat /MANIFEST.sha256" "$img" 2>/dev/null | awk '{ print $1 "  " $2 }' | cmp -s - "$sums"; then
        report PASS "$name/host/manifest"
    else
        report FAIL "$name/host/manifest" "MANIFEST.sha256 in the filesystem differs from the reported sums"
    fi

    if [ "$CHECK_IMAGE" = 1 ] && [ -n "$IMAGE" ]; then
        if e2fsck -fn "$IMAGE" >"$d/e2fsck-image.out" 2>&1; then
            report PASS "$name/host/e2fsck-backing-file"
        else
            report FAIL "$name/host/e2fsck-backing-file" "see $d/e2fsck-image.out"
        fi
    fi
}

# guest_results NAME: PASS/FAIL lines from what the guest reported.
guest_results() {
    local name=$1 d=$WORK/$1
    tr -d '\r' <"$d/results.log" >"$d/results.clean"
    local line check detail
    while read -r line; do
        case "$line" in
            GUEST-PASS\ *)
                report PASS "$name/guest/${line#GUEST-PASS }" ;;
            GUEST-FAIL\ *)
                line=${line#GUEST-FAIL }
                check=${line%% *}
                detail=""
                [ "$check" = "$line" ] || detail=${line#* }
                report FAIL "$name/guest/$check" "$detail" ;;
        esac
    done <"$d/results.clean"
    if grep -q '^GUEST-DONE' "$d/results.clean"; then
        report PASS "$name/guest/completed" "qemu ${QEMU_SECONDS}s"
    elif [ "$QEMU_RC" = 124 ] || [ "$QEMU_RC" = 137 ]; then
        report FAIL "$name/guest/completed" "timed out after ${QEMU_SECONDS}s (limit ${2}s)"
    else
        report FAIL "$name/guest/completed" "qemu exited $QEMU_RC after ${QEMU_SECONDS}s without GUEST-DONE"
    fi
    if ! grep -q '^GUEST-DONE failed=0' "$d/results.clean"; then
        echo "---- $name: last console lines ($d/console.log) ----"
        tr -d '\r' <"$d/console.log" | tail -n 40 | sed 's/^/  | /'
        if [ -s "$d/qemu.out" ]; then
            echo "---- $name: qemu output ----"
            sed 's/^/  | /' "$d/qemu.out" | tail -n 20
        fi
    fi
    local times
    times=$(awk '$1 == "GUEST-INFO" && $2 ~ /^time-/ { printf "%s=%s ", substr($2, 6), $3 }' "$d/results.clean")
    log "$name: qemu ${QEMU_SECONDS}s; guest uptime marks: $times"
}

# ---------------------------------------------------------------- scenarios
run_A() {
    local name=A
    log "scenario A: QEMU NBD block driver -> virtio-blk (timeout ${TIMEOUT_A}s)"
    local blockdev
    blockdev=$(printf '{"driver":"nbd","node-name":"nbddisk","discard":"unmap","server":{"type":"unix","path":"%s"},"export":"%s"}' "$SOCK" "$EXPORT")
    run_qemu "$name" "$TIMEOUT_A" A 0 \
        -blockdev "$blockdev" -device virtio-blk-pci,drive=nbddisk
    guest_results "$name" "$TIMEOUT_A"
    host_verify "$name"
}

run_B() { # run_B BLOCKSIZE
    local bs=$1 name=B$1
    log "scenario $name: guest nbd.ko + nbd-client -b $bs via guestfwd (timeout ${TIMEOUT_B}s)"
    run_qemu "$name" "$TIMEOUT_B" B "$bs" \
        -netdev "user,id=n0,restrict=on,ipv6=off,guestfwd=tcp:$GUEST_NBD_HOST:$GUEST_NBD_PORT-cmd:$PROXY" \
        -device virtio-net-pci,netdev=n0,romfile=
    guest_results "$name" "$TIMEOUT_B"
    host_verify "$name"
}

T_ALL=$SECONDS
for s in $SCENARIOS; do
    case "$s" in
        A) run_A ;;
        B) for bs in $NBD_BLOCK_SIZES; do run_B "$bs"; done ;;
        B512|B1024|B2048|B4096) run_B "${s#B}" ;;
        *) die "unknown scenario $s" ;;
    esac
done

echo "guest-tests: $NPASS passed, $NFAIL failed"
if [ "$NFAIL" -eq 0 ] && [ "$NPASS" -gt 0 ]; then
    if [ "$KEEP_WORK" = 0 ]; then
        rm -rf "$WORK"
        log "total ${SECONDS}s (scenarios $((SECONDS - T_ALL))s)"
    else
        log "total ${SECONDS}s (scenarios $((SECONDS - T_ALL))s); logs in $WORK"
    fi
    exit 0
fi
log "total ${SECONDS}s (scenarios $((SECONDS - T_ALL))s); logs kept in $WORK"
exit 1
