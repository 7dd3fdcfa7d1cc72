#!/bin/sh
# Installs the Debian packages the ecosystem tests use (make ecosystem runs it):
# torch, scikit-learn (its bundled digits data) and matplotlib for the client's
# torch optimizer and example, haproxy for the sharding test, pip/setuptools/
# wheel to install the client package offline, PyYAML for the manifests.
# As root it installs what is missing; otherwise it names it and goes on (the
# tests that need a missing package are skipped).
set -eu
PKGS="python3 python3-numpy python3-torch python3-sklearn python3-matplotlib python3-yaml python3-pip python3-setuptools python3-wheel haproxy curl binutils"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "the ecosystem tests want these Debian packages:$missing" >&2
    echo "install them with: sudo apt-get install$missing (tests needing them are skipped)" >&2
    exit 0
fi
echo "installing:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends $missing
