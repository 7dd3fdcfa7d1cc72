"""Idempotent replay on large sessions (issue 12, defect 13): the latest
keyed step of a session always replays with its params, whatever the size;
an older key, whose params are no longer kept, replays as a JSON body with
its step and no params (never an empty 200), in JSON and binary alike."""

import struct

from optd_e2e import DaemonTest, f32, unpack, uniq

BIN = "application/octet-stream"


class LargeReplayTests(DaemonTest):

    def bstep(self, name, grad_bytes, key, accept=BIN):
        hdrs = {"Content-Type": BIN, "Idempotency-Key": key}
        if accept:
            hdrs["Accept"] = accept
        return self.d.request("POST", "/v1/sessions/%s/step" % name, body=grad_bytes, headers=hdrs, timeout=120)

    def assertStepOnly(self, r, step):
        """An older key's replay: 200, JSON, the step and no params."""
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("Idempotent-Replayed"), "true", r)
        self.assertEqual(r.header("ETag"), '"%d"' % step, r)
        self.assertEqual(r.content_type, "application/json",
                         "a replay without params must say so in JSON, not as an empty vector: %r" % r)
        body = r.json
        self.assertEqual(body["step"], step, r)
        self.assertNotIn("params", body, r)

    def test_million_elements_latest_replays_with_params_older_with_step_only(self):
        n = 1000000
        name = uniq("big")
        self.d.create(name, "adam", size=n, fill=0.5)
        grad = struct.pack("<%df" % n, *([0.25] * n))
        replies = {}
        for k in range(1, 9):  # 4 MB of params a step: past the per-session budget
            r = self.bstep(name, grad, "k%d" % k)
            self.assertEqual(r.status, 200, r)
            self.assertEqual(len(r.body), 4 * n, r)
            replies[k] = r.body

        for accept in (BIN, None):
            with self.subTest(latest=True, accept=accept):
                r = self.bstep(name, grad, "k8", accept)
                self.assertEqual(r.status, 200, r)
                self.assertEqual(r.header("Idempotent-Replayed"), "true", r)
                self.assertEqual(r.header("ETag"), '"8"', r)
                if accept:
                    self.assertEqual(r.content_type, BIN, r)
                    self.assertTrue(r.body == replies[8], "the latest replay lost its params: %r" % r)
                else:
                    self.assertEqual(r.json["step"], 8)
                    got = [f32(x) for x in r.json["params"]]
                    # Not assertEqual on the lists: its diff of 1e6 elements takes minutes.
                    self.assertTrue(got == unpack("float32", replies[8]), "the latest JSON replay has other params")
            with self.subTest(latest=False, accept=accept):
                self.assertStepOnly(self.bstep(name, grad, "k1", accept), 1)
        # A JSON step replays the same way.
        r = self.d.request("POST", "/v1/sessions/%s/step" % name, body='{"grad":[%s]}' % ",".join(["0.25"] * n),
                           headers={"Idempotency-Key": "k2"}, timeout=120)
        self.assertStepOnly(r, 2)

        self.d.restart()
        r = self.bstep(name, grad, "k8")
        self.assertTrue(r.body == replies[8], "the latest replay lost its params across a restart: %r" % r)
        self.assertStepOnly(self.bstep(name, grad, "k3"), 3)
        self.assertEqual(self.d.session(name)["step"], 8, "a replay was applied again")

    def test_session_over_the_reply_budget_keeps_its_latest_reply(self):
        n = 5000000  # 20 MB of params: more than the whole per-session budget
        name = uniq("huge")
        self.d.create(name, "sgd", size=n, fill=1.0)
        grad = struct.pack("<%df" % n, *([0.5] * n))
        first = self.bstep(name, grad, "a")
        second = self.bstep(name, grad, "b")
        self.assertEqual((first.status, second.status), (200, 200), (first, second))
        r = self.bstep(name, grad, "b")
        self.assertEqual(r.header("Idempotent-Replayed"), "true", r)
        self.assertTrue(r.body == second.body, "the latest replay of a large session lost its params: %r" % r)
        self.assertStepOnly(self.bstep(name, grad, "a"), 1)
        self.assertEqual(self.d.session(name)["step"], 2)
