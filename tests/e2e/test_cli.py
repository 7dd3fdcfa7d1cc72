"""Command line: --help, flags from the environment, bad flags."""

import os
import subprocess
import time
import unittest

from optd_e2e import Daemon, free_port, optd_bin, wait_http


class CliTests(unittest.TestCase):

    def test_help_lists_flags_and_exits_zero(self):
        p = subprocess.run([optd_bin(), "--help"], stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
        self.assertEqual(p.returncode, 0, p)
        text = (p.stdout + p.stderr).decode()
        for flag in ("--listen", "--db", "--token-file", "--max-body", "--threads", "--sync"):
            self.assertIn(flag, text, "--help does not mention %s" % flag)

    def test_unknown_flag_exits_nonzero(self):
        p = subprocess.run([optd_bin(), "--no-such-flag"], stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
        self.assertNotEqual(p.returncode, 0, p)
        self.assertTrue(p.stderr.strip(), "no message on stderr")

    def test_flags_from_environment(self):
        d = Daemon()
        port = free_port()
        db = os.path.join(d.tmp, "env.db")
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPTD_")}
        env.update(OPTD_LISTEN="127.0.0.1:%d" % port, OPTD_DB=db)
        p = None
        try:
            p = subprocess.Popen([optd_bin()], cwd=d.tmp, env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.assertTrue(wait_http(port, timeout=10, proc=p), "optd did not listen on OPTD_LISTEN")
            self.assertTrue(os.path.exists(db), "optd did not open OPTD_DB")
            self.assertFalse(os.path.exists(os.path.join(d.tmp, "optd.db")))
        finally:
            if p is not None:
                p.terminate()
                p.wait(10)
            d.cleanup()

    def test_sync_normal_and_threads_are_accepted(self):
        d = Daemon(["--sync", "normal", "--threads", "2"])
        try:
            d.start()
            d.create("x", "sgd", params=[1.0])
            self.assertEqual(d.step("x", [1.0]).json["step"], 1)
        finally:
            d.cleanup()

    def test_busy_port_exits_nonzero(self):
        d = Daemon()
        try:
            d.start()
            p = subprocess.run([optd_bin(), "--listen", "127.0.0.1:%d" % d.port, "--db",
                                os.path.join(d.tmp, "second.db")],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
            self.assertNotEqual(p.returncode, 0)
            self.assertTrue(d.alive())
        finally:
            d.cleanup()


class StartupTests(unittest.TestCase):
    """The startup line says where, which sync mode and whether a token is
    needed; `make run ARGS=...` passes flags to the daemon (issue 15)."""

    def start_line(self, args, env=None):
        d = Daemon(args, env)
        self.addCleanup(d.cleanup)
        d.start()
        # The line is printed once the server runs, which may be just after
        # it first answers: wait for it (bounded).
        for _ in range(200):
            with open(d.log_path) as f:
                lines = [ln for ln in f.read().splitlines() if "listening" in ln]
            if lines:
                return lines[0]
            time.sleep(0.05)
        self.fail("no startup line in %s" % d.log())

    def test_startup_line_says_sync_mode_and_token(self):
        line = self.start_line([])
        self.assertIn("sync full", line)
        self.assertIn("no token", line)
        line = self.start_line(["--sync", "normal"], {"OPTD_TOKEN": "t0k"})
        self.assertIn("sync normal", line)
        self.assertIn("token required", line)
        self.assertNotIn("t0k", line)

    def test_make_run_passes_args(self):
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        d = Daemon()
        self.addCleanup(d.cleanup)
        port = free_port()
        b = os.path.dirname(optd_bin())  # the build tree of OPTD_BIN (build, build/asan)
        tree = ["SAN=1"] if os.path.basename(b) == "asan" else ["B=" + os.path.relpath(b, repo)]
        p = subprocess.Popen(["make", "-s", "run"] + tree + [
                              "ARGS=--listen 127.0.0.1:%d --db %s --sync normal" % (port, os.path.join(d.tmp, "r.db"))],
                             cwd=repo, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            self.assertTrue(wait_http(port, timeout=60, proc=p), "make run ARGS=... did not serve on port %d" % port)
        finally:
            os.killpg(p.pid, 15)
            out = p.communicate(timeout=20)[0].decode()
        self.assertIn("127.0.0.1:%d" % port, out)
        self.assertIn("sync normal", out)
