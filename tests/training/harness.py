"""Harness for the training-feature tests: build/optd (env OPTD_BIN) on a
free loopback port with a temp --db per test class (the Daemon of
tests/lib/optdtest.py), and HTTP to it with http.client (keep-alive, statuses
and headers exactly visible). Standard library only."""

import gzip
import http.client
import json
import os
import sys
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "lib"))
import optdtest  # noqa: E402
from optdtest import f32  # noqa: E402,F401 (the tests import it from here)


def uniq(prefix="s"):
    return optdtest.uniq(prefix, 10)


def rel_err(got, ref, floor):
    return abs(got - ref) / max(abs(ref), floor)


# How the replays of torch's reference data (test_reference.py,
# test_groups.py) compare: test_optim.c's rule, TOL relative with a floor of
# ULP_ALLOWANCE rounding units (UNIT) of the vector's largest element; lr to
# LR_TOL.
TOL = {"float64": 1e-12, "float32": 1e-5}
UNIT = {"float64": 2.0 ** -53, "float32": 2.0 ** -24}
ULP_ALLOWANCE = 16.0
LR_TOL = 1e-15


def ulp_floor(dtype, big):
    """rel_err's floor for a vector whose largest |element| is big."""
    return ULP_ALLOWANCE * UNIT[dtype] * big / TOL[dtype]


def load_reference(filename):
    """data/filename, a gzipped JSON written by gen_reference.py."""
    with gzip.open(os.path.join(HERE, "data", filename), "rb") as f:
        return json.loads(f.read().decode())


class Worst(dict):
    """The largest deviation seen by key, with where it was seen: printed
    when a replay's test class ends."""

    def note(self, key, value, where):
        if value > self.get(key, (-1.0, ""))[0]:
            self[key] = (value, where)


def add_case_tests(cls, cases):
    """One test_<name> on cls for each reference case, calling cls.replay(case)."""
    def make(case):
        def test(self):
            self.replay(case)
        test.__doc__ = "%s vs torch" % case["name"]
        return test
    for case in cases:
        setattr(cls, "test_%s" % case["name"], make(case))


class Resp(optdtest.Reply):
    """A reply; json is None for an empty body."""

    @property
    def json(self):
        return super().json if self.body else None


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
                resp = Resp(method, path, r.status, r.reason, r.getheaders(), data)
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


class Daemon(optdtest.Daemon):
    tmp_prefix = "optd-training-"
    default_args = ("--log-level", "quiet")

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
    errors = optdtest.run_threads(len(fns), lambda i: fns[i]())
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
