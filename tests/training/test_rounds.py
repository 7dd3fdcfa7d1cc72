"""Worker rounds (API.md, "Training features"): k contributions make one
step with their (weighted) mean; timeouts, min_workers, idempotent retries,
PATCH of workers, stragglers (412) and backup workers."""

import json
import math
import random
import socket
import struct
import time
import unittest

from harness import DaemonTest, Pending, run_threads, uniq

WORKERS = 8
ROUNDS = 200


def dyadic_grad(rng, n):
    """Values k / 1024 with |k| < 2**19: every weighted sum of a round (integer
    weights <= 16, 8 workers) is exact in float64, so the mean is one rounding
    whatever the arrival order, and the local replay can be bit-exact."""
    return [rng.randrange(-(1 << 19) + 1, 1 << 19) / 1024.0 for _ in range(n)]


def wmean(grads, weights):
    n = len(grads[0])
    s = [0.0] * n
    for g, w in zip(grads, weights):
        for i in range(n):
            s[i] += w * g[i]
    return [x / float(sum(weights)) for x in s]


def sgd_local(p, lr, g):
    """optim/kernels.inc sgd without momentum: p + (-lr) * g."""
    nlr = -lr
    return [p[i] + nlr * g[i] for i in range(len(p))]


class AdamLocal:
    """torch.optim.Adam (single tensor, no weight decay, no amsgrad) in float64,
    in the order of optim/kernels.inc: scalars in double, then per element
    ea = m*b1 + (1-b1)*d; es = v*b2 + (1-b2)*d*d; den = sqrt(es)/sqrt(bc2) + eps;
    p = p + (-(lr/bc1)) * ea / den."""

    def __init__(self, p, lr, betas=(0.9, 0.999), eps=1e-8):
        self.p = list(p)
        self.lr, self.b1, self.b2, self.eps = lr, betas[0], betas[1], eps
        self.m = [0.0] * len(p)
        self.v = [0.0] * len(p)
        self.t = 0

    def step(self, g):
        self.t += 1
        b1, b2 = self.b1, self.b2
        bc1 = 1 - b1 ** float(self.t)
        bc2 = 1 - b2 ** float(self.t)
        nss, bc2s, omb1, omb2 = -(self.lr / bc1), math.sqrt(bc2), 1 - b1, 1 - b2
        for i, d in enumerate(g):
            ea = self.m[i] * b1 + omb1 * d
            es = self.v[i] * b2 + omb2 * d * d
            self.m[i], self.v[i] = ea, es
            den = math.sqrt(es) / bc2s + self.eps
            self.p[i] = self.p[i] + nss * ea / den
        return self.p


def close(a, b, tol=1e-12):
    return all(abs(x - y) <= tol * max(abs(y), 1e-300) for x, y in zip(a, b))


