#!/usr/bin/env python3
"""Runs optd's training-feature tests (worker rounds, lr schedules, clipping,
forks, validation, and the rounds/s figure) against build/optd (env OPTD_BIN):
every test_*.py here, or the modules, classes or tests named
(test_forks.ForkTests.test_fork_evolves); what it prints and returns is
optdtest.main's."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "lib"))
import optdtest  # noqa: E402

if __name__ == "__main__":
    sys.exit(optdtest.main(sys.argv[1:], HERE))
