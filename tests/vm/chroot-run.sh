#!/bin/sh
# Runs a command inside a vfud test chroot, in a private mount namespace:
#
#   tests/vm/chroot-run.sh ROOT [--bind DIR]... -- COMMAND [ARG]...
#
# /dev, /proc and /sys of the host are bind-mounted into ROOT and a fresh tmpfs goes on its
# /tmp; every --bind DIR appears at the same path inside, so paths (sockets, logs) mean the same
# on both sides. Mount points for DIRs under /tmp are made in that tmpfs; others are created in
# ROOT itself (empty directories that stay). The mounts live only in a private mount namespace:
# they vanish with the command, however it ends, and the host's mount table is never touched.
# The command is SIGKILLed if unshare dies (--kill-child); callers that time out kill this
# script's process group. Needs root.
set -eu
if [ "${1:-}" = "--inside" ]; then
    # Second stage, already in the new mount namespace.
    shift
    root=$1
    shift
    mount --rbind /dev "$root/dev"
    mount --rbind /proc "$root/proc"
    mount --rbind /sys "$root/sys"
    mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
    while [ "$1" != "--" ]; do
        [ "$1" = "--bind" ] || { echo "chroot-run: bad argument $1" >&2; exit 2; }
        mkdir -p "$root$2"
        mount --bind "$2" "$root$2"
        shift 2
    done
    shift
    exec chroot "$root" "$@"
fi
[ $# -ge 3 ] || { echo "usage: $0 ROOT [--bind DIR]... -- COMMAND [ARG]..." >&2; exit 2; }
root=$(cd "$1" && pwd)
shift
for d in dev proc sys tmp; do [ -d "$root/$d" ] || mkdir -p "$root/$d"; done
exec unshare --mount --propagation private --fork --kill-child=SIGKILL \
    sh "$(cd "$(dirname "$0")" && pwd)/chroot-run.sh" --inside "$root" "$@"
