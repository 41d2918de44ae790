#!/bin/sh
# os-packages PACKAGE...: install the Debian/Ubuntu packages that the image lacks.
# Nothing runs when all are there (the offline base of deploy/docker/base-image.sh has the
# server's), so such a build needs no network; .deb files in /tmp/debs install without one;
# otherwise apt fetches the missing packages (a CUDA or registry base on a connected machine).
set -eu
missing=""
for package in "$@"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed"; then
    missing="$missing $package"
  fi
done
if [ -z "$missing" ]; then
  echo "os-packages: all present:$*"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ls /tmp/debs/*.deb >/dev/null 2>&1; then
  echo "os-packages: installing$missing from /tmp/debs"
  apt-get install -y --no-install-recommends /tmp/debs/*.deb
else
  echo "os-packages: installing$missing with apt"
  apt-get update
  # shellcheck disable=SC2086  # one word per package
  apt-get install -y --no-install-recommends $missing
fi
rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /tmp/debs
