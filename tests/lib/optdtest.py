"""What every Python test suite of optd shares: the daemon under test (env
OPTD_BIN, default build/optd) started on a free loopback port with a database
in a temporary directory, one HTTP exchange with it, the float codecs, and the
unittest runner that ends with the line `N passed, N failed[, N skipped]`.
Standard library only. Each suite imports this through a sys.path entry made
relative to its own file, and keeps its own helpers in its own harness."""

import atexit
import http.client
import json
import os
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SNAPSHOT = {}  # OPTD_BIN path -> its copy for this process
_LIVE = set()  # daemons started and not yet cleaned up: killed at exit whatever happened


def optd_bin(snapshot=False):
    """The daemon binary: $OPTD_BIN (relative to the repository root), default
    build/optd. With snapshot, a copy taken on the first call of the process
    and returned ever after, so that a rebuild meanwhile (the linker rewriting
    the file) cannot break the starts and restarts that follow."""
    path = os.environ.get("OPTD_BIN", "build/optd")
    path = path if os.path.isabs(path) else os.path.join(REPO, path)
    if not snapshot:
        return path
    if path in _SNAPSHOT:
        return _SNAPSHOT[path]
    if not os.path.exists(path):
        return path
    d = tempfile.mkdtemp(prefix="optd-bin-")
    atexit.register(shutil.rmtree, d, True)
    copy = os.path.join(d, "optd")
    for _ in range(50):
        try:
            shutil.copy2(path, copy)
            if os.access(copy, os.X_OK) and subprocess.run([copy, "--version"], capture_output=True).returncode == 0:
                break
        except OSError:
            pass
        time.sleep(0.2)  # being relinked: try again
    _SNAPSHOT[path] = copy
    return copy


def free_port():
    """A loopback TCP port that was free a moment ago (a start retries when
    another process took it meanwhile)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_http(port, path="/healthz", timeout=15.0, proc=None, want=200):
    """True once GET path on the loopback port answers want; False after
    timeout seconds, or as soon as proc (a Popen) has exited."""
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
        time.sleep(0.02)
    return False


# -- values -----------------------------------------------------------------

def f32(x):
    """The float32 nearest to x, as a Python float (exact)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def pack(dtype, values):
    """values as the little-endian binary body of dtype float32 or float64."""
    return struct.pack("<%d%s" % (len(values), "f" if dtype == "float32" else "d"), *values)


