"""Concurrent steps: one at a time per session, in arrival order, none lost."""

import threading

from optd_e2e import DaemonTest, run_threads, uniq


class ConcurrencyTests(DaemonTest):

    def test_eight_threads_fifty_steps_one_session(self):
        name = uniq("conc")
        init = [1000.0, 0.0, -5.0, 0.5]
        self.d.create(name, "sgd", dtype="float64", hyperparams={"lr": 1.0}, params=init)
        replies = [[] for _ in range(8)]

        def worker(i):
            c = self.d.conn()
            for _ in range(50):
                r = self.d.request("POST", "/v1/sessions/%s/step" % name, json_body={"grad": [1.0] * 4}, conn=c)
                replies[i].append(r)
            c.close()

        errors = run_threads(8, worker, 120)
        self.assertEqual(errors, [])
        allr = [r for rs in replies for r in rs]
        self.assertEqual([r.status for r in allr], [200] * 400, [r for r in allr if r.status != 200][:3])
        steps = sorted(r.json["step"] for r in allr)
        self.assertEqual(steps, list(range(1, 401)), "each step number must be replied exactly once")
        for r in allr:
            k = r.json["step"]
            self.assertEqual(r.json["params"], [x - k for x in init], "reply for step %d" % k)
            self.assertEqual(r.header("ETag"), '"%d"' % k)
        # each thread's own replies are in increasing step order
        for rs in replies:
            ks = [r.json["step"] for r in rs]
            self.assertEqual(ks, sorted(ks))
        p = self.d.params(name)
        self.assertEqual(p["step"], 400)
        self.assertEqual(p["params"], [x - 400 for x in init])
        self.assertEqual(self.d.session(name)["step"], 400)

    def test_four_sessions_in_parallel(self):
        names = [uniq("par%d" % i) for i in range(4)]
        for i, n in enumerate(names):
            self.d.create(n, "sgd", dtype="float64", hyperparams={"lr": 0.5}, params=[float(i)] * 8)

        def worker(i):
            c = self.d.conn()
            for k in range(50):
                r = self.d.request("POST", "/v1/sessions/%s/step" % names[i], json_body={"grad": [float(i + 1)] * 8},
                                   conn=c)
                assert r.status == 200, r
                assert r.json["step"] == k + 1, r
            c.close()

        errors = run_threads(4, worker, 120)
        self.assertEqual(errors, [])
        for i, n in enumerate(names):
            p = self.d.params(n)
            self.assertEqual(p["step"], 50)
            self.assertEqual(p["params"], [float(i) - 50 * 0.5 * (i + 1)] * 8)

    def test_mixed_writers_with_if_match_exactly_one_wins_each_round(self):
        name = uniq("cas")
        self.d.create(name, "sgd", dtype="float64", hyperparams={"lr": 1.0}, params=[0.0])
        wins = []
        barrier = threading.Barrier(6)

        def worker(i):
            c = self.d.conn()
            for rnd in range(10):
                barrier.wait(30)
                r = self.d.request("POST", "/v1/sessions/%s/step" % name, json_body={"grad": [1.0]},
                                   headers={"If-Match": '"%d"' % rnd}, conn=c)
                if r.status == 200:
                    wins.append((rnd, i))
                else:
                    assert r.status == 412, r
                barrier.wait(30)
            c.close()

        errors = run_threads(6, worker, 120)
        self.assertEqual(errors, [])
        self.assertEqual(sorted(r for r, _ in wins), list(range(10)), "not exactly one winner per round: %r" % wins)
        p = self.d.params(name)
        self.assertEqual((p["step"], p["params"]), (10, [-10.0]))
