"""Session size (issue 12, defect 3; API.md Sessions "Size"): a session whose
state is over --max-session-bytes is refused with 422 too_large at create,
PUT .../state, fork (and a PATCH that grows it) before anything is
allocated, and other clients' writes are not affected."""

import os
import subprocess
import threading

from optd_e2e import Daemon, DaemonTest, optd_bin, uniq

MIB = 1 << 20


def peak_rss(d):
    """The daemon's peak resident set (VmHWM), bytes."""
    with open("/proc/%d/status" % d.proc.pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/%d/status" % d.proc.pid)


class DefaultLimitTests(DaemonTest):
    """The default limit (512 MiB) against the requests the review found."""

    def test_help_states_the_default_and_the_maximum(self):
        p = subprocess.run([optd_bin(), "--help"], stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
        text = p.stdout.decode()
        self.assertIn("--max-session-bytes", text)
        self.assertIn("OPTD_MAX_SESSION_BYTES", text)
        line = text[text.index("--max-session-bytes"):]
        self.assertIn("default 512M", line.splitlines()[0], line[:300])
        self.assertIn("at most 900M", line[:400], line[:400])

    def test_a_tiny_body_asking_for_2_28_float64_adam_elements_is_refused_before_allocating(self):
        name = uniq("huge")
        before = peak_rss(self.d)
        body = '{"name":"%s","optimizer":"adam","dtype":"float64","size":268435456}' % name
        self.assertLess(len(body), 100)
        r = self.d.request("POST", "/v1/sessions", body=body)
        err = self.assertError(r, 422, "too_large")
        self.assertIn("--max-session-bytes", err["message"], r)
        grown = peak_rss(self.d) - before
        self.assertLess(grown, 64 * MIB, "refusing a 6 GiB session grew the peak RSS by %d MiB" % (grown // MIB))
        self.assertError(self.d.get("/v1/sessions/" + name), 404, "not_found")

    def test_a_big_create_beside_small_steps_fails_alone(self):
        """Three 9e7-element Adam creates (1.08 GB of state each, past
        SQLite's value limit) while four clients step small sessions: the
        creates are 422 too_large at once and every small step is 200."""
        names = [uniq("small") for _ in range(4)]
        for n in names:
            self.d.create(n, "sgd", params=[1.0, 2.0, 3.0])
        stop = threading.Event()
        bad, counts = [], [0] * len(names)

        def stepper(i):
            c = self.d.conn(timeout=30)
            while not stop.is_set() and counts[i] < 2000:
                r = self.d.request("POST", "/v1/sessions/%s/step" % names[i], json_body={"grad": [0.1, 0.1, 0.1]},
                                   conn=c)
                if r.status != 200:
                    bad.append(r)
                    break
                counts[i] += 1
            c.close()

        before = peak_rss(self.d)
        threads = [threading.Thread(target=stepper, args=(i,)) for i in range(len(names))]
        for t in threads:
            t.start()
        creates = []
        try:
            for _ in range(3):
                big = uniq("big")
                creates.append((big, self.d.post("/v1/sessions", {"name": big, "optimizer": "adam",
                                                                   "size": 90000000}, timeout=120)))
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        self.assertEqual(bad, [], "small steps failed beside the big creates")
        for big, r in creates:
            self.assertError(r, 422, "too_large")
            self.assertError(self.d.get("/v1/sessions/" + big), 404, "not_found")
        self.assertTrue(all(counts), "a stepper made no step: %r" % counts)
        for n, k in zip(names, counts):
            self.assertEqual(self.d.session(n)["step"], k)
        grown = peak_rss(self.d) - before
        self.assertLess(grown, 256 * MIB, "the refused creates grew the peak RSS by %d MiB" % (grown // MIB))


class LowLimitTests(DaemonTest):
    """--max-session-bytes 64K: 16,384 float32 vectors-elements in all."""

    daemon_args = ("--max-session-bytes", "64K")

    def test_create_with_params_or_size_counts_every_buffer(self):
        # adam: params, exp_avg, exp_avg_sq (+ 8 bytes): 5000 float32 fit, 6000 do not.
        cases = [("adam", "float32", 5000, 201), ("adam", "float32", 6000, 422),
                 ("sgd", "float32", 16000, 201), ("sgd", "float64", 8000, 201), ("sgd", "float64", 8200, 422),
                 ("adam", "float64", 2700, 201), ("adam", "float64", 2800, 422)]
        for opt, dtype, n, want in cases:
            for how in ("size", "params"):
                with self.subTest(optimizer=opt, dtype=dtype, n=n, how=how):
                    name = uniq("lim")
                    body = {"name": name, "optimizer": opt, "dtype": dtype}
                    body.update({"size": n} if how == "size" else {"params": [0.5] * n})
                    r = self.d.post("/v1/sessions", body)
                    if want == 201:
                        self.assertEqual(r.status, 201, r)
                    else:
                        self.assertError(r, 422, "too_large")
                        self.assertError(self.d.get("/v1/sessions/" + name), 404, "not_found")
        # amsgrad adds a buffer: 5000 float32 no longer fit.
        r = self.d.post("/v1/sessions", {"name": uniq(), "optimizer": "adam", "size": 5000,
                                         "hyperparams": {"amsgrad": True}})
        self.assertError(r, 422, "too_large")

    def test_put_state_fork_and_a_growing_patch_are_refused(self):
        src = uniq("src")
        self.d.create(src, "adam", size=5000, fill=1.0)  # 60,008 bytes
        self.d.step(src, [0.1] * 5000)
        ckpt = self.d.get("/v1/sessions/%s/state" % src).json

        # PUT .../state: the same checkpoint fits, with amsgrad it does not.
        twin = uniq("twin")
        r = self.d.request("PUT", "/v1/sessions/%s/state" % twin, json_body=ckpt)
        self.assertEqual(r.status, 201, r)
        grown = dict(ckpt, hyperparams=dict(ckpt["hyperparams"], amsgrad=True))
        grown["state"] = dict(ckpt["state"], max_exp_avg_sq=ckpt["state"]["exp_avg_sq"])
        other = uniq("other")
        self.assertError(self.d.request("PUT", "/v1/sessions/%s/state" % other, json_body=grown), 422, "too_large")
        self.assertError(self.d.get("/v1/sessions/" + other), 404, "not_found")
        # Replacing an existing session with it is refused too, and changes nothing.
        before = self.snapshot(twin)
        self.assertError(self.d.request("PUT", "/v1/sessions/%s/state" % twin, json_body=grown), 422, "too_large")
        self.assertUnchanged(twin, before)

        # Fork: as it is, fine; with amsgrad, too large.
        r = self.d.post("/v1/sessions", {"name": uniq("fork"), "from": src})
        self.assertEqual(r.status, 201, r)
        fork = uniq("fork")
        r = self.d.post("/v1/sessions", {"name": fork, "from": src, "hyperparams": {"amsgrad": True}})
        self.assertError(r, 422, "too_large")
        self.assertError(self.d.get("/v1/sessions/" + fork), 404, "not_found")

        # PATCH: amsgrad on would grow it past the limit; lr is fine.
        before = self.snapshot(src)
        r = self.d.request("PATCH", "/v1/sessions/" + src, json_body={"hyperparams": {"amsgrad": True}})
        self.assertError(r, 422, "too_large")
        self.assertUnchanged(src, before)
        self.assertNotIn("max_exp_avg_sq", self.d.get("/v1/sessions/%s/state" % src).json["state"])
        r = self.d.request("PATCH", "/v1/sessions/" + src, json_body={"hyperparams": {"lr": 0.01}})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.d.step(src, [0.1] * 5000).json["step"], 2)

    def test_a_session_over_a_lowered_limit_keeps_working_but_cannot_be_forked(self):
        name = uniq("old")
        self.d.create(name, "adam", size=5000)
        d2 = Daemon(["--max-session-bytes", "32K"], db=self.d.db)
        self.d.stop()
        try:
            d2.start()
            r = d2.step(name, [0.5] * 5000)
            self.assertEqual(r.json["step"], 1)
            r = d2.request("PATCH", "/v1/sessions/" + name, json_body={"hyperparams": {"lr": 0.002}})
            self.assertEqual(r.status, 200, r)
            r = d2.post("/v1/sessions", {"name": uniq("fork"), "from": name})
            self.assertError(r, 422, "too_large")
        finally:
            d2.cleanup()  # its own temp dir; the database is the class daemon's
            self.d.start()

    def test_the_limit_comes_from_the_environment_too(self):
        d = Daemon(env={"OPTD_MAX_SESSION_BYTES": "64K"})
        try:
            d.start()
            r = d.post("/v1/sessions", {"name": "a", "optimizer": "adam", "size": 6000})
            self.assertError(r, 422, "too_large")
            self.assertEqual(d.post("/v1/sessions", {"name": "b", "optimizer": "adam", "size": 5000}).status, 201)
        finally:
            d.cleanup()

    def test_a_limit_past_what_sqlite_stores_is_a_bad_flag(self):
        for value in ("1G", "901M", "1023"):
            with self.subTest(value=value):
                p = subprocess.run([optd_bin(), "--max-session-bytes", value, "--db",
                                    os.path.join(self.d.tmp, "never.db")],
                                   stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
                self.assertEqual(p.returncode, 2, p)
                self.assertIn(b"--max-session-bytes", p.stderr)
