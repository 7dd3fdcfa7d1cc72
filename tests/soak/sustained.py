#!/usr/bin/env python3
"""Sustained load: the storage holds for as long as steps keep coming.

Three loads, each against a fresh daemon (--sync normal, where the WAL grows
fastest), driven by bench/loadgen (C, keep-alive connections):

  small+churn  4 connections stepping one 8-element session, and 4 more each
               looping create / step / delete of sessions of their own
  big          one 1e6-element float32 Adam session stepped back to back
               (binary in and out)
  many         32 sessions x 1,000 float32 Adam under 32 connections
  keyed        8 sessions x 1,000 float32 Adam under 8 connections, a fresh
               Idempotency-Key on every step (as the Python client sends):
               each session's reply ring (1,000 slots with the window
               below) comes round and its old keys are forgotten many times

While a load runs, every half second: the -wal and database sizes, the
daemon's RSS and open descriptors, the CPU time of its writer thread (the
thread named optd-writer, from /proc) and the steps applied (/metrics).
Checked for each load:
  - the -wal file never exceeds 256 MiB;
  - a few seconds after the load stops it is back to at most 70 MiB;
  - the writer's CPU per step in the cheapest second of the last third of
    the run (the cheapest few seconds, if a second holds under 50 steps) is
    within 1.3x of the cheapest second of the first third (a WAL
    that grows makes every commit dearer). The cheapest second, because the
    cost of a second swings by a third with the load alone: a group of fewer
    steps shares its commit among fewer, and a busy neighbour core slows the
    writer. Both only ever make a second dearer; a growing WAL makes every
    second dearer, the cheapest one too;
  - no checkpoint failed and every request succeeded.
With --soak (make soak) also: RSS, descriptors and the database size at the
end stay within a margin of what they were a third of the way in.

    python3 tests/soak/sustained.py [--seconds S] [--soak] [--only NAME]

make test runs 20 s per load; make soak 200 s per load (13 minutes)."""

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the tree
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "lib"))
from optdtest import REPO, Daemon, request  # noqa: E402

MIB = 1 << 20
WAL_MAX = 256 * MIB
WAL_IDLE = 70 * MIB
CPU_RATIO = 1.3
TICK = os.sysconf("SC_CLK_TCK")


def loadgen_bin():
    b = os.environ.get("OPTD_BUILD", "build")
    return os.path.join(REPO, b, "bench", "loadgen")


LOADS = {
    "small+churn": [["--conns", "4", "--sessions", "1", "--size", "8", "--body", "binary", "--create",
                     "--prefix", "small"],
                    ["--conns", "4", "--size", "8", "--body", "binary", "--churn", "--prefix", "c"]],
    "big": [["--conns", "1", "--sessions", "1", "--size", "1000000", "--body", "binary", "--create",
             "--prefix", "big"]],
    "many": [["--conns", "32", "--sessions", "32", "--size", "1000", "--body", "binary", "--create",
              "--prefix", "many"]],
    "keyed": [["--conns", "8", "--sessions", "8", "--size", "1000", "--body", "binary", "--create",
               "--prefix", "keyed", "--keys"]],
}


def writer_tid(pid):
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/comm" % (pid, tid)) as f:
                if f.read().strip() == "optd-writer":
                    return int(tid)
        except OSError:
            pass
    return None  # a daemon that names no writer: the whole process is measured


