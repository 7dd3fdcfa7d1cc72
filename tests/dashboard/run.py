#!/usr/bin/env python3
"""Runs the dashboard tests (headless Chromium) and the /history tests against
the real binary (env OPTD_BIN, default build/optd under the repository root).

    python3 tests/dashboard/run.py                    # everything
    python3 tests/dashboard/run.py test_history       # one module
    OPTD_SCREENSHOT=docs/dashboard.png python3 tests/dashboard/run.py test_dashboard.DashboardTests.test_screenshot

Browser tests are skipped when chromium is not installed. The last line of
output is `N passed, N failed` (`, N skipped` when any); the exit status is
non-zero when anything failed."""

import os
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv):
    sys.path.insert(0, HERE)
    names = [a for a in argv if not a.startswith("-")]
    loader = unittest.TestLoader()
    suite = loader.loadTestsFromNames(names) if names else loader.discover(HERE, pattern="test_*.py",
                                                                           top_level_dir=HERE)
    ids = {t.id() for t in _iter(suite)}  # before run(), which drops them
    started = time.time()
    result = unittest.TextTestRunner(stream=sys.stdout, verbosity=1 if "-q" in argv else 2).run(suite)
    sys.stdout.flush()
    sys.stderr.flush()

    # A test counts once however many of its subtests failed; an error in a
    # class fixture counts as one failure of its own.
    failed = {_owner(t).id() for t, _ in result.failures + result.errors}
    failed |= {_owner(t).id() for t in result.unexpectedSuccesses}
    skipped = len({_owner(t).id() for t, _ in result.skipped} - failed)
    passed = max(result.testsRun - len(failed & ids) - skipped - len(result.expectedFailures), 0)
    line = "%d passed, %d failed" % (passed, len(failed))
    if skipped:
        line += ", %d skipped" % skipped
    print("(%.1f s)" % (time.time() - started))
    print(line)
    sys.stdout.flush()
    return 1 if failed or not result.testsRun else 0


def _owner(test):
    return getattr(test, "test_case", test)


def _iter(suite):
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            yield from _iter(t)
        else:
            yield t


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
