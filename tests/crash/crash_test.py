#!/usr/bin/env python3
"""Crash test: load the daemon, kill -9 it at a random moment, restart it on
the same database, check that every acknowledged write is there and nothing is
half-applied (see workload.py for what is checked), repeat.

    python3 tests/crash/crash_test.py [--rounds N] [--sync full|normal|both] [--seed S]

Prints one line per round and a summary; the last line is 'N passed, N failed'
(one check per round and sync mode, plus the final clean shutdown)."""

import argparse
import os
import random
import sqlite3
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the tree
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "faults"))
from harness import Daemon, Report, check  # noqa: E402
from workload import Workload  # noqa: E402


def integrity(db):
    con = sqlite3.connect("file:%s?mode=ro" % db, uri=True, timeout=10)
    try:
        rows = con.execute("PRAGMA integrity_check").fetchall()
    finally:
        con.close()
    check(rows == [("ok",)], "integrity_check: %r", rows[:5])


def run_mode(sync, rounds, seed, rep, min_ms, max_ms):
    rng = random.Random(seed)
    d = Daemon(args=["--sync", sync, "--log-level", "quiet", "--threads", "4"])
    w = Workload(d, rng, big_adam_size=45000)
    state = {"kills": 0, "early": 0}
    try:
        def setup():
            d.start()
            w.create()
        rep.run("[%s] create sessions" % sync, setup)
        if not d.alive():
            return w
        for rnd in range(1, rounds + 1):
            def one_round():
                stop = threading.Event()
                big_before = w.adam["adam-2"]["acked"]
                threads = w.start(stop)
                # The 1 MiB session steps slowly (its reference is computed
                # here in Python, and a sanitized daemon is slower still):
                # let it make a few steps each round before the random delay,
                # so the kills find it in every part of its log cycle however
                # slow the machine is, instead of hoping the delay is enough.
                deadline = time.time() + 60
                while w.adam["adam-2"]["acked"] < big_before + 3 and time.time() < deadline and not w.errors:
                    time.sleep(0.01)
                delay = rng.uniform(min_ms, max_ms) / 1000.0
                time.sleep(delay)
                d.kill()
                state["kills"] += 1
                stop.set()
                for t in threads:
                    t.join(30)
                    check(not t.is_alive(), "a client thread hung after the kill")
                check(not w.errors, "during load: %s", "; ".join(w.errors[:3]))
                before = w.unacked_durable
                # Now and then kill the restart too, while it recovers the WAL
                # and opens the store.
                early = rng.random() < 0.3
                if early:
                    d.spawn()
                    time.sleep(rng.uniform(0, 0.03))
                    d.kill()
                    state["early"] += 1
                d.start()
                w.verify()
                integrity(d.db)
                return "killed at %3.0f ms; %6d steps acknowledged so far, %d durable unacknowledged this round" % (
                    delay * 1000, w.acked_total, w.unacked_durable - before)
            if rep.run("[%s] round %d" % (sync, rnd), one_round) is None and w.errors:
                w.errors.clear()
            if not d.alive():
                try:
                    d.start()
                except Exception as e:  # noqa: BLE001
                    print("cannot restart: %s" % e)
                    return w

        def clean_exit():
            rc = d.term()
            check(rc == 0, "SIGTERM after the rounds: exit status %r: %s", rc, d.log())
            integrity(d.db)
            d.start()
            w.verify()
            rc = d.term()
            check(rc == 0, "second SIGTERM: exit status %r", rc)
        rep.run("[%s] clean shutdown and final check" % sync, clean_exit)
        big = w.adam["adam-2"]["acked"]
        # The 1 MiB session must have come through whole log cycles: a test
        # of the step log that never wrote the state would prove little.
        rep.run("[%s] the logged session stepped past its log (%d steps)" % (sync, big),
                lambda: check(big > 2 * 6, "adam-2 acknowledged only %d steps", big))
        print("[%s] %d rounds, %d kills under load and %d during restart, %d acknowledged steps checked durable, %d steps found applied but "
              "unacknowledged (in flight at the kill), %d idempotent replays after restarts, churn %d creates"
              % (sync, rounds, state["kills"], state["early"], w.checked_total, w.unacked_durable, w.replays,
                 len(w.churn["created"])), flush=True)
    finally:
        d.cleanup()
    return w


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("CRASH_ROUNDS", "5")))
    ap.add_argument("--sync", default="both", choices=["full", "normal", "both"])
    ap.add_argument("--seed", type=int, default=int(os.environ.get("CRASH_SEED", str(int(time.time())))))
    ap.add_argument("--min-ms", type=float, default=50)
    ap.add_argument("--max-ms", type=float, default=500)
    a = ap.parse_args()
    print("crash test: seed %d, %d rounds per sync mode" % (a.seed, a.rounds), flush=True)
    rep = Report()
    total = 0
    for i, sync in enumerate(["full", "normal"] if a.sync == "both" else [a.sync]):
        w = run_mode(sync, a.rounds, a.seed + i, rep, a.min_ms, a.max_ms)
        total += w.checked_total
    print("summary: %d acknowledged steps checked durable across all rounds" % total)
    return rep.finish()


if __name__ == "__main__":
    sys.exit(main())
