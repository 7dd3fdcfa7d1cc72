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
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))


def _iter(suite):
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            yield from _iter(t)
        else:
            yield t


def main(argv):
    sys.path.insert(0, HERE)
    names = [a for a in argv if not a.startswith("-")]
    loader = unittest.TestLoader()
    if names:
        suite = loader.loadTestsFromNames(names)
    else:
        suite = loader.discover(HERE, pattern="test_*.py", top_level_dir=HERE)
    ran = {t.id() for t in _iter(suite) if t is not None}  # before run() releases them
    started = time.time()
    verbosity = 1 if "-q" in argv else 2
    result = unittest.TextTestRunner(stream=sys.stdout, verbosity=verbosity).run(suite)
    sys.stdout.flush()
    sys.stderr.flush()
    failed_ids = {t.id() for t, _ in result.failures + result.errors}
    failed_ids |= {t.id() for t in result.unexpectedSuccesses}
    skipped = len(result.skipped)
    passed = max(result.testsRun - len(failed_ids & ran) - skipped - len(result.expectedFailures), 0)
    line = "%d passed, %d failed" % (passed, len(failed_ids))
    if skipped:
        line += ", %d skipped" % skipped
    print("(%.1f s)" % (time.time() - started))
    print(line)
    sys.stdout.flush()
    return 1 if failed_ids or not result.testsRun else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
