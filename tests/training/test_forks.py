"""Forks: POST /v1/sessions {"name": b, "from": a, "hyperparams": {...}} copies
a's current params, state and step; both then evolve independently."""

import random
import unittest

from harness import DaemonTest, uniq


def grads(seed, steps, n):
    rng = random.Random(seed)
    return [[rng.randrange(-4096, 4096) / 256.0 for _ in range(n)] for _ in range(steps)]


class MomentumLocal:
    """torch.optim.SGD with momentum (dampening 0) in float64, in the order of
    optim/kernels.inc: buf = d on the first step else buf*mom + 1*d; p = p + (-lr)*buf."""

    def __init__(self, p, mom):
        self.p, self.mom, self.buf = list(p), mom, None

    def copy(self):
        c = MomentumLocal(self.p, self.mom)
        c.buf = list(self.buf) if self.buf is not None else None
        return c

    def step(self, g, lr):
        if self.buf is None:
            self.buf = list(g)
        else:
            self.buf = [b * self.mom + 1.0 * d for b, d in zip(self.buf, g)]
        self.p = [p + (-lr) * b for p, b in zip(self.p, self.buf)]
        return self.p


class ForkTests(DaemonTest):
    def test_fork_evolves_independently(self):
        """Fork after 10 steps with another lr; step both with the same grads:
        the fork follows a local replay from the fork point, the original is
        unaffected."""
        a, b = uniq("orig"), uniq("fork")
        p0 = [1.0, -2.0, 0.5, 3.0, -0.25]
        self.create({"name": a, "optimizer": "sgd", "dtype": "float64", "params": p0,
                     "hyperparams": {"lr": 0.1, "momentum": 0.9}})
        g = grads(1, 30, len(p0))
        local = MomentumLocal(p0, 0.9)
        for t in range(10):
            r = self.step(a, g[t])
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.json["params"], local.step(g[t], 0.1))
        before = self.api.get("/v1/sessions/%s/state" % a).json
        f = self.create({"name": b, "from": a, "hyperparams": {"lr": 0.05}})
        self.assertEqual(f["name"], b)
        self.assertEqual(f["step"], 10)
        self.assertEqual(f["optimizer"], "sgd")
        self.assertEqual(f["dtype"], "float64")
        self.assertEqual(f["size"], len(p0))
        self.assertEqual(f["hyperparams"]["lr"], 0.05)
        self.assertEqual(f["hyperparams"]["momentum"], 0.9)
        st = self.api.get("/v1/sessions/%s/state" % b).json
        self.assertEqual(st["params"], before["params"])
        self.assertEqual(st["state"], before["state"])
        self.assertEqual(st["step"], 10)
        self.assertEqual(self.api.get("/v1/sessions/%s" % b).header("ETag"), '"10"')
        fork_local = local.copy()
        for t in range(10, 30):
            ra = self.step(a, g[t])
            rb = self.step(b, g[t])
            self.assertEqual((ra.status, rb.status), (200, 200), (ra, rb))
            self.assertEqual(ra.json["step"], t + 1)
            self.assertEqual(rb.json["step"], t + 1)
            self.assertEqual(rb.json["lr"], 0.05)
            self.assertEqual(ra.json["lr"], 0.1)
            self.assertEqual(ra.json["params"], local.step(g[t], 0.1), "original, step %d" % (t + 1))
            self.assertEqual(rb.json["params"], fork_local.step(g[t], 0.05), "fork, step %d" % (t + 1))
        # Deleting the original leaves the fork alone.
        self.assertEqual(self.api.delete("/v1/sessions/%s" % a).status, 204)
        self.assertEqual(self.params(b)["params"], fork_local.p)

    def test_fork_carries_state_and_step(self):
        """An Adam fork without overrides steps exactly as its source
        (bias corrections depend on the step, the update on exp_avg*)."""
        a, b = uniq("adam"), uniq("adamfork")
        self.create({"name": a, "optimizer": "adam", "dtype": "float32", "params": [0.5, -0.5, 2.0],
                     "hyperparams": {"lr": 0.01, "amsgrad": True}})
        g = grads(2, 20, 3)
        for t in range(7):
            self.assertEqual(self.step(a, g[t]).status, 200)
        self.create({"name": b, "from": a})
        for t in range(7, 20):
            ra, rb = self.step(a, g[t]), self.step(b, g[t])
            self.assertEqual(ra.json, rb.json, "step %d" % (t + 1))

    def test_fork_schedule_continues_from_the_step(self):
        """The fork's lr_schedule counts the steps copied with it; workers
        can be set in the fork body."""
        a, b = uniq("sch"), uniq("schfork")
        self.create({"name": a, "optimizer": "sgd", "dtype": "float64", "params": [1.0, 1.0],
                     "hyperparams": {"lr": 0.8}})
        for _ in range(10):
            self.assertEqual(self.step(a, [1.0, 0.0]).status, 200)
        f = self.create({"name": b, "from": a, "workers": 2, "round_timeout": 5,
                         "hyperparams": {"lr_schedule": {"type": "step", "step_size": 4, "gamma": 0.5},
                                         "max_grad_norm": 1.0}})
        self.assertEqual(f["workers"], 2)
        self.assertEqual(f["round_timeout"], 5)
        self.assertEqual(f["hyperparams"]["max_grad_norm"], 1.0)
        self.api.patch("/v1/sessions/%s" % b, {"workers": 1})
        r = self.step(b, [3.0, 4.0])
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json["step"], 11)
        self.assertEqual(r.json["lr"], 0.8 * 0.5 ** 2)  # 10 steps done: floor(10/4) = 2
        self.assertEqual(r.json["grad_norm"], 5.0)
        # the source kept its settings
        s = self.api.get("/v1/sessions/%s" % a).json
        self.assertIsNone(s["hyperparams"]["lr_schedule"])
        self.assertIsNone(s["hyperparams"]["max_grad_norm"])
        self.assertEqual(s["workers"], 1)

    def test_fork_errors(self):
        a = uniq("src")
        self.create({"name": a, "optimizer": "sgd", "params": [1.0, 2.0]})
        self.step(a, [1.0, 1.0])
        n = uniq("new")
        self.assertError(self.api.post("/v1/sessions", {"name": n, "from": uniq("missing")}), 404, "not_found")
        self.assertError(self.api.post("/v1/sessions", {"name": a, "from": a}), 409, "already_exists")
        other = uniq("other")
        self.create({"name": other, "optimizer": "adam", "size": 3})
        self.assertError(self.api.post("/v1/sessions", {"name": other, "from": a}), 409, "already_exists")
        for extra in ({"params": [1.0, 2.0]}, {"size": 2}, {"optimizer": "sgd"}, {"dtype": "float64"}):
            self.assertError(self.api.post("/v1/sessions", dict({"name": n, "from": a}, **extra)), 422)
        self.assertError(self.api.post("/v1/sessions", {"name": n, "from": a, "hyperparams": {"lr": -1}}),
                         422, "bad_hyperparam")
        self.assertError(self.api.post("/v1/sessions", {"name": n, "from": a, "hyperparams": {"nope": 1}}),
                         422)
        self.assertError(self.api.post("/v1/sessions", {"name": n, "from": a, "workers": 0}), 422)
        self.assertError(self.api.post("/v1/sessions", {"name": n, "from": 7}), 400, "bad_request")
        # None of these created anything; the other session is untouched.
        self.assertError(self.api.get("/v1/sessions/%s" % n), 404, "not_found")
        self.assertEqual(self.api.get("/v1/sessions/%s" % other).json["optimizer"], "adam")
        self.assertEqual(self.params(a)["step"], 1)


if __name__ == "__main__":
    unittest.main()
