"""SIGHUP (API.md, Operations): it never stops the daemon, not even with a
request in flight; with --log-file it reopens the log, as logrotate expects
(rename the file, send SIGHUP, the daemon writes a new one)."""

import os
import signal
import threading
import time
import unittest

from optd_e2e import Daemon, DaemonTest, uniq


def wait_until(pred, seconds=10.0):
    """True as soon as pred() holds, False after seconds (a bound, not a
    timing: each condition here holds within milliseconds when it holds)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


class SighupTests(DaemonTest):

    def test_sighup_with_a_request_in_flight_does_not_stop_the_daemon(self):
        name = uniq("hup")
        # A round of two keeps the first contribution in flight, its reply
        # waiting, while the signals arrive.
        self.d.create(name, "sgd", dtype="float64", params=[1.0, 2.0], hyperparams={"lr": 1.0}, workers=2)
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("r", self.d.step(name, [1.0, 1.0], expect=None)))
        t.start()
        try:
            time.sleep(0.3)
            for _ in range(3):
                self.d.proc.send_signal(signal.SIGHUP)
                time.sleep(0.1)
            self.assertTrue(self.d.alive(), "SIGHUP stopped the daemon: %s" % self.d.log())
            self.assertEqual(self.d.get("/healthz").status, 200)
            second = self.d.step(name, [3.0, 3.0])
        finally:
            t.join(30)
        self.assertEqual(first["r"].status, 200, first["r"])
        self.assertEqual(first["r"].json, second.json)
        self.assertEqual(second.json["contributors"], 2)
        self.assertEqual(second.json["params"], [-1.0, 0.0])
        self.assertEqual(self.d.stop(), 0, "exit status after SIGHUPs then SIGTERM")


class LogFileTests(unittest.TestCase):

    def test_log_file_is_reopened_on_sighup(self):
        d = Daemon()
        path = os.path.join(d.tmp, "optd.log")
        d.args += ["--log-file", path]
        try:
            d.start()
            self.assertTrue(wait_until(lambda: "GET /healthz 200" in read(path)),
                            "no request line in the log file: %r; stderr: %s" % (read(path), d.log()))
            self.assertEqual(os.stat(path).st_mode & 0o777, 0o600, "the log file is not mode 0600")
            os.rename(path, path + ".1")
            d.proc.send_signal(signal.SIGHUP)
            self.assertTrue(wait_until(lambda: os.path.exists(path)), "SIGHUP made no new log file: %s" % d.log())
            self.assertTrue(d.alive())
            self.assertEqual(d.get("/v1/sessions").status, 200)
            self.assertTrue(wait_until(lambda: "GET /v1/sessions 200" in read(path)),
                            "the new log file lacks the request after SIGHUP: %r" % read(path))
            self.assertNotIn("GET /v1/sessions 200", read(path + ".1"), "logged to the rotated file")
            self.assertIn("GET /healthz 200", read(path + ".1"))
            # stderr is the log file: a crash at shutdown says why there.
            self.assertEqual(d.stop(), 0, "exit status; the log file ends: %r; stderr: %s" % (read(path)[-2000:], d.log()))
        finally:
            d.cleanup()

    def test_an_unwritable_log_file_is_refused_at_start(self):
        d = Daemon()
        d.args += ["--log-file", os.path.join(d.tmp, "no-such-dir", "optd.log")]
        try:
            p = d.spawn()
            self.assertEqual(p.wait(10), 1)
            self.assertIn("log file", d.log())
        finally:
            d.cleanup()
