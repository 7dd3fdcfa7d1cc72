"""Checkpoints: GET .../state and PUT .../state restore a session exactly."""

import random

from optd_e2e import DEFAULTS, DaemonTest, uniq

CONFIGS = [
    ("adam", "float32", {"lr": 0.01}),
    ("adam", "float64", {"lr": 0.01}),
    ("adam", "float32", {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}),
    ("nadam", "float32", {}),
    ("nadam", "float64", {"weight_decay": 0.01}),
    ("adamw", "float64", {}),
    ("adamax", "float32", {}),
    ("sgd", "float64", {"momentum": 0.9, "dampening": 0.1}),
    ("nag", "float32", {}),
    ("momentum", "float64", {}),
    ("adagrad", "float64", {"lr_decay": 0.01}),
    ("adadelta", "float32", {}),
    ("rmsprop", "float64", {"centered": True, "momentum": 0.5}),
]

REQUIRED_BUFFERS = {
    "adam": ["exp_avg", "exp_avg_sq"],
    "adamw": ["exp_avg", "exp_avg_sq"],
    "nadam": ["exp_avg", "exp_avg_sq", "mu_product"],
    "adamax": ["exp_avg", "exp_inf"],
    "sgd": [],
    "momentum": ["momentum_buffer"],
    "nag": ["momentum_buffer"],
    "adagrad": ["sum"],
    "adadelta": ["square_avg", "acc_delta"],
    "rmsprop": ["square_avg"],
}


class CheckpointCase(DaemonTest):
    """What the JSON and the binary checkpoint tests share: reproducible
    gradients, and sessions trained on them."""

    def grads(self, seed, n, k):
        rnd = random.Random(seed)
        return [[rnd.uniform(-1, 1) for _ in range(n)] for _ in range(k)]

    def trained(self, name, optimizer, params, seed, steps, **fields):
        """Creates name (fields: dtype, hyperparams, ...) and steps it steps
        times with the gradients of seed; name."""
        self.d.create(name, optimizer, params=params, **fields)
        for g in self.grads(seed, len(params), steps):
            self.d.step(name, g)
        return name


