#!/bin/sh
# Installs the Debian packages optd builds and tests with, by group:
#
#     deploy/install-deps.sh [--optional] GROUP...      (default group: build)
#
#   build      the compiler, libraries and tools of `make` (the deps target)
#   ecosystem  what tests/ecosystem uses: torch, scikit-learn (its bundled
#              digits data) and matplotlib for the client's torch optimizer and
#              example, haproxy for the sharding test, pip/setuptools/wheel to
#              install the client package offline, PyYAML for the manifests,
#              podman, runc and debootstrap for the container image
#   dashboard  chromium, for the dashboard tests in a headless browser, and
#              haproxy for the one behind a router
#   bench      torch and numpy (the torch.optim comparison) and Flask (the
#              Python reference service) for make bench
#
# As root it installs what is missing. Otherwise it names it and exits 1, or
# with --optional exits 0: the tests that need a missing package are skipped.
set -eu
optional=0
if [ "${1:-}" = --optional ]; then
    optional=1
    shift
fi
[ $# -gt 0 ] || set -- build

# Two lists: the ecosystem packages go in without their recommends (torch's
# are large); the others with them (chromium's bring its fonts).
full=""
lean=""
for group in "$@"; do
    case "$group" in
    build) full="$full build-essential pkg-config libmicrohttpd-dev libcjson-dev libsqlite3-dev libcmocka-dev libcurl4-openssl-dev libdragonbox-dev python3 curl" ;;
    ecosystem)
        lean="$lean python3 python3-numpy python3-torch python3-sklearn python3-matplotlib python3-yaml python3-pip python3-setuptools python3-wheel python3-venv haproxy curl binutils"
        full="$full podman runc debootstrap"
        ;;
    dashboard) full="$full chromium haproxy" ;;
    bench) lean="$lean python3-torch python3-numpy python3-flask" ;;
    *)
        echo "install-deps.sh: no group '$group' (build, ecosystem, dashboard, bench)" >&2
        exit 2
        ;;
    esac
done

# The packages of $1 that are not installed (nor in $2 already).
missing() {
    out=""
    for p in $1; do
        case " $2 $out " in *" $p "*) continue ;; esac
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || out="$out $p"
    done
    echo "$out"
}
full=$(missing "$full" "")
lean=$(missing "$lean" "$full")
[ -z "$full$lean" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "optd ($*) needs these Debian packages:$full$lean" >&2
    if [ "$optional" = 1 ]; then
        echo "install them with: sudo apt-get install$full$lean (tests needing them are skipped)" >&2
        exit 0
    fi
    echo "install them with: sudo apt-get install$full$lean" >&2
    exit 1
fi
echo "installing:$full$lean" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
[ -z "$full" ] || apt-get install -y -qq $full
[ -z "$lean" ] || apt-get install -y -qq --no-install-recommends $lean
