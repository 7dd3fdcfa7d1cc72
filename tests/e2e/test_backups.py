"""Online backups (API.md "Operations"): POST /v1/backups writes a consistent
snapshot of the live database into --backup-dir while steps go on, GET
/v1/backups lists them. A backup taken under load holds every step
acknowledged before it began and is one commit's state (each session exactly
as one acknowledged step left it); a daemon started on it serves that state
and steps on bit-exactly; steps keep being acknowledged while it is taken; a
full backup disk is a clean 503 that changes nothing else."""

import os
import shutil
import stat
import struct
import subprocess
import tempfile
import threading
import time
import unittest

from optd_e2e import Daemon, DaemonTest, uniq


def grad(name, k, n):
    """The gradient of step k of session name: a fixed function of both, so
    a restored daemon can be fed the steps the original took after."""
    h = sum(ord(c) for c in name)
    return [((h * 31 + k * 17 + i * 7) % 97 - 48) / 64.0 for i in range(n)]


class BackupTests(DaemonTest):
    daemon_args = ("--sync", "normal")

    @classmethod
    def setUpClass(cls):
        cls.backup_dir = tempfile.mkdtemp(prefix="optd-backups-")
        cls.daemon_args = cls.daemon_args + ("--backup-dir", cls.backup_dir)
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        shutil.rmtree(cls.backup_dir, ignore_errors=True)

    def backup(self):
        r = self.d.request("POST", "/v1/backups", timeout=120)
        self.assertEqual(r.status, 201, r)
        return r.json

    def test_post_writes_a_file_and_get_lists_it(self):
        name = uniq("bk")
        self.d.create(name, "adam", params=[0.5, -1.0])
        self.d.step(name, [0.1, 0.2])
        b = self.backup()
        for k in ("name", "bytes", "step_commits", "sessions", "created_at", "path"):
            self.assertIn(k, b)
        path = os.path.join(self.backup_dir, b["name"])
        self.assertTrue(os.path.isfile(path), b)
        self.assertEqual(os.path.getsize(path), b["bytes"])
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, "a backup is its owner's only")
        self.assertGreaterEqual(b["sessions"], 1)
        self.assertGreaterEqual(b["step_commits"], 1)
        self.assertFalse([f for f in os.listdir(self.backup_dir) if f.endswith(".tmp")])
        listed = self.d.get("/v1/backups")
        self.assertEqual(listed.status, 200, listed)
        got = {x["name"]: x for x in listed.json["backups"]}
        self.assertIn(b["name"], got)
        self.assertEqual(got[b["name"]]["bytes"], b["bytes"])
        self.assertEqual(got[b["name"]]["step_commits"], b["step_commits"])
        b2 = self.backup()
        self.assertNotEqual(b2["name"], b["name"])
        names = [x["name"] for x in self.d.get("/v1/backups").json["backups"]]
        self.assertEqual(names, sorted(names), "listed oldest first")
        self.assertLess(names.index(b["name"]), names.index(b2["name"]))

    def test_refusals(self):
        r = self.d.request("POST", "/v1/backups", json_body={"dir": "/tmp"})
        self.assertError(r, 422)
        self.assertIn("dir", r.json["error"]["message"])
        r = self.d.request("DELETE", "/v1/backups")
        self.assertError(r, 405, "method_not_allowed")
        self.assertEqual({m.strip() for m in r.header("Allow").split(",")}, {"GET", "HEAD", "POST"})
        self.assertEqual(self.d.request("POST", "/v1/backups", json_body={}).status, 201)

    def test_backup_under_load_is_one_commit_and_restores_bit_exactly(self):
        # Ballast, so that the copy takes a while: 3 x 4M float32 Adam
        # sessions (params and two buffers) are about 150 MB.
        for i in range(3):
            self.d.create(uniq("ballast"), "adam", size=4 << 20, fill=0.25)
        n = 8
        live = [uniq("live%d" % i) for i in range(4)]
        for name in live:
            self.d.create(name, "adam", dtype="float64", params=[0.5] * n, hyperparams={"lr": 0.01})
        acked = {name: {} for name in live}  # step -> params of its reply
        times = {name: [] for name in live}  # (time of the reply, step)
        stop = threading.Event()
        errors = []

        def load(name):
            c = self.d.conn(timeout=60)
            k = 0
            try:
                while not stop.is_set() and k < 100000:
                    k += 1
                    r = self.d.request("POST", "/v1/sessions/%s/step" % name, json_body={"grad": grad(name, k, n)},
                                       conn=c)
                    if r.status != 200:
                        errors.append(r)
                        return
                    acked[name][r.json["step"]] = r.json["params"]
                    times[name].append((time.monotonic(), r.json["step"]))
            finally:
                c.close()
        threads = [threading.Thread(target=load, args=(name,)) for name in live]
        for t in threads:
            t.start()
        try:
            deadline = time.time() + 30
            while min(len(acked[x]) for x in live) < 5 and time.time() < deadline and not errors:
                time.sleep(0.01)
            before = {x: max(acked[x]) for x in live}  # acknowledged before the backup began
            t_post = time.monotonic()
            b = self.backup()
            t_done = time.monotonic()
            after_deadline = time.time() + 30
            while min(max(acked[x]) for x in live) < max(before.values()) + 200 and time.time() < after_deadline:
                if errors:
                    break
                time.sleep(0.01)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        self.assertEqual(errors, [])
        during = sum(1 for x in live for (t, _) in times[x] if t_post < t < t_done)
        gaps = [b2 - a2 for x in live for (a2, _), (b2, _) in zip(times[x], times[x][1:]) if t_post < b2 < t_done]
        print("\n    backup of %d bytes in %d ms; %d steps acknowledged meanwhile, longest wait %.1f ms"
              % (b["bytes"], b["duration_ms"], during, 1000 * max(gaps or [0])), end=" ")
        self.assertGreater(during, 0, "no step was acknowledged while the backup ran")

        # A daemon on (a copy of) the backup serves exactly one commit's state.
        tmp = tempfile.mkdtemp(prefix="optd-restore-")
        try:
            db = os.path.join(tmp, "restored.db")
            shutil.copyfile(os.path.join(self.backup_dir, b["name"]), db)
            r = Daemon(["--sync", "normal"], db=db).start()
            try:
                total = 0
                page = r.get("/v1/sessions?limit=1000").json
                self.assertIsNone(page["next"])
                total = sum(s["step"] for s in page["sessions"])
                self.assertEqual(total, b["step_commits"])
                self.assertEqual(len(page["sessions"]), b["sessions"])
                for x in live:
                    p = r.params(x)
                    s = p["step"]
                    self.assertGreaterEqual(s, before[x], "%s: a step acknowledged before the backup is missing" % x)
                    self.assertEqual(p["params"], acked[x][s], "%s: not the state step %d left" % (x, s))
                    # and it steps on exactly as the original did
                    for k in range(s + 1, min(s + 4, max(acked[x]) + 1)):
                        got = r.step(x, grad(x, k, n)).json
                        self.assertEqual((got["step"], got["params"]), (k, acked[x][k]), x)
            finally:
                r.cleanup()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class NoBackupDirTests(DaemonTest):
    def test_backups_are_off_without_backup_dir(self):
        r = self.d.request("POST", "/v1/backups")
        self.assertError(r, 503, "unavailable")
        self.assertIn("--backup-dir", r.json["error"]["message"])
        r = self.d.get("/v1/backups")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json["backups"], [])


