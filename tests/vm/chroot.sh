#!/bin/sh
# Prints the path of a cached Debian chroot for the VM test tiers, building it first if needed:
#
#   tests/vm/chroot.sh [EXTRA_PACKAGE]...
#
# The chroot holds Debian trixie with qemu-system-x86 from trixie-backports (QEMU >= 10.1, the
# first release with `-device vfio-user-pci`), the stock kernel (linux-image-amd64) and
# busybox-static. Tiers that need more (the real-kernel tier) name extra trixie packages; they
# are part of the cache key, so each package set gets its own chroot.
#
# Cache: ${VFUD_CACHE_DIR:-$HOME/.cache/vfud}/chroot-<key>, where <key> hashes everything that
# decides the contents (script version, suite, package lists). A build goes into a temporary
# directory next to it and is renamed into place only when complete, so an interrupted build
# never leaves a half cache; a lock serializes concurrent builders of the same key. Build logs
# go to stderr; stdout is only the path. Needs root (debootstrap, chroot), debootstrap and
# network access to the Debian mirror ($VFUD_DEBIAN_MIRROR, default deb.debian.org).
set -eu

SCRIPT_VERSION=1            # bump when the build procedure changes what ends up in the chroot
SUITE=trixie
BASE_PACKAGES="linux-image-amd64 busybox-static"
BACKPORTS_PACKAGES="qemu-system-x86"
MIRROR=${VFUD_DEBIAN_MIRROR:-http://deb.debian.org/debian}

here=$(cd "$(dirname "$0")" && pwd)
extra=$(printf '%s\n' "$@" | sort -u | tr '\n' ' ' | sed 's/^ *//; s/ *$//')
key=$(printf 'v%s\n%s\n%s\n%s\n%s\n' "$SCRIPT_VERSION" "$SUITE" "$BASE_PACKAGES" \
    "$BACKPORTS_PACKAGES" "$extra" | sha256sum | cut -c1-16)
cache=${VFUD_CACHE_DIR:-$HOME/.cache/vfud}
final="$cache/chroot-$key"

log() { printf 'chroot.sh: %s\n' "$*" >&2; }

if [ -f "$final/.vfud-chroot-complete" ]; then
    echo "$final"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || { log "building the chroot needs root"; exit 1; }
command -v debootstrap >/dev/null || { log "debootstrap is not installed"; exit 1; }
mkdir -p "$cache"

# One builder per key at a time; the loser of the race finds the finished chroot.
exec 9>"$cache/.chroot-$key.lock"
flock 9
if [ -f "$final/.vfud-chroot-complete" ]; then
    echo "$final"
    exit 0
fi

# Leftovers of builds that were killed: their namespaces (and so their mounts) are gone with
# their processes, and --one-file-system keeps rm off anything still mounted.
for old in "$cache"/.build-chroot-"$key"-*; do
    [ -e "$old" ] || continue
    log "removing the leftover of an interrupted build: $old"
    rm -rf --one-file-system "$old"
done
# A complete-less directory at the final path is never used; replace it.
[ -e "$final" ] && rm -rf --one-file-system "$final"

tmp="$cache/.build-chroot-$key-$$"
trap 'rm -rf --one-file-system "$tmp"' EXIT
trap 'exit 130' INT TERM
start=$(date +%s)
log "building $final (suite $SUITE: $BASE_PACKAGES${extra:+ $extra}; $SUITE-backports: $BACKPORTS_PACKAGES)"

# debootstrap mounts /proc and /sys in the target while it works; a private mount namespace
# keeps those mounts off the host even if the build is killed.
unshare --mount --propagation private debootstrap --variant=minbase "$SUITE" "$tmp" "$MIRROR" >&2

cat > "$tmp/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-backports main
SOURCES
# No daemons may start in the chroot; no docs or man pages are needed.
printf '#!/bin/sh\nexit 101\n' > "$tmp/usr/sbin/policy-rc.d"
chmod +x "$tmp/usr/sbin/policy-rc.d"
cat > "$tmp/etc/dpkg/dpkg.cfg.d/vfud-nodoc" <<'NODOC'
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/locale/*
NODOC

"$here/chroot-run.sh" "$tmp" -- sh -ec "
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends $BASE_PACKAGES $extra
    apt-get install -y -q --no-install-recommends -t $SUITE-backports $BACKPORTS_PACKAGES
    apt-get clean
    rm -rf /var/lib/apt/lists/*
" >&2

# Record what was installed; the tiers print it and the README quotes it.
{
    echo "suite=$SUITE"
    echo "key=$key"
    echo "qemu=$("$here/chroot-run.sh" "$tmp" -- qemu-system-x86_64 --version | head -n1)"
    echo "kernel=$(ls "$tmp/lib/modules" | sort -V | tail -n1)"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "build_seconds=$(( $(date +%s) - start ))"
} > "$tmp/.vfud-chroot-info"
cat "$tmp/.vfud-chroot-info" >&2
touch "$tmp/.vfud-chroot-complete"
mv -T "$tmp" "$final"
trap - EXIT
log "built in $(( $(date +%s) - start )) s"
echo "$final"
