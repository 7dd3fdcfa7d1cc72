"""Big sessions' step log (issue 14): a session whose state is 1 MiB or more
commits most steps as a log entry (what redoes the step) and its whole state
every few steps. Reads of the committed session (GET params/state, a restart
after kill -9) redo the logged steps, and must give the very bits the step
replies gave, with clipping, schedules, Optd-Lr, groups and skipped tensors,
and across a PATCH that changes the settings the log is redone with."""

import random
import sqlite3
import struct

from optd_e2e import DaemonTest, pack, uniq

OCTET = "application/octet-stream"
N = 90000  # float32 Adam: 12 B/element, a 1.08 MB state


def grad(seed, n=N):
    rnd = random.Random(seed)
    return [rnd.uniform(-2.0, 2.0) for _ in range(n)]


class StepLogTests(DaemonTest):

    def step(self, name, g, headers=None):
        h = {"Content-Type": OCTET, "Accept": OCTET}
        h.update(headers or {})
        r = self.d.request("POST", "/v1/sessions/%s/step" % name, body=pack("float32", g), headers=h)
        self.assertEqual(r.status, 200, r)
        return r.body

    def committed(self, name):
        """The params as a read of the committed session gives them (bytes)."""
        r = self.d.get("/v1/sessions/%s/params" % name, headers={"Accept": OCTET})
        self.assertEqual(r.status, 200, r)
        return r.body

    def state(self, name):
        r = self.d.get("/v1/sessions/%s/state" % name)
        self.assertEqual(r.status, 200, r)
        return r.json

    def logged(self, name):
        """(the step the stored state holds, log rows of the session) read
        from the database file itself."""
        con = sqlite3.connect("file:%s?mode=ro" % self.d.db, uri=True)
        try:
            sid, state_step = con.execute("SELECT id, state_step FROM sessions WHERE name = ?", (name,)).fetchone()
            rows = con.execute("SELECT count(*) FROM steplog WHERE session_id = ?", (sid,)).fetchone()[0]
        finally:
            con.close()
        return state_step, rows

    def test_every_step_reads_back_exactly_and_survives_kill9(self):
        a, b = uniq("log"), uniq("ref")
        hp = {"lr": 0.01, "max_grad_norm": 50.0, "weight_decay": 0.01,
              "lr_schedule": {"type": "step", "step_size": 3, "gamma": 0.5}}
        init = grad(0)
        for name in (a, b):
            self.d.create(name, "adam", hyperparams=hp, params=init)
        for k in range(1, 15):
            h = {"Optd-Lr": "%g" % (0.01 / k)} if k % 4 == 0 else None
            got = self.step(a, grad(k), h)
            self.assertEqual(self.step(b, grad(k), h), got, "two sessions stepped alike differ at step %d" % k)
            self.assertEqual(self.committed(a), got, "the committed session is not the step's reply at %d" % k)
        state_step, rows = self.logged(a)
        self.assertIsNotNone(state_step, "no step of a 1 MB Adam session was logged")
        self.assertLess(state_step, 14)
        self.assertGreater(rows, 0)
        # b's log is written out by a PATCH that changes nothing; a keeps its.
        lr = self.d.session(b)["hyperparams"]["lr"]
        r = self.d.request("PATCH", "/v1/sessions/" + b, json_body={"hyperparams": {"lr": lr}})
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(self.logged(b)[0])
        before = self.state(a)
        ref = self.state(b)
        for key in ("step", "params", "state"):
            self.assertEqual(ref[key], before[key], key)
        self.d.kill()
        self.d.start()
        self.assertEqual(self.state(a), before, "the state after kill -9 is not the acknowledged one")
        for k in range(15, 22):
            got = self.step(a, grad(k))
            self.assertEqual(self.step(b, grad(k)), got, "the reloaded log diverged at step %d" % k)
            self.assertEqual(self.committed(a), got)

    def test_groups_skipped_tensors_and_per_group_lrs_replay_exactly(self):
        name = uniq("glog")
        groups = [{"tensors": [{"name": "w", "shape": [300, 200]}]},
                  {"hyperparams": {"lr": 0.002, "weight_decay": 0},
                   "tensors": [{"name": "b", "shape": [20000]}, {"name": "c", "shape": [10000]}]}]
        r = self.d.post("/v1/sessions", {"name": name, "optimizer": "adamw", "groups": groups,
                                         "hyperparams": {"lr": 0.01, "max_grad_norm": 10.0},
                                         "params": grad(1)})
        self.assertEqual(r.status, 201, r)
        skips = [None, "c", "w", None, "b,c", None, "w", "c", None, None]
        for k, skip in enumerate(skips, 1):
            h = {"Optd-Skip": skip} if skip else {}
            if k % 3 == 0:
                h["Optd-Lr"] = "%g,%g" % (0.01 / k, 0.002 / k)
            got = self.step(name, grad(100 + k), h)
            self.assertEqual(self.committed(name), got, "step %d (skip %s)" % (k, skip))
        self.assertIsNotNone(self.logged(name)[0])
        before = self.state(name)
        self.d.kill()
        self.d.start()
        self.assertEqual(self.state(name), before)
        self.assertEqual(before["tensor_state"]["c"]["step"], 7)

    def test_a_patch_in_the_middle_of_a_log_applies_from_then_on(self):
        name = uniq("plog")
        self.d.create(name, "adam", hyperparams={"lr": 0.01}, params=grad(2))
        for k in range(1, 4):
            self.step(name, grad(k))
        self.assertEqual(self.logged(name)[0], 0)
        r = self.d.request("PATCH", "/v1/sessions/" + name, json_body={"hyperparams": {"betas": [0.8, 0.99]}})
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(self.logged(name)[0], "a change of settings must write the state")
        for k in range(4, 8):
            got = self.step(name, grad(k))
            self.assertEqual(self.committed(name), got)
        self.assertEqual(self.logged(name)[0], 3)
        self.d.kill()
        self.d.start()
        self.assertEqual(self.committed(name), got)
        self.assertEqual(struct.calcsize("<f") * N, len(got))

    def test_a_retried_key_gets_the_params_without_the_daemon_saving_them(self):
        name = uniq("ilog")
        self.d.create(name, "adam", hyperparams={"lr": 0.01}, params=grad(3))
        first = self.step(name, grad(1), {"Idempotency-Key": "k1"})
        for k in range(2, 4):
            got = self.step(name, grad(k), {"Idempotency-Key": "k%d" % k})
        h = {"Content-Type": OCTET, "Accept": OCTET, "Idempotency-Key": "k3"}
        r = self.d.request("POST", "/v1/sessions/%s/step" % name, body=pack("float32", grad(3)), headers=h)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("Idempotent-Replayed"), "true")
        self.assertEqual(r.body, got, "the latest step's replay must give its params")
        h["Idempotency-Key"] = "k1"
        r = self.d.request("POST", "/v1/sessions/%s/step" % name, body=pack("float32", grad(1)), headers=h)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("Idempotent-Replayed"), "true")
        self.assertEqual(r.json["step"], 1)
        self.assertNotIn("params", r.json)
        self.assertNotEqual(first, got)
        con = sqlite3.connect("file:%s?mode=ro" % self.d.db, uri=True)
        try:
            # The reply ring's records: pos (lap << 32 | offset), session,
            # step and the reply's length (8 bytes each, little-endian),
            # then the reply (store.c, RING_HEAD), in chunks in offset order.
            sid = con.execute("SELECT id FROM sessions WHERE name = ?", (name,)).fetchone()[0]
            ring = b"".join(r[0] for r in con.execute("SELECT data FROM replies ORDER BY chunk"))
        finally:
            con.close()
        self.assertTrue(ring, "no saved replies")
        recs, at = [], ring.find(struct.pack("<QQ", sid, 1))
        while at >= 0:
            pos, _, _, length = struct.unpack_from("<QQQQ", ring, max(at - 8, 0))
            if at >= 8 and pos & 0xFFFFFFFF == at - 8:
                recs.append(length)
            at = ring.find(struct.pack("<QQ", sid, 1), at + 1)
        self.assertEqual(len(recs), 1, "step 1's record not found")
        self.assertLess(recs[0], 100, "a logged session's saved replies must not hold its params")
        self.d.kill()
        self.d.start()
        h["Idempotency-Key"] = "k3"
        r = self.d.request("POST", "/v1/sessions/%s/step" % name, body=pack("float32", grad(3)), headers=h)
        self.assertEqual((r.status, r.header("Idempotent-Replayed")), (200, "true"))
        self.assertEqual(r.body, got, "after kill -9 too")


if __name__ == "__main__":
    import unittest
    unittest.main()
