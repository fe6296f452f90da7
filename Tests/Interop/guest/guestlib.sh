# Host-side helpers shared by the guest drivers (run-guest-tests.sh, devices.sh): the kernel, its
# modules and the shared libraries of guest binaries, packing an initramfs, result lines. Sourced, not run.
# Expects die() and log() from the caller.

# guest_kernel [PATH]: sets KERNEL, KVER and MODDIR (default: the newest /boot/vmlinuz-*).
guest_kernel() {
    KERNEL=${1:-}
    if [ -z "$KERNEL" ]; then
        KERNEL=$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1 || true)
        [ -n "$KERNEL" ] || die "no /boot/vmlinuz-*; install linux-image-amd64"
    fi
    [ -r "$KERNEL" ] || die "kernel $KERNEL not readable"
    KVER=${GUEST_KERNEL_VERSION:-$(basename "$KERNEL" | sed 's/^vmlinuz-//')}
    MODDIR=/lib/modules/$KVER
    [ -f "$MODDIR/modules.dep" ] || die "no $MODDIR/modules.dep for kernel $KERNEL"
}

# resolve_modules MODULE...: "insmod-path [args]" lines for the guest, dependencies first.
resolve_modules() {
    local m line seen=" "
    for m in "$@"; do
        while read -r line; do
            case "$line" in
                insmod\ *)
                    line=${line#insmod }
                    local p=${line%% *}
                    case "$seen" in *" $p "*) continue ;; esac
                    seen="$seen$p "
                    echo "$line"
                    ;;
                *) ;;
            esac
        done < <(modprobe -S "$KVER" -D "$m" 2>/dev/null || true)
    done
}

# resolve_libs EXECUTABLE...: the shared libraries (resolved paths) they load.
resolve_libs() {
    ldd "$@" 2>/dev/null | awk '
        /=> \// { print $3; next }
        /^[ \t]*\/[^ ]+ \(/ { print $1 }' | sort -u
}

# hash_inputs FILE...: "path sha256" per file, for a cache key.
hash_inputs() {
    local f
    for f in "$@"; do
        printf '%s ' "$f"
        sha256sum <"$f" | cut -d' ' -f1
    done
}

# install_libs STAGING LIB...: copies the libraries to the same paths under STAGING (usrmerge:
# /lib64 and /usr/lib64 both resolve).
install_libs() {
    local st=$1 f dest
    shift
    for f in "$@"; do
        dest=$st$f
        mkdir -p "$(dirname "$dest")"
        cp -L "$f" "$dest"
    done
    mkdir -p "$st/lib64"
    [ -e "$st/lib64/ld-linux-x86-64.so.2" ] || [ ! -e "$st/usr/lib64/ld-linux-x86-64.so.2" ] ||
        ln -s ../usr/lib64/ld-linux-x86-64.so.2 "$st/lib64/ld-linux-x86-64.so.2"
}

# install_modules STAGING MODLINES: uncompressed modules in STAGING/lib and the insmod order in
# STAGING/etc/modules.list.
install_modules() {
    local st=$1 modlines=$2 line path args base
    mkdir -p "$st/lib" "$st/etc"
    : >"$st/etc/modules.list"
    while read -r line; do
        [ -n "$line" ] || continue
        path=${line%% *}
        args=""
        [ "$path" = "$line" ] || args=${line#* }
        base=$(basename "$path")
        case "$base" in
            *.ko) cp "$path" "$st/lib/$base" ;;
            *.ko.xz) xz -dc "$path" >"$st/lib/${base%.xz}"; base=${base%.xz} ;;
            *.ko.zst) zstd -qdc "$path" >"$st/lib/${base%.zst}"; base=${base%.zst} ;;
            *.ko.gz) gzip -dc "$path" >"$st/lib/${base%.gz}"; base=${base%.gz} ;;
            *) die "unexpected module file $path" ;;
        esac
        echo "/lib/$base $args" >>"$st/etc/modules.list"
    done <<<"$modlines"
}

# install_busybox STAGING [SKIP-APPLET...]: busybox and a link per applet not skipped.
install_busybox() {
    local st=$1 applet
    shift
    local skip=" $* "
    mkdir -p "$st"/{bin,sbin,etc,proc,sys,dev,tmp,mnt,run,usr/bin,usr/sbin,lib,lib64}
    cp "$BUSYBOX" "$st/bin/busybox"
    for applet in $("$BUSYBOX" --list); do
        case "$skip" in *" $applet "*) continue ;; esac
        [ -e "$st/bin/$applet" ] || ln -s busybox "$st/bin/$applet"
    done
    ln -s /proc/mounts "$st/etc/mtab"
    echo "root:x:0:0:root:/:/bin/sh" >"$st/etc/passwd"
    echo "root:x:0:" >"$st/etc/group"
}

# pack_cpio STAGING OUT: a newc archive owned by root, in a stable order.
pack_cpio() {
    (cd "$1" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc -R 0:0 --quiet) >"$2.tmp.$$"
    mv "$2.tmp.$$" "$2"
}

# cached_initramfs KEY BUILDER: prints the cached initramfs for KEY, building it with
# "BUILDER OUTFILE" first when missing (the newest three are kept).
cached_initramfs() {
    local key=$1 builder=$2 out
    mkdir -p "$CACHE_DIR"
    out=$CACHE_DIR/initramfs-$KVER-$key.cpio
    if [ "${REBUILD:-0}" = 1 ] || [ ! -s "$out" ]; then
        log "building initramfs $out"
        "$builder" "$out" >&2
        ls -1t "$CACHE_DIR"/initramfs-*.cpio 2>/dev/null | tail -n +4 | xargs -r rm -f
    else
        log "using cached initramfs $out"
    fi
    echo "$out"
}

# report PASS|FAIL name [detail]: one result line (named after $REPORT_PREFIX), counted in NPASS or NFAIL.
report() {
    local r=$1 n=${REPORT_PREFIX:-}$2
    shift 2
    if [ "$r" = PASS ]; then
        NPASS=$((NPASS + 1)); echo "PASS $n${*:+ ($*)}"
    else
        NFAIL=$((NFAIL + 1)); echo "FAIL $n${*:+: $*}"
    fi
}
