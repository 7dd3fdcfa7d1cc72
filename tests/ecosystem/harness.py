"""Shared pieces of the ecosystem tests: the repository's paths, the real
daemon on a free loopback port with a temporary database, and skips for what
this machine lacks. The Python client is imported from clients/python."""

import atexit
import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CLIENT_DIR = os.path.join(REPO, "clients", "python")
if CLIENT_DIR not in sys.path:
    sys.path.insert(0, CLIENT_DIR)

SYSTEM_PYTHON = "/usr/bin/python3"


_SNAPSHOT = {}
_LIVE = set()  # daemons started and not yet cleaned up: killed at exit whatever happened


def optd_bin():
    """The daemon binary (env OPTD_BIN, default build/optd), copied once per run
    into a temporary directory: a rebuild of the working tree meanwhile (the
    linker rewriting the file) cannot break the tests that follow."""
    path = os.environ.get("OPTD_BIN", "build/optd")
    path = path if os.path.isabs(path) else os.path.join(REPO, path)
    if path in _SNAPSHOT:
        return _SNAPSHOT[path]
    if not os.path.exists(path):
        return path
    d = tempfile.mkdtemp(prefix="optd-bin-")
    copy = os.path.join(d, "optd")
    for _ in range(50):
        try:
            shutil.copy2(path, copy)
            if os.access(copy, os.X_OK) and subprocess.run([copy, "--version"], capture_output=True).returncode == 0:
                break
        except OSError:
            pass
        time.sleep(0.2)  # being relinked: try again
    atexit.register(shutil.rmtree, d, True)
    _SNAPSHOT[path] = copy
    return copy


@atexit.register
def _kill_leftovers():
    for d in list(_LIVE):
        d.cleanup()


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def have(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def wait_http(port, path="/healthz", timeout=15.0, proc=None, want=200):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            r = c.getresponse()
            r.read()
            c.close()
            if r.status == want:
                return True
        except OSError:
            pass
        time.sleep(0.03)
    return False


class Daemon:
    """One optd process with its own temporary database directory. ``port``
    is kept across restart(), so clients can reconnect to the same URL."""

    def __init__(self, args=(), env=None, binary=None, cmd_prefix=(), db=None, port=None):
        self.args = list(args)
        self.env = dict(env or {})
        self.binary = binary or optd_bin()
        self.cmd_prefix = list(cmd_prefix)
        self.tmp = tempfile.mkdtemp(prefix="optd-eco-")
        self.db = db or os.path.join(self.tmp, "optd.db")
        self.port = port
        self.proc = None
        self.log_path = os.path.join(self.tmp, "optd.log")

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def start(self, timeout=15.0):
        if not os.path.exists(self.binary):
            raise unittest.SkipTest("no daemon binary at %s (run make)" % self.binary)
        for attempt in range(3):
            fixed = self.port is not None
            if not fixed:
                self.port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("OPTD_")}
            env.update(self.env)
            cmd = self.cmd_prefix + [self.binary, "--listen", "127.0.0.1:%d" % self.port,
                                     "--db", self.db, "--log-level", "quiet"] + self.args
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, env=env)
            _LIVE.add(self)
            if wait_http(self.port, timeout=timeout, proc=self.proc):
                return self
            self.kill()
            if fixed or "in use" not in self.log():
                break
            self.port = None
        raise AssertionError("optd did not start: %s" % self.log())

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-3000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout=10.0):
        """SIGTERM; returns the exit status (kills after timeout)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def cleanup(self):
        self.kill()
        _LIVE.discard(self)
        shutil.rmtree(self.tmp, ignore_errors=True)


def raw(port, method, path, body=None, headers=None, timeout=10):
    """One raw HTTP exchange -> (status, headers dict (lower-case names), body bytes)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        c.close()


def raw_json(port, method, path, obj=None, headers=None):
    h = dict(headers or {})
    body = None
    if obj is not None:
        body = json.dumps(obj).encode()
        h.setdefault("Content-Type", "application/json")
    st, hd, data = raw(port, method, path, body, h)
    try:
        parsed = json.loads(data) if data else None
    except ValueError:
        parsed = None
    return st, hd, parsed


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
