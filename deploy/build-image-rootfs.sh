#!/bin/sh
# Builds the root file system of the optd container image (deploy/Dockerfile)
# without Docker, into a directory:
#
#   sh deploy/build-image-rootfs.sh [--no-deps] [--no-libs] DEST
#
# It performs the Dockerfile's steps on this (Debian bookworm) machine:
#   build stage    the -dev packages (installed when root), then `make clean &&
#                  make build/optd && strip` in a copy of the source tree (the
#                  working tree's build/ is left alone);
#   runtime stage  the runtime libraries (installed when root), the optd user
#                  and group (uid/gid 10001) in DEST/etc/passwd and group,
#                  DEST/data owned by it (the VOLUME), the binary in
#                  DEST/usr/local/bin/optd, the image's environment in
#                  DEST/etc/optd.env.
# Unless --no-libs, the binary's shared libraries, the dynamic loader and bash
# (for the HEALTHCHECK) are copied in too, so that the directory runs as the
# container would:
#
#   chroot --userspec=10001:10001 DEST /usr/bin/env $(cat DEST/etc/optd.env) /usr/local/bin/optd
#
# Environment: MAKE (default make), KEEP_BUILD=1 keeps the temporary build tree.
set -eu

BUILD_PKGS="build-essential pkg-config libmicrohttpd-dev libcjson-dev libsqlite3-dev libcurl4-openssl-dev libdragonbox-dev python3"
RUNTIME_PKGS="libmicrohttpd12 libcjson1 libsqlite3-0 libcurl4"
OPTD_UID=10001
OPTD_GID=10001
# The Dockerfile's ENV, one KEY=VALUE a line.
IMAGE_ENV="OPTD_DB=/data/optd.db
OPTD_LISTEN=0.0.0.0:8080"

deps=1
libs=1
dest=""
for a in "$@"; do
    case "$a" in
    --no-deps) deps=0 ;;
    --no-libs) libs=0 ;;
    -h | --help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "build-image-rootfs: unknown option $a" >&2; exit 2 ;;
    *) dest="$a" ;;
    esac
done
[ -n "$dest" ] || { echo "usage: $0 [--no-deps] [--no-libs] DEST" >&2; exit 2; }

repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
[ "$dest" != / ] || { echo "build-image-rootfs: refusing DEST=/" >&2; exit 2; }

install_pkgs() {  # apt-get install what is missing, as root; else name it
    missing=""
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
    done
    [ -z "$missing" ] && return 0
    if [ "$deps" -eq 0 ] || [ "$(id -u)" -ne 0 ]; then
        echo "build-image-rootfs: missing Debian packages:$missing" >&2
        echo "install them with: sudo apt-get install$missing" >&2
        exit 1
    fi
    echo "build-image-rootfs: installing:$missing" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
}

# --- build stage -------------------------------------------------------------
install_pkgs $BUILD_PKGS
src=$(mktemp -d "${TMPDIR:-/tmp}/optd-image-src.XXXXXX")
trap '[ "${KEEP_BUILD:-0}" = 1 ] || rm -rf "$src"' EXIT
# COPY . . (without the host's build tree and git metadata)
(cd "$repo" && tar --exclude=./build --exclude=./.git -cf - .) | (cd "$src" && tar -xf -)
# The image's build, whatever make this script runs under (make asan exports
# SAN=1, which would build elsewhere): a clean environment for make.
unset SAN B MAKEFLAGS MAKELEVEL MFLAGS CFLAGS LDFLAGS
${MAKE:-make} -C "$src" clean >/dev/null
${MAKE:-make} -C "$src" -j"$(nproc 2>/dev/null || echo 2)" build/optd
strip "$src/build/optd"

# --- runtime stage -----------------------------------------------------------
install_pkgs $RUNTIME_PKGS
mkdir -p "$dest/usr/local/bin" "$dest/etc" "$dest/data" "$dest/tmp" "$dest/dev"
chmod 1777 "$dest/tmp"
install -m 0755 "$src/build/optd" "$dest/usr/local/bin/optd"
install -m 0755 "$repo/deploy/healthcheck.sh" "$dest/usr/local/bin/optd-healthcheck"

printf 'root:x:0:0:root:/root:/bin/bash\noptd:x:%d:%d::/data:/usr/sbin/nologin\n' \
    "$OPTD_UID" "$OPTD_GID" >"$dest/etc/passwd"
printf 'root:x:0:\noptd:x:%d:\n' "$OPTD_GID" >"$dest/etc/group"
printf '%s\n' "$IMAGE_ENV" >"$dest/etc/optd.env"
chmod 0750 "$dest/data"
if [ "$(id -u)" -eq 0 ]; then
    chown "$OPTD_UID:$OPTD_GID" "$dest/data"
fi

copy_with_libs() {  # copies a binary's shared libraries (and the loader) into DEST
    ldd "$1" | awk '/=> \// { print $3 } /^[ \t]*\// { print $1 }' | while read -r lib; do
        [ -e "$lib" ] || continue
        mkdir -p "$dest$(dirname "$lib")"
        cp -L "$lib" "$dest$lib"
    done
}
if [ "$libs" -eq 1 ]; then
    copy_with_libs "$dest/usr/local/bin/optd"
    mkdir -p "$dest/usr/bin" "$dest/bin"
    cp -L "$(command -v bash)" "$dest/usr/bin/bash"
    copy_with_libs "$(command -v bash)"
    cp -L "$(command -v env)" "$dest/usr/bin/env"
    copy_with_libs "$(command -v env)"
    [ -e "$dest/bin/bash" ] || ln -s ../usr/bin/bash "$dest/bin/bash"
    # Debian's usrmerge: /lib and /lib64 are links into /usr.
    for d in lib lib64; do
        if [ -d "$dest/$d" ] && [ ! -L "$dest/$d" ] && [ -L "/$d" ]; then
            mkdir -p "$dest/usr/$d"
            cp -a "$dest/$d/." "$dest/usr/$d/"
            rm -rf "${dest:?}/$d"
            ln -s "usr/$d" "$dest/$d"
        fi
    done
fi

echo "build-image-rootfs: $dest is ready:"
echo "  chroot --userspec=$OPTD_UID:$OPTD_GID $dest /usr/bin/env $(echo $IMAGE_ENV) /usr/local/bin/optd"
