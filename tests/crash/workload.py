"""A workload whose every possible outcome is known, for the crash and
shutdown tests: the daemon may die at any moment, and afterwards the state it
comes back with must be one of the outcomes the acknowledged replies allow.

- SGD sessions (float64, lr=1, every gradient element 1.0), stepped by several
  threads at once in JSON and binary: after k applied steps every element is
  exactly p0[i] - k, so a half-applied step or a mixed-up buffer shows. The
  server's step must be at least the highest step any reply acknowledged (and
  at least the number acknowledged) and at most the number of requests sent.
- Adam sessions (float64, one with amsgrad), each stepped by one thread with a
  known gradient per step and an Idempotency-Key per step: the checkpoint
  (params and every buffer) must equal, bit for bit, the trajectory recomputed
  here after exactly `step` steps, and the step is the acknowledged count or
  one more (the request in flight). After a crash the thread retries its
  pending request with the same key: it must be replayed or applied, never
  applied twice.
- A churn thread creating and deleting small sessions: every acknowledged
  create is there (unless a delete of it was sent), every acknowledged delete
  is gone.
"""

import http.client
import math
import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "faults"))
from harness import check, pack, unpack  # noqa: E402

CONN_ERRORS = (OSError, http.client.HTTPException)


def adam_grad(seed, k, n):
    """Gradient of step k+1 (k counts from 0): quarter integers, exact in JSON."""
    return [((k * 7 + i * 13 + seed * 5) % 17 - 8) / 4.0 for i in range(n)]


class AdamRef:
    """torch.optim.Adam in float64, in the order of operations of
    optim/kernels.inc (which follows torch 1.13's single-tensor path)."""

    def __init__(self, p0, lr, betas, eps, amsgrad, seed):
        self.seed = seed
        self.lr, self.b1, self.b2, self.eps, self.ams = lr, betas[0], betas[1], eps, amsgrad
        n = len(p0)
        self.p0 = list(p0)
        # Only the newest steps are kept (a big session's would not fit in
        # memory): at() is asked for the acknowledged step or the next.
        self.traj = {0: (list(p0), [0.0] * n, [0.0] * n, [0.0] * n)}
        self.last = 0

    def at(self, k):
        if k < self.last - 2:
            raise AssertionError("AdamRef keeps steps from %d on, not %d" % (self.last - 2, k))
        while self.last < k:
            self.traj[self.last + 1] = self._step(self.last)
            self.last += 1
            self.traj.pop(self.last - 3, None)
        return self.traj[k]

    def _step(self, k):
        p, m, v, mx = (list(x) for x in self.traj[k])
        g = adam_grad(self.seed, k, len(p))
        step = float(k + 1)
        bc1 = 1 - self.b1 ** step
        bc2 = 1 - self.b2 ** step
        nss = -(self.lr / bc1)
        bc2s = math.sqrt(bc2)
        omb1, omb2 = 1 - self.b1, 1 - self.b2
        for i in range(len(p)):
            d = g[i]
            pi = p[i] * 1.0
            ea = m[i] * self.b1 + omb1 * d
            es = v[i] * self.b2 + omb2 * d * d
            m[i] = ea
            v[i] = es
            if self.ams:
                es = mx[i] if mx[i] > es else es
                mx[i] = es
            den = math.sqrt(es) / bc2s + self.eps
            p[i] = pi + nss * ea / den
        return (p, m, v, mx)


