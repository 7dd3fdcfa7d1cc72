"""The Python client (clients/python) against the real daemon: sessions,
steps JSON and binary, conditional and idempotent steps, errors, retries that
never apply a step twice, threads, the training-feature pass-through, and the
package itself (pip install, standard library only)."""

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import uuid

from harness import CLIENT_DIR, SYSTEM_PYTHON, Daemon, DaemonCase, have, is_unimplemented
from flaky_proxy import FlakyProxy

import optd

try:
    import numpy as np
except ImportError:  # pragma: no cover
    np = None


def uniq(prefix="c"):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:10])


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


class SessionTests(DaemonCase):
    def setUp(self):
        self.c = optd.Client(self.url)

    def test_create_get_patch_delete(self):
        name = uniq()
        s = self.c.create(name, "adam", params=[0.5, -1.25, 3.0], hyperparams={"lr": 0.01, "betas": (0.8, 0.99)})
        self.assertIsInstance(s, optd.Session)
        self.assertEqual((s.name, s.optimizer, s.dtype, s.size, s.current_step), (name, "adam", "float32", 3, 0))
        self.assertEqual(s.hyperparams["betas"], [0.8, 0.99])
        self.assertEqual(s.hyperparams["eps"], 1e-8)  # defaults listed in full
        g = self.c.get(name)
        self.assertEqual(g.info["created_at"], s.info["created_at"])
        p = g.patch({"lr": 0.0005})
        self.assertEqual(p.hyperparams["lr"], 0.0005)
        self.assertEqual(self.c.get(name).hyperparams["lr"], 0.0005)
        self.c.delete(name)
        with self.assertRaises(optd.NotFound) as cm:
            self.c.get(name)
        self.assertEqual((cm.exception.status, cm.exception.code), (404, "not_found"))
        self.c.delete(name, missing_ok=True)
        with self.assertRaises(optd.NotFound):
            self.c.delete(name)

    def test_size_fill_dtype(self):
        name = uniq()
        s = self.c.create(name, "sgd", size=5, fill=1.5, dtype="float64")
        self.assertEqual((s.size, s.dtype), (5, "float64"))
        step, params = s.params()
        self.assertEqual((step, params), (0, [1.5] * 5))
        if np is not None:
            s2 = self.c.create(uniq(), "sgd", params=np.arange(4, dtype=np.float64), dtype=np.float64)
            self.assertEqual(s2.params()[1], [0.0, 1.0, 2.0, 3.0])

    def test_conflict_and_exist_ok(self):
        name = uniq()
        self.c.create(name, "sgd", size=2)
        with self.assertRaises(optd.Conflict) as cm:
            self.c.create(name, "sgd", size=2)
        self.assertEqual((cm.exception.status, cm.exception.code), (409, "already_exists"))
        self.assertIsInstance(cm.exception, optd.AlreadyExists)
        self.assertEqual(self.c.create(name, "sgd", size=2, exist_ok=True).name, name)

    def test_list_pages_in_name_order(self):
        prefix = uniq("list")
        names = sorted("%s-%02d" % (prefix, i) for i in range(23))
        for n in reversed(names):
            self.c.create(n, "sgd", size=1)
        got = [s.name for s in self.c.list(after=prefix, page_size=5) if s.name.startswith(prefix)]
        self.assertEqual(got, names)
        first = list(self.c.list(after=prefix, limit=7, page_size=3))
        self.assertEqual([s.name for s in first], names[:7])
        page, nxt = self.c.list_page(limit=4, after=prefix)
        self.assertEqual([s.name for s in page], names[:4])
        self.assertEqual(nxt, names[3])
        self.assertTrue(all(isinstance(s, optd.Session) and s.info["optimizer"] == "sgd" for s in first))

    def test_optimizers_and_service(self):
        names = [o["name"] for o in self.c.optimizers()]
        for n in ("sgd", "momentum", "nag", "adagrad", "adadelta", "rmsprop", "adam", "adamax", "adamw", "nadam"):
            self.assertIn(n, names)
        self.assertEqual(self.c.health(), {"status": "ok"})
        self.assertTrue(self.c.ready())
        self.assertIn("# TYPE", self.c.metrics())