def unpack(dtype, data):
    w = 4 if dtype == "float32" else 8
    if len(data) % w:
        raise AssertionError("binary body of %d bytes is not a whole number of %s" % (len(data), dtype))
    return list(struct.unpack("<%d%s" % (len(data) // w, "f" if dtype == "float32" else "d"), data))


def uniq(prefix="s", digits=12):
    """A session name no other test uses."""
    return "%s-%s" % (prefix, uuid.uuid4().hex[:digits])


def sqlite_file(path, *sql):
    """Runs the statements sql on the SQLite file path (created when absent)
    and commits, as another application would make its file; path."""
    con = sqlite3.connect(path)
    try:
        for stmt in sql:
            con.execute(stmt)
        con.commit()
    finally:
        con.close()
    return path


def run_threads(n, fn, timeout=None):
    """Runs fn(0) .. fn(n - 1), each in its own thread, and waits for each (up
    to timeout seconds, None: as long as it takes); the exceptions they
    raised, so that a failure in a thread fails the test that started it."""
    errors = []

    def wrap(i):
        try:
            fn(i)
        except BaseException as e:  # noqa: BLE001 (reported to the caller)
            errors.append(e)

    ts = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
    return errors


# -- HTTP -------------------------------------------------------------------

class Reply:
    """A finished HTTP exchange. headers is the list of (name, value) pairs as
    received; body is bytes."""

    strict = True  # json rejects NaN and Infinity, which are not JSON

    def __init__(self, method, path, status, reason, headers, body):
        self.method, self.path = method, path
        self.status, self.reason = status, reason
        self.headers = headers
        self.body = body

    def header(self, name):
        """The value of header name (any case), or None."""
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    @property
    def content_type(self):
        return (self.header("Content-Type") or "").split(";")[0].strip().lower()

    @property
    def json(self):
        """The body parsed as JSON; AssertionError naming the exchange if it is not."""
        def constant(c):
            raise ValueError("%s is not JSON" % c)
        try:
            return json.loads(self.body.decode("utf-8"), parse_constant=constant if self.strict else None)
        except Exception as e:  # noqa: BLE001
            raise AssertionError("%s %s -> %d: body is not JSON (%s): %r"
                                 % (self.method, self.path, self.status, e, self.body[:300]))

    @property
    def code(self):
        """error.code of an error reply, or None."""
        try:
            return self.json["error"]["code"]
        except Exception:  # noqa: BLE001
            return None

    def __repr__(self):
        return "%s %s -> %d %s %r" % (self.method, self.path, self.status, dict(self.headers), self.body[:400])


def request(port, method, path, body=None, headers=None, timeout=30, conn=None, reply=Reply):
    """One request to the loopback port, on conn (left open) or on a
    connection of its own (closed after); a reply (Reply or a subclass)."""
    own = conn is None
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout) if own else conn
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        return reply(method, path, r.status, r.reason, r.getheaders(), data)
    finally:
        if own:
            c.close()


# -- a router in front of daemons -------------------------------------------

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
HAPROXY_CFG = os.path.join(REPO, "deploy", "haproxy.cfg")


def haproxy_env(router_port, shard_ports):
    """The environment deploy/haproxy.cfg reads: where the router listens
    and the three shards' loopback ports."""
    env = dict(os.environ, OPTD_ROUTER_BIND="127.0.0.1:%d" % router_port)
    for i, port in enumerate(shard_ports):
        env["OPTD_SHARD%d" % i] = "127.0.0.1:%d" % port
    return env


def start_haproxy(env, log=None):
    """HAProxy in the foreground with deploy/haproxy.cfg and env (see
    haproxy_env), its output to the file log (else discarded); the Popen,
    once /router-healthz answers. AssertionError when it does not."""
    p = subprocess.Popen([HAPROXY, "-db", "-f", HAPROXY_CFG], env=env, stdin=subprocess.DEVNULL,
                         stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
    if not wait_http(int(env["OPTD_ROUTER_BIND"].rsplit(":", 1)[1]), "/router-healthz", proc=p):
        stop_process(p)
        raise AssertionError("haproxy did not become ready")
    return p


def stop_process(p, timeout=10):
    """Stops p with SIGTERM, or SIGKILL when it outlives timeout seconds."""
    if p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout)


# -- the daemon -------------------------------------------------------------

class Daemon:
    """One optd process. Its database lives in a temporary directory that
    outlives the process: kill() or stop() it and start() it again on the same
    data. Each start logs to a file of its own (log() gives the last one's
    end). The environment is the test's without any OPTD_* variable, plus env.
    Suites subclass it for their HTTP helpers; these class attributes tune it."""

    tmp_prefix = "optd-test-"
    default_args = ()  # flags before args on every start
    keep_port = False  # every start after the first on the same port (clients keep their URL)
    snapshot = False  # run optd_bin(snapshot=True) rather than OPTD_BIN itself

    def __init__(self, args=(), env=None, db=None, tmp=None):
        self.args = list(args)
        self.env = dict(env or {})
        self.tmp = tmp or tempfile.mkdtemp(prefix=self.tmp_prefix)
        self.db = db or os.path.join(self.tmp, "optd.db")
        self.proc = None
        self.port = None
        self.starts = 0
        self.log_path = None
        self.expected_exit = False  # the last exit was asked for (kill, stop)

    @property
    def binary(self):
        return optd_bin(self.snapshot)

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def environment(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPTD_")}
        env.update(self.env)
        return env

    def spawn(self):
        """Starts the process without waiting for it to serve; the Popen."""
        if not (self.keep_port and self.port):
            self.port = free_port()
        self.starts += 1
        self.log_path = os.path.join(self.tmp, "optd-%d.log" % self.starts)
        cmd = ([self.binary, "--listen", "127.0.0.1:%d" % self.port, "--db", self.db]
               + list(self.default_args) + self.args)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=self.environment())
        self.expected_exit = False
        _LIVE.add(self)
        return self.proc

    def start(self, timeout=20.0):
        """Starts the process and waits until /healthz answers 200; self.
        AssertionError with the log when it exits or does not answer in time
        (a port taken meanwhile is retried on another, twice)."""
        if not os.path.exists(self.binary):
            raise AssertionError("daemon binary %s does not exist (run make)" % self.binary)
        for _ in range(3):
            fixed = self.keep_port and self.port is not None
            self.spawn()
            if wait_http(self.port, timeout=timeout, proc=self.proc):
                return self
            if self.alive():
                self.kill()
                raise AssertionError("optd did not answer /healthz within %.0f s: %s" % (timeout, self.log()))
            if fixed or "in use" not in self.log():
                break
            self.port = None
        raise AssertionError("optd exited with %s during start-up: %s" % (self.proc.returncode, self.log()))

    def restart(self):
        """kill -9, then start again on the same database."""
        self.kill()
        return self.start()

    def log(self):
        """The end of the last start's log."""
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-4000:].decode("utf-8", "replace")
        except (OSError, TypeError):
            return ""

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """kill -9 and reap."""
        if self.alive():
            self.expected_exit = True
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, sig=signal.SIGTERM, timeout=20.0):
        """Sends sig (SIGTERM) and waits up to timeout seconds; the exit
        status, or None when it did not exit in time (then it is killed)."""
        if not self.alive():
            return self.proc.returncode if self.proc else None
        self.expected_exit = True
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def cleanup(self):
        """kill -9 and remove the temporary directory (again is harmless)."""
        self.kill()
        _LIVE.discard(self)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def conn(self, timeout=30):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)


