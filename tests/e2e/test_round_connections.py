"""Worker-round contributions and connections (API.md, Training features):
waiting contributions never starve other clients, however many wait (up to
--max-connections); a contributor that hangs up while waiting frees its
place (its contribution is withdrawn from the round); a retry with the same
Idempotency-Key takes the place of its own waiting contribution, whose
request is answered 409 superseded.

The daemon runs with --max-connections 10. Waits below are bounds on things
that happen within milliseconds, never timings asserted."""

import json
import re
import socket
import threading
import time

from optd_e2e import DaemonTest, uniq

MAX_CONN = 10


class Pending(threading.Thread):
    """One request on its own connection, in a thread; result() joins."""

    def __init__(self, d, method, path, body=None, headers=None):
        super().__init__(daemon=True)
        self.d, self.args = d, (method, path, body, headers)
        self.resp = self.error = None
        self.start()

    def run(self):
        method, path, body, headers = self.args
        try:
            self.resp = self.d.request(method, path, json_body=body, headers=headers, timeout=60)
        except BaseException as e:  # noqa: BLE001
            self.error = e

    def result(self, timeout=20):
        self.join(timeout)
        if self.is_alive():
            raise AssertionError("%s %s still waiting after %.0f s" % (self.args[0], self.args[1], timeout))
        if self.error:
            raise self.error
        return self.resp