class RoundTests(DaemonTest):
    # Rounds park their requests: every waiting contributor holds a
    # connection but no request thread (MHD suspends it).
    daemon_args = ("--sync", "normal", "--threads", "4")

    def sess(self, n=4, workers=1, optimizer="sgd", hp=None, **fields):
        name = uniq("rnd")
        p0 = [0.5 * (i + 1) * (-1) ** i for i in range(n)]
        body = dict(name=name, optimizer=optimizer, dtype="float64", params=p0,
                    hyperparams=hp or {"lr": 0.1}, workers=workers, **fields)
        s = self.create(body)
        self.assertEqual(s["workers"], workers)
        return name, p0

    def contribute(self, name, grad, delay=0.0, headers=None, timeout=30, **extra):
        return Pending(self.d, "POST", "/v1/sessions/%s/step" % name, dict(extra, grad=grad),
                       headers=headers, delay=delay, timeout=timeout)

    def state(self, name):
        r = self.api.get("/v1/sessions/%s/params" % name)
        self.assertEqual(r.status, 200, r)
        return r.json

    def wait_parked(self, name, step, secs=0.3):
        """Gives parked contributions time to arrive, then checks that no
        round was applied meanwhile."""
        time.sleep(secs)
        self.assertEqual(self.state(name)["step"], step, "the round was applied early")

    # -- many workers ------------------------------------------------------

    def run_workers(self, name, n, rounds, workers, local_step, check_lr=None):
        """workers threads x rounds: each posts its own gradient (weighted) with
        If-Match of the current step after a random small delay."""
        rngs = [random.Random(1000 * k + 7) for k in range(workers)]
        grads = [[dyadic_grad(rngs[k], n) for _ in range(rounds)] for k in range(workers)]
        weights = [[1 + rngs[k].randrange(16) for _ in range(rounds)] for k in range(workers)]
        replies = [[None] * rounds for _ in range(workers)]

        def worker(k):
            def go():
                c = self.d.client()
                rng = rngs[k]
                try:
                    for r in range(rounds):
                        time.sleep(rng.uniform(0, 0.002))
                        resp = c.post("/v1/sessions/%s/step" % name,
                                      {"grad": grads[k][r], "weight": weights[k][r]},
                                      headers={"If-Match": '"%d"' % r})
                        assert resp.status == 200, "worker %d round %d: %r" % (k, r, resp)
                        replies[k][r] = resp.json
                finally:
                    c.close()
            return go

        t0 = time.monotonic()
        run_threads([worker(k) for k in range(workers)])
        elapsed = time.monotonic() - t0
        bit_exact = 0
        for r in range(rounds):
            first = replies[0][r]
            for k in range(1, workers):
                self.assertEqual(replies[k][r], first, "round %d: workers got different replies" % r)
            self.assertEqual(first["step"], r + 1)
            self.assertEqual(first["contributors"], workers)
            mean = wmean([grads[k][r] for k in range(workers)], [weights[k][r] for k in range(workers)])
            want = local_step(r, mean)
            if check_lr:
                self.assertEqual(first["lr"], check_lr(r), "round %d" % r)
            self.assertTrue(close(first["params"], want), "round %d: optd %r, local %r"
                            % (r, first["params"], want))
            bit_exact += first["params"] == want
        final = self.state(name)
        self.assertEqual(final["step"], rounds)
        self.assertTrue(close(final["params"], want))
        print("\n    %d workers x %d rounds in %.2f s; %d/%d rounds bit-exact to the local replay"
              % (workers, rounds, elapsed, bit_exact, rounds), end=" ", flush=True)

    def test_sgd_8_workers_weighted_mean(self):
        """8 threads x 200 rounds (SGD, exponential lr schedule): same reply for all 8,
        contributors 8, params = local float64 replay of the weighted means."""
        n = 6
        hp = {"lr": 0.1, "lr_schedule": {"type": "exponential", "gamma": 0.99}}
        name, p0 = self.sess(n=n, workers=WORKERS, hp=hp)
        p = list(p0)

        def local(r, mean):
            nonlocal p
            p = sgd_local(p, 0.1 * 0.99 ** r, mean)
            return p
        self.run_workers(name, n, ROUNDS, WORKERS, local, check_lr=lambda r: 0.1 * 0.99 ** r)

    def test_adam_8_workers_weighted_mean(self):
        """8 threads x 200 rounds of Adam: params = torch's Adam formula in float64."""
        n = 5
        name, p0 = self.sess(n=n, workers=WORKERS, optimizer="adam", hp={"lr": 0.01})
        adam = AdamLocal(p0, 0.01)
        self.run_workers(name, n, ROUNDS, WORKERS, lambda r, mean: list(adam.step(mean)))

    # -- timeouts ----------------------------------------------------------

    def test_round_timeout_without_min_workers(self):
        """workers=3, round_timeout=1, only 2 contribute: both 503 round_timeout
        after about 1 s; params and step unchanged."""
        name, p0 = self.sess(workers=3, round_timeout=1)
        t0 = time.monotonic()
        a = self.contribute(name, [1.0, 2.0, 3.0, 4.0], headers={"If-Match": '"0"'})
        b = self.contribute(name, [2.0, 2.0, 2.0, 2.0], headers={"If-Match": '"0"'}, delay=0.05)
        ra, rb = a.result(10), b.result(10)
        elapsed = time.monotonic() - t0
        for r in (ra, rb):
            self.assertError(r, 503, "round_timeout")
        self.assertGreaterEqual(a.t_done - a.t_sent, 0.9, "failed before round_timeout")
        self.assertLess(elapsed, 3.0, "took %.2f s for a 1 s round_timeout" % elapsed)
        st = self.state(name)
        self.assertEqual(st["step"], 0)
        self.assertEqual(st["params"], p0)
        # Nothing of the failed round lingers: the next round starts afresh.
        self.api.patch("/v1/sessions/%s" % name, {"workers": 1})
        r = self.step(name, [1.0, 1.0, 1.0, 1.0])
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json["contributors"], 1)
        self.assertEqual(r.json["params"], sgd_local(p0, 0.1, [1.0] * 4))

    def test_round_timeout_with_min_workers(self):
        """workers=3, min_workers=2, round_timeout=1: the round is applied with
        the 2 contributions after the timeout (weighted mean)."""
        name, p0 = self.sess(workers=3, min_workers=2, round_timeout=1)
        ga, gb = [1.0, 2.0, 3.0, 4.0], [-2.0, 0.5, 2.0, 8.0]
        a = self.contribute(name, ga, weight=3, headers={"If-Match": '"0"'})
        b = self.contribute(name, gb, weight=1, headers={"If-Match": '"0"'}, delay=0.05)
        ra, rb = a.result(10), b.result(10)
        self.assertEqual(ra.status, 200, ra)
        self.assertEqual(rb.status, 200, rb)
        self.assertEqual(ra.json, rb.json)
        self.assertEqual(ra.json["contributors"], 2)
        self.assertEqual(ra.json["step"], 1)
        self.assertGreaterEqual(a.t_done - a.t_sent, 0.9)
        self.assertLess(a.t_done - a.t_sent, 3.0)
        self.assertEqual(ra.json["params"], sgd_local(p0, 0.1, wmean([ga, gb], [3, 1])))
        h = self.api.get("/v1/sessions/%s/history" % name)
        self.assertEqual(h.status, 200, h)
        self.assertEqual([x["contributors"] for x in h.json["history"]], [2])

    # -- idempotency ---------------------------------------------------------

    def test_idempotent_retry_of_a_contribution(self):
        """The same Idempotency-Key posted twice while the round waits counts
        once: the retry takes the first request's place (which is answered
        409 superseded at once) and gets the round's reply; retried after the
        round it is a replay (Idempotent-Replayed: true)."""
        name, p0 = self.sess(workers=2)
        ga, gc = [1.0, 2.0, 3.0, 4.0], [3.0, -2.0, 1.0, 0.0]
        a = self.contribute(name, ga, headers={"Idempotency-Key": "ka"})
        self.wait_parked(name, 0, 0.2)
        a2 = self.contribute(name, ga, headers={"Idempotency-Key": "ka"})
        self.assertError(a.result(10), 409, "superseded")
        self.wait_parked(name, 0)
        # The same key with another gradient is refused and changes nothing.
        bad = self.step(name, [9.0, 9.0, 9.0, 9.0], headers={"Idempotency-Key": "ka"})
        self.assertError(bad, 422, "idempotency_mismatch")
        self.wait_parked(name, 0, 0.05)
        self.assertFalse(a2.done(), "a contribution was answered before its round filled")
        c = self.contribute(name, gc, headers={"Idempotency-Key": "kc"})
        ra2, rc = a2.result(), c.result()
        for r in (ra2, rc):
            self.assertEqual(r.status, 200, r)
        self.assertEqual(ra2.json, rc.json)
        self.assertEqual(rc.json["contributors"], 2)
        self.assertEqual(rc.json["step"], 1)
        want = sgd_local(p0, 0.1, wmean([ga, gc], [1, 1]))
        self.assertEqual(rc.json["params"], want)
        # After the round: a replay of the first application.
        again = self.step(name, ga, headers={"Idempotency-Key": "ka"})
        self.assertEqual(again.status, 200, again)
        self.assertEqual((again.header("Idempotent-Replayed") or "").lower(), "true", again.headers)
        self.assertEqual(again.json["step"], 1)
        self.assertEqual(again.json["params"], want)
        self.assertEqual(self.state(name)["step"], 1)
        self.assertEqual(self.state(name)["params"], want)

    def test_retry_after_disconnect_counts_once(self):
        """A worker whose connection dies while its contribution waits, then
        retries with the same Idempotency-Key: counted once, the retry gets
        the round's reply; a retry after the round (even with a stale
        If-Match) is a replay, not a 412."""
        name, p0 = self.sess(workers=2)
        ga, gb = [4.0, 4.0, -4.0, 1.0], [2.0, 2.0, 2.0, 2.0]
        body = json.dumps({"grad": ga}).encode()
        s = socket.create_connection(("127.0.0.1", self.d.port))
        s.sendall(b"POST /v1/sessions/%s/step HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Idempotency-Key: kdead\r\nIf-Match: \"0\"\r\nContent-Length: %d\r\n\r\n"
                  % (name.encode(), len(body)) + body)
        self.wait_parked(name, 0, 0.2)
        s.close()  # the worker dies
        retry = self.contribute(name, ga, headers={"Idempotency-Key": "kdead", "If-Match": '"0"'})
        self.wait_parked(name, 0)
        self.assertFalse(retry.done(), "the retry was counted as a second contribution")
        other = self.contribute(name, gb)
        rr, ro = retry.result(), other.result()
        self.assertEqual(rr.status, 200, rr)
        self.assertEqual(rr.json, ro.json)
        self.assertEqual(rr.json["contributors"], 2)
        want = sgd_local(p0, 0.1, wmean([ga, gb], [1, 1]))
        self.assertEqual(rr.json["params"], want)
        again = self.step(name, ga, headers={"Idempotency-Key": "kdead", "If-Match": '"0"'})
        self.assertEqual(again.status, 200, again)
        self.assertEqual((again.header("Idempotent-Replayed") or "").lower(), "true")
        self.assertEqual(again.json["params"], want)
        self.assertEqual(self.state(name), {"step": 1, "params": want})

    def test_delete_while_round_waits(self):
        """Deleting the session fails its waiting contributions (404)."""
        name, _ = self.sess(workers=2)
        a = self.contribute(name, [1.0] * 4)
        self.wait_parked(name, 0, 0.2)
        self.assertEqual(self.api.delete("/v1/sessions/%s" % name).status, 204)
        self.assertError(a.result(5), 404, "not_found")

    def test_checkpoint_replace_while_round_waits(self):
        """PUT .../state replacing the session fails its waiting contributions;
        the daemon answers 412 step_mismatch, whose body (API.md) carries the
        current step: the restored checkpoint's."""
        name, _ = self.sess(workers=2)
        first = [self.contribute(name, [1.0] * 4), self.contribute(name, [3.0] * 4)]
        self.assertEqual([x.result().status for x in first], [200, 200])
        a = self.contribute(name, [1.0] * 4)
        self.wait_parked(name, 1, 0.2)
        ck = self.api.get("/v1/sessions/%s/state" % name).json
        self.assertEqual(ck["step"], 1)
        r = self.api.put("/v1/sessions/%s/state" % name, ck)
        self.assertEqual(r.status, 200, r)
        ra = a.result(5)
        self.assertError(ra, 412, "step_mismatch")
        self.assertEqual(ra.json["error"].get("step"), 1, ra)
        self.assertEqual(self.state(name)["step"], 1)

    # -- PATCH of workers ----------------------------------------------------

    def test_patch_workers_between_rounds(self):
        """workers 2 -> 3 between rounds: the next round waits for 3."""
        name, p0 = self.sess(workers=2)
        g = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0],
             [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
        r1 = [self.contribute(name, g[0]), self.contribute(name, g[1])]
        replies = [x.result() for x in r1]
        self.assertEqual([r.status for r in replies], [200, 200], replies)
        self.assertEqual(replies[0].json["contributors"], 2)
        p1 = sgd_local(p0, 0.1, wmean(g[0:2], [1, 1]))
        self.assertEqual(replies[0].json["params"], p1)
        r = self.api.patch("/v1/sessions/%s" % name, {"workers": 3})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json["workers"], 3)
        self.assertEqual(r.json["min_workers"], 3)  # follows workers unless set
        r2 = [self.contribute(name, g[2]), self.contribute(name, g[3])]
        self.wait_parked(name, 1)
        self.assertFalse(any(x.done() for x in r2))
        r2.append(self.contribute(name, g[4]))
        replies = [x.result() for x in r2]
        self.assertEqual([x.status for x in replies], [200] * 3, replies)
        self.assertTrue(all(x.json == replies[0].json for x in replies))
        self.assertEqual(replies[0].json["contributors"], 3)
        self.assertEqual(replies[0].json["step"], 2)
        self.assertEqual(replies[0].json["params"], sgd_local(p1, 0.1, wmean(g[2:5], [1, 1, 1])))

    def test_patch_lowering_workers_applies_waiting_round(self):
        """workers=3 with 2 waiting; PATCH workers=2 applies the round."""
        name, p0 = self.sess(workers=3)
        ga, gb = [1.0, 2.0, 3.0, 4.0], [0.5, 0.5, -0.5, 2.0]
        a, b = self.contribute(name, ga), self.contribute(name, gb)
        self.wait_parked(name, 0)
        r = self.api.patch("/v1/sessions/%s" % name, {"workers": 2})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json["workers"], 2)
        ra, rb = a.result(5), b.result(5)
        self.assertEqual(ra.status, 200, ra)
        self.assertEqual(ra.json, rb.json)
        self.assertEqual(ra.json["contributors"], 2)
        self.assertEqual(ra.json["step"], 1)
        self.assertEqual(ra.json["params"], sgd_local(p0, 0.1, wmean([ga, gb], [1, 1])))
        self.assertEqual(self.state(name)["step"], 1)

    # -- stragglers and backups ---------------------------------------------

    def test_straggler_gets_412(self):
        """A contribution with If-Match of an applied step is 412 (the error
        carries the current step), while a round waits or not."""
        name, p0 = self.sess(workers=2)
        a = self.contribute(name, [1.0] * 4, headers={"If-Match": '"0"'})
        b = self.contribute(name, [3.0] * 4, headers={"If-Match": '"0"'})
        self.assertEqual(a.result().status, 200)
        self.assertEqual(b.result().status, 200)
        p1 = sgd_local(p0, 0.1, [2.0] * 4)
        late = self.step(name, [5.0] * 4, headers={"If-Match": '"0"'})
        self.assertError(late, 412, "step_mismatch")
        self.assertEqual(late.json["error"].get("step"), 1, late)
        # Round 2 waiting: a straggler of round 1 neither joins nor spoils it.
        c = self.contribute(name, [1.0, 0.0, 1.0, 0.0], headers={"If-Match": '"1"'})
        self.wait_parked(name, 1, 0.2)
        late = self.step(name, [7.0] * 4, headers={"If-Match": '"0"'})
        self.assertError(late, 412, "step_mismatch")
        self.assertFalse(c.done())
        d = self.contribute(name, [0.0, 1.0, 0.0, 1.0], headers={"If-Match": '"1"'})
        rc, rd = c.result(), d.result()
        self.assertEqual(rc.status, 200, rc)
        self.assertEqual(rc.json, rd.json)
        self.assertEqual(rc.json["contributors"], 2)
        self.assertEqual(rc.json["params"], sgd_local(p1, 0.1, [0.5] * 4))

    def test_backup_workers(self):
        """workers=3 with 4 posting at once (no If-Match): the first 3 make
        round 1; the 4th joins round 2."""
        name, p0 = self.sess(workers=3)
        g = [[float(k + 1), 0.0, -float(k), 1.0] for k in range(4)]
        ps = [self.contribute(name, g[k]) for k in range(4)]
        deadline = time.time() + 10
        while sum(x.done() for x in ps) < 3 and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        done = [k for k in range(4) if ps[k].done()]
        self.assertEqual(len(done), 3, "expected exactly 3 answered, got %s" % done)
        (late,) = [k for k in range(4) if k not in done]
        replies = [ps[k].result() for k in done]
        self.assertTrue(all(r.status == 200 and r.json == replies[0].json for r in replies), replies)
        self.assertEqual(replies[0].json["step"], 1)
        self.assertEqual(replies[0].json["contributors"], 3)
        p1 = sgd_local(p0, 0.1, wmean([g[k] for k in done], [1, 1, 1]))
        self.assertTrue(close(replies[0].json["params"], p1))
        more = [[0.5, 0.5, 0.5, 0.5], [-1.0, 2.0, 0.0, 0.25]]
        extra = [self.contribute(name, x) for x in more]
        rl = ps[late].result()
        self.assertEqual(rl.status, 200, rl)
        self.assertEqual(rl.json["step"], 2)
        self.assertEqual(rl.json["contributors"], 3)
        for x in extra:
            self.assertEqual(x.result().json, rl.json)
        self.assertTrue(close(rl.json["params"], sgd_local(p1, 0.1, wmean([g[late]] + more, [1, 1, 1]))))

    def test_binary_and_json_contributions_mix(self):
        """A round may mix JSON and binary contributions; Optd-Weight weighs a
        binary one."""
        name, p0 = self.sess(workers=2)
        ga, gb = [1.0, 2.0, 3.0, 4.0], [-4.0, 0.0, 1.0, 2.0]
        a = self.contribute(name, ga, weight=3)
        b = Pending(self.d, "POST", "/v1/sessions/%s/step" % name, struct.pack("<4d", *gb),
                    headers={"Content-Type": "application/octet-stream", "Optd-Weight": "1"})
        ra, rb = a.result(), b.result()
        self.assertEqual(ra.status, 200, ra)
        self.assertEqual(rb.status, 200, rb)
        self.assertEqual(ra.json["contributors"], 2)
        self.assertEqual(rb.json, ra.json)
        self.assertEqual(ra.json["params"], sgd_local(p0, 0.1, wmean([ga, gb], [3, 1])))

    def test_bad_weight(self):
        name, _ = self.sess(workers=1)
        for w in (0, -1):
            self.assertError(self.step(name, [1.0] * 4, weight=w), 422)
        self.assertError(self.step(name, [1.0] * 4, weight="2"), 400, "bad_request")
        self.assertEqual(self.state(name)["step"], 0)


class SlowRoundTests(DaemonTest):
    """A round may wait longer than the idle-connection timeout: the waiting
    contributors' connections are busy, not idle."""

    daemon_args = ("--sync", "normal", "--connection-timeout", "1")

    def test_round_outlives_connection_timeout(self):
        name = uniq("slow")
        self.create({"name": name, "optimizer": "sgd", "dtype": "float64", "params": [1.0, 2.0],
                     "workers": 3, "min_workers": 2, "round_timeout": 2.5})
        a = Pending(self.d, "POST", "/v1/sessions/%s/step" % name, {"grad": [1.0, 3.0]})
        b = Pending(self.d, "POST", "/v1/sessions/%s/step" % name, {"grad": [3.0, 1.0]})
        ra, rb = a.result(10), b.result(10)
        self.assertEqual(ra.status, 200, ra)
        self.assertEqual(rb.json, ra.json)
        self.assertEqual(ra.json["contributors"], 2)
        self.assertGreaterEqual(a.t_done - a.t_sent, 2.3)


if __name__ == "__main__":
    unittest.main()
