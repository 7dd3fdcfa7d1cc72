#!/usr/bin/env python3
"""Runs optd's training-feature tests (worker rounds, lr schedules, clipping,
forks, validation, and the rounds/s figure) against build/optd (env OPTD_BIN).

    python3 tests/training/run.py                 # everything
    python3 tests/training/run.py test_rounds     # one module
    python3 tests/training/run.py test_forks.ForkTests.test_fork_evolves

The last line of output is `N passed, N failed` (`, N skipped` when any); the
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
    ids = {t.id() for t in _iter(suite)}
    started = time.time()
    result = unittest.TextTestRunner(stream=sys.stdout, verbosity=2).run(suite)
    sys.stdout.flush()
    sys.stderr.flush()
    failed = set()
    for test, _ in result.failures + result.errors:
        failed.add(getattr(test, "test_case", test).id())
    for test in result.unexpectedSuccesses:
        failed.add(test.id())
    skipped = len({t.id() for t, _ in result.skipped} - failed)
    passed = max(result.testsRun - len(failed & ids) - skipped - len(result.expectedFailures), 0)
    line = "%d passed, %d failed" % (passed, len(failed))
    if skipped:
        line += ", %d skipped" % skipped
    print("(%.1f s)" % (time.time() - started))
    print(line)
    return 1 if failed or not result.testsRun else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