class CheckpointTests(CheckpointCase):

    def get_state(self, name):
        r = self.d.get("/v1/sessions/%s/state" % name)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.content_type, "application/json")
        return r.json

    def test_state_has_the_documented_fields(self):
        name = self.trained(uniq(), "adam", [0.5, -1.25, 3.0], 1, 3, hyperparams={"lr": 0.01})
        st = self.get_state(name)
        self.assertEqual(st["name"], name)
        self.assertEqual(st["optimizer"], "adam")
        self.assertEqual(st["dtype"], "float32")
        self.assertSame(st["step"], 3)
        self.assertEqual(st["params"], self.d.params(name)["params"])
        for k, v in dict(DEFAULTS["adam"], lr=0.01).items():
            self.assertSame(st["hyperparams"][k], v, k)
        self.assertIsInstance(st["state"], dict)
        for buf in ("exp_avg", "exp_avg_sq"):
            self.assertIn(buf, st["state"])
            self.assertEqual(len(st["state"][buf]), 3)
            self.assertTrue(all(isinstance(x, (int, float)) for x in st["state"][buf]))
        self.assertTrue(any(x != 0 for x in st["state"]["exp_avg"]))
        self.assertTrue(all(x > 0 for x in st["state"]["exp_avg_sq"]))

    def test_state_buffers_per_optimizer(self):
        for opt, dtype, hp in CONFIGS:
            with self.subTest(optimizer=opt, hyperparams=hp):
                name = uniq(opt)
                self.d.create(name, opt, dtype=dtype, hyperparams=hp, params=[1.0, 2.0])
                self.d.step(name, [0.5, -0.5])
                st = self.get_state(name)
                for buf in REQUIRED_BUFFERS[opt]:
                    self.assertIn(buf, st["state"], "%s lacks %s: %r" % (opt, buf, st))
                    if buf == "mu_product":
                        v = st["state"][buf]
                        v = v[0] if isinstance(v, list) and len(v) == 1 else v
                        self.assertIsInstance(v, (int, float), "mu_product is a scalar: %r" % st["state"][buf])
                    else:
                        self.assertEqual(len(st["state"][buf]), 2)
                if hp.get("amsgrad"):
                    self.assertIn("max_exp_avg_sq", st["state"])
                if opt == "rmsprop" and hp.get("centered"):
                    self.assertIn("grad_avg", st["state"])
                if opt == "rmsprop" and hp.get("momentum"):
                    self.assertIn("momentum_buffer", st["state"])
                if opt == "sgd" and hp.get("momentum"):
                    self.assertIn("momentum_buffer", st["state"])

    def test_restore_to_new_name_continues_bit_identically(self):
        for opt, dtype, hp in CONFIGS:
            with self.subTest(optimizer=opt, dtype=dtype, hyperparams=hp):
                a = self.trained(uniq(opt), opt, [0.5, -1.25, 3.0, 1e-3, 7.0], 2, 7, dtype=dtype, hyperparams=hp)
                b = uniq(opt + "-copy")
                st = self.get_state(a)
                body = {k: v for k, v in st.items() if k != "name"}
                r = self.d.request("PUT", "/v1/sessions/%s/state" % b, json_body=body)
                self.assertEqual(r.status, 201, r)
                sb = self.d.session(b)
                self.assertEqual((sb["optimizer"], sb["dtype"], sb["size"], sb["step"]), (opt, dtype, 5, 7))
                self.assertSame(sb["hyperparams"], self.d.session(a)["hyperparams"])
                stb = self.get_state(b)
                self.assertEqual(stb["params"], st["params"])
                self.assertEqual(stb["state"], st["state"])
                for k, g in enumerate(self.grads(3, 5, 5), start=8):
                    ra, rb = self.d.step(a, g).json, self.d.step(b, g).json
                    self.assertEqual(ra["step"], k)
                    self.assertEqual(rb["step"], k)
                    self.assertEqual(ra["params"], rb["params"], "restored session diverged at step %d" % k)
                self.assertEqual(self.get_state(a)["state"], self.get_state(b)["state"])

    def test_checkpoint_as_is_restores_under_its_own_name(self):
        a, twin = uniq(), uniq()
        for n in (a, twin):
            self.trained(n, "nadam", [1.0, 2.0, 3.0], 4, 4, dtype="float64")
        st = self.get_state(a)
        self.assertEqual(self.d.request("DELETE", "/v1/sessions/" + a).status, 204)
        r = self.d.request("PUT", "/v1/sessions/%s/state" % a, json_body=st)
        self.assertEqual(r.status, 201, r)
        for g in self.grads(5, 3, 4):
            self.assertEqual(self.d.step(a, g).json, self.d.step(twin, g).json)

    def test_put_state_over_existing_replaces_it(self):
        a, x = uniq(), uniq()
        self.trained(a, "adam", [1.0, 2.0, 3.0], 6, 3, dtype="float64", hyperparams={"lr": 0.05})
        self.d.create(x, "sgd", dtype="float32", params=[9.0])
        st = self.get_state(a)
        st["name"] = x
        r = self.d.request("PUT", "/v1/sessions/%s/state" % x, json_body=st)
        self.assertEqual(r.status, 200, r)
        s = self.d.session(x)
        self.assertEqual((s["optimizer"], s["dtype"], s["size"], s["step"]), ("adam", "float64", 3, 3))
        for g in self.grads(7, 3, 3):
            self.assertEqual(self.d.step(a, g).json["params"], self.d.step(x, g).json["params"])

    def test_bad_checkpoint_is_rejected_and_changes_nothing(self):
        a = uniq()
        self.d.create(a, "adam", params=[1.0, 2.0, 3.0])
        self.d.step(a, [0.1, 0.2, 0.3])
        st = self.get_state(a)
        bad = dict(st, state=dict(st["state"], exp_avg=st["state"]["exp_avg"][:2]))
        new = uniq()
        r = self.d.request("PUT", "/v1/sessions/%s/state" % new, json_body={k: v for k, v in bad.items() if k != "name"})
        self.assertError(r, 422)
        self.assertError(self.d.get("/v1/sessions/" + new), 404)
        before = self.snapshot(a)
        r = self.d.request("PUT", "/v1/sessions/%s/state" % a, json_body=bad)
        self.assertError(r, 422)
        self.assertUnchanged(a, before)
        r = self.d.request("PUT", "/v1/sessions/%s/state" % a, json_body=dict(st, params="nope"))
        self.assertError(r, 400, "bad_request")
        r = self.d.request("PUT", "/v1/sessions/%s/state" % a, json_body=dict(st, optimizer="lbfgs"))
        self.assertError(r, 422, "unknown_optimizer")
        r = self.d.request("PUT", "/v1/sessions/%s/state" % a,
                           json_body=dict(st, hyperparams=dict(st["hyperparams"], lr=-1)))
        self.assertError(r, 422, "bad_hyperparam")
        self.assertUnchanged(a, before)
        self.assertEqual(self.get_state(a), st)