class Workload:
    def __init__(self, daemon, rng, n_sgd=4, sgd_threads=4, sgd_size=16, adam_size=8, churn=True, big_adam_size=0):
        self.d = daemon
        self.rng = rng
        self.lock = threading.Lock()
        self.sgd = {}   # name -> dict(p0, sent, acked, steps:set, max_acked)
        self.adam = {}  # name -> dict(ref, acked, pending)
        self.sgd_threads = sgd_threads
        self.errors = []
        self.churn_on = churn
        self.churn = {"next": 0, "create_sent": set(), "created": set(), "delete_sent": set(), "deleted": set()}
        for s in range(n_sgd):
            name = "sgd-%d" % s
            self.sgd[name] = {"p0": [1000.0 + 3 * i + s for i in range(sgd_size)], "sent": 0, "acked": 0,
                              "steps": set(), "max_acked": 0}
        # big_adam_size: one more Adam session that big; from 1 MiB of state
        # (43,691 float64 elements) the daemon logs most of its steps rather
        # than rewriting its state (engine_sess_log_slots).
        for a, ams in enumerate((False, True, False) if big_adam_size else (False, True)):
            name = "adam-%d" % a
            n = big_adam_size if a == 2 else adam_size
            p0 = [((i * 5 + a) % 9 - 4) / 8.0 for i in range(n)]
            self.adam[name] = {"ref": AdamRef(p0, 0.01, (0.9, 0.999), 1e-8, ams, a), "acked": 0, "ams": ams,
                               "pending": False}
        # Totals for the summary.
        self.acked_total = 0
        self.checked_total = 0
        self.unacked_durable = 0
        self.replays = 0
        self.drops = []  # send times of step requests whose connection failed before a reply

    # -- setup ----------------------------------------------------------------
    def create(self):
        for name, s in self.sgd.items():
            self.d.create(name, "sgd", s["p0"], hyperparams={"lr": 1})
        for name, a in self.adam.items():
            self.d.create(name, "adam", a["ref"].p0,
                          hyperparams={"lr": 0.01, "amsgrad": a["ams"]})

    # -- checks after a restart -------------------------------------------------
    def verify(self):
        """Checks the daemon's state against what the replies allow. Returns
        the number of acknowledged steps it covered."""
        covered = 0
        for name, s in self.sgd.items():
            binary = self.rng.random() < 0.5
            if binary:
                r = self.d.request("GET", "/v1/sessions/%s/params" % name,
                                   headers={"Accept": "application/octet-stream"})
                check(r.status == 200, "GET params %s: %r", name, r)
                step = int(r.header("ETag").strip('"'))
                params = unpack("float64", r.body)
            else:
                r = self.d.request("GET", "/v1/sessions/%s/params" % name)
                check(r.status == 200, "GET params %s: %r", name, r)
                step, params = r.json["step"], r.json["params"]
            check(step >= s["max_acked"], "%s: step %d after restart but step %d was acknowledged (lost)",
                  name, step, s["max_acked"])
            check(step >= s["acked"], "%s: step %d after restart but %d steps were acknowledged",
                  name, step, s["acked"])
            check(step <= s["sent"], "%s: step %d after restart but only %d steps were sent (applied twice?)",
                  name, step, s["sent"])
            want = [p - step for p in s["p0"]]
            check(params == want, "%s at step %d: params %r, want %r (half-applied step?)",
                  name, step, params[:4], want[:4])
            self.unacked_durable += step - s["acked"]
            # Account the unacknowledged steps that made it, so the next round's
            # lower bound is exact and step numbers stay unique.
            for k in range(1, step + 1):
                s["steps"].add(k)
            covered += s["acked"]
            s["acked"] = step
            s["sent"] = step
            s["max_acked"] = step
        for name, a in self.adam.items():
            r = self.d.request("GET", "/v1/sessions/%s/state" % name)
            check(r.status == 200, "GET state %s: %r", name, r)
            j = r.json
            step = j["step"]
            lo, hi = a["acked"], a["acked"] + (1 if a["pending"] else 0)
            check(lo <= step <= hi, "%s: step %d after restart; acknowledged %d, %s in flight",
                  name, step, a["acked"], "one" if a["pending"] else "none")
            p, m, v, mx = a["ref"].at(step)
            st = j.get("state", {})
            check(j["params"] == p, "%s at step %d: params differ from the trajectory: %r vs %r",
                  name, step, j["params"][:3], p[:3])
            check(st.get("exp_avg", [0.0] * len(p)) == m, "%s at step %d: exp_avg differs", name, step)
            check(st.get("exp_avg_sq", [0.0] * len(p)) == v, "%s at step %d: exp_avg_sq differs", name, step)
            if a["ams"]:
                check(st.get("max_exp_avg_sq", [0.0] * len(p)) == mx, "%s at step %d: max_exp_avg_sq differs",
                      name, step)
            covered += a["acked"]
            if step == hi and a["pending"]:
                self.unacked_durable += 1
        c = self.churn
        for n in sorted(c["created"] - c["delete_sent"]):
            r = self.d.request("GET", "/v1/sessions/c-%d" % n)
            check(r.status == 200, "c-%d: acknowledged create is gone: %r", n, r)
        for n in sorted(c["deleted"]):
            r = self.d.request("GET", "/v1/sessions/c-%d" % n)
            check(r.status == 404, "c-%d: acknowledged delete came back: %r", n, r)
        # What happened to the in-flight ones is now known; settle it: a
        # create took effect when the session is there (200), a delete when
        # it is not (404).
        for sent, done, took in (("create_sent", "created", 200), ("delete_sent", "deleted", 404)):
            for n in sorted(c[sent] - c[done]):
                if self.d.request("GET", "/v1/sessions/c-%d" % n).status == took:
                    c[done].add(n)
                else:
                    c[sent].discard(n)
        self.checked_total = covered
        return covered

    # -- load -------------------------------------------------------------------
    def start(self, stop):
        threads = []
        for t in range(self.sgd_threads):
            threads.append(threading.Thread(target=self._sgd_loop, args=(stop, random.Random(self.rng.random())),
                                            daemon=True))
        for name in self.adam:
            threads.append(threading.Thread(target=self._adam_loop, args=(stop, name), daemon=True))
        if self.churn_on:
            threads.append(threading.Thread(target=self._churn_loop, args=(stop,), daemon=True))
        for t in threads:
            t.start()
        return threads

    def _fail(self, msg):
        with self.lock:
            self.errors.append(msg)

    def _sgd_loop(self, stop, rng):
        c = self.d.conn(timeout=20)
        names = list(self.sgd)
        try:
            while not stop.is_set():
                name = rng.choice(names)
                s = self.sgd[name]
                n = len(s["p0"])
                binary = rng.random() < 0.5
                minimal = rng.random() < 0.2
                hdrs = {}
                if binary:
                    body = pack("float64", [1.0] * n)
                    hdrs["Content-Type"] = "application/octet-stream"
                    if rng.random() < 0.5:
                        hdrs["Accept"] = "application/octet-stream"
                else:
                    body = ('{"grad":[%s]}' % ",".join(["1.0"] * n)).encode()
                    hdrs["Content-Type"] = "application/json"
                if minimal:
                    hdrs["Prefer"] = "return=minimal"
                with self.lock:
                    s["sent"] += 1
                try:
                    c.request("POST", "/v1/sessions/%s/step" % name, body=body, headers=hdrs)
                except CONN_ERRORS:
                    return
                sent_at = time.time()
                try:
                    r = c.getresponse()
                    data = r.read()
                except CONN_ERRORS:
                    with self.lock:
                        self.drops.append(sent_at)
                    return
                if r.status != 200:
                    if r.status == 503:  # shutting down: refused cleanly, not applied
                        with self.lock:
                            s["sent"] -= 1
                        continue
                    self._fail("%s step: %d %r" % (name, r.status, data[:200]))
                    return
                step = int(r.getheader("ETag").strip('"'))
                if hdrs.get("Accept"):
                    params = None if minimal else unpack("float64", data)
                else:
                    import json
                    j = json.loads(data)
                    check(j["step"] == step, "ETag %d but body step %d", step, j["step"])
                    params = j.get("params")
                if not minimal and params != [p - step for p in s["p0"]]:
                    self._fail("%s: reply for step %d has params %r" % (name, step, params[:4]))
                with self.lock:
                    if step in s["steps"]:
                        self._fail("%s: step %d acknowledged twice" % (name, step))
                    s["steps"].add(step)
                    s["acked"] += 1
                    s["max_acked"] = max(s["max_acked"], step)
                    self.acked_total += 1
        finally:
            c.close()

    def _adam_loop(self, stop, name):
        import json
        a = self.adam[name]
        c = self.d.conn(timeout=20)
        try:
            while not stop.is_set():
                k = a["acked"]  # 0-based index of the step this request makes
                g = adam_grad(a["ref"].seed, k, len(a["ref"].p0))
                body = json.dumps({"grad": g}).encode()
                retry = a["pending"]
                a["pending"] = True
                try:
                    c.request("POST", "/v1/sessions/%s/step" % name, body=body,
                              headers={"Content-Type": "application/json", "Idempotency-Key": "k%d" % k})
                    r = c.getresponse()
                    data = r.read()
                except CONN_ERRORS:
                    a["refused"] = False  # outcome unknown: a replay is fine
                    return
                if r.status == 503:
                    # Refused: nothing changed, so the retry must not be a replay.
                    a["refused"] = True
                    continue
                if r.status != 200:
                    self._fail("%s step %d: %d %r" % (name, k + 1, r.status, data[:200]))
                    return
                j = json.loads(data)
                if j["step"] != k + 1:
                    self._fail("%s: request for step %d got step %d%s" % (name, k + 1, j["step"],
                                                                          " (a retry)" if retry else ""))
                    return
                want = a["ref"].at(k + 1)[0]
                if j.get("params") is not None and j["params"] != want:
                    self._fail("%s: reply of step %d differs from the trajectory" % (name, k + 1))
                if r.getheader("Idempotent-Replayed") == "true":
                    self.replays += 1
                    if not retry:
                        self._fail("%s: a first request for step %d was answered as a replay" % (name, k + 1))
                    elif a.get("refused"):
                        self._fail("%s: step %d was refused with 503, yet its retry is a replay (it had been "
                                   "applied)" % (name, k + 1))
                a["refused"] = False
                a["pending"] = False
                a["acked"] = k + 1
                with self.lock:
                    self.acked_total += 1
        finally:
            c.close()

    def _churn_send(self, c, method, path, want, sent, n, body=None):
        """One churn request on c: "done" when answered want; "again" when
        refused with 503 (n leaves sent: it was not applied); "stop" when the
        connection broke, or on another answer (a failure)."""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        try:
            c.request(method, path, body=body, headers=headers)
            r = c.getresponse()
            data = r.read()
        except CONN_ERRORS:
            return "stop"
        if r.status == 503:
            sent.discard(n)
            return "again"
        if r.status != want:
            self._fail("%s c-%d: %d %r" % ("create" if method == "POST" else "delete", n, r.status, data[:200]))
            return "stop"
        return "done"

    def _churn_loop(self, stop):
        ch = self.churn
        c = self.d.conn(timeout=20)
        import json
        try:
            while not stop.is_set():
                with self.lock:
                    n = ch["next"]
                    ch["next"] += 1
                    ch["create_sent"].add(n)
                body = json.dumps({"name": "c-%d" % n, "optimizer": "momentum", "size": 4, "fill": n}).encode()
                got = self._churn_send(c, "POST", "/v1/sessions", 201, ch["create_sent"], n, body)
                if got == "stop":
                    return
                if got == "again":
                    continue
                ch["created"].add(n)
                live = sorted(ch["created"] - ch["delete_sent"])
                if len(live) > 3:
                    m = live[0]
                    ch["delete_sent"].add(m)
                    got = self._churn_send(c, "DELETE", "/v1/sessions/c-%d" % m, 204, ch["delete_sent"], m)
                    if got == "stop":
                        return
                    if got == "again":
                        continue
                    ch["deleted"].add(m)
        finally:
            c.close()
