"""Idempotency keys at the edges of their window (--idempotency-window 5):
a key is replayed while its step is among the session's last 5 and applied
anew after; the same holds after kill -9 and after the session left the
cache, when the daemon rebuilds its map of keys from the database; a saved
reply stays until its ring slot comes round (store.c)."""

from optd_e2e import DaemonTest, pack, uniq

OCTET = "application/octet-stream"
WINDOW = 5


def replayed(r):
    return (r.header("Idempotent-Replayed") or "").lower() == "true"


class IdemWindowTests(DaemonTest):
    # A 1 MiB cache: a few 0.4 MB sessions push each other out.
    daemon_args = ("--idempotency-window", str(WINDOW), "--cache-mb", "1")

    def keyed(self, name, grad, key):
        r = self.d.step(name, grad, headers={"Idempotency-Key": key}, expect=None)
        self.assertEqual(r.status, 200, r)
        return r

    def test_a_key_is_replayed_within_the_window_and_applied_anew_after(self):
        name = uniq("win")
        self.d.create(name, "sgd", dtype="float64", hyperparams={"lr": 1.0}, params=[0.0])
        first = self.keyed(name, [1.0], "k1")
        for i in range(2, WINDOW + 1):  # k1's step is the 5th-last
            self.keyed(name, [1.0], "k%d" % i)
        again = self.keyed(name, [1.0], "k1")
        self.assertTrue(replayed(again), again)
        self.assertEqual(again.json, first.json)
        self.keyed(name, [1.0], "k6")  # k1's step leaves the window
        fresh = self.keyed(name, [1.0], "k1")
        self.assertFalse(replayed(fresh), "a key past the window was replayed: %r" % fresh)
        self.assertEqual(fresh.json["step"], WINDOW + 2)
        self.assertEqual(self.d.params(name)["params"], [-(WINDOW + 2.0)])

    def test_keys_survive_kill_9_and_eviction_from_the_cache(self):
        names = [uniq("evict") for _ in range(4)]
        n = 50000  # 0.4 MB of float64 params: the cache holds two
        firsts = {}
        for name in names:
            self.d.create(name, "sgd", dtype="float64", size=n)
        for k in range(3):
            for name in names:
                r = self.d.request("POST", "/v1/sessions/%s/step" % name, body=pack("float64", [0.5] * n),
                                   headers={"Content-Type": OCTET, "Accept": OCTET,
                                            "Idempotency-Key": "%s-%d" % (name, k)})
                self.assertEqual(r.status, 200, r)
                firsts[(name, k)] = r.body
        for restart in (False, True):
            if restart:
                self.d.kill()
                self.d.start()
            for name in names:
                for k in range(3):
                    r = self.d.request("POST", "/v1/sessions/%s/step" % name, body=pack("float64", [0.5] * n),
                                       headers={"Content-Type": OCTET, "Accept": OCTET,
                                                "Idempotency-Key": "%s-%d" % (name, k)})
                    self.assertEqual(r.status, 200, r)
                    self.assertTrue(replayed(r), "%s key %d not replayed (restart %s)" % (name, k, restart))
                    self.assertEqual(r.body, firsts[(name, k)], "%s key %d: another reply" % (name, k))
                self.assertEqual(self.d.session(name)["step"], 3)
                r = self.d.request("POST", "/v1/sessions/%s/step" % name, body=pack("float64", [1.0] * n),
                                   headers={"Content-Type": OCTET, "Idempotency-Key": "%s-0" % name})
                self.assertEqual(r.status, 422, "a reused key with another gradient: %r" % r)

    def test_the_reply_of_a_step_is_replayed_exactly_after_later_steps(self):
        name = uniq("ring")
        self.d.create(name, "adam", hyperparams={"lr": 0.1}, params=[1.0, 2.0, 3.0])
        replies = []
        for k in range(WINDOW):
            replies.append(self.keyed(name, [0.1 * k, -0.2, 0.3], "r%d" % k).json)
        for k in range(WINDOW):
            r = self.keyed(name, [0.1 * k, -0.2, 0.3], "r%d" % k)
            self.assertTrue(replayed(r), r)
            self.assertEqual(r.json, replies[k])


class SharedRingTests(DaemonTest):
    # Window 1 and two small sessions: the reply ring's capacity is one
    # chunk (64 KiB), which 16 replies of 1,000 float32 fill.
    daemon_args = ("--idempotency-window", "1")

    def test_the_latest_steps_reply_outlives_the_ring_coming_round(self):
        quiet, busy = uniq("quiet"), uniq("busy")
        self.d.create(quiet, "adam", hyperparams={"lr": 0.1}, params=[1.0, 2.0, 3.0])
        self.d.create(busy, "adam", size=1000)
        first = self.d.step(quiet, [0.5, -0.25, 0.125], headers={"Idempotency-Key": "q1"}, expect=None)
        self.assertEqual(first.status, 200, first)
        for k in range(40):  # the ring comes round more than twice
            r = self.d.step(busy, [0.001 * k] * 1000, headers={"Idempotency-Key": "b%d" % k}, expect=None)
            self.assertEqual(r.status, 200, r)
        for restart in (False, True):
            if restart:
                self.d.kill()
                self.d.start()
            again = self.d.step(quiet, [0.5, -0.25, 0.125], headers={"Idempotency-Key": "q1"}, expect=None)
            self.assertEqual(again.status, 200, again)
            self.assertTrue(replayed(again), again)
            self.assertEqual(again.json, first.json, "the latest step's replay lost its reply (restart %s)" % restart)
        self.assertEqual(self.d.session(quiet)["step"], 1)