def eventually(pred, seconds=10.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if pred():
                return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


class RoundConnectionTests(DaemonTest):
    daemon_args = ("--max-connections", str(MAX_CONN), "--log-level", "quiet")

    def session(self, workers, n=2):
        name = uniq("rc")
        self.d.create(name, "sgd", dtype="float64", params=[0.0] * n, hyperparams={"lr": 1.0}, workers=workers,
                      round_timeout=120)
        return name

    def contribute(self, name, grad, headers=None):
        return Pending(self.d, "POST", "/v1/sessions/%s/step" % name, {"grad": grad}, headers)

    def send_and_hang_up(self, name, grad):
        body = json.dumps({"grad": grad}).encode()
        s = socket.create_connection(("127.0.0.1", self.d.port), timeout=5)
        s.sendall(b"POST /v1/sessions/%s/step HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % (name.encode(), len(body)) + body)
        s.close()

    def metric(self, name):
        """The value of metric name, or None when the daemon has no such metric."""
        m = re.search(r"^%s (\d+)$" % name, self.d.get("/metrics", timeout=2).body.decode(), re.M)
        return int(m.group(1)) if m else None

    def waiting(self):
        return self.metric("optd_round_contributions_waiting")

    def withdrawn(self):
        return self.metric("optd_round_contributions_withdrawn_total")

    def wait_metric(self, get, n):
        """Until get() is n (a daemon without the metric: a second, to let
        the test fail on what it checks next rather than here)."""
        if not eventually(lambda: get() in (n, None)):
            self.fail("%s is %r, want %d" % (get.__name__, get(), n))
        if get() is None:
            time.sleep(1.0)

    def wait_waiting(self, n):
        self.wait_metric(self.waiting, n)

    def served(self):
        return self.d.get("/healthz", timeout=2).status == 200

    def test_contributors_that_hang_up_do_not_lock_others_out(self):
        name = self.session(workers=2 * MAX_CONN)
        before = self.withdrawn()
        for i in range(MAX_CONN):
            self.send_and_hang_up(name, [float(i), 1.0])
        self.assertTrue(eventually(self.served), "%d contributors that hung up left the daemon unreachable"
                        % MAX_CONN)
        # They are withdrawn, not left counting in a round nobody waits for.
        # A request whose client was gone before the daemon read all of it
        # never reaches the round, so it is not counted as withdrawn either:
        # under load fewer than MAX_CONN may be, never none and never more.
        if before is not None:
            self.assertTrue(eventually(lambda: self.waiting() == 0 and self.withdrawn() > before),
                            "waiting %r, withdrawn %r (before %d)" % (self.waiting(), self.withdrawn(), before))
            gone = self.withdrawn() - before
            self.assertTrue(1 <= gone <= MAX_CONN, "%d withdrawn of %d that hung up" % (gone, MAX_CONN))
        self.wait_waiting(0)
        self.assertEqual(self.d.params(name)["step"], 0)

    def test_a_contributor_that_hangs_up_is_withdrawn_from_its_round(self):
        name = self.session(workers=2)
        before = self.withdrawn()
        self.send_and_hang_up(name, [100.0, 100.0])
        if before is not None:
            self.wait_metric(self.withdrawn, before + 1)
        else:
            time.sleep(1.0)
        b = self.contribute(name, [1.0, 1.0])
        self.wait_waiting(1)
        self.assertEqual(self.d.params(name)["step"], 0, "the round was applied with a contributor that hung up")
        c = self.contribute(name, [3.0, 3.0])
        rb, rc = b.result(), c.result()
        self.assertEqual(rb.status, 200, rb)
        self.assertEqual(rb.json, rc.json)
        self.assertEqual(rb.json["contributors"], 2)
        self.assertEqual(rb.json["params"], [-2.0, -2.0], "the round's mean is not that of the two still there")

    def test_waiting_contributors_up_to_max_connections_do_not_starve_others(self):
        name = self.session(workers=MAX_CONN + 1)
        other = self.session(workers=1)
        rounds_elsewhere = self.session(workers=5)
        waiting = []
        for i in range(MAX_CONN):
            waiting.append(self.contribute(name, [1.0, float(i)]))
            self.wait_waiting(i + 1)
        self.assertTrue(eventually(self.served), "%d waiting contributions locked other clients out" % MAX_CONN)
        for _ in range(3):
            self.assertEqual(self.d.get("/v1/sessions").status, 200)
            self.assertEqual(self.d.step(other, [1.0, 1.0]).status, 200)
        # No more may wait than --max-connections: one more that would is
        # refused at once (503, safe to retry) rather than crowd out others.
        r = self.d.step(rounds_elsewhere, [1.0, 1.0], expect=None)
        self.assertError(r, 503, "unavailable")
        self.assertIn("max-connections", r.json["error"]["message"])
        self.assertFalse(any(p.resp or p.error for p in waiting), "a contribution was answered early")
        # The one that fills the round is never refused.
        last = self.d.step(name, [1.0, 10.0])
        self.assertEqual(last.json["contributors"], MAX_CONN + 1)
        for p in waiting:
            r = p.result()
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.json, last.json)
        self.assertEqual(self.d.params(name)["step"], 1)
        self.wait_waiting(0)

    def test_a_retry_with_the_same_key_takes_the_place_of_its_waiting_contribution(self):
        name = self.session(workers=2)
        ga, gb = [2.0, 4.0], [6.0, 8.0]
        first = self.contribute(name, ga, {"Idempotency-Key": "worker-0"})
        self.wait_waiting(1)
        retry = self.contribute(name, ga, {"Idempotency-Key": "worker-0"})
        r = first.result(10)
        self.assertError(r, 409, "superseded")
        self.assertIn("Idempotency-Key", r.json["error"]["message"])
        self.wait_waiting(1)
        self.assertEqual(self.d.params(name)["step"], 0)
        other = self.contribute(name, gb, {"Idempotency-Key": "worker-1"})
        rr, ro = retry.result(), other.result()
        self.assertEqual(rr.status, 200, rr)
        self.assertEqual(rr.json, ro.json)
        self.assertEqual(rr.json["contributors"], 2)
        self.assertEqual(rr.json["params"], [-4.0, -6.0])
        again = self.d.step(name, ga, headers={"Idempotency-Key": "worker-0"})
        self.assertEqual(again.header("Idempotent-Replayed"), "true")
        self.assertEqual(again.json["params"], [-4.0, -6.0])
        self.assertEqual(self.d.params(name)["step"], 1)

    def test_a_retry_after_hanging_up_counts_once(self):
        name = self.session(workers=2)
        body = json.dumps({"grad": [5.0, 5.0]}).encode()
        s = socket.create_connection(("127.0.0.1", self.d.port), timeout=5)
        s.sendall(b"POST /v1/sessions/%s/step HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Idempotency-Key: k-dead\r\nContent-Length: %d\r\n\r\n" % (name.encode(), len(body)) + body)
        self.wait_waiting(1)
        s.close()
        retry = self.contribute(name, [5.0, 5.0], {"Idempotency-Key": "k-dead"})
        self.wait_waiting(1)
        self.assertEqual(self.d.params(name)["step"], 0, "the retry was counted as a second contribution")
        other = self.contribute(name, [1.0, 1.0])
        rr = retry.result()
        self.assertEqual(rr.status, 200, rr)
        self.assertEqual(rr.json["contributors"], 2)
        self.assertEqual(rr.json["params"], [-3.0, -3.0])
        self.assertEqual(other.result().json, rr.json)