class StepTests(DaemonCase):
    def setUp(self):
        self.c = optd.Client(self.url)

    def test_step_json(self):
        s = self.c.create(uniq(), "sgd", params=[1.0, 2.0], dtype="float64", hyperparams={"lr": 0.5})
        r = s.step([0.5, -1.0])
        step, params = r  # unpacks as a tuple
        self.assertEqual((step, params), (1, [0.75, 2.5]))
        self.assertFalse(r.replayed)
        self.assertEqual(s.current_step, 1)
        self.assertEqual(s.params(), (1, [0.75, 2.5]))

    @unittest.skipIf(np is None, "numpy is not installed")
    def test_binary_matches_json(self):
        for dtype in ("float32", "float64"):
            init = [0.1 * i - 0.7 for i in range(17)]
            a = self.c.create(uniq(), "adam", params=init, dtype=dtype, hyperparams={"lr": 0.01})
            b = self.c.create(uniq(), "adam", params=init, dtype=dtype, hyperparams={"lr": 0.01})
            for k in range(5):
                g = [math.sin(i + k) for i in range(17)]
                ja = a.step(g)
                jb = b.step(np.array(g))  # binary both ways
                self.assertIsInstance(jb.params, np.ndarray)
                self.assertEqual(jb.params.dtype, np.dtype(dtype))
                self.assertEqual(ja.step, jb.step)
                self.assertEqual(ja.params, jb.params.tolist(), dtype)
            step, vals = b.params(binary=True)
            self.assertEqual(step, 5)
            self.assertEqual(vals.tolist(), a.params()[1])

    def test_binary_without_numpy_types(self):
        s = self.c.create(uniq(), "sgd", params=[1.0, 2.0, 3.0], hyperparams={"lr": 1.0})
        r = s.step([0.5, 0.25, 0.125], binary=True)  # list in: list out, bytes on the wire
        self.assertEqual((r.step, r.params), (1, [0.5, 1.75, f32(3.0 - 0.125)]))
        raw_grad = struct.pack("<3f", 0.5, 0.5, 0.5)
        r = s.step(raw_grad)  # bytes go as they are
        self.assertEqual(r.params, [0.0, 1.25, 2.375])

    def test_minimal(self):
        s = self.c.create(uniq(), "sgd", size=3)
        self.assertEqual(tuple(s.step([1, 2, 3], minimal=True)), (1, None))
        if np is not None:
            self.assertEqual(tuple(s.step(np.ones(3), minimal=True)), (2, None))

    def test_if_match(self):
        s = self.c.create(uniq(), "sgd", size=2)
        s.step([1, 1], if_match=0)
        with self.assertRaises(optd.StepMismatch) as cm:
            s.step([1, 1], if_match=0)
        e = cm.exception
        self.assertEqual((e.status, e.code, e.current_step), (412, "step_mismatch", 1))
        self.assertEqual(s.step([1, 1], if_match=e.current_step).step, 2)

    def test_idempotency_key(self):
        s = self.c.create(uniq(), "sgd", params=[1.0], dtype="float64", hyperparams={"lr": 0.5})
        r1 = s.step([1.0], idempotency_key="batch-1")
        r2 = s.step([1.0], idempotency_key="batch-1")
        self.assertEqual((r1.step, r1.params), (1, [0.5]))
        self.assertEqual((r2.step, r2.params, r2.replayed), (1, [0.5], True))
        with self.assertRaises(optd.IdempotencyMismatch) as cm:
            s.step([2.0], idempotency_key="batch-1")
        self.assertEqual((cm.exception.status, cm.exception.code), (422, "idempotency_mismatch"))
        self.assertIsInstance(cm.exception, optd.Invalid)
        self.assertEqual(s.params().step, 1)

    def test_errors(self):
        s = self.c.create(uniq(), "adam", size=3)
        cases = [
            (lambda: s.step([1, 2]), optd.SizeMismatch, 422, "size_mismatch"),
            (lambda: s.step([1e39, 0, 0]), optd.NonFinite, 422, "non_finite"),
            (lambda: self.c.create(uniq(), "adamz", size=1), optd.UnknownOptimizer, 422, "unknown_optimizer"),
            (lambda: self.c.create(uniq(), "adam", size=1, hyperparams={"lr": -1}), optd.BadHyperparam, 422, "bad_hyperparam"),
            (lambda: self.c.create(uniq(), "adam", params=[1], size=1), optd.Invalid, 422, "invalid"),
            (lambda: self.c.step(uniq(), [1.0]), optd.NotFound, 404, "not_found"),
            (lambda: list(self.c.list(page_size=0)), optd.BadRequest, 400, "bad_request"),
            (lambda: s.patch(dtype="float64"), optd.Invalid, 422, None),
            # a hyperparameter given as a keyword field is not silently dropped (issue 15)
            (lambda: self.c.create(uniq(), "adam", size=1, lr=0.05), optd.UnknownField, 422, "unknown_field"),
            (lambda: s.step([1, 2, 3], los=1.0), optd.UnknownField, 422, "unknown_field"),
        ]
        if np is not None:
            cases.append((lambda: s.step(np.array([np.nan, 0, 0], dtype=np.float32)), optd.NonFinite, 422, "non_finite"))
        for fn, cls, status, code in cases:
            with self.subTest(cls=cls.__name__, code=code):
                with self.assertRaises(cls) as cm:
                    fn()
                e = cm.exception
                self.assertIsInstance(e, optd.OptdError)
                self.assertEqual(e.status, status)
                if code:
                    self.assertEqual(e.code, code)
                self.assertTrue(e.message)
        self.assertEqual(s.params().step, 0)  # nothing changed

    def test_checkpoint_restore(self):
        a = self.c.create(uniq(), "nadam", params=[0.3, -0.2, 0.1], dtype="float64")
        for k in range(3):
            a.step([0.1 * k, -0.2, 0.3])
        ck = a.checkpoint()
        self.assertEqual((ck["step"], ck["optimizer"]), (3, "nadam"))
        self.assertIn("exp_avg", ck["state"])
        ck = json.loads(json.dumps(ck))  # as if saved to a file
        b_name = uniq()
        self.c.restore(b_name, ck)
        b = self.c.get(b_name)
        self.assertEqual(b.current_step, 3)
        for k in range(4):
            ra, rb = a.step([0.2, 0.1 * k, -0.4]), b.step([0.2, 0.1 * k, -0.4])
            self.assertEqual(tuple(ra), tuple(rb))
        self.c.restore(b_name, ck)  # replace: back to step 3
        self.assertEqual(b.refresh().current_step, 3)

    def test_checkpoint_to_a_safetensors_file_and_back(self):
        a = self.c.create(uniq(), "adam", params=[0.3, -0.2, 0.1, 4.0], dtype="float32",
                          hyperparams={"lr": 0.01, "amsgrad": True})
        for k in range(3):
            a.step([0.1 * k, -0.2, 0.3, 1.0])
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "a.safetensors")
        self.assertEqual(a.checkpoint(path), path)
        ck = a.checkpoint()
        # numpy alone (optd.safetensors) reads the tensors and the metadata
        meta, tensors = optd.safetensors.load(path)
        self.assertEqual(sorted(tensors), ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "params"])
        m = optd.safetensors.metadata_values(meta)
        self.assertEqual((m["optimizer"], m["dtype"], m["step"]), ("adam", "float32", 3))
        self.assertEqual(m["hyperparams"], ck["hyperparams"])
        if np is not None:
            self.assertEqual(tensors["params"].dtype, np.float32)
            self.assertEqual(tensors["params"].tolist(), [float(np.float32(x)) for x in ck["params"]])
            self.assertEqual(tensors["exp_avg_sq"].tolist(), [float(np.float32(x)) for x in ck["state"]["exp_avg_sq"]])
        # restore under another name: continues exactly as the original
        b = self.c.session(uniq()).restore(path)
        self.assertEqual(b.refresh().current_step, 3)
        for k in range(3):
            self.assertEqual(tuple(a.step([0.5, 0.1 * k, -0.4, 0.0])), tuple(b.step([0.5, 0.1 * k, -0.4, 0.0])))
        # JSON files too, and If-Match guards a replace
        jpath = os.path.join(d, "a.json")
        a.checkpoint(jpath)
        with self.assertRaises(optd.StepMismatch):
            b.restore(jpath, if_match=0)
        b.restore(jpath, if_match=6)
        self.assertEqual(b.refresh().current_step, 6)
        self.assertEqual(b.checkpoint()["state"], a.checkpoint()["state"])

    @unittest.skipUnless(have("safetensors"), "the safetensors package is not installed")
    def test_checkpoint_files_load_with_the_safetensors_package(self):
        import safetensors.numpy
        a = self.c.create(uniq(), "nadam", params=[0.3, -0.2], dtype="float64")
        a.step([0.1, 0.2])
        path = os.path.join(tempfile.mkdtemp(), "a.safetensors")
        a.checkpoint(path)
        t = safetensors.numpy.load_file(path)
        self.assertEqual(sorted(t), ["exp_avg", "exp_avg_sq", "params"])
        self.assertEqual(t["params"].tolist(), a.params().params)
        from safetensors import safe_open
        with safe_open(path, "np") as f:
            self.assertEqual(f.metadata()["optimizer"], "nadam")

    def test_threads_share_a_client(self):
        s = self.c.create(uniq(), "sgd", size=4)
        errors = []

        def work():
            try:
                for _ in range(25):
                    s.step([1, 1, 1, 1])
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        ts = [threading.Thread(target=work) for _ in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(s.params().step, 200)


class RetryTests(DaemonCase):
    def setUp(self):
        self.proxy = None

    def tearDown(self):
        if self.proxy:
            self.proxy.close()

    def test_lost_replies_are_not_applied_twice(self):
        direct = optd.Client(self.url)
        s = direct.create(uniq(), "sgd", params=[0.0], dtype="float64", hyperparams={"lr": 1.0})
        self.proxy = FlakyProxy(self.d.port, ["drop_after", "drop_after", "pass",  # step 1: reply lost twice
                                              "503", "pass",                       # step 2: 503 first
                                              "drop_before", "pass"])              # step 3: never arrived first
        c = optd.Client(self.proxy.url, retries=5, backoff=0.01)
        r1 = c.step(s.name, [1.0])
        self.assertEqual((r1.step, r1.params, r1.replayed), (1, [-1.0], True))
        r2 = c.step(s.name, [1.0])
        self.assertEqual((r2.step, r2.params), (2, [-2.0]))
        r3 = c.step(s.name, [1.0])
        self.assertEqual((r3.step, r3.params), (3, [-3.0]))
        self.assertEqual(direct.params(s.name), (3, [-3.0]))
        steps = [(m, h.get("idempotency-key"), a) for m, p, h, a in self.proxy.seen if p.endswith("/step")]
        self.assertEqual(len(steps), 7)
        keys = [k for _, k, _ in steps]
        self.assertTrue(all(keys), "every step carries an Idempotency-Key")
        self.assertEqual(len(set(keys[0:3])), 1)
        self.assertEqual(len(set(keys[3:5])), 1)
        self.assertEqual(len(set(keys[5:7])), 1)
        self.assertEqual(len(set(keys)), 3)

    @unittest.skipIf(np is None, "numpy is not installed")
    def test_lost_binary_reply(self):
        direct = optd.Client(self.url)
        s = direct.create(uniq(), "sgd", params=[0.0, 0.0], hyperparams={"lr": 1.0})
        self.proxy = FlakyProxy(self.d.port, ["pass", "drop_after"])  # the first request is the GET of dtype
        c = optd.Client(self.proxy.url, retries=3, backoff=0.01)
        r = c.step(s.name, np.array([1.0, 2.0], dtype=np.float32))
        self.assertEqual(r.step, 1)
        self.assertEqual(r.params.tolist(), [-1.0, -2.0])
        self.assertEqual(direct.params(s.name).step, 1)

    def test_503_exhausts_retries(self):
        direct = optd.Client(self.url)
        s = direct.create(uniq(), "sgd", size=1)
        self.proxy = FlakyProxy(self.d.port, ["503"] * 3)
        c = optd.Client(self.proxy.url, retries=2, backoff=0.01)
        with self.assertRaises(optd.Unavailable) as cm:
            c.step(s.name, [1.0])
        self.assertEqual((cm.exception.status, cm.exception.code), (503, "unavailable"))
        self.assertEqual(len(self.proxy.seen), 3)
        self.assertEqual(direct.params(s.name).step, 0)

    def test_connection_refused(self):
        c = optd.Client("http://127.0.0.1:%d" % _closed_port(), retries=2, backoff=0.01, timeout=2)
        t0 = time.time()
        with self.assertRaises(optd.ConnectionFailed) as cm:
            c.get("x")
        self.assertIsNone(cm.exception.status)
        self.assertIsInstance(cm.exception, ConnectionError)
        self.assertLess(time.time() - t0, 5)

    def test_create_is_not_repeated_after_it_may_have_arrived(self):
        direct = optd.Client(self.url)
        name = uniq()
        self.proxy = FlakyProxy(self.d.port, ["drop_after"])
        c = optd.Client(self.proxy.url, retries=3, backoff=0.01)
        with self.assertRaises(optd.ConnectionFailed):
            c.create(name, "sgd", size=1)
        self.assertEqual(len(self.proxy.seen), 1)
        self.assertEqual(direct.get(name).name, name)  # it did arrive

    def test_daemon_restart_between_steps(self):
        d = Daemon().start()
        try:
            c = optd.Client(d.url, retries=12, backoff=0.05, max_backoff=0.5)
            s = c.create(uniq(), "sgd", size=2)
            s.step([1, 1])
            d.kill()  # kill -9 ...
            threading.Timer(0.4, d.start).start()  # ... and back on the same port
            r = s.step([1, 1])
            self.assertEqual(r.step, 2)
            self.assertEqual(c.params(s.name).step, 2)
        finally:
            time.sleep(0.1)
            d.cleanup()

    def test_default_budget_survives_a_daemon_restart(self):
        """With the default retries a step waits out a daemon that is down for
        3 s (kill -9, then a restart): the old budget (5 retries, backoff to
        2 s: at most 1.6 s) gave up."""
        d = Daemon().start()
        try:
            c = optd.Client(d.url)
            s = c.create(uniq(), "sgd", size=2)
            s.step([1, 1])
            d.kill()
            threading.Timer(3.0, d.start).start()
            r = s.step([1, 1])
            self.assertEqual(r.step, 2)
            self.assertEqual(c.params(s.name).step, 2)
            self.assertGreaterEqual(c.max_backoff, 30)
        finally:
            time.sleep(0.1)
            d.cleanup()

    def test_only_what_is_safe_to_repeat_is_retried(self):
        """A step without an Idempotency-Key (auto_idempotency=False) whose
        reply is lost is not sent again: it may have been applied."""
        direct = optd.Client(self.url)
        s = direct.create(uniq(), "sgd", params=[0.0], dtype="float64", hyperparams={"lr": 1.0})
        self.proxy = FlakyProxy(self.d.port, ["drop_after", "pass"])
        c = optd.Client(self.proxy.url, backoff=0.01, auto_idempotency=False)
        with self.assertRaises(optd.ConnectionFailed):
            c.step(s.name, [1.0])
        self.assertEqual(direct.params(s.name), (1, [-1.0]))  # applied once, not twice
        self.assertEqual(len(self.proxy.seen), 1)

    def test_stale_keepalive_connection(self):
        d = Daemon(["--connection-timeout", "1"]).start()
        try:
            c = optd.Client(d.url, retries=0)
            s = c.create(uniq(), "sgd", size=1)
            time.sleep(1.6)  # the daemon closes the idle connection
            self.assertEqual(s.step([1.0]).step, 1)  # one transparent reconnect
            time.sleep(1.6)
            self.assertEqual(c.create(uniq(), "sgd", size=1).size, 1)
        finally:
            d.cleanup()


def _closed_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class AuthTests(DaemonCase):
    daemon_env = {"OPTD_TOKEN": "s3cret-token"}

    def test_token(self):
        with self.assertRaises(optd.Unauthorized) as cm:
            optd.Client(self.url, token="wrong").optimizers()
        self.assertEqual((cm.exception.status, cm.exception.code), (401, "unauthorized"))
        c = optd.Client(self.url, token="s3cret-token")
        self.assertTrue(c.optimizers())
        s = c.create(uniq(), "sgd", size=1)
        self.assertEqual(s.step([1.0]).step, 1)
        old = os.environ.get("OPTD_TOKEN")
        os.environ["OPTD_TOKEN"] = "s3cret-token"
        try:
            self.assertEqual(optd.Client(self.url).get(s.name).name, s.name)  # from the environment
        finally:
            if old is None:
                del os.environ["OPTD_TOKEN"]
            else:
                os.environ["OPTD_TOKEN"] = old


class NarrowWireTests(DaemonCase):
    """Binary vectors in bfloat16/float16 (API.md "Binary vectors") and the
    scalars of a binary step reply in its headers."""

    def setUp(self):
        self.c = optd.Client(self.url)
        self.proxy = None

    def tearDown(self):
        if self.proxy:
            self.proxy.close()

    @unittest.skipIf(np is None, "numpy is not installed")
    def test_bfloat16_halves_the_bytes_each_way(self):
        n = 1000
        s = self.c.create(uniq(), "sgd", size=n, fill=1.0, hyperparams={"lr": 1.0})
        self.proxy = FlakyProxy(self.d.port, [])
        c = optd.Client(self.proxy.url)
        c.get(s.name)
        g = np.linspace(-1, 1, n).astype(np.float32)
        r = c.step(s.name, g, wire_dtype="bfloat16")
        hdrs = self.proxy.seen[-1][2]
        self.assertEqual(int(hdrs["content-length"]), 2 * n)
        self.assertEqual(hdrs["content-type"], "application/octet-stream; dtype=bfloat16")
        self.assertEqual(hdrs["accept"], "application/octet-stream; dtype=bfloat16")
        self.assertEqual((r.step, r.params.dtype, len(r.params)), (1, np.float32, n))
        full = self.c.params(s.name, binary=True).params  # float32 in the session
        self.assertTrue(np.array_equal(r.params, _bf16(full)))
        self.assertTrue(np.array_equal(full, (np.float32(1) - _bf16(g)).astype(np.float32)))
        self.assertEqual((r.lr, r.contributors), (1, 1))
        self.assertAlmostEqual(r.grad_norm, float(np.linalg.norm(_bf16(g).astype(np.float64))), places=9)
        # the session's own type back, and GET .../params in a narrow one
        r = c.step(s.name, g, wire_dtype="bfloat16", reply_dtype="float32")
        self.assertTrue(np.array_equal(r.params, self.c.params(s.name, binary=True).params))
        p16 = c.params(s.name, wire_dtype="float16").params
        self.assertTrue(np.array_equal(p16, r.params.astype(np.float16).astype(np.float32)))

    def test_without_numpy_types(self):
        s = self.c.create(uniq(), "sgd", params=[1.0, 2.0], dtype="float64", hyperparams={"lr": 1.0})
        r = s.step([0.1, 1 / 3], wire_dtype="float16", reply_dtype="float64")
        self.assertEqual(r.params, [1.0 - 0.0999755859375, 2.0 - 0.333251953125])
        r = s.step([0.0, 0.0], wire_dtype="bfloat16")
        self.assertEqual(r.params, [0.8984375, 1.6640625])  # 1 - 0.0999755859375 and 2 - 0.333251953125 in bfloat16

    def test_float16_past_its_range_is_infinity_from_a_list_as_from_numpy(self):
        if np is None:
            self.skipTest("numpy is not importable")
        from optd.client import _encode_narrow
        v = [70000.0, -1e6, float("nan"), 1.0, 65504.0]
        with np.errstate(invalid="ignore"):
            want = _encode_narrow(np.array(v), "float16")
        self.assertEqual(want[:4], b"\x00\x7c\x00\xfc")
        self.assertEqual(_encode_narrow(v, "float16"), want)

    @unittest.skipUnless(have("torch"), "needs torch")
    def test_rounding_is_torchs(self):
        import torch
        from optd.client import _decode_narrow, _encode_narrow
        rng = np.random.default_rng(5)
        x = rng.standard_normal(20000) * 10.0 ** rng.uniform(-44, 38, 20000)
        edges = [0.0, -0.0, 1.0, 1.00390625, 1.01171875, 65504.0, 65519.99, 6.1e-5, 5.96e-8, 2.9e-8,
                 3.3895313892515355e38, 1.0000000000000002, 1e-40]
        x = np.concatenate([x, edges]).astype(np.float64)
        for wire, td in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
            with self.subTest(wire=wire):
                v = x if wire == "bfloat16" else x[np.abs(x) < 65504]
                want = torch.from_numpy(v).to(td)
                self.assertEqual(_encode_narrow(v, wire), want.view(torch.int16).numpy().tobytes())
                self.assertEqual(_encode_narrow(list(v[:500]), wire), want[:500].view(torch.int16).numpy().tobytes())
                back = _decode_narrow(want.view(torch.int16).numpy().tobytes(), wire, "float64", True)
                self.assertTrue(np.array_equal(back, want.double().numpy()))


class ShapedSessionTests(DaemonCase):
    """Sessions shaped like a model (API.md "Tensors and parameter groups")
    through the client: groups pass through create, skip through step."""

    def test_skip_json_and_binary(self):
        c = optd.Client(self.url)
        s = c.create(uniq(), "sgd", params=[1.0, 1.0, 1.0], dtype="float64", hyperparams={"lr": 1.0},
                     groups=[{"tensors": [{"name": "w", "shape": [2]}]},
                             {"hyperparams": {"lr": 0.5}, "tensors": [{"name": "b", "shape": []}]}])
        self.assertEqual([g["hyperparams"]["lr"] for g in s.info["groups"]], [1.0, 0.5])
        r = s.step([1.0, 1.0, 1.0], skip=["w"])
        self.assertEqual((r.params, r.lr), ([1.0, 1.0, 0.5], [1.0, 0.5]))
        if np is not None:
            r = s.step(np.ones(3), skip=["b"])
            self.assertEqual((r.params.tolist(), r.lr), ([0.0, 0.0, 0.5], [1.0, 0.5]))
        with self.assertRaises(optd.Invalid) as cm:
            s.step([1.0, 1.0, 1.0], skip=["nope"])
        self.assertEqual(cm.exception.status, 422)

    # 150 tensors of two float32 elements and 200-character names: all their
    # names make a 30 KB Optd-Skip, past the daemon's 28 KiB request heads.
    LONG_NAMES = ["t%03d." % i + "x" * 195 for i in range(150)]

    def long_named(self, c, optimizer, value, **kw):
        """A session of LONG_NAMES' tensors, every element value."""
        groups = [{"tensors": [{"name": n, "shape": [2]} for n in self.LONG_NAMES]}]
        return c.create(uniq(), optimizer, params=[value] * 300, dtype="float32", groups=groups, **kw)

    def test_a_skip_list_too_long_for_a_header_goes_in_the_body(self):
        # All but the first skipped: the client sends such a binary step as
        # JSON with "skip" in the body, and returns what the binary step
        # would have.
        if np is None:
            self.skipTest("numpy is not importable")
        from optd.client import _decode_narrow, _encode_narrow
        c = optd.Client(self.url)
        a, b = (self.long_named(c, "adam", 1.0) for _ in range(2))
        skip = self.LONG_NAMES[1:]
        self.assertGreater(len(",".join(skip)), 28 * 1024)
        g = np.arange(300, dtype=np.float32) / np.float32(7)
        ra = a.step(g, skip=skip)
        rb = b.step(g.tolist(), skip=skip)
        self.assertIsInstance(ra.params, np.ndarray)
        self.assertEqual((ra.step, ra.params.tolist()), (rb.step, rb.params))
        self.assertEqual(ra.params[2:].tolist(), [1.0] * 298)
        self.assertNotEqual(ra.params[:2].tolist(), [1.0, 1.0])
        # bfloat16 on the wire: the gradient rounded as the binary body
        # would carry it, the params rounded as its reply would.
        r16 = a.step(g, skip=skip, wire_dtype="bfloat16")
        g16 = _decode_narrow(_encode_narrow(g, "bfloat16"), "bfloat16", "float64", False)
        rj = b.step(g16, skip=skip)
        self.assertEqual(r16.step, rj.step)
        self.assertEqual(r16.params.tolist(),
                         _decode_narrow(_encode_narrow(np.array(rj.params, dtype=np.float32), "bfloat16"),
                                        "bfloat16", "float32", True).tolist())

    def test_a_skip_list_that_fits_a_head_stays_binary_and_a_float16_reply_overflows_to_inf(self):
        if np is None:
            self.skipTest("numpy is not importable")
        c = optd.Client(self.url)
        names = self.LONG_NAMES
        s = self.long_named(c, "sgd", 70000.0, hyperparams={"lr": 0.5})

        def json_step(*a, **k):
            raise AssertionError("a 20 KB skip list went as JSON")
        binary_only = optd.Client(self.url)
        binary_only._step_skip_in_body = json_step
        r = binary_only.step(s.name, np.ones(300, dtype=np.float32), skip=names[:100])
        self.assertEqual(r.params[:200].tolist(), [70000.0] * 200)
        self.assertEqual(r.params[200:].tolist(), [69999.5] * 100)
        # Through JSON (a 30 KB list), params past float16's range come
        # back as infinity, as the binary reply would carry them.
        r = c.step(s.name, np.ones(300, dtype=np.float32), skip=names[1:], wire_dtype="float16")
        self.assertEqual(r.params.tolist(), [float("inf")] * 300)

    def test_lr_with_the_step_json_and_binary(self):
        c = optd.Client(self.url)
        s = c.create(uniq(), "sgd", params=[1.0, 1.0, 1.0], dtype="float64", hyperparams={"lr": 1.0},
                     groups=[{"tensors": [{"name": "w", "shape": [2]}]},
                             {"tensors": [{"name": "b", "shape": []}]}])
        r = s.step([1.0, 1.0, 1.0], lr=[0.5, 0.25])
        self.assertEqual((r.params, r.lr), ([0.5, 0.5, 0.75], [0.5, 0.25]))
        if np is not None:
            r = s.step(np.ones(3), lr=0.125)
            self.assertEqual((r.params.tolist(), r.lr), ([0.375, 0.375, 0.625], [0.125, 0.125]))
        s.refresh()
        self.assertEqual([g["hyperparams"]["lr"] for g in s.info["groups"]], [0.125 if np is not None else 0.5,
                                                                              0.125 if np is not None else 0.25])
        with self.assertRaises(optd.Invalid) as cm:
            s.step([1.0, 1.0, 1.0], lr=-1)
        self.assertEqual(cm.exception.code, "bad_hyperparam")


def _bf16(a):
    """float32 -> bfloat16 (round to nearest even) -> float32, in numpy."""
    u = np.asarray(a, dtype=np.float32).view(np.uint32)
    return (((u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16) << 16).view(np.float32)


class TrainingFeatureTests(DaemonCase):
    """What the client sends for the training features; skipped while the
    daemon does not have them (404 / 422)."""

    def setUp(self):
        self.c = optd.Client(self.url)

    def _try(self, fn):
        try:
            return fn()
        except optd.OptdError as e:
            if is_unimplemented(e):
                self.skipTest("daemon lacks it yet: %s" % e)
            raise

    def test_loss_and_history(self):
        s = self.c.create(uniq(), "sgd", params=[1.0, 1.0], dtype="float64")
        s.step([0.5, 0.5], loss=2.5)
        if np is not None:
            s.step(np.array([0.5, 0.5]), loss=1.5)  # Optd-Loss header
        else:
            s.step([0.5, 0.5], loss=1.5)
        s.step([0.5, 0.5])
        h = self._try(lambda: s.history())
        self.assertEqual([e["step"] for e in h], [1, 2, 3])
        self.assertEqual(h[0].get("loss"), 2.5)
        self.assertEqual(h[1].get("loss"), 1.5)
        self.assertIsNone(h[2].get("loss"))
        paged = self._try(lambda: s.history(limit=1))
        self.assertEqual([e["step"] for e in paged], [1, 2, 3])
        self.assertEqual([e["step"] for e in s.history(after=1)], [2, 3])

    def test_workers_weight(self):
        s = self._try(lambda: self.c.create(uniq(), "sgd", params=[0.0], dtype="float64",
                                            hyperparams={"lr": 1.0}, workers=2))
        self.assertEqual(s.info.get("workers"), 2)
        out = []
        ts = [threading.Thread(target=lambda g, w: out.append(s.step([g], weight=w)), args=a)
              for a in ((1.0, 1.0), (4.0, 3.0))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        self.assertEqual(len(out), 2)
        for r in out:
            self.assertEqual((r.step, r.contributors), (1, 2))
            self.assertEqual(r.params, [-(1.0 * 1 + 4.0 * 3) / 4])
        self.assertEqual(self.c.patch(s.name, workers=1).info.get("workers"), 1)

    def test_schedule_clip_fork(self):
        s = self._try(lambda: self.c.create(
            uniq(), "sgd", params=[0.0, 0.0], dtype="float64",
            hyperparams={"lr": 1.0, "max_grad_norm": 1.0,
                         "lr_schedule": {"type": "step", "step_size": 1, "gamma": 0.5}}))
        r = s.step([3.0, 4.0])
        self.assertEqual(r.lr, 1.0)
        self.assertEqual(r.grad_norm, 5.0)
        self.assertEqual(s.step([3.0, 4.0]).lr, 0.5)
        f = self._try(lambda: self.c.fork(uniq(), s.name, hyperparams={"lr": 2.0}))
        self.assertEqual((f.current_step, f.hyperparams["lr"]), (2, 2.0))
        self.assertEqual(f.params(), s.params())


class PackageTests(unittest.TestCase):
    def test_pip_install_offline(self):
        py = SYSTEM_PYTHON if os.path.exists(SYSTEM_PYTHON) else sys.executable
        if subprocess.run([py, "-m", "pip", "--version"], capture_output=True).returncode != 0:
            self.skipTest("pip is not available to %s" % py)
        for mod in ("setuptools", "wheel"):
            if subprocess.run([py, "-c", "import " + mod], capture_output=True).returncode != 0:
                self.skipTest("%s lacks %s" % (py, mod))
        tmp = tempfile.mkdtemp(prefix="optd-pip-")
        try:
            src = os.path.join(tmp, "src")
            shutil.copytree(CLIENT_DIR, src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
            target = os.path.join(tmp, "site")
            r = subprocess.run([py, "-m", "pip", "install", "--quiet", "--no-index", "--no-build-isolation",
                                "--no-deps", "--target", target, src], capture_output=True, text=True,
                               env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_ROOT_USER_ACTION="ignore"))
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            r = subprocess.run([py, "-c", "import optd, optd.sharded; print(optd.__version__); print(optd.__file__)"],
                               capture_output=True, text=True, cwd=tmp, env=dict(os.environ, PYTHONPATH=target))
            self.assertEqual(r.returncode, 0, r.stderr)
            version, path = r.stdout.split()
            self.assertEqual(version, optd.__version__)
            self.assertTrue(path.startswith(target), path)
            dist = [n for n in os.listdir(target) if n.endswith(".dist-info")]
            self.assertEqual(len(dist), 1, dist)
            with open(os.path.join(target, dist[0], "METADATA")) as f:
                meta = f.read()
            self.assertNotIn("Requires-Dist: numpy\n", meta.replace("; extra", "\n; extra"))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def test_standard_library_only(self):
        """The client works where numpy cannot be imported (binary included)."""
        d = Daemon().start()
        try:
            code = r"""
import sys
sys.modules["numpy"] = None  # import numpy fails
sys.path.insert(0, %r)
import optd
c = optd.Client(%r)
s = c.create("nonumpy", "sgd", params=[1.0, 2.0], hyperparams={"lr": 1.0})
r = s.step([0.5, 0.5], binary=True)
assert (r.step, r.params) == (1, [0.5, 1.5]), r
assert s.params(binary=True) == (1, [0.5, 1.5])
assert s.step([0.5, 0.5]).params == [0.0, 1.0]
print("ok")
""" % (CLIENT_DIR, d.url)
            r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True)
            self.assertEqual((r.returncode, r.stdout.strip()), (0, "ok"), r.stderr)
        finally:
            d.cleanup()
