"""Edges of the training features: norms that overflow float64, large but
finite params, and shutting down while a round waits."""

import signal
import time
import unittest

from harness import Daemon, DaemonTest, Pending, uniq


class NormOverflowTests(DaemonTest):
    def test_clip_with_overflowing_norm_replies_json(self):
        """grad [1e200, -1e200] (finite float64) with max_grad_norm: torch's
        total_norm is inf, clip_coef 0, so the grad becomes 0 and the params
        stay. The reply and the history must still be JSON (no bare inf)."""
        name = uniq("ovf")
        self.create({"name": name, "optimizer": "sgd", "dtype": "float64", "params": [1.0, 2.0],
                     "hyperparams": {"max_grad_norm": 1.0}})
        r = self.step(name, [1e200, -1e200])
        body = r.json  # AssertionError when not strict JSON
        self.assertEqual(r.status, 200, r)
        self.assertEqual(body["params"], [1.0, 2.0])
        h = self.api.get("/v1/sessions/%s/history" % name)
        self.assertEqual(h.status, 200, h)
        h.json

    def test_large_finite_params_step(self):
        """Params of 1e200 are finite float64 (their squared norm is not):
        steps on them are ordinary steps, not 422 non_finite."""
        name = uniq("big")
        self.create({"name": name, "optimizer": "sgd", "dtype": "float64", "params": [1e200, 2.0]})
        r = self.step(name, [1.0, 1.0])
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json["params"], [1e200 - 0.01, 2.0 - 0.01])
        h = self.api.get("/v1/sessions/%s/history" % name)
        self.assertEqual(h.status, 200, h)
        h.json

    def test_large_finite_update(self):
        """grad 1e200 with lr 0.01 makes params of 1e198: finite, so applied."""
        name = uniq("bigg")
        self.create({"name": name, "optimizer": "sgd", "dtype": "float64", "params": [1.0, 2.0]})
        r = self.step(name, [1e200, -1e200])
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json["params"], [1.0 + -0.01 * 1e200, 2.0 + -0.01 * -1e200])


class ShutdownTests(unittest.TestCase):
    def test_sigterm_while_round_waits(self):
        """SIGTERM with a round waiting for contributors that will not come:
        the waiting contributor gets 503 promptly (it is safe to retry) and
        the daemon exits 0 without first waiting out its drain period
        (a 10 s `docker stop` would otherwise SIGKILL it)."""
        d = Daemon(["--sync", "normal"]).start()
        try:
            api = d.client()
            name = uniq("term")
            r = api.post("/v1/sessions", {"name": name, "optimizer": "sgd", "params": [1.0],
                                          "workers": 3})
            self.assertEqual(r.status, 201, r)
            api.close()
            a = Pending(d, "POST", "/v1/sessions/%s/step" % name, {"grad": [1.0]})
            time.sleep(0.3)
            t0 = time.monotonic()
            d.proc.send_signal(signal.SIGTERM)
            ra = a.result(30)
            t_reply = time.monotonic() - t0
            rc = d.proc.wait(30)
            t_exit = time.monotonic() - t0
            self.assertEqual(ra.status, 503, ra)
            self.assertEqual(rc, 0)
            self.assertLess(t_exit, 3.0, "exited %.1f s after SIGTERM (reply after %.1f s)" % (t_exit, t_reply))
        finally:
            d.cleanup()


if __name__ == "__main__":
    unittest.main()
