#!/usr/bin/env bash
# base-image.sh [TAG]: an offline base for the CPU image and the CI Prometheus, from Debian's
# packages alone (no container registry): `debootstrap --variant=minbase bookworm` with the
# server's OS packages and the security updates, imported with `docker import`. Prometheus's
# .deb files (for deploy/docker/prometheus.Dockerfile) are left in $DEBS_DIR.
# Needs root, debootstrap and a reachable Debian mirror (MIRROR).
set -euo pipefail
tag=${1:-logquant-base:bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
security=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
debs_dir=${DEBS_DIR:-build/prometheus-debs}
packages=python3,python3-venv,python3-dev,g++,make  # as the Dockerfile's `os-packages` line
work=$(mktemp -d /var/tmp/logquant-base.XXXXXX)
rootfs=$work/rootfs
cleanup() {
  umount "$rootfs/proc" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

debootstrap --variant=minbase --include="$packages" bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" \
  || { tail -20 "$work/debootstrap.log"; exit 1; }
rm -f "$rootfs"/var/cache/apt/archives/*.deb
cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
SOURCES
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
mount -t proc proc "$rootfs/proc"
in_root() { chroot "$rootfs" env DEBIAN_FRONTEND=noninteractive "$@"; }
{
  in_root apt-get update -qq
  in_root apt-get upgrade -y -qq
  in_root apt-get clean
  # Prometheus is not in this image: its packages are downloaded for the Prometheus image.
  in_root apt-get install -y -qq --download-only --no-install-recommends prometheus
} >"$work/apt.log" 2>&1 || { tail -20 "$work/apt.log"; exit 1; }
rm -rf "$debs_dir" && mkdir -p "$debs_dir"
mv "$rootfs"/var/cache/apt/archives/*.deb "$debs_dir/"
umount "$rootfs/proc"
rm -rf "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* "$rootfs/etc/resolv.conf"
: >"$rootfs/etc/resolv.conf"
tar -C "$rootfs" -c . | docker import -c 'CMD ["bash"]' -c 'ENV LANG=C.UTF-8' - "$tag" >/dev/null
echo "base image $tag: Debian bookworm minbase + $packages ($(docker image inspect -f '{{.Size}}' "$tag" | numfmt --to=iec))"
