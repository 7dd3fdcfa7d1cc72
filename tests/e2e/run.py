#!/usr/bin/env python3
"""Runs optd's end-to-end tests against the real binary (env OPTD_BIN, default
build/optd under the repository root): every test_*.py here, or the modules,
classes or tests named (test_steps.StepTests.test_if_match); what it prints
and returns is optdtest.main's."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "lib"))
import optdtest  # noqa: E402

if __name__ == "__main__":
    sys.exit(optdtest.main(sys.argv[1:], HERE))
