#!/bin/bash
# Runs README.md's commands that are not the curl cookbook's (those are in
# curl_cookbook.sh), exactly as written there: the Python client's install
# on Debian 12. They run in a scratch directory holding a copy of
# clients/python (so the build leaves nothing in the work tree).
# tests/ecosystem/test_cookbook.py runs this and checks that every command
# of README.md is here or in curl_cookbook.sh. Prints "readme ok".
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$(mktemp -d)"
scratch=$PWD
trap 'rm -rf "$scratch"' EXIT
mkdir clients
cp -r "$repo/clients/python" clients/python
rm -rf clients/python/build clients/python/*.egg-info

fail() { echo "readme: FAIL: $*" >&2; exit 1; }

# --- Python, containers, many machines: the client on Debian 12
python3 -m venv --system-site-packages .venv
.venv/bin/pip install --no-build-isolation --no-index ./clients/python
out=$(.venv/bin/python -c 'import optd; print(optd.__version__)')
[ "$out" = "$(sed -n 's/^version = "\(.*\)"/\1/p' clients/python/pyproject.toml)" ] || fail "installed optd says $out"
# installed, not merely on the path: it imports from the venv's site-packages
(cd / && "$scratch/.venv/bin/python" -c 'import optd, sys; sys.exit(0 if "site-packages" in optd.__file__ else 1)') \
    || fail "optd is not installed in the venv"

echo "readme ok"
