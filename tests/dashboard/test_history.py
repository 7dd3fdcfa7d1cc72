"""GET /v1/sessions/{name}/history against the real daemon: every recorded
value checked against an independent float64 computation in Python, the loss
from JSON and from the Optd-Loss header, paging with after/limit/next, and
--history-steps pruning (also across a restart)."""

import datetime
import math
import re
import struct
import threading
import time
import unittest

from harness import Daemon, pack

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")
FIELDS = {"step", "time", "lr", "grad_norm", "update_norm", "param_norm", "contributors", "loss"}


def norm(v):
    return math.sqrt(math.fsum(x * x for x in v))


def grads(step, n):
    """Known gradients, spanning several magnitudes."""
    return [math.sin(1.3 * step + 0.7 * i) * 10.0 ** (i % 4 - 2) for i in range(n)]


class Reference:
    """torch.optim.SGD in float64, in torch's order of operations."""

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0):
        self.p = list(params)
        self.lr, self.momentum, self.dampening, self.wd = lr, momentum, dampening, weight_decay
        self.buf = None

    def step(self, g, lr=None):
        lr = self.lr if lr is None else lr
        d = [gi + self.wd * pi for gi, pi in zip(g, self.p)] if self.wd else list(g)
        if self.momentum:
            if self.buf is None:
                self.buf = list(d)
            else:
                self.buf = [self.momentum * b + (1 - self.dampening) * di for b, di in zip(self.buf, d)]
            d = self.buf
        self.p = [pi + (-lr) * di for pi, di in zip(self.p, d)]
        return self.p


class HistoryTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.d = Daemon(args=["--sync", "normal"]).start()

    @classmethod
    def tearDownClass(cls):
        cls.d.cleanup()

    def create(self, name, **body):
        body["name"] = name
        return self.d.ok("POST", "/v1/sessions", body)

    def step(self, name, grad, **extra):
        return self.d.ok("POST", "/v1/sessions/%s/step" % name, dict(extra, grad=grad))

    def assertClose(self, got, want, rel=1e-12, msg=None):
        self.assertTrue(abs(got - want) <= rel * abs(want), "%r != %r (rel %g) %s" % (got, want, rel, msg or ""))

    def test_norms_match_an_independent_float64_sgd(self):
        n = 7
        p0 = [0.5 * (i - 3) + 0.125 for i in range(n)]
        hp = {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}
        self.create("norms", optimizer="sgd", dtype="float64", params=p0, hyperparams=hp)
        ref = Reference(p0, **hp)
        prev = p0
        want = []
        for k in range(1, 11):
            g = grads(k, n)
            got = self.step("norms", g)["params"]
            new = ref.step(g)
            for a, b in zip(got, new):
                self.assertClose(a, b, msg="params at step %d" % k)
            want.append((k, norm(g), norm([a - b for a, b in zip(new, prev)]), norm(new)))
            prev = new
        rows = self.d.history("norms")
        self.assertEqual([r["step"] for r in rows], list(range(1, 11)))
        for row, (k, gn, un, pn) in zip(rows, want):
            self.assertEqual(set(row), FIELDS)
            self.assertEqual(row["lr"], 0.1)
            # grad_norm is of the gradient as sent (weight decay is not part of it).
            self.assertClose(row["grad_norm"], gn, msg="grad_norm at step %d" % k)
            self.assertClose(row["update_norm"], un, msg="update_norm at step %d" % k)
            self.assertClose(row["param_norm"], pn, msg="param_norm at step %d" % k)
            self.assertEqual(row["contributors"], 1)
            self.assertIsNone(row["loss"])

    def test_grad_norm_is_before_clipping_and_the_update_after(self):
        n = 5
        p0 = [1.0] * n
        self.create("clipped", optimizer="sgd", dtype="float64", params=p0,
                    hyperparams={"lr": 0.5, "max_grad_norm": 1.0})
        prev = p0
        for k in range(1, 4):
            g = [3.0 * k * (i + 1) for i in range(n)]
            gn = norm(g)
            coef = min(1.0, 1.0 / (gn + 1e-6))
            got = self.step("clipped", g)
            self.assertClose(got["grad_norm"], gn)
            want = [pi - 0.5 * gi * coef for pi, gi in zip(prev, g)]
            for a, b in zip(got["params"], want):
                self.assertClose(a, b)
            row = self.d.history("clipped", after=k - 1, limit=1)[0]
            self.assertEqual(row["step"], k)
            self.assertClose(row["grad_norm"], gn)
            self.assertClose(row["update_norm"], norm([a - b for a, b in zip(want, prev)]))
            self.assertClose(row["update_norm"], 0.5 * gn * coef, rel=1e-9)
            self.assertClose(row["param_norm"], norm(want))
            prev = want

    def test_lr_is_the_scheduled_one(self):
        self.create("sched", optimizer="sgd", dtype="float64", size=3,
                    hyperparams={"lr": 0.2, "lr_schedule": {"type": "step", "step_size": 3, "gamma": 0.5}})
        replies = [self.step("sched", [1.0, 1.0, 1.0])["lr"] for _ in range(8)]
        rows = self.d.history("sched")
        want = [0.2 * 0.5 ** ((k - 1) // 3) for k in range(1, 9)]
        self.assertEqual([r["lr"] for r in rows], replies)
        for got, w in zip(replies, want):
            self.assertClose(got, w)

    def test_float32_norms_are_of_the_float32_values(self):
        # JSON carries the shortest decimal that reads back as the float32:
        # round it to float32 again before doing arithmetic on it.
        def f32(v):
            return list(struct.unpack("<%df" % len(v), struct.pack("<%df" % len(v), *v)))
        self.create("f32", optimizer="adam", dtype="float32", params=[0.1, -0.2, 0.3, 1e-3],
                    hyperparams={"lr": 0.01})
        prev = f32(self.d.ok("GET", "/v1/sessions/f32/params")["params"])
        for k in range(1, 6):
            g = grads(k, 4)
            new = f32(self.step("f32", g)["params"])
            row = self.d.history("f32", after=k - 1, limit=1)[0]
            self.assertClose(row["update_norm"], norm([a - b for a, b in zip(new, prev)]), msg="step %d" % k)
            self.assertClose(row["param_norm"], norm(new), msg="step %d" % k)
            self.assertClose(row["grad_norm"], norm(f32(g)), msg="step %d" % k)
            prev = new

    def test_loss_from_json_and_from_the_optd_loss_header(self):
        self.create("loss", optimizer="sgd", dtype="float64", size=2)
        url = "/v1/sessions/loss/step"
        self.step("loss", [1, 1], loss=1.5)
        self.step("loss", [1, 1], loss=0.1)
        self.step("loss", [1, 1], loss=-3.25)
        self.step("loss", [1, 1], loss=None)
        self.step("loss", [1, 1])
        binary = {"Content-Type": "application/octet-stream"}
        self.assertEqual(self.d.request("POST", url, body=pack("float64", [1, 1]),
                                        headers=dict(binary, **{"Optd-Loss": "0.25"})).status, 200)
        self.assertEqual(self.d.request("POST", url, body=pack("float64", [1, 1]), headers=binary).status, 200)
        self.assertEqual(self.d.request("POST", url, body=pack("float64", [1, 1]),
                                        headers=dict(binary, **{"Optd-Loss": "1e300"})).status, 200)
        self.step("loss", [1, 1], loss=5e-324)
        losses = [r["loss"] for r in self.d.history("loss")]
        self.assertEqual(losses, [1.5, 0.1, -3.25, None, None, 0.25, None, 1e300, 5e-324])

        # Rejected losses change nothing: no step, no row.
        for bad in ("nan", "inf", "-Infinity", "1e400", "abc", ""):
            r = self.d.request("POST", url, body=pack("float64", [1, 1]), headers=dict(binary, **{"Optd-Loss": bad}))
            self.assertEqual(r.status, 400, "Optd-Loss %r: %r" % (bad, r))
            self.assertEqual(r.json["error"]["code"], "bad_request")
        for bad in ('"abc"', "true", "[1]", "1e999"):
            r = self.d.request("POST", url, body=('{"grad":[1,1],"loss":%s}' % bad).encode(),
                               headers={"Content-Type": "application/json"})
            self.assertEqual(r.status, 400, "loss %s: %r" % (bad, r))
        self.assertEqual(self.d.ok("GET", "/v1/sessions/loss")["step"], 9)
        self.assertEqual(len(self.d.history("loss")), 9)

    def test_a_worker_round_records_its_contributors_and_mean_loss(self):
        self.create("round", optimizer="sgd", dtype="float64", params=[0.0, 0.0], workers=2,
                    hyperparams={"lr": 1.0})
        a, b = self.d.client(), self.d.client()
        out = {}

        def contribute(c, key, g, loss):
            out[key] = c.ok("POST", "/v1/sessions/round/step", {"grad": g, "loss": loss})
        threads = [threading.Thread(target=contribute, args=(a, "a", [1.0, 2.0], 1.0)),
                   threading.Thread(target=contribute, args=(b, "b", [3.0, 6.0], 3.0))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        a.close()
        b.close()
        self.assertEqual(out["a"]["step"], 1)
        self.assertEqual(out["b"]["step"], 1)
        row, = self.d.history("round")
        self.assertEqual(row["contributors"], 2)
        self.assertEqual(row["loss"], 2.0)
        self.assertClose(row["grad_norm"], norm([2.0, 4.0]))
        self.assertClose(row["update_norm"], norm([2.0, 4.0]))
        self.assertClose(row["param_norm"], norm([2.0, 4.0]))

    def test_times_are_rfc3339_in_order_and_now(self):
        self.create("times", optimizer="sgd", size=1)
        before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        for _ in range(5):
            self.step("times", [1.0])
            time.sleep(0.01)
        after = datetime.datetime.now(datetime.timezone.utc)
        seen = []
        for row in self.d.history("times"):
            self.assertRegex(row["time"], RFC3339)
            t = datetime.datetime.fromisoformat(row["time"].replace("Z", "+00:00"))
            self.assertTrue(before - datetime.timedelta(seconds=1) <= t <= after + datetime.timedelta(seconds=1),
                            "%s not within %s..%s" % (t, before, after))
            seen.append(t)
        self.assertEqual(seen, sorted(seen))

    def test_paging_with_after_limit_and_next(self):
        self.create("pages", optimizer="sgd", size=1)
        for k in range(12):
            self.step("pages", [1.0], loss=float(k))

        def page(q):
            return self.d.ok("GET", "/v1/sessions/pages/history" + q)

        def steps(p):
            return [r["step"] for r in p["history"]]
        p = page("?limit=5")
        self.assertEqual((steps(p), p["next"]), (list(range(1, 6)), 5))
        p = page("?after=5&limit=5")
        self.assertEqual((steps(p), p["next"]), (list(range(6, 11)), 10))
        p = page("?after=10&limit=5")
        self.assertEqual((steps(p), p["next"]), ([11, 12], None))
        # A last page that is exactly full has no next.
        p = page("?after=8&limit=4")
        self.assertEqual((steps(p), p["next"]), ([9, 10, 11, 12], None))
        for q in ("", "?after=0", "?limit=12", "?limit=10000", "?after=0&limit=1000"):
            p = page(q)
            self.assertEqual((steps(p), p["next"]), (list(range(1, 13)), None), q)
            self.assertEqual([r["loss"] for r in p["history"]], [float(k) for k in range(12)])
        for q in ("?after=12", "?after=500"):
            self.assertEqual(page(q), {"history": [], "next": None}, q)
        # Walking by next with limit=1 visits every step once.
        walked, after = [], 0
        while after is not None:
            p = page("?after=%d&limit=1" % after)
            walked += steps(p)
            after = p["next"]
        self.assertEqual(walked, list(range(1, 13)))

    def test_bad_queries_are_400(self):
        self.create("queries", optimizer="sgd", size=1)
        for q in ("limit=0", "limit=10001", "limit=2.5", "limit=abc", "limit=-1", "after=-1", "after=abc",
                  "after=1.5", "limit="):
            r = self.d.request("GET", "/v1/sessions/queries/history?" + q)
            self.assertEqual(r.status, 400, "%s: %r" % (q, r))
            self.assertEqual(r.json["error"]["code"], "bad_request", q)

    def test_unknown_session_and_wrong_method(self):
        r = self.d.request("GET", "/v1/sessions/nobody/history")
        self.assertEqual(r.status, 404)
        self.assertEqual(r.json["error"]["code"], "not_found")
        self.create("methods", optimizer="sgd", size=1)
        r = self.d.request("POST", "/v1/sessions/methods/history", json_body={})
        self.assertEqual(r.status, 405, r)
        self.assertIn("GET", r.header("Allow") or "")

    def test_a_recreated_session_starts_a_new_history(self):
        self.create("again", optimizer="sgd", size=1)
        for _ in range(3):
            self.step("again", [1.0], loss=9.0)
        self.assertEqual(self.d.request("DELETE", "/v1/sessions/again").status, 204)
        self.assertEqual(self.d.request("GET", "/v1/sessions/again/history").status, 404)
        self.create("again", optimizer="sgd", size=1)
        self.assertEqual(self.d.history("again"), [])
        self.step("again", [1.0])
        self.assertEqual([(r["step"], r["loss"]) for r in self.d.history("again")], [(1, None)])

    def test_only_applied_steps_are_recorded(self):
        self.create("applied", optimizer="sgd", size=2)
        key = {"Idempotency-Key": "batch-1"}
        for _ in range(2):  # the retry is a replay, not a second step
            r = self.d.request("POST", "/v1/sessions/applied/step", json_body={"grad": [1, 1], "loss": 4.0},
                               headers=key)
            self.assertEqual(r.status, 200)
        self.assertEqual(r.header("Idempotent-Replayed"), "true")
        r = self.d.request("POST", "/v1/sessions/applied/step", json_body={"grad": [1, 1], "loss": 5.0},
                           headers={"If-Match": '"0"'})
        self.assertEqual(r.status, 412)
        r = self.d.request("POST", "/v1/sessions/applied/step", json_body={"grad": [1], "loss": 6.0})
        self.assertEqual(r.status, 422)
        self.assertEqual([(r["step"], r["loss"]) for r in self.d.history("applied")], [(1, 4.0)])

    def test_histories_are_per_session(self):
        self.create("mine", optimizer="sgd", size=1)
        self.create("yours", optimizer="sgd", size=1)
        for _ in range(3):
            self.step("mine", [1.0], loss=1.0)
        self.step("yours", [1.0], loss=2.0)
        self.assertEqual([r["loss"] for r in self.d.history("mine")], [1.0] * 3)
        self.assertEqual([r["loss"] for r in self.d.history("yours")], [2.0])


class PruningTests(unittest.TestCase):
    def test_only_the_last_history_steps_are_kept(self):
        d = Daemon(args=["--history-steps", "5"]).start()
        try:
            d.ok("POST", "/v1/sessions", {"name": "short", "optimizer": "sgd", "dtype": "float64", "size": 2})
            d.ok("POST", "/v1/sessions", {"name": "other", "optimizer": "sgd", "size": 1})
            last = None
            for k in range(1, 13):
                last = d.ok("POST", "/v1/sessions/short/step", {"grad": [k, -k], "loss": k / 10})["params"]
            for _ in range(3):
                d.ok("POST", "/v1/sessions/other/step", {"grad": [1]})
            rows = d.history("short")
            self.assertEqual([r["step"] for r in rows], [8, 9, 10, 11, 12])
            self.assertEqual([r["loss"] for r in rows], [0.8, 0.9, 1.0, 1.1, 1.2])
            self.assertTrue(abs(rows[-1]["param_norm"] - norm(last)) <= 1e-12 * norm(last))
            self.assertEqual([r["step"] for r in d.history("other")], [1, 2, 3])
            p = d.ok("GET", "/v1/sessions/short/history?after=0&limit=2")
            self.assertEqual(([r["step"] for r in p["history"]], p["next"]), ([8, 9], 9))
            p = d.ok("GET", "/v1/sessions/short/history?after=3&limit=10")
            self.assertEqual([r["step"] for r in p["history"]], [8, 9, 10, 11, 12])

            # Kept across a restart, and pruning goes on from there.
            d.stop()
            d.start()
            self.assertEqual(d.history("short"), rows)
            d.ok("POST", "/v1/sessions/short/step", {"grad": [1, 1]})
            self.assertEqual([r["step"] for r in d.history("short")], [9, 10, 11, 12, 13])
        finally:
            d.cleanup()


class AuthTests(unittest.TestCase):
    def test_history_needs_the_token(self):
        d = Daemon(env={"OPTD_TOKEN": "secret"}, token="secret").start()
        try:
            d.ok("POST", "/v1/sessions", {"name": "locked", "optimizer": "sgd", "size": 1})
            d.ok("POST", "/v1/sessions/locked/step", {"grad": [1], "loss": 0.5})
            r = d.request("GET", "/v1/sessions/locked/history", auth=False)
            self.assertEqual(r.status, 401)
            self.assertEqual(r.json["error"]["code"], "unauthorized")
            r = d.request("GET", "/v1/sessions/locked/history", auth=False, headers={"Authorization": "Bearer nope"})
            self.assertEqual(r.status, 401)
            self.assertEqual([r["loss"] for r in d.history("locked")], [0.5])
        finally:
            d.cleanup()
