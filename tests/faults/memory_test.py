#!/usr/bin/env python3
"""Memory stays flat: the daemon's resident set (VmRSS in /proc/PID/status)
after many steps and many create/delete cycles stays within a margin of what
it was after a warm-up, so nothing grows per request.

    python3 tests/faults/memory_test.py [--steps N] [--cycles N] [--threads N]

make test runs a scaled-down version (10,000 steps, 1,000 cycles); make soak
the full one (100,000 steps, 10,000 cycles). The margin is
max(+20 MB, 1.5 x the warmed-up RSS), overridable with --margin-mb/--ratio."""

import argparse
import http.client
import json
import os
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the tree
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from harness import Daemon, Report, check, pack  # noqa: E402

SIZE = 64
SESSIONS = 4


def step_loop(d, count, tid, errors, keys):
    c = d.conn(timeout=30)
    grad_b = pack("float32", [0.5] * SIZE)
    grad_j = json.dumps({"grad": [0.25] * SIZE, "loss": 1.5}).encode()
    try:
        for i in range(count):
            name = "m%d" % ((i + tid) % SESSIONS)
            kind = i % 4
            hdrs = {}
            if kind == 0:
                body, hdrs["Content-Type"] = grad_j, "application/json"
            else:
                body, hdrs["Content-Type"] = grad_b, "application/octet-stream"
            if kind == 1:
                hdrs["Accept"] = "application/octet-stream"
            if kind == 2:
                hdrs["Prefer"] = "return=minimal"
            if keys and kind == 3:
                hdrs["Idempotency-Key"] = "t%d-%d" % (tid, i)
            c.request("POST", "/v1/sessions/%s/step" % name, body=body, headers=hdrs)
            r = c.getresponse()
            r.read()
            if r.status != 200:
                errors.append("step %s: %d" % (name, r.status))
                return
            if i % 997 == 0:
                for path in ("/v1/sessions/%s/state" % name, "/v1/sessions/%s/params" % name, "/metrics",
                             "/v1/sessions?limit=10", "/v1/sessions/%s/history?limit=100" % name):
                    c.request("GET", path)
                    r = c.getresponse()
                    r.read()
    except (OSError, http.client.HTTPException) as e:
        errors.append("thread %d: %r" % (tid, e))
    finally:
        c.close()


def steps(d, n, threads, keys=True):
    errors = []
    per = n // threads
    ts = [threading.Thread(target=step_loop, args=(d, per, t, errors, keys)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    check(not errors, "during steps: %s", errors[:3])
    return per * threads


def cycles(d, n, tag):
    c = d.conn(timeout=30)
    try:
        for i in range(n):
            name = "c-%s-%d" % (tag, i)
            body = {"name": name, "optimizer": ("adam", "rmsprop", "nadam", "adagrad")[i % 4], "size": SIZE,
                    "dtype": "float64" if i % 2 else "float32", "hyperparams": {"lr": 0.01}}
            c.request("POST", "/v1/sessions", body=json.dumps(body), headers={"Content-Type": "application/json"})
            r = c.getresponse()
            r.read()
            check(r.status == 201, "create %s: %d", name, r.status)
            c.request("POST", "/v1/sessions/%s/step" % name, body=json.dumps({"grad": [1.0] * SIZE}),
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            r.read()
            check(r.status == 200, "step %s: %d", name, r.status)
            if i % 3 == 0:
                c.request("GET", "/v1/sessions/%s/state" % name)
                r = c.getresponse()
                r.read()
            if i % 5 == 0:
                c.request("PATCH", "/v1/sessions/%s" % name, body=b'{"hyperparams":{"lr":0.5}}',
                          headers={"Content-Type": "application/json"})
                r = c.getresponse()
                r.read()
            c.request("DELETE", "/v1/sessions/%s" % name)
            r = c.getresponse()
            r.read()
            check(r.status == 204, "delete %s: %d", name, r.status)
    finally:
        c.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--margin-mb", type=float, default=20)
    ap.add_argument("--ratio", type=float, default=1.5)
    a = ap.parse_args()
    rep = Report()
    # Under AddressSanitizer (make asan) freed memory waits in a quarantine
    # that would read as growth; without it, what grows is still a leak, and
    # LeakSanitizer checks the clean exit.
    asan = os.environ.get("ASAN_OPTIONS", "")
    d = Daemon(args=["--log-level", "quiet", "--sync", "normal"],
               env={"ASAN_OPTIONS": (asan + ":quarantine_size_mb=0:thread_local_quarantine_size_kb=0").lstrip(":")})
    samples = []
    try:
        d.start()
        for s in range(SESSIONS):
            d.create("m%d" % s, "adam", [0.1] * SIZE, dtype="float32")

        def rss():
            v = d.rss_kb()
            samples.append(v)
            return v

        def warm():
            steps(d, max(2000, a.steps // 10), a.threads)
            cycles(d, max(200, a.cycles // 10), "warm")
            return "RSS %.1f MB after warm-up" % (rss() / 1024)
        rep.run("warm-up", warm)
        base = samples[-1] if samples else 0
        limit = max(base + a.margin_mb * 1024, base * a.ratio)

        def flat_steps():
            t0 = time.time()
            done = 0
            chunk = max(1, a.steps // 5)
            while done < a.steps:
                done += steps(d, min(chunk, a.steps - done), a.threads)
                rss()
            now = samples[-1]
            check(now <= limit, "RSS %.1f MB after %d steps; warmed-up %.1f MB (limit %.1f MB); samples %s",
                  now / 1024, done, base / 1024, limit / 1024, [round(x / 1024, 1) for x in samples])
            return "%d steps in %.1f s; RSS %s MB" % (done, time.time() - t0,
                                                      " -> ".join("%.1f" % (x / 1024) for x in samples[1:]))
        rep.run("RSS flat over %d steps" % a.steps, flat_steps)

        def flat_cycles():
            t0 = time.time()
            first = len(samples)
            chunk = max(1, a.cycles // 5)
            for k in range(0, a.cycles, chunk):
                cycles(d, min(chunk, a.cycles - k), "k%d" % k)
                rss()
            now = samples[-1]
            check(now <= limit, "RSS %.1f MB after %d create/delete cycles; warmed-up %.1f MB (limit %.1f MB)",
                  now / 1024, a.cycles, base / 1024, limit / 1024)
            r = d.request("GET", "/v1/sessions?limit=1000")
            check(len(r.json["sessions"]) == SESSIONS, "sessions left: %d", len(r.json["sessions"]))
            return "%d cycles in %.1f s; RSS %s MB" % (a.cycles, time.time() - t0,
                                                       " -> ".join("%.1f" % (x / 1024) for x in samples[first:]))
        rep.run("RSS flat over %d create/delete cycles" % a.cycles, flat_cycles)
        rep.run("clean exit", lambda: check(d.term() == 0, "SIGTERM exit status"))
    finally:
        d.cleanup()
    return rep.finish()


if __name__ == "__main__":
    sys.exit(main())
