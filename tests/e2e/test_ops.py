"""Operations endpoints: /healthz, /readyz, /metrics, /v1/optimizers."""

import re
import time

from optd_e2e import DEFAULTS, STATE_BUFFERS, DaemonTest, uniq


SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? '
                    r'([-+0-9.eE]+|[-+]?Inf|NaN)( -?[0-9]+)?$')


class OpsTests(DaemonTest):

    def test_healthz(self):
        r = self.d.get("/healthz")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.content_type, "application/json", r)
        self.assertEqual(r.json.get("status"), "ok", r)

    def test_readyz(self):
        r = self.d.get("/readyz")
        self.assertEqual(r.status, 200, r)

    def test_metrics(self):
        name = uniq()
        self.d.create(name, "adam", size=3)
        self.d.step(name, [0.1, 0.2, 0.3])
        self.d.get("/v1/sessions/" + uniq())  # a 404
        # Counters may be bumped just after the reply is sent: allow a moment.
        deadline = time.time() + 3
        while True:
            r = self.d.get("/metrics")
            self.assertEqual(r.status, 200, r)
            if b'"404"' in r.body or time.time() > deadline:
                break
            time.sleep(0.05)
        self.assertEqual(r.content_type, "text/plain", r)
        text = r.body.decode()
        lines = text.splitlines()
        self.assertIn("# TYPE", text)
        self.assertTrue(any(ln.startswith("optd_") for ln in lines), text[:2000])
        types = [ln.split() for ln in lines if ln.startswith("# TYPE ")]
        self.assertTrue(all(len(t) == 4 and t[3] in ("counter", "gauge", "histogram", "summary", "untyped")
                            for t in types), types)
        hist = [t[2] for t in types if t[3] == "histogram"]
        self.assertTrue(any("step" in h for h in hist), "no step latency histogram among %r" % hist)
        self.assertTrue(any(re.match(r"^optd_\w*step\w*_bucket\{.*le=\"\+Inf\"\} [0-9.e+]+$", ln) for ln in lines),
                        "no step histogram bucket line")
        self.assertTrue(any("commit" in h or "db" in h for h in hist), "no database commit histogram among %r" % hist)
        self.assertIn('"404"', text, "requests by status: no 404 counted")
        self.assertTrue(any(re.match(r"^optd_\w*step\w*\{[^}]*adam[^}]*\} [0-9.e+]+$", ln) for ln in lines),
                        "no steps-by-optimizer series for adam")
        self.assertTrue(any(re.match(r"^optd_\w*session\w* [0-9.e+]+$", ln) for ln in lines), "no sessions gauge")
        # samples are "name{labels} value"
        for ln in lines:
            if ln and not ln.startswith("#"):
                self.assertRegex(ln, SAMPLE, ln)

    def test_metrics_step_count_grows(self):
        def count():
            text = self.d.get("/metrics").body.decode()
            tot = 0.0
            for ln in text.splitlines():
                m = re.match(r"^(optd_\w*step\w*_count)(\{[^}]*\})? ([0-9.e+]+)$", ln)
                if m:
                    tot += float(m.group(3))
            return tot
        before = count()
        name = uniq()
        self.d.create(name, "sgd", size=2)
        for _ in range(3):
            self.d.step(name, [1.0, 1.0])
        deadline = time.time() + 3
        while count() - before < 3 and time.time() < deadline:
            time.sleep(0.05)
        self.assertGreaterEqual(count() - before, 3)

    def _optimizers(self):
        r = self.d.get("/v1/optimizers")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.content_type, "application/json", r)
        body = r.json
        self.assertIsInstance(body, dict, body)
        self.assertIsInstance(body.get("optimizers"), list, body)
        return body["optimizers"]

    def test_optimizers_lists_all_ten(self):
        names = [o["name"] for o in self._optimizers()]
        self.assertEqual(sorted(names), sorted(DEFAULTS), names)
        self.assertEqual(len(names), 10)

    def test_optimizers_describe_hyperparams_defaults_ranges_and_buffers(self):
        for o in self._optimizers():
            opt = o["name"]
            with self.subTest(optimizer=opt):
                hps = o.get("hyperparams")
                self.assertIsInstance(hps, list, o)
                hps = {h["name"]: h for h in hps}
                for k, v in DEFAULTS[opt].items():
                    self.assertIn(k, hps, "%s does not describe %s: %r" % (opt, k, o))
                    self.assertIn("default", hps[k])
                    self.assertSame(hps[k]["default"], v, "%s.%s default" % (opt, k))
                    if not isinstance(v, bool):
                        self.assertIn("min", hps[k], "%s.%s has no range" % (opt, k))
                        self.assertIn("max", hps[k], "%s.%s has no range" % (opt, k))
                self.assertSame(hps["lr"]["min"], 0)
                if "betas" in hps:
                    self.assertSame((hps["betas"]["min"], hps["betas"]["max"]), (0, 1))
                    self.assertIs(hps["betas"].get("max_exclusive"), True, "beta < 1 is exclusive")
                if opt == "adadelta":
                    self.assertSame(hps["rho"]["max"], 1)
                    self.assertIs(hps["rho"].get("max_exclusive"), False, "rho = 1 is allowed")
                # The contract names mu_product a (scalar) state buffer; the
                # listing may keep scalars apart from vectors.
                bufs = list(o.get("state_buffers", [])) + list(o.get("state_scalars", []))
                self.assertEqual(sorted(bufs), sorted(STATE_BUFFERS[opt]), "%s: %r" % (opt, o))
