#!/usr/bin/env python3
"""Runs the ecosystem tests (Python client, torch optimizer, OpenAPI document,
container root fs, Kubernetes manifests, sharding behind HAProxy, curl
cookbook) against the real daemon (env OPTD_BIN, default build/optd).

    /usr/bin/python3 tests/ecosystem/run.py                 # everything
    /usr/bin/python3 tests/ecosystem/run.py test_client     # one module
    /usr/bin/python3 tests/ecosystem/run.py test_client.RetryTests.test_503

Run with Debian's /usr/bin/python3 (which has python3-torch, -sklearn,
-matplotlib when installed); tests needing what the interpreter lacks are
skipped. The last line is `N passed, N failed` (`, N skipped` when any); the
exit status is non-zero when anything failed."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "lib"))
import optdtest  # noqa: E402

if __name__ == "__main__":
    sys.exit(optdtest.main(sys.argv[1:], HERE))
