#!/bin/sh
# Builds and runs the optd image (deploy/Dockerfile) with Debian's podman and
# runc: no Docker engine, no daemon and no registry needed.
#
#   sh deploy/podman.sh check             exit 0 when podman can run containers here
#   sh deploy/podman.sh base              the base image localhost/debian:bookworm-slim,
#                                         made once with debootstrap (cached)
#   sh deploy/podman.sh build [TAG]       base, then the image (default optd:latest)
#   sh deploy/podman.sh podman ARGS...    podman with the flags this machine needs
#
# As root it installs podman, runc and debootstrap when they are missing.
# Environment:
#   OPTD_IMAGE_CACHE   where the debootstrap tarball is kept (default /var/cache/optd)
#   DEBIAN_MIRROR      debootstrap's mirror (default http://deb.debian.org/debian)
#
# Why the flags: podman's default rlimits are refused by some sandboxes
# (containers.conf default_ulimits = []), and on hosts with hybrid cgroups
# crun and podman's systemd cgroup manager fail where runc with cgroupfs works.
# The base image is Debian bookworm from debootstrap, imported under the name
# the Dockerfile uses (debian:bookworm-slim resolves to localhost/ first), so
# nothing is pulled; `docker build` uses the registry's image instead.
set -eu

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${OPTD_IMAGE_CACHE:-/var/cache/optd}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
base=localhost/debian:bookworm-slim

conf=${TMPDIR:-/tmp}/optd-containers.conf
if [ -z "${CONTAINERS_CONF:-}" ]; then
    [ -f "$conf" ] || printf '[containers]\ndefault_ulimits = []\n' >"$conf"
    CONTAINERS_CONF=$conf
    export CONTAINERS_CONF
fi

pm() { podman --runtime runc --cgroup-manager cgroupfs "$@"; }

need() {  # installs the Debian packages named (as root), or says which are missing
    missing=""
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
    done
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "podman.sh: missing Debian packages:$missing (sudo apt-get install$missing)" >&2
        return 1
    fi
    echo "podman.sh: installing:$missing" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >&2
}

make_base() {
    if pm image exists "$base"; then
        return 0
    fi
    need debootstrap
    tarball=$cache/debian-bookworm-minbase.tar
    if [ ! -s "$tarball" ]; then
        mkdir -p "$cache"
        root=$(mktemp -d "$cache/rootfs.XXXXXX")
        echo "podman.sh: debootstrap bookworm from $mirror (once; a few minutes)" >&2
        if ! debootstrap --variant=minbase bookworm "$root" "$mirror" >"$root.log" 2>&1; then
            tail -20 "$root.log" >&2
            rm -rf "$root" "$root.log"
            echo "podman.sh: debootstrap failed" >&2
            return 1
        fi
        # As debian:bookworm-slim: no package lists, no apt cache, and no
        # documentation, manual pages or translations, now or from later
        # installs (dpkg's path-exclude).
        rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
        find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
        rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
        printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
            'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' 'path-exclude /usr/share/locale/*' \
            >"$root/etc/dpkg/dpkg.cfg.d/optd-slim"
        tar --numeric-owner -C "$root" -cf "$tarball.part" .
        mv "$tarball.part" "$tarball"
        rm -rf "$root" "$root.log"
    fi
    pm import --change 'CMD ["bash"]' "$tarball" "$base" >/dev/null
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
check)
    need podman runc || exit 1
    # A container needs an image; `podman info` alone does not prove that
    # runc can start one, so this checks the engine's set-up only.
    pm info >/dev/null 2>&1 || { echo "podman.sh: podman info fails here" >&2; exit 1; }
    ;;
base)
    need podman runc
    make_base
    ;;
build)
    need podman runc
    make_base
    tag=${1:-optd:latest}
    # --network host: the build stage installs packages with apt-get.
    # --format docker: the OCI image format has no HEALTHCHECK.
    pm build --pull=never --network host --layers --format docker -t "$tag" -f "$repo/deploy/Dockerfile" "$repo"
    ;;
podman)
    pm "$@"
    ;;
*)
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
