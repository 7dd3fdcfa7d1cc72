"""Durability: acknowledged writes survive kill -9; foreign --db files are
refused and left alone; SIGTERM/SIGINT exit cleanly."""

import os
import signal
import sqlite3
import subprocess
import threading
import time
import unittest

from optd_e2e import Daemon, DaemonTest, free_port, optd_bin, sqlite_file, uniq


class DurabilityTests(DaemonTest):
    """Each test restarts the class daemon on the same database."""

    def steps_until(self, name, grad, enough, interrupt, give_up_on_503=False):
        """Four clients step name with grad until interrupt() (called once
        enough steps are acknowledged, or after 10 s) stops the daemon; a
        client stops at a broken connection, or at a 503 when
        give_up_on_503. (the acknowledged steps, every status seen, what
        interrupt returned)."""
        acked, statuses = [], []
        stop = threading.Event()

        def worker():
            c = self.d.conn(timeout=10)
            while not stop.is_set():
                try:
                    r = self.d.request("POST", "/v1/sessions/%s/step" % name, json_body={"grad": grad}, conn=c)
                except Exception:  # noqa: BLE001 -- the daemon is being stopped
                    break
                statuses.append(r.status)
                if r.status == 200:
                    acked.append(r.json["step"])
                elif r.status == 503 and give_up_on_503:
                    break
            c.close()

        ts = [threading.Thread(target=worker) for _ in range(4)]
        for t in ts:
            t.start()
        deadline = time.time() + 10
        while len(acked) < enough and time.time() < deadline:
            time.sleep(0.01)
        got = interrupt()
        stop.set()
        for t in ts:
            t.join(15)
        return acked, statuses, got

    def test_kill9_keeps_every_acknowledged_step(self):
        name = uniq("dur")
        self.d.create(name, "adam", hyperparams={"lr": 0.01}, params=[0.5, -1.25, 3.0, 0.0, 1e-3])
        c = self.d.conn()
        last = None
        for k in range(1, 51):
            g = [0.01 * k, -0.02 * k, 0.5, 1.0 / k, -1.0]
            r = self.d.request("POST", "/v1/sessions/%s/step" % name, json_body={"grad": g}, conn=c)
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.json["step"], k)
            last = r.json
        c.close()
        state = self.d.get("/v1/sessions/%s/state" % name).json
        self.d.kill()
        self.d.start()
        p = self.d.params(name)
        self.assertEqual(p["step"], 50)
        self.assertEqual(p["params"], last["params"])
        self.assertEqual(self.d.get("/v1/sessions/%s/state" % name).json, state, "optimizer state not durable")
        self.assertEqual(self.d.session(name)["step"], 50)

    def test_kill9_keeps_patch_delete_and_create(self):
        kept, gone = uniq("kept"), uniq("gone")
        self.d.create(kept, "adam", params=[1.0])
        self.d.create(gone, "sgd", params=[1.0])
        r = self.d.request("PATCH", "/v1/sessions/" + kept, json_body={"hyperparams": {"lr": 0.0005}})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.d.request("DELETE", "/v1/sessions/" + gone).status, 204)
        self.d.kill()
        self.d.start()
        self.assertEqual(self.d.session(kept)["hyperparams"]["lr"], 0.0005)
        self.assertError(self.d.get("/v1/sessions/" + gone), 404, "not_found")

    def test_kill9_during_concurrent_steps_loses_no_acknowledged_step(self):
        name = uniq("crash")
        init = [100000.0, -3.0]
        self.d.create(name, "sgd", dtype="float64", hyperparams={"lr": 1.0}, params=init)
        acked, _, _ = self.steps_until(name, [1.0, 1.0], 40, self.d.kill)
        self.assertGreater(len(acked), 0, "no step was acknowledged before the kill")
        self.d.start()
        p = self.d.params(name)
        self.assertGreaterEqual(p["step"], max(acked), "acknowledged steps lost (had %d)" % max(acked))
        self.assertEqual(p["params"], [x - p["step"] for x in init], "params do not match the step: half-applied?")

    def test_idempotency_key_survives_restart(self):
        name = uniq("idem")
        self.d.create(name, "adam", hyperparams={"lr": 0.1}, params=[1.0, 2.0])
        key = uniq("key")
        first = self.d.step(name, [0.5, -0.5], headers={"Idempotency-Key": key})
        self.d.step(name, [1.0, 1.0])
        self.d.kill()
        self.d.start()
        again = self.d.step(name, [0.5, -0.5], headers={"Idempotency-Key": key})
        self.assertEqual((again.header("Idempotent-Replayed") or "").lower(), "true", again)
        self.assertEqual(again.json, first.json)
        self.assertEqual(self.d.session(name)["step"], 2)
        r = self.d.step(name, [0.5, 0.5], headers={"Idempotency-Key": key}, expect=None)
        self.assertError(r, 422, "idempotency_mismatch")

    def test_sigterm_exits_zero_within_10s_and_keeps_data(self):
        name = uniq()
        self.d.create(name, "sgd", params=[1.0])
        last = self.d.step(name, [1.0]).json
        t0 = time.time()
        rc = self.d.terminate(signal.SIGTERM, 10)
        self.assertEqual(rc, 0, "exit status after SIGTERM (None = still running after 10 s); log: %s" % self.d.log())
        self.assertLess(time.time() - t0, 10)
        self.d.start()
        self.assertEqual(self.d.params(name)["params"], last["params"])

    def test_sigint_exits_zero(self):
        rc = self.d.terminate(signal.SIGINT, 10)
        self.assertEqual(rc, 0, self.d.log())
        self.d.start()

    def test_sigterm_closes_database_cleanly(self):
        name = uniq()
        self.d.create(name, "sgd", params=[1.0])
        self.d.step(name, [1.0])
        self.assertEqual(self.d.terminate(signal.SIGTERM, 10), 0)
        wal = self.d.db + "-wal"
        size = os.path.getsize(wal) if os.path.exists(wal) else 0
        self.assertEqual(size, 0, "WAL left with %d bytes after a clean shutdown" % size)
        con = sqlite3.connect("file:%s?mode=ro" % self.d.db, uri=True)
        try:
            self.assertEqual(con.execute("PRAGMA integrity_check").fetchone()[0], "ok")
            self.assertEqual(con.execute("PRAGMA journal_mode").fetchone()[0].lower(), "wal")
        finally:
            con.close()
        self.d.start()

    def test_sigterm_with_steps_in_flight(self):
        name = uniq("term")
        init = [500000.0]
        self.d.create(name, "sgd", dtype="float64", hyperparams={"lr": 1.0}, params=init)
        acked, statuses, rc = self.steps_until(name, [1.0], 30, lambda: self.d.terminate(signal.SIGTERM, 10),
                                               give_up_on_503=True)
        self.assertEqual(rc, 0, self.d.log())
        self.assertTrue(set(statuses) <= {200, 503}, "statuses during shutdown: %r" % sorted(set(statuses)))
        self.d.start()
        p = self.d.params(name)
        self.assertGreaterEqual(p["step"], max(acked))
        self.assertEqual(p["params"], [init[0] - p["step"]])


