"""Tensors and parameter groups (API.md "Tensors and parameter groups"):
creation with groups and strict validation of them, replies that list every
group, skipped tensors (JSON "skip", binary Optd-Skip) with per-tensor step
counts, per-group PATCH, the lr list, checkpoints (JSON tensor_state and
safetensors params/<tensor>, <buffer>/<tensor>, step/<tensor>) round-trip,
worker rounds, idempotent replays, forks, and kill -9 durability. The
arithmetic against torch is tests/training/test_groups.py's."""

import struct
import threading
import time

from optd_e2e import DaemonTest, f32, pack, unpack, uniq
import safetensors_spec as spec

OCTET = "application/octet-stream"

# A small model: 6 + 2 + 2 + 1 = 11 elements.
MODEL = [
    {"tensors": [{"name": "fc1.weight", "shape": [2, 3]}, {"name": "fc2.weight", "shape": [1, 2]}]},
    {"hyperparams": {"weight_decay": 0}, "tensors": [{"name": "fc1.bias", "shape": [2]},
                                                    {"name": "fc2.bias", "shape": []}]},
]
SLICES = {"fc1.weight": (0, 6), "fc2.weight": (6, 8), "fc1.bias": (8, 10), "fc2.bias": (10, 11)}
N = 11


class GroupTests(DaemonTest):

    def make(self, optimizer="adamw", groups=MODEL, **fields):
        name = uniq("g")
        body = {"name": name, "optimizer": optimizer, "groups": groups}
        body.setdefault("hyperparams", {"lr": 0.01, "weight_decay": 0.1})
        body.update(fields)
        r = self.d.post("/v1/sessions", body)
        self.assertEqual(r.status, 201, r)
        return name, r.json

    def step(self, name, grad, skip=None, headers=None, expect=200):
        body = {"grad": grad}
        if skip is not None:
            body["skip"] = skip
        r = self.d.request("POST", "/v1/sessions/%s/step" % name, json_body=body, headers=headers)
        if expect is not None:
            self.assertEqual(r.status, expect, r)
        return r

    def state(self, name, **kw):
        r = self.d.get("/v1/sessions/%s/state" % name, **kw)
        self.assertEqual(r.status, 200, r)
        return r

    def create_error(self, body, status, code, *words):
        body = dict({"name": uniq("bad"), "optimizer": "adam"}, **body)
        r = self.d.post("/v1/sessions", body)
        err = self.assertError(r, status, code)
        for w in words:
            self.assertIn(w, err["message"], r)
        self.assertError(self.d.get("/v1/sessions/" + body["name"]), 404, "not_found")
        return err

    # -- creation ---------------------------------------------------------
    def test_a_created_session_lists_every_group_with_full_hyperparams(self):
        name, s = self.make()
        self.assertEqual(s["size"], N)
        self.assertEqual(len(s["groups"]), 2)
        full = {k: v for k, v in s["hyperparams"].items() if k not in ("lr_schedule", "max_grad_norm")}
        self.assertEqual(s["groups"][0]["hyperparams"], full)
        self.assertEqual(s["groups"][1]["hyperparams"], dict(full, weight_decay=0))
        self.assertEqual(s["groups"][1]["tensors"], MODEL[1]["tensors"])
        for got in (self.d.session(name), [x for x in self.d.get("/v1/sessions?limit=1000").json["sessions"]
                                           if x["name"] == name][0]):
            self.assertEqual(got["groups"], s["groups"])
        self.assertEqual(self.d.params(name)["params"], [0.0] * N)

    def test_without_groups_a_session_is_as_before(self):
        name = uniq()
        s = self.d.create(name, "adam", params=[1.0, 2.0])
        self.assertNotIn("groups", s)
        r = self.d.step(name, [0.1, 0.2])
        self.assertIsInstance(r.json["lr"], float)
        self.assertNotIn("tensor_state", self.state(name).json)

    def test_params_or_size_must_fill_the_tensors(self):
        name, _ = self.make(params=[0.5] * N)
        self.assertEqual(self.d.params(name)["params"], [0.5] * N)
        name, _ = self.make(size=N, fill=0.25)
        self.assertEqual(self.d.params(name)["params"], [0.25] * N)
        self.create_error({"groups": MODEL, "params": [0.5] * (N - 1)}, 422, "size_mismatch", "10", "11")
        self.create_error({"groups": MODEL, "size": N + 1}, 422, "size_mismatch", "11")

    def test_bad_groups_are_refused_with_a_sentence_that_says_what_to_do(self):
        t = [{"name": "w", "shape": [2]}]
        cases = [
            ({"groups": {"tensors": t}}, 400, "bad_request", "array"),
            ({"groups": []}, 422, "invalid", "at least one group"),
            ({"groups": ["w"]}, 400, "bad_request", "groups[0]"),
            ({"groups": [{"tensor": t}]}, 422, "unknown_field", 'did you mean "tensors"'),
            ({"groups": [{"lr": 0.1, "tensors": t}]}, 422, "unknown_field", "inside \"hyperparams\""),
            ({"groups": [{"optimizer": "sgd", "tensors": t}]}, 422, "invalid", "optimizer or dtype"),
            ({"groups": [{"tensors": t}, {"tensors": []}]}, 422, "invalid", "group 1 has no tensors"),
            ({"groups": [{"tensors": [{"name": "w x", "shape": [2]}]}]}, 422, "invalid", "[A-Za-z0-9._/-]"),
            ({"groups": [{"tensors": [{"name": "w", "shape": [2]}, {"name": "w", "shape": [1]}]}]}, 422,
             "invalid", "twice"),
            ({"groups": [{"tensors": [{"name": "w", "shape": 2}]}]}, 400, "bad_request", "shape"),
            ({"groups": [{"tensors": [{"name": "w", "shape": [0]}]}]}, 422, "invalid", "positive integer"),
            ({"groups": [{"tensors": [{"name": "w", "shape": [2.5]}]}]}, 422, "invalid", "positive integer"),
            ({"groups": [{"tensors": [{"shape": [2]}]}]}, 422, "invalid", "name"),
            ({"groups": [{"tensors": [{"name": "w", "shape": [2], "dtype": "float32"}]}]}, 422, "unknown_field",
             "tensors[0]"),
            ({"groups": [{"hyperparams": {"lr_schedule": {"type": "exponential", "gamma": 0.9}}, "tensors": t}]},
             422, "invalid", "session-wide"),
            ({"groups": [{"hyperparams": {"max_grad_norm": 1}, "tensors": t}]}, 422, "invalid", "session-wide"),
            ({"groups": [{"hyperparams": {"lr": -1}, "tensors": t}]}, 422, "bad_hyperparam",
             "groups[0].hyperparams"),
            ({"groups": [{"hyperparams": {"beta": [0.9, 0.99]}, "tensors": t}]}, 422, "unknown_field",
             'did you mean "betas"'),
            ({"groups": [{"hyperparams": [], "tensors": t}]}, 400, "bad_request", "object"),
            ({"groups": [{"tensors": [{"name": "w", "shape": [1] * 33}]}]}, 422, "invalid", "dimensions"),
        ]
        for body, status, code, words in cases:
            with self.subTest(body=body):
                self.create_error(body, status, code, words)
        self.create_error({"optimizer": "adagrad", "groups": [{"hyperparams": {"initial_accumulator_value": 0.1},
                                                               "tensors": t}]},
                          422, "invalid", "constructor")

    # -- skipped tensors --------------------------------------------------
    def test_a_skipped_tensor_does_not_change_and_keeps_its_own_step(self):
        name, _ = self.make(params=[1.0] * N)
        garbage = [5.0] * N  # a skipped tensor's elements are ignored
        p1 = [f32(x) for x in self.step(name, garbage, skip=["fc2.bias", "fc1.weight"]).json["params"]]
        self.assertEqual(p1[0:6], [1.0] * 6, "fc1.weight was skipped")
        self.assertEqual(p1[10], 1.0, "fc2.bias was skipped")
        self.assertNotEqual(p1[6], 1.0)
        b = struct.pack("<%df" % N, *garbage)
        r = self.d.request("POST", "/v1/sessions/%s/step" % name, body=b,
                           headers={"Content-Type": OCTET, "Accept": OCTET, "Optd-Skip": " fc2.bias , fc1.bias"})
        self.assertEqual(r.status, 200, r)
        p2 = unpack("float32", r.body)
        self.assertEqual(p2[8:11], p1[8:11])
        self.assertEqual(r.header("Optd-Lr"), "0.01,0.01")
        ts = self.state(name).json["tensor_state"]
        self.assertEqual({k: v["step"] for k, v in ts.items()},
                         {"fc1.weight": 1, "fc2.weight": 2, "fc1.bias": 1, "fc2.bias": 0})
        self.assertEqual(self.d.session(name)["step"], 2, "the session's step counts applied steps")
        # The first real step of fc2.bias is its step 1: a full Adam step of lr.
        p3 = self.step(name, [0.0] * 10 + [1.0]).json["params"]
        self.assertEqual(f32(p3[10]), f32(1.0 - f32(0.01 * f32(1.0 / f32(1.0 + f32(1e-8))))))

    def test_unknown_or_malformed_skips_are_refused_and_change_nothing(self):
        name, _ = self.make()
        before = self.snapshot(name)
        err = self.assertError(self.step(name, [0.0] * N, skip=["fc3.bias"], expect=None), 422, "invalid")
        self.assertIn('did you mean "fc1.bias"', err["message"])
        self.assertError(self.step(name, [0.0] * N, skip="fc1.bias", expect=None), 400, "bad_request")
        self.assertError(self.step(name, [0.0] * N, skip=[1], expect=None), 400, "bad_request")
        self.assertError(self.step(name, [0.0] * N, skip=["fc1.bias"], headers={"Optd-Skip": "fc1.bias"},
                                   expect=None), 400, "bad_request")
        r = self.d.request("POST", "/v1/sessions/%s/step" % name, body=pack("float32", [0.0] * N),
                           headers={"Content-Type": OCTET, "Optd-Skip": "fc1.bias,a b"})
        self.assertError(r, 400, "bad_request")
        self.assertUnchanged(name, before)
        plain = uniq()
        self.d.create(plain, "sgd", params=[1.0])
        err = self.assertError(self.step(plain, [1.0], skip=["params"], expect=None), 422, "invalid")
        self.assertIn("created without groups", err["message"])
        err = self.assertError(self.step(plain, [1.0], skip=["w"], expect=None), 422, "invalid")
        self.assertIn('"params"', err["message"])

    def test_a_round_skips_the_same_tensors_for_every_contribution(self):
        name, _ = self.make(workers=2, round_timeout=30)
        out = {}

        def first():
            out["a"] = self.step(name, [1.0] * N, skip=["fc2.bias"], expect=None)
        t = threading.Thread(target=first)
        t.start()
        for _ in range(1000):  # until the first contribution waits in its round
            if b"optd_round_contributions_waiting 1" in self.d.get("/metrics").body:
                break
            time.sleep(0.01)
        bad = self.step(name, [1.0] * N, skip=["fc1.bias"], expect=None)
        self.assertError(bad, 422, "invalid")
        good = self.step(name, [3.0] * N, skip=["fc2.bias"], expect=None)
        t.join(30)
        self.assertEqual((good.status, out["a"].status), (200, 200), (good, out["a"]))
        self.assertEqual(good.json["contributors"], 2)
        ts = self.state(name).json["tensor_state"]
        self.assertEqual(ts["fc2.bias"]["step"], 0)
        self.assertEqual(ts["fc1.bias"]["step"], 1)

    def test_an_idempotent_replay_has_the_lr_of_every_group(self):
        name, _ = self.make(hyperparams={"lr": 0.01, "lr_schedule": {"type": "exponential", "gamma": 0.5}})
        hdr = {"Idempotency-Key": uniq("k")}
        r1 = self.step(name, [0.5] * N, skip=["fc1.bias"], headers=hdr)
        r2 = self.step(name, [0.5] * N, skip=["fc1.bias"], headers=hdr)
        self.assertEqual(r2.header("Idempotent-Replayed"), "true")
        self.assertEqual(r2.json, r1.json)
        self.assertEqual(r1.json["lr"], [0.01, 0.01])
        r3 = self.step(name, [0.5] * N, headers=hdr, expect=None)
        self.assertError(r3, 422, "idempotency_mismatch")  # the same key with another skip set
        self.assertEqual(self.step(name, [0.5] * N).json["lr"], [0.005, 0.005])

    # -- PATCH ------------------------------------------------------------
    def test_patch_merges_per_group_and_the_session_level_into_every_group(self):
        name, _ = self.make()
        r = self.d.request("PATCH", "/v1/sessions/" + name,
                           json_body={"groups": [{"hyperparams": {"lr": 0.5}}, {}]})
        self.assertEqual(r.status, 200, r)
        self.assertEqual([g["hyperparams"]["lr"] for g in r.json["groups"]], [0.5, 0.01])
        self.assertEqual(self.step(name, [0.0] * N).json["lr"], [0.5, 0.01])
        r = self.d.request("PATCH", "/v1/sessions/" + name, json_body={"hyperparams": {"eps": 1e-6}})
        self.assertEqual([g["hyperparams"]["eps"] for g in r.json["groups"]], [1e-6, 1e-6])
        self.assertEqual([g["hyperparams"]["weight_decay"] for g in r.json["groups"]], [0.1, 0])
        # One group starts amsgrad: its buffer starts fresh, the other group's
        # steps go on as before.
        r = self.d.request("PATCH", "/v1/sessions/" + name,
                           json_body={"groups": [{}, {"hyperparams": {"amsgrad": True}}]})
        self.assertEqual(r.status, 200, r)
        st = self.state(name).json
        self.assertEqual(st["state"]["max_exp_avg_sq"], [0.0] * N)
        self.assertEqual(self.step(name, [0.1] * N).status, 200)

    def test_bad_patches_are_refused_and_change_nothing(self):
        name, _ = self.make()
        before = self.snapshot(name)
        cases = [
            ({"groups": [{}]}, 422, "invalid", "2 groups"),
            ({"groups": {}}, 400, "bad_request", "array"),
            ({"groups": [{"tensors": []}, {}]}, 422, "invalid", "cannot change"),
            ({"groups": [{"hyperparams": {"max_grad_norm": 1.0}}, {}]}, 422, "invalid", "session-wide"),
            ({"groups": [{"hyperparams": {"lr": -1}}, {}]}, 422, "bad_hyperparam", "groups[0]"),
            ({"groups": [{"lr": 1}, {}]}, 422, "unknown_field", "inside \"hyperparams\""),
        ]
        for body, status, code, words in cases:
            with self.subTest(body=body):
                r = self.d.request("PATCH", "/v1/sessions/" + name, json_body=body)
                err = self.assertError(r, status, code)
                self.assertIn(words, err["message"])
                self.assertUnchanged(name, before)
                self.assertEqual(self.d.session(name)["groups"], before[0]["groups"])
        plain = uniq()
        self.d.create(plain, "sgd", params=[1.0])
        r = self.d.request("PATCH", "/v1/sessions/" + plain, json_body={"groups": [{}]})
        self.assertError(r, 422, "invalid")

    def test_the_schedule_multiplies_each_groups_lr_and_clipping_sees_the_whole_gradient(self):
        name, _ = self.make(optimizer="sgd", hyperparams={"lr": 0.5, "max_grad_norm": 1.0,
                                                          "lr_schedule": {"type": "step", "step_size": 1,
                                                                          "gamma": 0.5}},
                            groups=[dict(MODEL[0]), {"hyperparams": {"lr": 0.25}, "tensors": MODEL[1]["tensors"]}],
                            params=[0.0] * N)
        r = self.step(name, [3.0] * 8 + [4.0] * 2 + [12.0], skip=["fc2.bias"]).json
        self.assertEqual(r["lr"], [0.5, 0.25])
        # The norm of the gradients given: sqrt(8 * 9 + 2 * 16) = sqrt(104), not with fc2.bias's 12.
        self.assertEqual(r["grad_norm"], 104 ** 0.5)
        coef = f32(1.0 / (104 ** 0.5 + 1e-6))
        self.assertEqual(f32(r["params"][0]), f32(-0.5 * f32(3.0 * coef)))
        self.assertEqual(f32(r["params"][8]), f32(-0.25 * f32(4.0 * coef)))
        self.assertEqual(r["params"][10], 0.0)
        self.assertEqual(self.step(name, [0.0] * N).json["lr"], [0.25, 0.125])

    # -- checkpoints ------------------------------------------------------
    def test_a_json_checkpoint_round_trips_with_each_tensors_step(self):
        name, _ = self.make(optimizer="nadam", hyperparams={"lr": 0.01}, params=[0.5] * N)
        for k in range(5):
            self.step(name, [0.1 * (k + 1)] * N, skip=["fc2.bias"] if k % 2 else ["fc1.weight"])
        ck = self.state(name).json
        self.assertEqual(ck["tensor_state"]["fc2.bias"]["step"], 3)
        self.assertIn("mu_product", ck["tensor_state"]["fc1.weight"])
        self.assertNotIn("mu_product", ck["state"])
        copy = uniq("c")
        r = self.d.request("PUT", "/v1/sessions/%s/state" % copy, json_body=ck)
        self.assertEqual(r.status, 201, r)
        back = self.state(copy).json
        back["name"] = ck["name"]
        self.assertEqual(back, ck)
        a = self.step(name, [0.3] * N, skip=["fc1.bias"]).json
        b = self.step(copy, [0.3] * N, skip=["fc1.bias"]).json
        self.assertEqual(a, b)

    def test_bad_tensor_state_is_refused(self):
        name, _ = self.make(optimizer="nadam", hyperparams={"lr": 0.01})
        self.step(name, [0.1] * N)
        ck = self.state(name).json

        def put(mut, status, code, words):
            import copy as cp
            body = cp.deepcopy(ck)
            mut(body)
            target = uniq("bad")
            r = self.d.request("PUT", "/v1/sessions/%s/state" % target, json_body=body)
            err = self.assertError(r, status, code)
            self.assertIn(words, err["message"])
            self.assertError(self.d.get("/v1/sessions/" + target), 404, "not_found")
        put(lambda b: b["tensor_state"]["fc1.bias"].update(step=2), 422, "invalid", "session's step")
        put(lambda b: b["tensor_state"].update({"fc9": {"step": 0}}), 422, "invalid", "fc9")
        put(lambda b: b["tensor_state"]["fc1.bias"].update(stp=1), 422, "unknown_field", 'did you mean "step"')
        put(lambda b: b["tensor_state"]["fc1.bias"].pop("mu_product"), 422, "invalid", "mu_product")
        put(lambda b: b["tensor_state"]["fc1.bias"].update(mu_product=2), 422, "invalid", "[0, 1]")
        put(lambda b: b["state"].update(mu_product=0.5), 422, "invalid", "per tensor")
        put(lambda b: b.update(params=b["params"][:-1]), 422, "size_mismatch", "10")
        # A tensor the checkpoint does not name stepped with the session.
        body = dict(ck)
        body["tensor_state"] = {k: v for k, v in ck["tensor_state"].items() if k != "fc1.bias"}
        body["tensor_state"]["fc1.bias"] = {"mu_product": ck["tensor_state"]["fc1.bias"]["mu_product"]}
        target = uniq("ok")
        self.assertEqual(self.d.request("PUT", "/v1/sessions/%s/state" % target, json_body=body).status, 201)
        self.assertEqual(self.state(target).json["tensor_state"]["fc1.bias"]["step"], 1)

    def test_a_binary_checkpoint_stores_each_tensor_under_its_name_and_shape(self):
        name, _ = self.make(params=[0.5] * N)
        self.step(name, [0.1] * N, skip=["fc2.bias"])
        self.step(name, [0.2] * N)
        raw = self.state(name, headers={"Accept": OCTET}).body
        meta, tensors = spec.parse(raw)
        self.assertIn("groups", meta)
        want = {}
        for t, (a, b) in SLICES.items():
            shape = [x["shape"] for g in MODEL for x in g["tensors"] if x["name"] == t][0]
            for prefix in ("params", "exp_avg", "exp_avg_sq"):
                want["%s/%s" % (prefix, t)] = ("F32", shape)
            want["step/" + t] = ("I64", [])
        self.assertEqual({k: (v[0], list(v[1])) for k, v in tensors.items()}, want)
        params = [f32(x) for x in self.d.params(name)["params"]]
        for t, (a, b) in SLICES.items():
            self.assertEqual(spec.values(tensors["params/" + t]), params[a:b])
        self.assertEqual(struct.unpack("<q", tensors["step/fc2.bias"][2])[0], 1)
        self.assertEqual(struct.unpack("<q", tensors["step/fc1.bias"][2])[0], 2)
        copy = uniq("c")
        r = self.d.request("PUT", "/v1/sessions/%s/state" % copy, body=raw, headers={"Content-Type": OCTET})
        self.assertEqual(r.status, 201, r)
        meta2, tensors2 = spec.parse(self.state(copy, headers={"Accept": OCTET}).body)
        self.assertEqual(tensors2, tensors)
        self.assertEqual(dict(meta2, name=meta["name"]), meta)
        self.assertEqual(self.step(name, [0.3] * N, skip=["fc1.weight"]).json,
                         self.step(copy, [0.3] * N, skip=["fc1.weight"]).json)

    def test_bad_binary_checkpoints_are_refused(self):
        name, _ = self.make()
        self.step(name, [0.1] * N)
        meta, tensors = spec.parse(self.state(name, headers={"Accept": OCTET}).body)

        def put(ts, status, code, words):
            target = uniq("bad")
            r = self.d.request("PUT", "/v1/sessions/%s/state" % target, body=spec.build(meta, ts),
                               headers={"Content-Type": OCTET})
            err = self.assertError(r, status, code)
            self.assertIn(words, err["message"])
            self.assertError(self.d.get("/v1/sessions/" + target), 404, "not_found")
        put({k: v for k, v in tensors.items() if k != "params/fc1.bias"}, 422, "invalid", "params/fc1.bias")
        put({k: v for k, v in tensors.items() if k != "exp_avg/fc1.bias"}, 422, "invalid", "exp_avg/fc1.bias")
        put(dict(tensors, **{"params/fc1.bias": ("F32", [1, 2], tensors["params/fc1.bias"][2])}), 422, "invalid",
            "shape")
        put(dict(tensors, **{"params/fc9": ("F32", [2], b"\0" * 8)}), 422, "invalid", "fc9")
        put(dict(tensors, **{"momentum/fc1.bias": ("F32", [2], b"\0" * 8)}), 422, "unknown_field", "step/<tensor>")
        put(dict(tensors, **{"step/fc1.bias": ("I64", [], struct.pack("<q", 7))}), 422, "invalid", "past")
        put(dict(tensors, **{"params": ("F32", [N], b"\0" * 4 * N)}), 422, "invalid", "params/<tensor>")

    # -- forks and durability ---------------------------------------------
    def test_a_fork_keeps_the_groups_and_its_hyperparams_reach_every_group(self):
        name, _ = self.make(params=[1.0] * N)
        self.step(name, [0.5] * N, skip=["fc2.bias"])
        r = self.d.post("/v1/sessions", {"name": name + "-f", "from": name, "hyperparams": {"lr": 0.02}})
        self.assertEqual(r.status, 201, r)
        self.assertEqual([g["hyperparams"]["lr"] for g in r.json["groups"]], [0.02, 0.02])
        st = self.state(name + "-f").json
        self.assertEqual(st["tensor_state"], self.state(name).json["tensor_state"])
        r = self.d.post("/v1/sessions", {"name": name + "-g", "from": name, "groups": MODEL})
        self.assertError(r, 422, "invalid")

    def test_kill9_keeps_the_groups_and_each_tensors_state(self):
        name, _ = self.make(optimizer="nadam", hyperparams={"lr": 0.01}, params=[0.5] * N)
        twin, _ = self.make(optimizer="nadam", hyperparams={"lr": 0.01}, params=[0.5] * N)
        self.d.request("PATCH", "/v1/sessions/" + name, json_body={"groups": [{}, {"hyperparams": {"lr": 0.03}}]})
        self.d.request("PATCH", "/v1/sessions/" + twin, json_body={"groups": [{}, {"hyperparams": {"lr": 0.03}}]})
        for k in range(7):
            for n in (name, twin):
                self.step(n, [0.1 * (k + 1)] * N, skip=["fc2.bias"] if k % 3 else ["fc1.weight", "fc1.bias"])
        before = self.state(name).json
        self.d.kill()
        self.d.start()
        self.assertEqual(self.state(name).json, before)
        self.assertEqual(self.step(name, [0.2] * N, skip=["fc1.bias"]).json["params"],
                         self.step(twin, [0.2] * N, skip=["fc1.bias"]).json["params"])
