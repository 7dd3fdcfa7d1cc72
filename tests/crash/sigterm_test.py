#!/usr/bin/env python3
"""SIGTERM under load: the requests in flight finish (every 2xx reply is durable
after a restart), new ones are refused cleanly (503, or the connection is
refused), the process exits 0 promptly and the database is consistent.

    python3 tests/crash/sigterm_test.py [--rounds N] [--seed S]

Each round: the workload of workload.py runs, a few step requests are left
half-sent (head and half the body) on their own connections, SIGTERM arrives
at a random moment, then the half-sent requests are completed: each must be
answered 200 (and be durable) or 503 (and not applied), never dropped. A probe
opens new connections all along: after SIGTERM each is refused or answered
503. A step request on a kept-alive connection that gets no reply counts as
dropped when it was sent well before SIGTERM (a request sent just as the
server closes an idle connection is HTTP's usual race, and is reported)."""

import argparse
import os
import random
import socket
import sqlite3
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the tree
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "faults"))
from harness import Daemon, Report, check, pack, read_reply  # noqa: E402
from workload import Workload  # noqa: E402

N_PARTIAL = 4
SIZE = 16
MARGIN = 0.1  # seconds: a request sent this long before SIGTERM is in flight for sure


def reply_status(sock, timeout=15):
    """The status of the reply on sock (None: none came within timeout)."""
    sock.settimeout(timeout)
    return read_reply(sock)[0]


def one_round(rnd, rng, rep, sync):
    d = Daemon(args=["--sync", sync, "--log-level", "quiet"])
    try:
        d.start()
        w = Workload(d, rng)
        w.create()
        p0 = [float(i) for i in range(SIZE)]
        for i in range(N_PARTIAL):
            d.create("part-%d" % i, "sgd", p0, hyperparams={"lr": 1})
        stop = threading.Event()
        threads = w.start(stop)
        probe_out = {"after": [], "bad": []}
        t_term = [None]

        def probe():
            while not stop.is_set():
                t = time.time()
                try:
                    r = d.request("GET", "/v1/sessions/sgd-0", timeout=10)
                    status = r.status
                except (ConnectionRefusedError, ConnectionResetError):
                    status = "refused"
                except OSError as e:  # noqa: F841
                    status = "error:%s" % type(e).__name__
                except Exception as e:  # noqa: BLE001
                    status = "error:%s" % type(e).__name__
                if t_term[0] is not None and t > t_term[0] + 0.05:
                    probe_out["after"].append(status)
                    if status not in (503, "refused"):
                        probe_out["bad"].append(status)
                    if status == "refused":
                        return
                time.sleep(0.005)
        pt = threading.Thread(target=probe, daemon=True)
        pt.start()

        time.sleep(rng.uniform(0.05, 0.4))
        body = pack("float64", [1.0] * SIZE)
        partial = []
        for i in range(N_PARTIAL):
            s = socket.create_connection(("127.0.0.1", d.port))
            s.sendall(("POST /v1/sessions/part-%d/step HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream"
                       "\r\nContent-Length: %d\r\n\r\n" % (i, len(body))).encode() + body[:len(body) // 2])
            partial.append(s)
        time.sleep(0.05)
        t_term[0] = time.time()
        d.proc.send_signal(15)
        time.sleep(0.1)
        for s in partial:
            s.sendall(body[len(body) // 2:])
        statuses = [reply_status(s) for s in partial]
        for s in partial:
            s.close()
        try:
            rc = d.proc.wait(20)
        except Exception:  # noqa: BLE001
            rc = None
        t_exit = time.time() - t_term[0]
        stop.set()
        for t in threads:
            t.join(30)
        pt.join(30)
        check(rc is not None, "the daemon did not exit within 20 s of SIGTERM")
        check(rc == 0, "exit status %r after SIGTERM: %s", rc, d.log())
        check(not w.errors, "during load: %s", "; ".join(w.errors[:3]))
        for i, st in enumerate(statuses):
            check(st in (200, 503), "half-sent request %d: %r after SIGTERM (want 200 or 503)", i, st)
        check(not probe_out["bad"], "new connections after SIGTERM got %r (want 503 or refused)",
              probe_out["bad"][:5])
        late = [t for t in w.drops if t < t_term[0] - MARGIN]
        racy = [t for t in w.drops if t >= t_term[0] - MARGIN]
        check(not late, "%d step requests sent more than %.0f ms before SIGTERM got no reply", len(late),
              MARGIN * 1000)
        con = sqlite3.connect("file:%s?mode=ro" % d.db, uri=True)
        rows = con.execute("PRAGMA integrity_check").fetchall()
        con.close()
        check(rows == [("ok",)], "integrity_check: %r", rows)
        wal = d.db + "-wal"
        wal_left = os.path.getsize(wal) if os.path.exists(wal) else 0
        d.start()
        w.verify()
        for i, st in enumerate(statuses):
            r = d.request("GET", "/v1/sessions/part-%d/params" % i)
            want = 1 if st == 200 else 0
            check(r.json["step"] == want, "half-sent request %d answered %d but the session is at step %d",
                  i, st, r.json["step"])
            check(r.json["params"] == [p - want for p in p0], "part-%d params %r", i, r.json["params"][:3])
        rc2 = d.term()
        check(rc2 == 0, "second SIGTERM (idle): exit status %r", rc2)
        return ("exit in %.0f ms; %d steps acknowledged and durable; half-sent: %s; new connections after: %s; "
                "%d racy no-reply at close; WAL left %d bytes" % (
                    t_exit * 1000, w.checked_total, statuses, sorted(set(map(str, probe_out["after"]))),
                    len(racy), wal_left))
    finally:
        d.cleanup()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("SIGTERM_ROUNDS", "3")))
    ap.add_argument("--seed", type=int, default=int(time.time()))
    a = ap.parse_args()
    print("sigterm test: seed %d" % a.seed, flush=True)
    rng = random.Random(a.seed)
    rep = Report()
    for rnd in range(1, a.rounds + 1):
        sync = "full" if rnd % 2 else "normal"
        rep.run("SIGTERM under load, round %d (--sync %s)" % (rnd, sync), one_round, rnd, rng, rep, sync)
    return rep.finish()


if __name__ == "__main__":
    sys.exit(main())