@atexit.register
def _kill_leftovers():
    for d in list(_LIVE):
        d.cleanup()


# -- the runner -------------------------------------------------------------

def summary(passed, failed, skipped, started):
    """Prints the time since started and the closing line CI reads."""
    line = "%d passed, %d failed" % (passed, failed)
    if skipped:
        line += ", %d skipped" % skipped
    print("(%.1f s)" % (time.time() - started))
    print(line)
    sys.stdout.flush()


def main(argv, here):
    """Runs the unittest modules test_*.py of directory here, or the modules,
    classes or tests named in argv (-q: one character a test). The last line
    is `N passed, N failed` (`, N skipped` when any); the exit status is 1
    when anything failed or nothing ran, else 0."""
    sys.path.insert(0, here)
    names = [a for a in argv if not a.startswith("-")]
    loader = unittest.TestLoader()
    if names:
        suite = loader.loadTestsFromNames(names)
    else:
        suite = loader.discover(here, pattern="test_*.py", top_level_dir=here)
    ids = {t.id() for t in _iter(suite)}  # before run(), which drops them
    started = time.time()
    result = unittest.TextTestRunner(stream=sys.stdout, verbosity=1 if "-q" in argv else 2).run(suite)
    sys.stdout.flush()
    sys.stderr.flush()

    # A test counts once however many of its subtests failed; an error outside
    # any test (a class fixture) counts as one failure of its own.
    failed = {_owner(t).id() for t, _ in result.failures + result.errors}
    failed |= {_owner(t).id() for t in result.unexpectedSuccesses}
    skipped = len({_owner(t).id() for t, _ in result.skipped} - failed)
    passed = max(result.testsRun - len(failed & ids) - skipped - len(result.expectedFailures), 0)
    summary(passed, len(failed), skipped, started)
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