def thread_cpu(pid, tid):
    """utime + stime of one thread (the whole process when tid is None), in seconds."""
    with open("/proc/%d/stat" % pid if tid is None else "/proc/%d/task/%d/stat" % (pid, tid)) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_bytes(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def size_of(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def metrics(port):
    r = request(port, "GET", "/metrics", timeout=10)
    if r.status != 200:
        return None
    text = r.body.decode()
    steps = sum(float(m) for m in re.findall(r"^optd_steps_total\{[^}]*\} (\S+)$", text, re.M))
    out = {"steps": steps}
    for name in ("optd_db_checkpoint_failures_total", "optd_db_wal_resets_total", "optd_db_checkpoints_total",
                 "optd_db_wal_refusals_total"):
        m = re.search(r"^%s (\S+)$" % name, text, re.M)
        out[name] = float(m.group(1)) if m else None
    return out


class Sampler(threading.Thread):
    def __init__(self, d, tid):
        super().__init__(daemon=True)
        self.d, self.tid = d, tid
        self.rows = []
        self.stop_at = None
        self.halt = threading.Event()

    def sample(self):
        pid = self.d.proc.pid
        m = metrics(self.d.port)
        return {"t": time.time(), "wal": size_of(self.d.db + "-wal"), "db": size_of(self.d.db),
                "rss": rss_bytes(pid), "fds": len(os.listdir("/proc/%d/fd" % pid)),
                "cpu": thread_cpu(pid, self.tid), "steps": m["steps"] if m else None, "m": m}

    def run(self):
        while not self.halt.is_set():
            try:
                self.rows.append(self.sample())
            except (OSError, AssertionError):
                pass
            self.halt.wait(0.5)


def cheapest_second(rows, t0, t1, span):
    """The least writer CPU per step over windows of span seconds from t0 to
    t1, with the steps it covers; (None, 0) if no window saw a step."""
    best, n = None, 0
    while t0 + span <= t1:
        c, k = window_cost(rows, t0, t0 + span)
        if c is not None and (best is None or c < best):
            best, n = c, k
        t0 += span
    return best, n


def window_cost(rows, t0, t1):
    """Writer CPU seconds per step between the samples nearest t0 and t1."""
    a = min(rows, key=lambda r: abs(r["t"] - t0))
    b = min(rows, key=lambda r: abs(r["t"] - t1))
    steps = (b["steps"] or 0) - (a["steps"] or 0)
    if steps <= 0:
        return None, 0
    return (b["cpu"] - a["cpu"]) / steps, steps


def run_load(name, seconds, soak, extra_args):
    # Each session's history is full (and trimmed at every step) within the
    # warm-up, even under ASan: the first and last thirds then compare the
    # same steady state, not a history still filling against a full one.
    # Under AddressSanitizer (make asan) every free goes through a quarantine
    # of 256 MB by default, and freeing gets dearer once it is full: in 20 s
    # the small+churn load's writer went 1.16x and 1.18x dearer per step that
    # way (once 1.42x), against 1.03x and 1.06x with 16 MB, which fills within
    # the warm-up. Growth is then the daemon's own, as without ASan.
    asan = os.environ.get("ASAN_OPTIONS", "")
    d = Daemon(args=["--sync", "normal", "--log-level", "quiet", "--history-steps", "64",
                     "--idempotency-window", "1000"] + extra_args,
               env={"ASAN_OPTIONS": (asan + ":quarantine_size_mb=16").lstrip(":")})
    problems, figures = [], {}
    try:
        d.start()
        tid = writer_tid(d.proc.pid)
        procs = []
        warm = 2.0
        for args in LOADS[name]:
            cmd = [loadgen_bin(), "--port", str(d.port), "--seconds", str(seconds), "--warmup", str(warm)] + args
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        s = Sampler(d, tid)
        s.start()
        t_start = time.time()
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=seconds + warm + 120)
            outs.append((p.returncode, out.decode(), err.decode()))
        t_stop = time.time()
        # Idle: the WAL is given back within a few seconds.
        idle_wal = None
        deadline = time.time() + 8
        while time.time() < deadline:
            idle_wal = size_of(d.db + "-wal")
            if idle_wal <= WAL_IDLE and time.time() - t_stop >= 3:
                break
            time.sleep(0.25)
        s.halt.set()
        s.join()
        rows = [r for r in s.rows if r["steps"] is not None]
        for rc, out, err in outs:
            try:
                res = json.loads(out)
            except ValueError:
                problems.append("loadgen failed (%d): %s" % (rc, err.strip()[-300:]))
                continue
            if res.get("errors"):
                problems.append("%d requests failed: %s" % (res["errors"], err.strip()[-300:]))
            figures.setdefault("ok", 0)
            figures["ok"] += res.get("all_ok", 0)
        if len(rows) < 8:
            problems.append("only %d samples taken" % len(rows))
            return problems, figures
        load_rows = [r for r in rows if r["t"] <= t_stop]
        wal_peak = max(r["wal"] for r in rows)
        t0 = t_start + warm
        t1 = t_stop
        w = max((t1 - t0) / 3.0, 3.0)
        # A "second" long enough for 50 steps: under ASan the big load makes 18 a second.
        rate = (load_rows[-1]["steps"] - load_rows[0]["steps"]) / max(t1 - t_start, 1e-9)
        span = max(1.0, 50.0 / max(rate, 1e-9))
        first, n_first = cheapest_second(load_rows, t0, t0 + w, span)
        last, n_last = cheapest_second(load_rows, t1 - w, t1, span)
        steps = (load_rows[-1]["steps"] or 0) - (load_rows[0]["steps"] or 0)
        figures.update({
            "seconds": round(t_stop - t_start, 1), "steps": int(steps),
            "steps_per_s": round(steps / max(t_stop - t_start, 1e-9), 1),
            "wal_peak_mib": round(wal_peak / MIB, 1), "wal_idle_mib": round((idle_wal or 0) / MIB, 1),
            "db_mib": round(rows[-1]["db"] / MIB, 1),
            "writer_us_per_step_first": round(first * 1e6, 1) if first else None,
            "writer_us_per_step_last": round(last * 1e6, 1) if last else None,
            "rss_mib": round(rows[-1]["rss"] / MIB, 1), "fds": rows[-1]["fds"],
            "checkpoints": rows[-1]["m"]["optd_db_checkpoints_total"],
            "wal_resets": rows[-1]["m"]["optd_db_wal_resets_total"],
        })
        if wal_peak > WAL_MAX:
            problems.append("the -wal file reached %.0f MiB (limit %d)" % (wal_peak / MIB, WAL_MAX // MIB))
        if idle_wal is None or idle_wal > WAL_IDLE:
            problems.append("idle for 8 s, the -wal file is still %.0f MiB (limit %d)"
                            % ((idle_wal or 0) / MIB, WAL_IDLE // MIB))
        if first is None or last is None or n_first < 20 or n_last < 20:
            problems.append("too few steps to compare CPU per step (%d, %d)" % (n_first, n_last))
        elif last > CPU_RATIO * first:
            series, t = [], t0
            while t + span <= t1:
                c, _ = window_cost(load_rows, t, t + span)
                series.append(round(c * 1e6) if c else None)
                t += span
            problems.append("writer CPU per step grew from %.1f to %.1f us (over %.1fx); "
                            "us per step in each %.1f s: %s" % (first * 1e6, last * 1e6, CPU_RATIO, span, series))
        fails = rows[-1]["m"]["optd_db_checkpoint_failures_total"]
        if fails:
            problems.append("%d checkpoints failed: %s" % (fails, d.log()[-600:]))
        if soak:
            third = min(load_rows, key=lambda r: abs(r["t"] - (t_start + (t_stop - t_start) / 3)))
            end = load_rows[-1]
            if end["rss"] > third["rss"] * 1.25 + 16 * MIB:
                problems.append("RSS grew from %.1f to %.1f MiB" % (third["rss"] / MIB, end["rss"] / MIB))
            if end["fds"] > third["fds"] + 4:
                problems.append("open descriptors grew from %d to %d" % (third["fds"], end["fds"]))
            if end["db"] > third["db"] * 1.5 + 32 * MIB:
                problems.append("the database grew from %.1f to %.1f MiB" % (third["db"] / MIB, end["db"] / MIB))
            figures["rss_third_mib"] = round(third["rss"] / MIB, 1)
            figures["fds_third"] = third["fds"]
            figures["db_third_mib"] = round(third["db"] / MIB, 1)
        if not d.alive():
            problems.append("the daemon died: %s" % d.log())
    finally:
        d.cleanup()
    return problems, figures


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds of load per load (default 20)")
    ap.add_argument("--soak", action="store_true", help="also check RSS, descriptors and database size")
    ap.add_argument("--only", action="append", choices=sorted(LOADS), help="run just this load (repeatable)")
    ap.add_argument("--daemon-arg", action="append", default=[], help="an extra flag for the daemon")
    a = ap.parse_args(argv)
    if not os.path.exists(loadgen_bin()):
        print("no %s: run make %s first" % (loadgen_bin(), os.path.relpath(loadgen_bin(), REPO)))
        return 1
    started = time.time()
    passed = failed = 0
    for name in a.only or ["small+churn", "big", "many", "keyed"]:
        problems, figures = run_load(name, a.seconds, a.soak, a.daemon_arg)
        print("%-12s %s" % (name, json.dumps(figures)))
        for p in problems:
            print("  FAIL: %s" % p)
        if problems:
            failed += 1
        else:
            passed += 1
        sys.stdout.flush()
    print("(%.1f s)" % (time.time() - started))
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
