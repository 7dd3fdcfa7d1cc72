#!/bin/sh
# Makes sure $1 (default clang) can build a libFuzzer program: installs clang
# and its runtime libraries (libFuzzer, ASan, UBSan) with apt-get when run as
# root, or names them otherwise. Exit status 0 when it can.
set -eu
CC=${1:-clang}
probe() {
    tmp=$(mktemp -d)
    printf 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n) { (void)d; (void)n; return 0; }\n' >"$tmp/p.c"
    ok=1
    "$CC" -fsanitize=fuzzer,address,undefined "$tmp/p.c" -o "$tmp/p" >/dev/null 2>&1 || ok=0
    rm -rf "$tmp"
    [ "$ok" = 1 ]
}
command -v "$CC" >/dev/null 2>&1 && probe && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "make fuzz needs clang with libFuzzer: sudo apt-get install clang libclang-rt-dev" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq clang
# The runtimes come in libclang-rt-<major>-dev (Debian 12: 14).
major=$(clang --version | sed -n 's/.*clang version \([0-9]*\).*/\1/p' | head -1)
probe || apt-get install -y -qq "libclang-rt-$major-dev" || apt-get install -y -qq libclang-rt-dev
probe || { echo "clang cannot link -fsanitize=fuzzer even after installing" >&2; exit 1; }
