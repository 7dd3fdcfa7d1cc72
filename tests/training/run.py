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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "lib"))
import optdtest  # noqa: E402

if __name__ == "__main__":
    sys.exit(optdtest.main(sys.argv[1:], HERE))
