"""The Optd-Lr request header of a step (docs/API.md "Steps", an optd
extension): it sets the session's lr as PATCH {"hyperparams":{"lr":x}} (or
the per-group PATCH) would, in the step's transaction: it stays for later
steps and restarts, a refused step changes nothing (lr included), an
idempotent retry replays without applying it again, every contribution to a
worker round gives the same, and bad values teach the fix."""

import threading
import time

from optd_e2e import DaemonTest, pack, unpack, uniq

OCTET = "application/octet-stream"
MODEL = [
    {"tensors": [{"name": "w", "shape": [2]}]},
    {"hyperparams": {"lr": 0.2}, "tensors": [{"name": "b", "shape": [1]}]},
]


class StepLrTests(DaemonTest):

    def lr(self, name):
        return self.d.session(name)["hyperparams"]["lr"]

    def group_lrs(self, name):
        return [g["hyperparams"]["lr"] for g in self.d.session(name)["groups"]]

    def step(self, name, grad, lr=None, headers=None, expect=200):
        h = dict(headers or {})
        if lr is not None:
            h["Optd-Lr"] = lr
        return self.d.step(name, grad, headers=h, expect=expect)

    def grouped(self, **fields):
        name = uniq("g")
        body = {"name": name, "optimizer": "sgd", "hyperparams": {"lr": 0.1}, "groups": MODEL}
        body.update(fields)
        r = self.d.post("/v1/sessions", body)
        self.assertEqual(r.status, 201, r)
        return name

    def test_the_lr_is_used_by_the_step_and_stays_for_later_steps_and_restarts(self):
        name = uniq()
        self.d.create(name, "sgd", hyperparams={"lr": 0.1}, params=[1.0])
        r = self.step(name, [1.0], lr="0.5")
        self.assertEqual(r.json["lr"], 0.5)
        self.assertEqual(r.json["params"], [0.5])
        self.assertEqual(self.lr(name), 0.5)
        r = self.step(name, [1.0])  # no header: the lr set stays
        self.assertEqual((r.json["lr"], r.json["params"]), (0.5, [0.0]))
        self.d.restart()
        self.assertEqual(self.lr(name), 0.5)
        self.assertEqual(self.step(name, [1.0]).json["params"], [-0.5])

    def test_a_binary_step_takes_it_too(self):
        name = uniq()
        self.d.create(name, "sgd", hyperparams={"lr": 0.1}, params=[1.0, 2.0])
        r = self.d.request("POST", "/v1/sessions/%s/step" % name, body=pack("float32", [1.0, 1.0]),
                           headers={"Content-Type": OCTET, "Accept": OCTET, "Optd-Lr": " 0.25 "})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("Optd-Lr"), "0.25")
        self.assertEqual(unpack("float32", r.body), [0.75, 1.75])
        self.assertEqual(self.lr(name), 0.25)

    def test_an_lr_schedule_multiplies_it_as_after_a_patch(self):
        name = uniq()
        self.d.create(name, "sgd", hyperparams={"lr": 0.1, "lr_schedule": {"type": "exponential", "gamma": 0.5}},
                      params=[1.0, 1.0])
        self.step(name, [1.0, 1.0])
        r = self.step(name, [1.0, 1.0], lr="0.4")
        self.assertEqual(r.json["lr"], 0.2)  # 0.4 * 0.5^1
        self.assertEqual(self.lr(name), 0.4)

    def test_a_refused_step_changes_nothing_lr_included(self):
        name = uniq()
        self.d.create(name, "sgd", dtype="float32", hyperparams={"lr": 0.1}, params=[3e38])
        before = self.snapshot(name)
        self.assertError(self.step(name, [1.0], lr="0.5", headers={"If-Match": '"7"'}, expect=None), 412,
                         "step_mismatch")
        self.assertError(self.step(name, [1.0, 2.0], lr="0.5", expect=None), 422, "size_mismatch")
        # The step would overflow float32: refused after the lr was set in memory.
        self.assertError(self.step(name, [-1e38], lr="10", expect=None), 422, "non_finite")
        self.assertUnchanged(name, before)
        self.assertEqual(self.lr(name), 0.1)
        self.d.restart()
        self.assertEqual(self.lr(name), 0.1)
        self.assertUnchanged(name, before)

    def test_groups_take_a_list_or_one_number_for_all(self):
        name = self.grouped()
        r = self.step(name, [1.0, 1.0, 1.0], lr="0.3, 0.4")
        self.assertEqual(r.json["lr"], [0.3, 0.4])
        self.assertEqual(self.group_lrs(name), [0.3, 0.4])
        self.assertEqual(self.lr(name), 0.1)  # as the per-group PATCH: the session's own stays
        r = self.step(name, [1.0, 1.0, 1.0], lr="0.05")
        self.assertEqual(r.json["lr"], [0.05, 0.05])
        self.assertEqual((self.lr(name), self.group_lrs(name)), (0.05, [0.05, 0.05]))
        self.d.restart()
        self.assertEqual(self.group_lrs(name), [0.05, 0.05])
        err = self.assertError(self.step(name, [1.0] * 3, lr="0.1,0.2,0.3", expect=None), 422, "invalid")
        self.assertIn("2 groups", err["message"])
        err = self.assertError(self.step(name, [1.0] * 3, lr="0.1,-2", expect=None), 422, "bad_hyperparam")
        self.assertIn("Optd-Lr", err["message"])
        self.assertEqual(self.group_lrs(name), [0.05, 0.05])

    def test_bad_values_are_refused_with_how_to_fix_them(self):
        name = uniq()
        self.d.create(name, "adam", params=[1.0])
        before = self.snapshot(name)
        for bad in ("fast", "", "0.1,", "nan", "1e999", "0.1;0.2"):
            err = self.assertError(self.step(name, [1.0], lr=bad, expect=None), 400, "bad_request")
            self.assertIn("Optd-Lr", err["message"], bad)
        err = self.assertError(self.step(name, [1.0], lr="-0.1", expect=None), 422, "bad_hyperparam")
        self.assertIn("Optd-Lr", err["message"])
        err = self.assertError(self.step(name, [1.0], lr="0.1,0.2", expect=None), 422, "invalid")
        self.assertIn("no groups", err["message"])
        self.assertUnchanged(name, before)

    def test_a_retry_replays_without_applying_it_again_and_another_lr_is_a_mismatch(self):
        name = uniq()
        self.d.create(name, "sgd", hyperparams={"lr": 0.1}, params=[1.0])
        key = {"Idempotency-Key": uniq("k")}
        r1 = self.step(name, [1.0], lr="0.5", headers=key)
        r = self.d.request("PATCH", "/v1/sessions/" + name, json_body={"hyperparams": {"lr": 0.2}})
        self.assertEqual(r.status, 200, r)
        r2 = self.step(name, [1.0], lr="0.5", headers=key)
        self.assertEqual(r2.header("Idempotent-Replayed"), "true")
        self.assertEqual(r2.json, r1.json)
        self.assertEqual(self.lr(name), 0.2)
        self.assertError(self.step(name, [1.0], lr="0.7", headers=key, expect=None), 422, "idempotency_mismatch")
        self.assertError(self.step(name, [1.0], headers=key, expect=None), 422, "idempotency_mismatch")
        self.assertEqual(self.lr(name), 0.2)
        key2 = {"Idempotency-Key": uniq("k")}
        self.step(name, [1.0], headers=key2)
        self.assertError(self.step(name, [1.0], lr="0.2", headers=key2, expect=None), 422, "idempotency_mismatch")

    def test_every_contribution_to_a_round_sets_the_same_lr_applied_with_the_round(self):
        name = uniq()
        self.d.create(name, "sgd", hyperparams={"lr": 0.1}, params=[1.0], workers=2, round_timeout=30)
        out = {}

        def first():
            out["a"] = self.step(name, [1.0], lr="0.5", expect=None)
        t = threading.Thread(target=first)
        t.start()
        for _ in range(1000):  # until the first contribution waits in its round
            if b"optd_round_contributions_waiting 1" in self.d.get("/metrics").body:
                break
            time.sleep(0.01)
        self.assertEqual(self.lr(name), 0.1)  # not before the round applies
        err = self.assertError(self.step(name, [3.0], lr="0.6", expect=None), 422, "invalid")
        self.assertIn("Optd-Lr", err["message"])
        self.assertError(self.step(name, [3.0], expect=None), 422, "invalid")
        good = self.step(name, [3.0], lr="0.5", expect=None)
        t.join(30)
        self.assertEqual((good.status, out["a"].status), (200, 200), (good, out["a"]))
        self.assertEqual(good.json["contributors"], 2)
        self.assertEqual(good.json["lr"], 0.5)
        self.assertEqual(good.json["params"], [0.0])  # 1 - 0.5 * mean(1, 3)
        self.assertEqual(self.lr(name), 0.5)

    def test_a_bad_lr_does_not_open_a_round(self):
        name = uniq()
        self.d.create(name, "sgd", hyperparams={"lr": 0.1}, params=[1.0], workers=2, round_timeout=30)
        self.assertError(self.step(name, [1.0], lr="-1", expect=None), 422, "bad_hyperparam")
        self.assertIn(b"optd_round_contributions_waiting 0", self.d.get("/metrics").body)

    def test_a_round_applied_at_its_timeout_sets_its_lr(self):
        name = uniq()
        self.d.create(name, "sgd", hyperparams={"lr": 0.1}, params=[1.0], workers=2, min_workers=1,
                      round_timeout=0.3)
        r = self.step(name, [1.0], lr="0.5")  # waits for the timeout, then applies with one contribution
        self.assertEqual((r.json["contributors"], r.json["lr"], r.json["params"]), (1, 0.5, [0.5]))
        self.assertEqual(self.lr(name), 0.5)
