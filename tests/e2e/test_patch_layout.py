"""A PATCH that changes which state buffers a session uses (issue 12, defect
2): the stored state must change with the cached one, so GET .../state, a
restart and the steps after it all see the same, torch-like state."""

import math

from optd_e2e import DaemonTest, uniq


def rmsprop_step(p, g, st, lr, alpha, eps, momentum, centered):
    """One torch.optim.RMSprop step (1.13's order of operations) in float64
    on lists; st holds square_avg and, when used, momentum_buffer and grad_avg."""
    sq = [alpha * s + (1 - alpha) * gi * gi for s, gi in zip(st["square_avg"], g)]
    out = {"square_avg": sq}
    if centered:
        ga = [alpha * a + (1 - alpha) * gi for a, gi in zip(st["grad_avg"], g)]
        out["grad_avg"] = ga
        avg = [math.sqrt(s - a * a) + eps for s, a in zip(sq, ga)]
    else:
        avg = [math.sqrt(s) + eps for s in sq]
    if momentum > 0:
        buf = [momentum * b + gi / a for b, gi, a in zip(st["momentum_buffer"], g, avg)]
        out["momentum_buffer"] = buf
        p = [pi - lr * b for pi, b in zip(p, buf)]
    else:
        p = [pi - lr * gi / a for pi, gi, a in zip(p, g, avg)]
    return p, out


class PatchLayoutTests(DaemonTest):

    def assertClose(self, got, want, what):
        self.assertEqual(len(got), len(want), what)
        for i, (a, b) in enumerate(zip(got, want)):
            self.assertLessEqual(abs(a - b), 1e-12 * max(abs(b), 1e-300), "%s[%d]: %r != %r" % (what, i, a, b))

    def state(self, name):
        r = self.d.get("/v1/sessions/%s/state" % name)
        self.assertEqual(r.status, 200, r)
        return r.json

    def test_rmsprop_momentum_off_centered_on_is_stored_and_survives_a_restart(self):
        name = uniq("layout")
        p = [0.5, -1.25, 3.0, 0.0, 1e-3]
        hp = {"lr": 0.01, "alpha": 0.9, "eps": 1e-8, "momentum": 0.9, "centered": False}
        self.d.create(name, "rmsprop", dtype="float64", hyperparams=hp, params=p)
        st = {"square_avg": [0.0] * 5, "momentum_buffer": [0.0] * 5}
        grads = [[0.1 * (k + 1), -0.2, 0.3 / (k + 1), 0.4, -0.5 * k] for k in range(3)]
        for g in grads:
            r = self.d.step(name, g)
            p, st = rmsprop_step(p, g, st, hp["lr"], hp["alpha"], hp["eps"], 0.9, False)
            self.assertClose(r.json["params"], p, "params before the PATCH")

        # Same number of buffers (two), different ones: momentum_buffer goes,
        # grad_avg comes, starting at zero as torch would create it.
        r = self.d.request("PATCH", "/v1/sessions/" + name,
                           json_body={"hyperparams": {"momentum": 0, "centered": True}})
        self.assertEqual(r.status, 200, r)
        st = {"square_avg": st["square_avg"], "grad_avg": [0.0] * 5}
        got = self.state(name)
        self.assertEqual(sorted(got["state"]), ["grad_avg", "square_avg"], got["state"])
        self.assertEqual(got["state"]["grad_avg"], [0.0] * 5,
                         "GET .../state after the PATCH shows another buffer as grad_avg")
        self.assertClose(got["state"]["square_avg"], st["square_avg"], "square_avg after the PATCH")
        self.assertClose(got["params"], p, "params after the PATCH")

        self.d.restart()
        self.assertEqual(self.state(name), got, "the state after a restart differs from before it")
        g = [0.05, 0.1, -0.2, 0.3, 0.7]
        r = self.d.step(name, g)
        p, st = rmsprop_step(p, g, st, hp["lr"], hp["alpha"], hp["eps"], 0, True)
        self.assertEqual(r.json["step"], 4)
        self.assertClose(r.json["params"], p, "params of the step after the restart")
        after = self.state(name)
        self.assertClose(after["state"]["grad_avg"], st["grad_avg"], "grad_avg after the step")
        self.assertClose(after["state"]["square_avg"], st["square_avg"], "square_avg after the step")

    def test_cached_and_stored_state_agree_after_every_layout_patch(self):
        """For each optimizer whose buffers depend on its hyperparameters,
        flip them back and forth: the committed state (GET .../state) must
        equal what the next step computes from (checked by replaying the
        same steps on a session restored from that checkpoint)."""
        changes = [
            ("sgd", {"momentum": 0.9}, {"momentum": 0}),
            ("adam", {"amsgrad": True}, {"amsgrad": False}),
            ("adamw", {"amsgrad": True}, {"amsgrad": False}),
            ("rmsprop", {"momentum": 0.5, "centered": True}, {"momentum": 0, "centered": False}),
            ("rmsprop", {"momentum": 0.5}, {"momentum": 0, "centered": True}),
        ]
        g = [0.25, -0.5, 1.0]
        for opt, on, off in changes:
            with self.subTest(optimizer=opt, on=on):
                name, twin = uniq("flip"), uniq("twin")
                self.d.create(name, opt, dtype="float64", params=[1.0, 2.0, -3.0])
                for change in (on, off, on):
                    self.d.step(name, g)
                    r = self.d.request("PATCH", "/v1/sessions/" + name, json_body={"hyperparams": change})
                    self.assertEqual(r.status, 200, r)
                    ckpt = self.state(name)
                    r = self.d.request("PUT", "/v1/sessions/%s/state" % twin, json_body=ckpt)
                    self.assertIn(r.status, (200, 201), r)
                    a, b = self.d.step(name, g).json, self.d.step(twin, g).json
                    self.assertEqual(a["params"], b["params"],
                                     "a step from the stored state differs from one from the cached state")
