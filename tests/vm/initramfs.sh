#!/bin/sh
# Builds the interop guest's initramfs from a chroot made by chroot.sh:
#
#   tests/vm/initramfs.sh ROOT OUT.cpio.gz
#
# Contents: the chroot's static busybox, the uio and uio_pci_generic modules of the chroot's
# kernel (decompressed, so busybox insmod loads them), guest/init as /init, and
# guest/ats-dma-test.c compiled here with `gcc -static`. Needs gcc with a static libc and cpio.
set -eu
[ $# -eq 2 ] || { echo "usage: $0 ROOT OUT.cpio.gz" >&2; exit 2; }
root=$1
out=$2
here=$(cd "$(dirname "$0")" && pwd)
kver=$(ls "$root/lib/modules" | sort -V | tail -n1)
modules="uio uio_pci_generic"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT INT TERM
mkdir -p "$stage/bin" "$stage/dev" "$stage/proc" "$stage/sys" "$stage/etc" "$stage/lib/modules"
cp "$root/bin/busybox" "$stage/bin/busybox"
cp "$here/guest/init" "$stage/init"
chmod 755 "$stage/init"
gcc -static -O2 -Wall -Wextra -Werror -o "$stage/bin/ats-dma-test" "$here/guest/ats-dma-test.c"
for m in $modules; do
    rel=$(grep -E "(^|/)$m\.ko(\.[a-z]+)?:" "$root/lib/modules/$kver/modules.dep" | cut -d: -f1)
    [ -n "$rel" ] || { echo "initramfs.sh: module $m not found for $kver" >&2; exit 1; }
    src="$root/lib/modules/$kver/$rel"
    case "$src" in
        *.ko.xz) xz -dc "$src" > "$stage/lib/modules/$m.ko" ;;
        *.ko.zst) zstd -qdc "$src" > "$stage/lib/modules/$m.ko" ;;
        *.ko.gz) gzip -dc "$src" > "$stage/lib/modules/$m.ko" ;;
        *.ko) cp "$src" "$stage/lib/modules/$m.ko" ;;
        *) echo "initramfs.sh: unknown module format $src" >&2; exit 1 ;;
    esac
done
echo "$modules" > "$stage/etc/modules-load"
(cd "$stage" && find . | sort | cpio -o -H newc --quiet -R 0:0) | gzip -1 > "$out.tmp"
mv "$out.tmp" "$out"
