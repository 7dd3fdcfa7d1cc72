"""Shared pieces of the ecosystem tests: the repository's paths, the real
daemon on a free loopback port with a temporary database (the Daemon of
tests/lib/optdtest.py), and skips for what this machine lacks. The Python client is imported from clients/python."""

import importlib.util
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CLIENT_DIR = os.path.join(REPO, "clients", "python")
if CLIENT_DIR not in sys.path:
    sys.path.insert(0, CLIENT_DIR)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "lib"))
import optdtest  # noqa: E402
from optdtest import HAPROXY, free_port, run_threads, wait_http  # noqa: E402,F401 (the tests import them from here)

SYSTEM_PYTHON = "/usr/bin/python3"


def have(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class Daemon(optdtest.Daemon):
    """One optd process (a copy of the binary taken once per run) with its own
    temporary database directory. ``port`` is kept across restarts, so
    clients can reconnect to the same URL."""

    tmp_prefix = "optd-eco-"
    default_args = ("--log-level", "quiet")
    keep_port = True
    snapshot = True

    def start(self, timeout=20.0):
        if not os.path.exists(self.binary):
            raise unittest.SkipTest("no daemon binary at %s (run make)" % self.binary)
        return super().start(timeout)


def raw(port, method, path, body=None, headers=None, timeout=10):
    """One raw HTTP exchange -> (status, headers dict (lower-case names), body bytes)."""
    r = optdtest.request(port, method, path, body, headers, timeout)
    return r.status, {k.lower(): v for k, v in r.headers}, r.body


class DaemonCase(unittest.TestCase):
    """A test class with one daemon for all its tests (``cls.d``, ``cls.url``)."""

    daemon_args = ()
    daemon_env = None

    @classmethod
    def setUpClass(cls):
        cls.d = Daemon(cls.daemon_args, cls.daemon_env)
        cls.addClassCleanup(cls.d.cleanup)  # runs even when setUpClass fails
        cls.d.start()
        cls.url = cls.d.url

    @classmethod
    def tearDownClass(cls):
        pass


def is_unimplemented(exc):
    """True for the replies a daemon without the training features gives
    (404 no such path, 422 for an unknown field or hyperparameter)."""
    import optd
    if isinstance(exc, optd.NotFound) and "path" in exc.message:
        return True
    if isinstance(exc, optd.Invalid) and exc.code in ("invalid", "bad_hyperparam"):
        return True
    return False