class ForeignDatabaseTests(unittest.TestCase):
    """Each test has a daemon of its own, self.d (not started: its temp dir
    holds the foreign files), cleaned up after the test."""

    def setUp(self):
        self.d = Daemon()
        self.addCleanup(self.d.cleanup)

    def refused(self, path):
        with open(path, "rb") as f:
            before = f.read()
        st = os.stat(path)
        port = free_port()
        p = subprocess.Popen([optd_bin(), "--listen", "127.0.0.1:%d" % port, "--db", path],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            self.fail("optd kept running on a foreign database %s" % path)
        msg = (out + err).decode("utf-8", "replace")
        self.assertNotEqual(p.returncode, 0, msg)
        self.assertIn("optd", msg.lower(), "no message naming optd: %r" % msg)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), before, "the foreign file was modified")
        self.assertEqual(os.stat(path).st_size, st.st_size)
        return msg

    def assertNoSidecars(self, path):
        left = [path + s for s in ("-wal", "-shm", "-journal") if os.path.exists(path + s)]
        self.assertEqual(left, [], "optd left files beside the foreign database (owned by optd's user, they can "
                                   "lock the other application out of its WAL database)")

    def test_text_file_is_refused_and_unchanged(self):
        path = os.path.join(self.d.tmp, "notes.txt")
        with open(path, "w") as f:
            f.write("this is not a database\n" * 100)
        self.refused(path)
        self.assertNoSidecars(path)

    def test_other_apps_sqlite_file_is_refused_and_unchanged(self):
        path = sqlite_file(os.path.join(self.d.tmp, "other.db"),
                           "CREATE TABLE t (a INTEGER, b TEXT)", "INSERT INTO t VALUES (1, 'x')")
        self.refused(path)
        con = sqlite3.connect(path)
        self.assertEqual(con.execute("SELECT * FROM t").fetchall(), [(1, "x")])
        self.assertEqual([r[0] for r in con.execute("SELECT name FROM sqlite_master")], ["t"])
        con.close()
        self.assertNoSidecars(path)

    def _wal_db(self):
        path = sqlite_file(os.path.join(self.d.tmp, "other-wal.db"),
                           "PRAGMA journal_mode=wal", "CREATE TABLE sessions (name TEXT)")
        self.assertFalse(os.path.exists(path + "-wal"))
        return path

    def test_other_apps_wal_sqlite_file_is_refused_and_unchanged(self):
        self.refused(self._wal_db())

    def test_other_apps_wal_sqlite_file_gets_no_sidecar_files(self):
        path = self._wal_db()
        self.refused(path)
        self.assertNoSidecars(path)

    def test_optd_database_is_reopened(self):
        self.d.start()
        name = uniq()
        self.d.create(name, "sgd", params=[1.0])
        self.assertEqual(self.d.terminate(signal.SIGTERM, 10), 0)
        self.d.start()
        self.assertEqual(self.d.params(name)["params"], [1.0])
