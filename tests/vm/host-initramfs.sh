#!/bin/sh
# Builds the real-kernel tier's initramfs from a chroot made by chroot.sh:
#
#   tests/vm/host-initramfs.sh ROOT OUT.cpio.gz
#
# Contents: the chroot's static busybox and guest/host-init as /init. Everything else (the
# static vfud, the guest-side driver, the device configurations) comes from the host through
# the read-only 9p share, so the initramfs does not change when they do. Needs cpio and gzip.
set -eu
[ $# -eq 2 ] || { echo "usage: $0 ROOT OUT.cpio.gz" >&2; exit 2; }
root=$1
out=$2
here=$(cd "$(dirname "$0")" && pwd)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT INT TERM
mkdir -p "$stage/bin" "$stage/dev" "$stage/proc" "$stage/sys" "$stage/tmp" "$stage/host"
cp "$root/bin/busybox" "$stage/bin/busybox"
cp "$here/guest/host-init" "$stage/init"
chmod 755 "$stage/init"
(cd "$stage" && find . | sort | cpio -o -H newc --quiet -R 0:0) | gzip -1 > "$out.tmp"
mv "$out.tmp" "$out"
