#!/bin/sh
# Installs the Debian packages `make bench` needs beyond the build's own
# (deploy/install-deps.sh): torch and numpy for the torch.optim comparison and
# Flask for the Python reference service, all for Debian's /usr/bin/python3.
# Run as root (make bench runs it); otherwise it names what to install.
set -eu
PKGS="python3-torch python3-numpy python3-flask"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "make bench needs these Debian packages:$missing" >&2
    echo "install them with: sudo apt-get install$missing" >&2
    exit 1
fi
echo "installing:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
# Another apt may hold the lock for a while on a shared machine: wait for it.
apt-get -o DPkg::Lock::Timeout=600 update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq $missing
