#!/usr/bin/env python3
"""Storage discipline, against the real binary: one daemon per database,
files for their owner only, a WAL that stays bounded (and refuses writes
with a logged reason at its hard limit rather than fill the disk, then
recovers by itself), /readyz that does not call a full disk ready, storage
failures in the log with SQLite's message, and the storage figures in
/metrics.

    python3 tests/faults/storage_test.py [name-substring ...]

The disk-full case needs root for a tmpfs mount (skipped with the reason
otherwise)."""

import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the tree
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from harness import Daemon, check, fill_disk, metric, params, run_listed, small_disk, step, wait_for  # noqa: E402

MIB = 1 << 20




def ready(d):
    return d.request("GET", "/readyz").status


def t_one_daemon_per_database():
    """A second daemon on the same --db exits non-zero at once with a message;
    the first goes on serving and every step it acknowledged is kept."""
    d = Daemon(args=["--log-level", "quiet"])
    d2 = Daemon(db=d.db, args=["--log-level", "quiet"], tmp=d.tmp)
    try:
        d.start()
        d.create("f", "sgd", [0.0, 0.0], hyperparams={"lr": 1})
        for _ in range(2):
            check(step(d, "f", 2).status == 200, "step on the first daemon")
        d2.spawn()
        try:
            rc = d2.proc.wait(10)
        except subprocess.TimeoutExpired:
            d2.kill()
            raise AssertionError("a second daemon on the same database kept running")
        check(rc not in (0, None), "second daemon exit status %r", rc)
        check("in use by another process" in d2.log(), "second daemon's message: %r", d2.log())
        for _ in range(2):
            check(step(d, "f", 2).status == 200, "step on the first daemon after the second tried")
        check(params(d, "f") == (4, [-4.0, -4.0]), "first daemon's state: %r", params(d, "f"))
        d.kill()
        d.start()
        check(params(d, "f") == (4, [-4.0, -4.0]), "after a restart: %r", params(d, "f"))
        return "second daemon: exit %d, %r" % (rc, d2.log().strip().splitlines()[-1][:90])
    finally:
        d2.kill()
        d.cleanup()


def t_files_are_private():
    """The database, -wal and -shm files are created 0600, whatever the umask."""
    d = Daemon(args=["--log-level", "quiet"])
    old = os.umask(0o022)
    try:
        d.start()
        d.create("f", "adam", [1.0, 2.0])
        check(step(d, "f", 2).status == 200, "step")
        modes = {}
        for suffix in ("", "-wal", "-shm"):
            p = d.db + suffix
            if os.path.exists(p):
                modes[suffix or "db"] = stat.S_IMODE(os.stat(p).st_mode)
        check("db" in modes and "-wal" in modes, "files present: %r", modes)
        bad = {k: oct(v) for k, v in modes.items() if v & 0o077}
        check(not bad, "readable by others: %r", bad)
        return ", ".join("%s %s" % (k, oct(v)) for k, v in modes.items())
    finally:
        os.umask(old)
        d.cleanup()


def t_metrics_report_storage():
    d = Daemon(args=["--log-level", "quiet"])
    try:
        d.start()
        d.create("f", "sgd", [0.0] * 1000, hyperparams={"lr": 1})
        check(step(d, "f", 1000).status == 200, "step")
        text = d.request("GET", "/metrics").body.decode()
        for name in ("optd_db_bytes", "optd_db_wal_bytes", "optd_db_checkpoint_lag_frames",
                     "optd_db_checkpoint_failures_total", "optd_db_checkpoints_total", "optd_db_wal_refusals_total"):
            check(re.search(r"^%s \d+$" % name, text, re.M), "%s missing from /metrics", name)
        wal = int(re.search(r"^optd_db_wal_bytes (\d+)$", text, re.M).group(1))
        check(wal == os.path.getsize(d.db + "-wal"), "optd_db_wal_bytes %d vs file %d", wal,
              os.path.getsize(d.db + "-wal"))
        # The WAL frames commits wrote, all told, and the writer's page
        # cache (SQLite's 2 MB: no session here logs its steps).
        check(metric(d, "optd_db_page_cache_limit_bytes") == 2000 * 1024, "page cache limit %d",
              metric(d, "optd_db_page_cache_limit_bytes"))
        before = metric(d, "optd_db_wal_frames_written_total")
        check(before >= 1, "no WAL frames counted after a create and a step")
        check(step(d, "f", 1000).status == 200, "step")
        after_step = metric(d, "optd_db_wal_frames_written_total")
        check(after_step > before, "a step wrote no frames: %d -> %d", before, after_step)
        # Idle: a TRUNCATE checkpoint gives the WAL back within a few seconds.
        check(wait_for(lambda: os.path.getsize(d.db + "-wal") == 0, 8), "the -wal file is still %d bytes after 8 s idle",
              os.path.getsize(d.db + "-wal"))
        # The count goes on across the WAL starting over: it never goes back.
        check(step(d, "f", 1000).status == 200, "step")
        after_reset = metric(d, "optd_db_wal_frames_written_total")
        check(after_reset > after_step, "frames written went %d -> %d across the WAL's restart", after_step,
              after_reset)
        return "wal %d bytes after one step, 0 when idle; %d frames written" % (wal, after_reset)
    finally:
        d.cleanup()


