"""Harness for the training-feature tests: starts build/optd (env OPTD_BIN)
on a free loopback port with a temp --db per test class, and talks HTTP to it
with http.client (keep-alive, statuses and headers exactly visible). Standard
library only."""

import http.client
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import unittest
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def optd_bin():
    path = os.environ.get("OPTD_BIN", "build/optd")
    return path if os.path.isabs(path) else os.path.join(REPO, path)


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def f32(x):
    """The float32 nearest to x, as a Python float (exact)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def uniq(prefix="s"):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:10])


def rel_err(got, ref, floor):
    return abs(got - ref) / max(abs(ref), floor)


class Resp:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def header(self, name):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    @property
    def json(self):
        """The body as strict JSON (NaN, Infinity and inf are not JSON)."""
        if not self.body:
            return None

        def constant(c):
            raise ValueError("%s is not JSON" % c)
        try:
            return json.loads(self.body.decode("utf-8"), parse_constant=constant)
        except ValueError as e:
            raise AssertionError("reply %d is not JSON (%s): %r" % (self.status, e, self.body[:300]))

    @property
    def code(self):
        try:
            return self.json["error"]["code"]
        except Exception:  # noqa: BLE001
            return None

    def __repr__(self):
        return "<%d %r>" % (self.status, self.body[:300])


class Client:
    """One keep-alive connection (reconnects once when the server closed it)."""

    def __init__(self, port, timeout=30):
        self.port, self.timeout = port, timeout
        self.c = None

    def close(self):
        if self.c:
            self.c.close()
            self.c = None

    def request(self, method, path, body=None, headers=None):
        hdrs = dict(headers or {})
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
            hdrs.setdefault("Content-Type", "application/json")
        for attempt in (0, 1):
            if self.c is None:
                self.c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self.c.request(method, path, body=body, headers=hdrs)
                r = self.c.getresponse()
                data = r.read()
                resp = Resp(r.status, r.getheaders(), data)
                if (r.getheader("Connection") or "").lower() == "close":
                    self.close()
                return resp
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt:
                    raise

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def patch(self, path, body=None, **kw):
        return self.request("PATCH", path, body, **kw)

    def put(self, path, body=None, **kw):
        return self.request("PUT", path, body, **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)


class Daemon:
    def __init__(self, args=()):
        self.args = list(args)
        self.tmp = tempfile.mkdtemp(prefix="optd-training-")
        self.db = os.path.join(self.tmp, "optd.db")
        self.proc = None
        self.port = None

    def start(self, timeout=15.0):
        exe = optd_bin()
        if not os.path.exists(exe):
            raise AssertionError("%s does not exist (run make)" % exe)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPTD_")}
        for _ in range(3):
            self.port = free_port()
            self.log_path = os.path.join(self.tmp, "optd.log")
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [exe, "--listen", "127.0.0.1:%d" % self.port, "--db", self.db,
                     "--log-level", "quiet"] + self.args,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
            deadline = time.time() + timeout
            while time.time() < deadline and self.proc.poll() is None:
                try:
                    c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                    c.request("GET", "/healthz")
                    r = c.getresponse()
                    r.read()
                    c.close()
                    if r.status == 200:
                        return self
                except OSError:
                    time.sleep(0.02)
            self.stop()
        raise AssertionError("optd did not start: %s" % self.log())

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-2000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def client(self, timeout=30):
        return Client(self.port, timeout)


class DaemonTest(unittest.TestCase):
    """One daemon per test class (--sync normal: these tests are about
    arithmetic and rounds, not durability, and fsyncs would only slow them)."""

    daemon_args = ("--sync", "normal")

    @classmethod
    def setUpClass(cls):
        cls.d = Daemon(cls.daemon_args).start()
        cls.api = cls.d.client()

    @classmethod
    def tearDownClass(cls):
        cls.api.close()
        cls.d.cleanup()

    def create(self, body, status=201):
        r = self.api.post("/v1/sessions", body)
        self.assertEqual(r.status, status, r)
        return r.json

    def step(self, name, grad, client=None, headers=None, **extra):
        body = dict(extra, grad=grad)
        return (client or self.api).post("/v1/sessions/%s/step" % name, body, headers=headers)

    def params(self, name):
        r = self.api.get("/v1/sessions/%s/params" % name)
        self.assertEqual(r.status, 200, r)
        return r.json

    def assertError(self, r, status, code=None):
        self.assertEqual(r.status, status, r)
        body = r.json
        self.assertIn("error", body, r)
        if code:
            self.assertEqual(body["error"]["code"], code, r)
        self.assertTrue(body["error"].get("message"), r)


def run_threads(fns):
    """Runs each fn in its own thread; re-raises the first exception."""
    errors = []

    def wrap(fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=wrap, args=(fn,)) for fn in fns]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


class Pending(threading.Thread):
    """A request running in its own thread on its own connection; .result()
    joins and returns the Resp (re-raising what the request raised)."""

    def __init__(self, daemon, method, path, body=None, headers=None, delay=0.0, timeout=30):
        super().__init__(daemon=True)
        self.args = (method, path, body, headers)
        self.delay = delay
        self.client = daemon.client(timeout)
        self.resp = self.error = None
        self.t_sent = self.t_done = None
        self.start()

    def run(self):
        try:
            if self.delay:
                time.sleep(self.delay)
            self.t_sent = time.monotonic()
            self.resp = self.client.request(*self.args)
            self.t_done = time.monotonic()
        except BaseException as e:  # noqa: BLE001
            self.error = e
        finally:
            self.client.close()

    def done(self):
        return not self.is_alive()

    def result(self, timeout=30):
        self.join(timeout)
        if self.is_alive():
            raise AssertionError("request %s %s still waiting after %.0f s" % (self.args[0], self.args[1], timeout))
        if self.error:
            raise self.error
        return self.resp
