# Sourced by the demo and test scripts: installs what a fresh Debian machine lacks.
# Only missing tools are installed; nothing happens on a machine that already has them.

vfud_sudo() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

vfud_need_apt() {
    # $@: Debian package names to install if absent.
    missing=""
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
    done
    if [ -n "$missing" ]; then
        echo ">> installing Debian packages:$missing"
        vfud_sudo apt-get update -qq
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive vfud_sudo apt-get install -y -qq $missing
    fi
}

vfud_prereqs() {
    if ! command -v cc >/dev/null 2>&1; then
        vfud_need_apt gcc libc6-dev
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        # Debian's toolchain is new enough (rust-version in Cargo.toml); rustup works too.
        vfud_need_apt cargo rustc
    fi
    if ! cargo fmt --version >/dev/null 2>&1; then
        command -v rustup >/dev/null 2>&1 && rustup component add rustfmt || vfud_need_apt rustfmt
    fi
    if ! cargo clippy --version >/dev/null 2>&1; then
        command -v rustup >/dev/null 2>&1 && rustup component add clippy || vfud_need_apt rust-clippy
    fi
}

vfud_vm_prereqs() {
    # The VM tiers: debootstrap builds the cached chroot; gcc with a static libc, cpio and xz
    # build the guest's initramfs (tests/vm/).
    vfud_need_apt debootstrap cpio xz-utils gcc libc6-dev
}

vfud_systemd_prereqs() {
    # `systemd-analyze verify` checks the units; it works without systemd running as init.
    if ! command -v systemd-analyze >/dev/null 2>&1; then
        vfud_need_apt systemd
    fi
}

vfud_fuzz_prereqs() {
    # libFuzzer is C++ built by libfuzzer-sys; cargo-fuzz drives it.
    if ! command -v c++ >/dev/null 2>&1; then
        vfud_need_apt g++
    fi
    if ! cargo fuzz --version >/dev/null 2>&1; then
        echo ">> installing cargo-fuzz from crates.io"
        cargo install --locked cargo-fuzz --version 0.13.2
    fi
}

vfud_nightly() {
    # Prints the cargo toolchain argument for the sanitizer builds: rustup's nightly when it is
    # installed, else nothing (the stable compiler then accepts -Z flags via RUSTC_BOOTSTRAP).
    if command -v rustup >/dev/null 2>&1 && rustup toolchain list | grep -q '^nightly'; then
        echo "+nightly"
    fi
}
