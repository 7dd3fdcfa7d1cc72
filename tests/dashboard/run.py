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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "lib"))
import optdtest  # noqa: E402

if __name__ == "__main__":
    sys.exit(optdtest.main(sys.argv[1:], HERE))
