#!/usr/bin/env python3
"""Runs optd's end-to-end tests against the real binary (env OPTD_BIN, default
build/optd under the repository root).

    python3 tests/e2e/run.py                      # everything
    python3 tests/e2e/run.py test_steps           # one module
    python3 tests/e2e/run.py test_steps.StepTests.test_if_match

The last line of output is `N passed, N failed` (`, N skipped` when any); the
exit status is non-zero when anything failed."""

import os
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv):
    sys.path.insert(0, HERE)
    names = [a for a in argv if not a.startswith("-")]
    quiet = "-q" in argv
    loader = unittest.TestLoader()
    if names:
        suite = loader.loadTestsFromNames(names)
    else:
        suite = loader.discover(HERE, pattern="test_*.py", top_level_dir=HERE)

    all_ids = {t.id() for t in _iter(suite)}
    started = time.time()
    runner = unittest.TextTestRunner(stream=sys.stdout, verbosity=1 if quiet else 2)
    result = runner.run(suite)
    sys.stdout.flush()
    sys.stderr.flush()

    # A test counts once however many of its phases or subtests failed; an
    # error outside any test (a class fixture) counts as one failure of its own.
    failed_ids = set()
    for test, _ in result.failures + result.errors + [(t, None) for t in result.unexpectedSuccesses]:
        failed_ids.add(_owner(test).id())
    skipped = len({_owner(t).id() for t, _ in result.skipped} - failed_ids)
    failed = len(failed_ids)
    passed = max(result.testsRun - len(failed_ids & all_ids) - skipped - len(result.expectedFailures), 0)
    line = "%d passed, %d failed" % (passed, failed)
    if skipped:
        line += ", %d skipped" % skipped
    print("(%.1f s)" % (time.time() - started))
    print(line)
    sys.stdout.flush()
    return 1 if failed or not result.testsRun else 0


def _owner(test):
    """The test case a subtest belongs to."""
    return getattr(test, "test_case", test)


def _iter(suite):
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            yield from _iter(t)
        else:
            yield t


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