class TokenTests(DaemonTest):
    daemon_token = "s3cret"
    daemon_env = {"OPTD_TOKEN": "s3cret"}

    def test_backups_need_the_token(self):
        self.assertError(self.d.request("POST", "/v1/backups", auth=False), 401, "unauthorized")
        self.assertError(self.d.request("GET", "/v1/backups", auth=False), 401, "unauthorized")


@unittest.skipUnless(os.geteuid() == 0 and shutil.which("mount"), "needs root to mount a small tmpfs")
class FullBackupDiskTests(unittest.TestCase):
    def test_full_backup_disk_is_a_clean_503(self):
        mnt = tempfile.mkdtemp(prefix="optd-fullbk-")
        m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "optd-bk", mnt], capture_output=True, text=True)
        if m.returncode != 0:
            os.rmdir(mnt)
            self.skipTest("cannot mount a tmpfs here: %s" % m.stderr.strip())
        d = Daemon(["--backup-dir", mnt])
        try:
            d.start()
            name = uniq("full")
            d.create(name, "sgd", size=1 << 20, fill=0.5)  # 4 MB of state: more than the disk
            d.step(name, [0.0] * 8, expect=422)  # wrong length: just a request, nothing changes
            before = d.params(name)
            r = d.request("POST", "/v1/backups", timeout=60)
            self.assertEqual(r.status, 503, r)
            self.assertEqual(r.json["error"]["code"], "unavailable")
            self.assertIn("full", r.json["error"]["message"])
            self.assertEqual(os.listdir(mnt), [], "a failed backup leaves nothing behind")
            self.assertEqual(d.get("/v1/backups").json["backups"], [])
            # nothing else is affected
            self.assertEqual(d.get("/readyz").status, 200)
            self.assertEqual(d.params(name), before)
            body = struct.pack("<%df" % (1 << 20), *([0.5] * (1 << 20)))
            r = d.request("POST", "/v1/sessions/%s/step" % name, body=body,
                          headers={"Content-Type": "application/octet-stream", "Prefer": "return=minimal"})
            self.assertEqual((r.status, r.json["step"]), (200, 1), r)
            self.assertIn("backup failed", d.log(), "the cause is logged")
        finally:
            d.cleanup()
            subprocess.run(["umount", "-l", mnt])
            os.rmdir(mnt)
