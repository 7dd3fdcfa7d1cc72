"""Shared harness for optd's end-to-end tests: the real binary on a free
loopback port with a fresh database (the Daemon of tests/lib/optdtest.py),
raw HTTP to it (http.client, so statuses and headers are exactly visible) and
checks of replies against /work/shared/API.md. Standard library only."""

import json
import os
import re
import signal
import socket
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "lib"))
import optdtest  # noqa: E402
from optdtest import f32, free_port, optd_bin, pack, run_threads, sqlite_file, unpack, uniq, wait_http  # noqa: E402,F401 (the tests import them from here)


class Daemon(optdtest.Daemon):
    """One optd process on a database in a temp dir that survives restarts of
    the process (stop/kill then start again), with raw HTTP helpers."""

    tmp_prefix = "optd-e2e-"

    def __init__(self, args=(), env=None, token=None, db=None):
        super().__init__(args, env, db)
        self.token = token  # sent by default as Authorization: Bearer

    def terminate(self, sig=signal.SIGTERM, timeout=10.0):
        """Sends sig and waits up to timeout; returns the exit status (None if it hung, then kills)."""
        return self.stop(sig, timeout)

    # -- HTTP -------------------------------------------------------------
    def request(self, method, path, body=None, json_body=None, headers=None, auth=True,
                conn=None, timeout=30):
        """One request. json_body is serialised with Content-Type application/json
        (unless headers name another); body is sent as given (bytes/str)."""
        hdrs = {}
        if json_body is not None:
            body = json.dumps(json_body).encode()
            hdrs["Content-Type"] = "application/json"
        elif body is not None:
            if isinstance(body, str):
                body = body.encode()
            hdrs["Content-Type"] = "application/json"
        if auth and self.token is not None:
            hdrs["Authorization"] = "Bearer " + self.token
        for k, v in (headers or {}).items():
            for existing in list(hdrs):
                if existing.lower() == k.lower():
                    del hdrs[existing]
            if v is not None:
                hdrs[k] = v
        return optdtest.request(self.port, method, path, body, hdrs, timeout, conn)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, obj=None, **kw):
        return self.request("POST", path, json_body=obj, **kw)

    def raw(self, data, timeout=10.0, shut_write=False):
        """Sends raw bytes on a fresh socket and reads one response.
        Returns (status, headers dict lower-cased, body bytes)."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        try:
            try:
                s.sendall(data)
                if shut_write:
                    s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server may answer (and close) before taking all of it
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            if b"\r\n\r\n" not in buf:
                raise AssertionError("no complete response head, got %r" % buf[:300])
            head, rest = buf.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            hdrs = {}
            for ln in lines[1:]:
                k, _, v = ln.partition(":")
                hdrs[k.strip().lower()] = v.strip()
            n = int(hdrs.get("content-length", "-1"))
            try:
                while n < 0 or len(rest) < n:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    rest += chunk
            except (socket.timeout, ConnectionResetError):
                pass
            return status, hdrs, rest[:n] if n >= 0 else rest
        finally:
            s.close()

    # -- session helpers --------------------------------------------------
    def create(self, name=None, optimizer="sgd", **fields):
        body = {"name": name or uniq(), "optimizer": optimizer}
        body.update(fields)
        r = self.post("/v1/sessions", body)
        if r.status != 201:
            raise AssertionError("creating %r failed: %r" % (body, r))
        return r.json

    def session(self, name):
        r = self.get("/v1/sessions/" + name)
        if r.status != 200:
            raise AssertionError("GET session %s: %r" % (name, r))
        return r.json

    def params(self, name):
        r = self.get("/v1/sessions/%s/params" % name)
        if r.status != 200:
            raise AssertionError("GET params %s: %r" % (name, r))
        return r.json

    def step(self, name, grad, headers=None, expect=200):
        r = self.request("POST", "/v1/sessions/%s/step" % name, json_body={"grad": grad}, headers=headers)
        if expect is not None and r.status != expect:
            raise AssertionError("step on %s expected %d: %r" % (name, expect, r))
        return r


class DaemonTest(unittest.TestCase):
    """A test class sharing one daemon. Subclasses set daemon_args / daemon_env /
    daemon_token. If the daemon dies during a test the test fails and the next
    one gets a fresh daemon."""

    daemon_args = ()
    daemon_env = None
    daemon_token = None
    maxDiff = 4000

    @classmethod
    def setUpClass(cls):
        cls.d = None
        cls.start_error = None
        try:
            cls.d = Daemon(cls.daemon_args, cls.daemon_env, cls.daemon_token)
            cls.d.start()
        except Exception as e:  # noqa: BLE001 -- reported by each test instead
            cls.start_error = e

    @classmethod
    def tearDownClass(cls):
        if cls.d is not None:
            cls.d.cleanup()

    def setUp(self):
        if self.start_error is not None:
            raise AssertionError("daemon did not start: %s" % self.start_error)
        if not self.d.alive():
            self.d.start()

    def tearDown(self):
        d = self.d
        if d is not None and d.proc is not None and not d.expected_exit and d.proc.poll() is not None:
            rc = d.proc.returncode
            log = d.log()
            raise AssertionError("optd died during this test (exit status %s): %s" % (rc, log))

    # -- assertions -------------------------------------------------------
    def assertError(self, r, status, code=None, codes=None):
        """r is an error reply with the given status and the contract's body:
        {"error": {"code": "<snake_case>", "message": "<sentence>"}}."""
        self.assertEqual(r.status, status, "expected %d: %r" % (status, r))
        self.assertEqual(r.content_type, "application/json", "error reply not JSON: %r" % r)
        body = r.json
        self.assertIsInstance(body, dict, r)
        self.assertIn("error", body, r)
        err = body["error"]
        self.assertIsInstance(err, dict, r)
        self.assertIsInstance(err.get("code"), str, r)
        self.assertRegex(err["code"], r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$", r)
        self.assertIsInstance(err.get("message"), str, r)
        self.assertTrue(err["message"].strip(), "empty error message: %r" % r)
        if code is not None:
            self.assertEqual(err["code"], code, r)
        if codes is not None:
            self.assertIn(err["code"], codes, r)
        return err

    def assertStatusIn(self, r, statuses):
        self.assertIn(r.status, statuses, r)
        if r.status >= 400:
            self.assertError(r, r.status)

    def assertSame(self, a, b, msg=None):
        """Deep equality that tells booleans from numbers and ints from
        strings (json's false must not pass for 0)."""
        def norm(x):
            if isinstance(x, bool):
                return ("bool", x)
            if isinstance(x, (int, float)):
                return ("num", float(x))
            if isinstance(x, list):
                return ("list", [norm(y) for y in x])
            if isinstance(x, dict):
                return ("dict", {k: norm(v) for k, v in x.items()})
            return (type(x).__name__, x)
        self.assertEqual(norm(a), norm(b), msg)

    def assertUnchanged(self, name, before):
        """The session and its params are exactly as in `before` =
        (session json, params json)."""
        s, p = before
        s2 = self.d.session(name)
        p2 = self.d.params(name)
        self.assertEqual(s2["step"], s["step"], "step changed by a rejected request")
        self.assertSame(s2["hyperparams"], s["hyperparams"], "hyperparams changed by a rejected request")
        self.assertEqual(p2, p, "params changed by a rejected request")

    def snapshot(self, name):
        return self.d.session(name), self.d.params(name)


RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")

DEFAULTS = {
    "sgd": {"lr": 0.01, "momentum": 0, "dampening": 0, "nesterov": False, "weight_decay": 0, "maximize": False},
    "momentum": {"lr": 0.01, "momentum": 0.9, "dampening": 0, "nesterov": False, "weight_decay": 0,
                 "maximize": False},
    "nag": {"lr": 0.01, "momentum": 0.9, "dampening": 0, "nesterov": True, "weight_decay": 0, "maximize": False},
    "adagrad": {"lr": 0.01, "lr_decay": 0, "weight_decay": 0, "initial_accumulator_value": 0, "eps": 1e-10,
                "maximize": False},
    "adadelta": {"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0, "maximize": False},
    "rmsprop": {"lr": 0.01, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0, "momentum": 0, "centered": False,
                "maximize": False},
    "adam": {"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0, "amsgrad": False,
             "maximize": False},
    "adamax": {"lr": 0.002, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0, "maximize": False},
    "adamw": {"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False,
              "maximize": False},
    "nadam": {"lr": 0.002, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0, "momentum_decay": 0.004,
              "maximize": False},
}

STATE_BUFFERS = {
    "sgd": ["momentum_buffer"],
    "momentum": ["momentum_buffer"],
    "nag": ["momentum_buffer"],
    "adagrad": ["sum"],
    "adadelta": ["square_avg", "acc_delta"],
    "rmsprop": ["square_avg", "momentum_buffer", "grad_avg"],
    "adam": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
    "adamax": ["exp_avg", "exp_inf"],
    "adamw": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
    "nadam": ["exp_avg", "exp_avg_sq", "mu_product"],
}
