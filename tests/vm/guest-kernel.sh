#!/bin/sh
# Prints the path of a cached guest kernel (bzImage) for the real-kernel tier, building it first
# if needed:
#
#   tests/vm/guest-kernel.sh ROOT
#
# ROOT is a chroot made by `chroot.sh linux-source-7.2 make gcc ...` (see VFUD_KERNEL_CHROOT_PACKAGES
# in tests/scripts/run-all). Debian's own kernels leave CONFIG_IOMMUFD unset, so the tier builds
# one from Debian's linux-source package: `make tinyconfig`, the fragment below merged in,
# `make olddefconfig`, `make bzImage`. About 5 minutes on 2 idle cores.
#
# Cache: ${VFUD_CACHE_DIR:-$HOME/.cache/vfud}/guest-kernel-<key>/bzImage, where <key> hashes the
# build procedure's version, the fragment and the versions of the source package and compiler in
# ROOT. The
# build runs in a temporary directory and is renamed into place only when complete; a lock
# serializes concurrent builders. Build logs go to stderr; stdout is only the path. Needs root.
set -eu
[ $# -eq 1 ] || { echo "usage: $0 ROOT" >&2; exit 2; }
root=$(cd "$1" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
SOURCE_PACKAGE=linux-source-7.2
BUILD_VERSION=1             # bump when the build procedure changes what ends up in the kernel

# Everything the host-device guest needs, on top of tinyconfig: a serial console, an initramfs,
# the 9p share, virtio-pci, PCIe with ATS/PRI/PASID, the emulated VT-d, iommufd with the VFIO
# character device, and what a static tokio binary uses (epoll, eventfd, signalfd, timerfd,
# futex, memfd, process_vm_readv).
FRAGMENT="64BIT SMP PRINTK TTY SERIAL_8250 SERIAL_8250_CONSOLE BLK_DEV_INITRD RD_GZIP BINFMT_ELF
BINFMT_SCRIPT DEVTMPFS PROC_FS SYSFS TMPFS SHMEM MULTIUSER FUTEX EPOLL SIGNALFD TIMERFD EVENTFD
MEMFD_CREATE POSIX_TIMERS NET UNIX INET PCI PCI_MSI PCIEPORTBUS PCI_ATS PCI_PRI PCI_PASID ACPI
IOMMU_SUPPORT INTEL_IOMMU INTEL_IOMMU_SVM IOMMUFD VFIO VFIO_DEVICE_CDEV VFIO_PCI VIRTIO VIRTIO_PCI
NET_9P NET_9P_VIRTIO 9P_FS CROSS_MEMORY_ATTACH FILE_LOCKING VIRTIO_MENU NETWORK_FILESYSTEMS"
# The options the tier cannot work without; the build fails if olddefconfig dropped any.
REQUIRED="IOMMUFD VFIO_DEVICE_CDEV VFIO_PCI INTEL_IOMMU PCI_ATS 9P_FS VIRTIO_PCI SERIAL_8250_CONSOLE
BLK_DEV_INITRD RD_GZIP EVENTFD MEMFD_CREATE CROSS_MEMORY_ATTACH"

log() { printf 'guest-kernel.sh: %s\n' "$*" >&2; }

versions=$("$here/chroot-run.sh" "$root" -- dpkg-query -W "$SOURCE_PACKAGE" gcc make)
key=$(printf 'v%s\n%s\n%s\n%s\n' "$BUILD_VERSION" "$FRAGMENT" "$REQUIRED" "$versions" \
    | sha256sum | cut -c1-16)
cache=${VFUD_CACHE_DIR:-$HOME/.cache/vfud}
final="$cache/guest-kernel-$key"
if [ -f "$final/bzImage" ]; then
    echo "$final/bzImage"
    exit 0
fi
[ "$(id -u)" -eq 0 ] || { log "building the guest kernel needs root (chroot)"; exit 1; }
mkdir -p "$cache"
exec 9>"$cache/.guest-kernel-$key.lock"
flock 9
if [ -f "$final/bzImage" ]; then
    echo "$final/bzImage"
    exit 0
fi
for old in "$cache"/.build-guest-kernel-"$key"-*; do
    [ -e "$old" ] || continue
    log "removing the leftover of an interrupted build: $old"
    rm -rf --one-file-system "$old"
done
tmp="$cache/.build-guest-kernel-$key-$$"
trap 'rm -rf --one-file-system "$tmp"' EXIT
trap 'exit 130' INT TERM
mkdir -p "$tmp/out"
start=$(date +%s)
log "building $final from $(echo "$versions" | tr '\t\n' '  ')"
fragment=$(for o in $FRAGMENT; do echo "CONFIG_$o=y"; done)
required=$(for o in $REQUIRED; do echo "CONFIG_$o=y"; done)
"$here/chroot-run.sh" "$root" --bind "$tmp" -- sh -ec "
    cd '$tmp'
    tar -xf /usr/src/$SOURCE_PACKAGE.tar.xz
    cd $SOURCE_PACKAGE
    make -s tinyconfig
    printf '%s\n' '$fragment' > ../fragment.config
    scripts/kconfig/merge_config.sh -m .config ../fragment.config >/dev/null
    make -s olddefconfig
    missing=''
    for line in $(echo "$required" | tr '\n' ' '); do
        grep -qx \"\$line\" .config || missing=\"\$missing \$line\"
    done
    [ -z \"\$missing\" ] || { echo \"guest kernel config lacks:\$missing\" >&2; exit 1; }
    make -s -j$(nproc) bzImage
    cp arch/x86/boot/bzImage .config '$tmp/out/'
" >&2
{
    echo "packages=$(echo "$versions" | tr '\t\n' '  ')"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "build_seconds=$(( $(date +%s) - start ))"
} > "$tmp/out/info"
mv -T "$tmp/out" "$final"
log "built in $(( $(date +%s) - start )) s"
echo "$final/bzImage"