def t_wal_hard_limit():
    """A reader that holds an old snapshot keeps checkpoints from copying the
    WAL back; at --max-wal writes are refused with 503 and a logged reason
    (and /readyz is 503) instead of the WAL growing until the disk is full;
    once the reader lets go, writes and /readyz come back by themselves."""
    d = Daemon(args=["--log-level", "quiet", "--max-wal", "4M", "--sync", "normal"])
    n = 20000  # 160 KB of float64 state a step
    try:
        d.start()
        d.create("big", "sgd", [0.0] * n, hyperparams={"lr": 1})
        check(step(d, "big", n).status == 200, "first step")
        holder = sqlite3.connect(d.db, timeout=1, isolation_level=None)
        holder.execute("BEGIN")
        holder.execute("SELECT count(*) FROM sessions").fetchall()  # a read snapshot, held
        acked, refused = 1, None
        for i in range(200):
            r = step(d, "big", n)
            if r.status == 200:
                acked += 1
                continue
            refused = r
            break
        check(refused is not None, "200 steps of 160 KB with a reader holding the WAL: never refused (WAL %d bytes)",
              os.path.getsize(d.db + "-wal"))
        check(refused.status == 503 and refused.code == "unavailable", "refusal: %r", refused)
        wal = os.path.getsize(d.db + "-wal")
        check(wal < 4 * MIB + 2 * n * 8 + MIB, "WAL %d bytes at the refusal, limit 4 MiB", wal)
        check(ready(d) == 503, "/readyz while writes are refused: %d", ready(d))
        check(wait_for(lambda: "refusing writes" in d.log(), 5), "no logged reason: %r", d.log())
        check(params(d, "big")[0] == acked, "reads still work and show the acknowledged step")
        holder.execute("COMMIT")
        holder.close()
        check(wait_for(lambda: ready(d) == 200, 10), "/readyz did not come back after the reader let go")
        r = step(d, "big", n)
        check(r.status == 200, "step after the reader let go: %r", r)
        acked += 1
        d.kill()
        d.start()
        got = params(d, "big")
        check(got[0] == acked and got[1][0] == -float(acked), "after kill -9: %r, acknowledged %d", got[:1], acked)
        return "refused after %d steps with the WAL at %.1f MiB; recovered" % (acked - 1, wal / MIB)
    finally:
        d.cleanup()


def t_full_disk_not_ready():
    """On a full disk, a write too big for the WAL's slack fails; /readyz then
    stays 503 (a one-page probe write would still fit, and used to call the
    disk ready), the log says why with SQLite's message, and both come back
    by themselves once there is room again."""
    with small_disk("24m") as mnt:
        d = Daemon(db=os.path.join(mnt, "optd.db"), args=["--log-level", "quiet"])
        filler = os.path.join(mnt, "filler")
        try:
            d.start()
            d.create("f", "sgd", [0.0] * 4, hyperparams={"lr": 1})
            check(step(d, "f", 4).status == 200, "first step")
            # Steps of 800 KB grow the WAL past its soft limit (an eighth of this
            # small disk), so it restarts and its file has slack: room for the
            # probe's one page even once the disk is full.
            d.create("mid", "sgd", [0.0] * 100000, hyperparams={"lr": 1})
            for _ in range(8):
                check(step(d, "mid", 100000).status == 200, "step of mid")
            fill_disk(filler)
            # 1e6 float64 elements: 8 MB of state, more than any slack left.
            r = d.request("PUT", "/v1/sessions/huge", js={"optimizer": "sgd", "size": 1000000, "dtype": "float64"})
            check(r.status == 503, "create of 8 MB on a full disk: %r", r)
            check(ready(d) == 503, "/readyz after a write failed for lack of space: %d", ready(d))
            time.sleep(1)
            check(ready(d) == 503, "/readyz a second later, the disk still full: %d", ready(d))
            check(wait_for(lambda: re.search(r"store: (COMMIT|a transaction).*failed: .*full", d.log()), 5),
                  "no storage failure in the log: %r", d.log())
            os.unlink(filler)
            check(wait_for(lambda: ready(d) == 200, 10), "/readyz did not come back once there was room")
            r = d.request("PUT", "/v1/sessions/huge", js={"optimizer": "sgd", "size": 1000000, "dtype": "float64"})
            check(r.status == 201, "create once there is room: %r", r)
            return "log: %r" % re.search(r"store: .*", d.log()).group(0)[:100]
        finally:
            d.kill()
            shutil.rmtree(d.tmp, ignore_errors=True)


TESTS = [
    ("one daemon per database", t_one_daemon_per_database),
    ("files are private (0600)", t_files_are_private),
    ("metrics report the storage", t_metrics_report_storage),
    ("WAL hard limit: refuse, log, recover", t_wal_hard_limit),
    ("full disk: /readyz stays 503, log says why", t_full_disk_not_ready),
]


if __name__ == "__main__":
    sys.exit(run_listed(TESTS))
