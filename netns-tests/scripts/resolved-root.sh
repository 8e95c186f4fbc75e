#!/usr/bin/env bash
# Builds the container root tests/resolved.rs boots with systemd-nspawn: Debian bookworm
# (debootstrap, minbase) with systemd as init, systemd-resolved and libnss-resolve (so
# `getent hosts` goes through resolved), dbus and iproute2. Cached: a root with its stamp file
# is kept, so a second run does nothing. Usage:
#
#   netns-tests/scripts/resolved-root.sh DIR      (default: $CARGO_TARGET_DIR or target, + /resolved-root)
#
# Needs root and debootstrap (Debian package `debootstrap`); the mirror is A2A_DEBIAN_MIRROR
# or http://deb.debian.org/debian.
set -euo pipefail
# debootstrap, chroot and groupadd live in sbin, which a non-login shell's PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"
trap 'echo "resolved-root: failed at line $LINENO: $BASH_COMMAND" >&2' ERR

dir="${1:-${CARGO_TARGET_DIR:-target}/resolved-root}"
case "$dir" in "" | / | /usr | /work) echo "resolved-root: refusing to build in $dir" >&2; exit 1 ;; esac
# Bump when the package list or the setup below changes: an older root is rebuilt.
version=1
stamp="$dir/.a2a-root-v$version"
if [ -e "$stamp" ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "resolved-root: building the container root needs root (debootstrap)" >&2
    exit 1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    echo "resolved-root: debootstrap is missing: apt-get install debootstrap" >&2
    exit 1
fi
# One build at a time (./run-tests and a test may both ask); the second finds it done.
mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock 9
if [ -e "$stamp" ]; then
    exit 0
fi
mirror="${A2A_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
packages=systemd,systemd-sysv,systemd-resolved,libnss-resolve,dbus,iproute2

# Build beside the final place, then rename: a run killed half-way leaves no root that looks done.
tmp="$dir.tmp"
rm -rf "$tmp" "$dir"
echo "==> debootstrap bookworm into $dir ($mirror): $packages" >&2
start=$(date +%s)
debootstrap --variant=minbase --include="$packages" \
    bookworm "$tmp" "$mirror" >"$tmp.log" 2>&1 || {
    echo "resolved-root: debootstrap failed; its log is $tmp.log:" >&2
    tail -n 20 "$tmp.log" >&2
    exit 1
}

# The machine's identity and the services the test needs; nothing else starts.
echo a2a-resolved >"$tmp/etc/hostname"
: >"$tmp/etc/machine-id"
# A name only in the container's /etc/hosts: resolution of other names must keep working.
echo "192.0.2.77 hosts-only.example" >>"$tmp/etc/hosts"
# /etc/resolv.conf to resolved's stub (libnss-resolve does the getent lookups; this is for the rest).
ln -sf ../run/systemd/resolve/stub-resolv.conf "$tmp/etc/resolv.conf"
chroot "$tmp" systemctl enable systemd-resolved.service >/dev/null 2>&1
# Services a container under the test does not need, and that slow the boot or fail without a TTY.
for unit in systemd-networkd.service systemd-networkd.socket systemd-timesyncd.service \
    apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer; do
    chroot "$tmp" systemctl mask "$unit" >/dev/null 2>&1 || true
done
# What the a2a package's postinst does: the group of a2ad.service (Group=a2a) and the state
# directory. The test bind-mounts the built binaries and packaging/a2ad.service instead of
# installing the .deb.
chroot "$tmp" groupadd --system a2a
mkdir -p "$tmp/var/lib/a2a"
chmod 0700 "$tmp/var/lib/a2a"
rm -rf "$tmp/var/cache/apt/archives/"*.deb

touch "$tmp/.a2a-root-v$version"
mv "$tmp" "$dir"
rm -f "$tmp.log"
echo "==> container root ready in $dir ($(($(date +%s) - start)) s)" >&2
