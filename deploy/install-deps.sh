#!/bin/sh
# Installs the Debian packages optd builds and tests with. Run as root (make
# does so when it finds one missing); otherwise it names what to install.
set -eu
PKGS="build-essential pkg-config libmicrohttpd-dev libcjson-dev libsqlite3-dev libcmocka-dev python3 curl"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "optd needs these Debian packages:$missing" >&2
    echo "install them with: sudo apt-get install$missing" >&2
    exit 1
fi
echo "installing:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq $missing
