#!/usr/bin/env python3
"""SIGTERM while requests keep arriving on every request thread, with the
main thread's removal of the listening socket from epoll slowed by
slow_unlisten_shim.so (LD_PRELOAD; $UNLISTEN_SHIM or
build/tests/slow_unlisten_shim.so). libmicrohttpd's MHD_quiesce_daemon races
its own worker threads there and aborts the process (CI saw it once as exit
-6 and "Failed to remove listen FD from epoll set"); the daemon must stop
accepting without it. Each round: 4 request threads, 6 client threads
opening a connection per request, SIGTERM, and then exit status 0 and every
probe after SIGTERM answered 503 or refused.

    python3 tests/crash/shutdown_race_test.py [--rounds N]"""

import argparse
import os
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the tree
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "faults"))
from harness import REPO, Daemon, Report, Skip, check  # noqa: E402


def shim_path():
    p = os.environ.get("UNLISTEN_SHIM") or os.path.join(REPO, "build", "tests", "slow_unlisten_shim.so")
    if not os.path.exists(p):
        raise Skip("no %s (make build/tests/slow_unlisten_shim.so)" % p)
    return p


def one_round(rnd):
    d = Daemon(args=["--threads", "4", "--log-level", "quiet"], preload=shim_path(),
               env={"OPTD_UNLISTEN_DELAY_MS": "300"})
    try:
        d.start()
        stop = threading.Event()
        t_term = [None]
        bad = []

        def load():
            while not stop.is_set():
                t = time.time()
                try:
                    status = d.request("GET", "/healthz", timeout=10).status
                except (ConnectionRefusedError, ConnectionResetError, BrokenPipeError):
                    status = "refused"
                except OSError as e:
                    status = "error:%s" % type(e).__name__
                if t_term[0] is not None and t > t_term[0] + 0.05 and status not in (200, 503, "refused"):
                    bad.append(status)
                if status == "refused" and t_term[0] is not None:
                    time.sleep(0.01)

        threads = [threading.Thread(target=load, daemon=True) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.2 + 0.05 * (rnd % 4))
        t_term[0] = time.time()
        rc = d.term(timeout=20)
        stop.set()
        for t in threads:
            t.join(15)
        check(rc == 0, "exit status %r after SIGTERM under load (-6 is MHD's abort): %s", rc, d.log()[-600:])
        check(not bad, "requests after SIGTERM got %r (want 200 in flight, 503 or refused)", bad[:5])
        return "exit %d in %.0f ms" % (rc, (time.time() - t_term[0]) * 1000)
    finally:
        d.cleanup()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    rep = Report()
    for rnd in range(1, a.rounds + 1):
        rep.run("SIGTERM with the listening socket's removal slowed, round %d" % rnd, one_round, rnd)
    return rep.finish()


if __name__ == "__main__":
    sys.exit(main())
