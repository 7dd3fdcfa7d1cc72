#!/usr/bin/env python3
"""Storage faults, each against a real daemon: while the fault lasts every
write answers 503 `unavailable` and changes nothing, reads and /healthz keep
working, /readyz says 503; once the fault clears /readyz comes back and writes
work again, and after a kill -9 and a restart exactly the acknowledged writes
are there. Then files that are not an optd database: refused at start with a
message that says so, and never modified.

    python3 tests/faults/faults_test.py [name-substring ...]

Faults: disk full (a small tmpfs mount), the database locked by another
process past the busy timeout, the database and its WAL made immutable
(chattr +i: chmod does not stop root), and I/O errors injected by
eio_shim.so (LD_PRELOAD; build/tests/eio_shim.so, or $EIO_SHIM) on writes,
on fsync, and on reads. Needs root for mount and chattr; a fault whose tool
is missing is skipped with the reason."""

import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the tree
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from harness import (REPO, Daemon, Skip, check, fill_disk, metric, params, run_listed, small_disk,  # noqa: E402
                     sqlite_file, step, wait_for)

P0 = [10.0, 20.0, 30.0, 40.0]
BIG = 20000  # elements of the session whose steps must grow the WAL


def shim_path():
    p = os.environ.get("EIO_SHIM", os.path.join(REPO, "build", "tests", "eio_shim.so"))
    if not os.path.exists(p):
        raise Skip("%s is missing (make build/tests/eio_shim.so)" % p)
    return os.path.abspath(p)




def setup(d):
    """Sessions f (4 elements) and big (BIG elements), both SGD lr=1 float64,
    stepped once each; returns the step of f."""
    d.create("f", "sgd", P0, hyperparams={"lr": 1})
    d.create("big", "sgd", [0.0] * BIG, hyperparams={"lr": 1})
    check(step(d, "f", 4).status == 200, "first step of f")
    check(step(d, "big", BIG).status == 200, "first step of big")
    return 1


def writes_fail(d, k, label):
    """Every kind of write is refused with 503 unavailable while the fault
    lasts; run concurrently so a fault that costs the busy timeout costs it
    once. Returns the list of (what, reply)."""
    reqs = [
        ("step", lambda: step(d, "f", 4)),
        ("step big", lambda: step(d, "big", BIG)),
        ("step json", lambda: d.request("POST", "/v1/sessions/f/step", js={"grad": [1, 1, 1, 1]})),
        ("create", lambda: d.request("POST", "/v1/sessions", js={"name": "new", "optimizer": "adam", "size": 3})),
        ("put", lambda: d.request("PUT", "/v1/sessions/new2", js={"optimizer": "sgd", "size": 2})),
        ("patch", lambda: d.request("PATCH", "/v1/sessions/f", js={"hyperparams": {"lr": 0.5}})),
        ("delete", lambda: d.request("DELETE", "/v1/sessions/f")),
        ("put state", lambda: d.request("PUT", "/v1/sessions/new3/state",
                                        js={"optimizer": "sgd", "params": [1.0], "step": 3})),
    ]
    out = [None] * len(reqs)

    def go(i):
        try:
            out[i] = reqs[i][1]()
        except Exception as e:  # noqa: BLE001
            out[i] = e
    ts = [threading.Thread(target=go, args=(i,)) for i in range(len(reqs))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    bad = []
    for (what, _), r in zip(reqs, out):
        if not hasattr(r, "status") or r.status != 503 or r.code != "unavailable":
            bad.append("%s -> %r" % (what, r))
    check(not bad, "%s: writes during the fault: %s", label, "; ".join(bad))


def reads_work(d, k, label):
    s, p = params(d, "f")
    check(s == k and p == [x - k for x in P0], "%s: f at step %d with %r during the fault (want %d)", label, s,
          p, k)
    r = d.request("GET", "/v1/sessions/f")
    check(r.status == 200 and r.json["hyperparams"]["lr"] == 1, "%s: GET f: %r", label, r)
    r = d.request("GET", "/v1/sessions")
    check(r.status == 200 and len(r.json["sessions"]) == 2, "%s: list: %r", label, r)
    r = d.request("GET", "/v1/sessions/new")
    check(r.status == 404, "%s: a refused create exists: %r", label, r)


def recovered(d, k, label, restart=True):
    """After the fault: ready again, the refused writes left nothing, new
    writes work and survive kill -9."""
    ok = wait_for(lambda: d.request("GET", "/readyz").status == 200, 10)
    check(ok, "%s: /readyz still 503 10 s after the fault cleared", label)
    s, p = params(d, "f")
    check(s == k, "%s: f at step %d after the fault, want %d (a refused step was applied)", label, s, k)
    r = step(d, "f", 4)
    check(r.status == 200 and r.header("ETag") == '"%d"' % (k + 1), "%s: step after the fault: %r", label, r)
    r = step(d, "big", BIG)
    check(r.status == 200, "%s: big step after the fault: %r", label, r)
    for path in ("/v1/sessions/new", "/v1/sessions/new2", "/v1/sessions/new3"):
        r = d.request("GET", path)
        check(r.status == 404, "%s: %s was refused but exists: %r", label, path, r)
    r = d.request("GET", "/v1/sessions/f")
    check(r.json["hyperparams"]["lr"] == 1, "%s: a refused PATCH changed lr: %r", label, r.json["hyperparams"])
    r = d.request("POST", "/v1/sessions", js={"name": "after", "optimizer": "adam", "size": 3})
    check(r.status == 201, "%s: create after the fault: %r", label, r)
    if restart:
        d.kill()
        d.start()
        s, p = params(d, "f")
        check(s == k + 1 and p == [x - k - 1 for x in P0], "%s: after kill -9, f at step %d with %r, want %d",
              label, s, p, k + 1)
        check(d.request("GET", "/v1/sessions/after").status == 200, "%s: acknowledged create lost", label)
    check(d.request("DELETE", "/v1/sessions/after").status == 204, "%s: delete after", label)
    return k + 1


def fault_cycle(d, k, label, on, off, again=True):
    on()
    try:
        writes_fail(d, k, label)
        reads_work(d, k, label)
        check(d.request("GET", "/healthz").status == 200, "%s: /healthz during the fault", label)
        r = d.request("GET", "/readyz")
        check(r.status == 503, "%s: /readyz says %d during the fault (want 503)", label, r.status)
        if again:
            # A second round of writes: the daemon keeps refusing cleanly.
            writes_fail(d, k, label + " (again)")
    finally:
        off()
    check(d.alive(), "%s: the daemon died: %s", label, d.log())
    return recovered(d, k, label)


# ---- the faults ------------------------------------------------------------

def t_disk_full():
    with small_disk("3m") as mnt:
        d = Daemon(db=os.path.join(mnt, "optd.db"), args=["--log-level", "quiet"])
        filler = os.path.join(mnt, "filler")
        try:
            d.start()
            k = setup(d)
            k = fault_cycle(d, k, "disk full", lambda: fill_disk(filler), lambda: os.unlink(filler))
            check(d.term() == 0, "SIGTERM after disk full")
            # Start-up on a full disk: refused with a message, not a crash.
            fill_disk(filler)
            d2 = Daemon(db=os.path.join(mnt, "new.db"), args=["--log-level", "quiet"], tmp=d.tmp)
            d2.spawn()
            rc = d2.proc.wait(20)
            os.unlink(filler)
            check(rc == 1, "start with a new db on a full disk: exit %r: %s", rc, d2.log())
            return "start on a full disk: exit 1, %r" % d2.log().strip().splitlines()[-1][:100]
        finally:
            d.kill()
            shutil.rmtree(d.tmp, ignore_errors=True)


def t_locked():
    d = Daemon(args=["--log-level", "quiet"])
    holder = {}
    try:
        d.start()
        k = setup(d)

        def lock():
            con = sqlite3.connect(d.db, isolation_level=None, timeout=10)
            con.execute("BEGIN EXCLUSIVE")
            holder["con"] = con

        def unlock():
            holder["con"].execute("ROLLBACK")
            holder["con"].close()
        t0 = time.time()
        k = fault_cycle(d, k, "locked", lock, unlock, again=False)
        return "%.1f s" % (time.time() - t0)
    finally:
        d.cleanup()


def chattr(flag, files):
    for f in files:
        r = subprocess.run(["chattr", flag, f], capture_output=True, text=True)
        if r.returncode != 0:
            raise Skip("chattr %s %s: %s" % (flag, f, r.stderr.strip()))


def t_read_only():
    if not shutil.which("chattr"):
        raise Skip("no chattr")
    d = Daemon(args=["--log-level", "quiet"])
    files = []
    try:
        d.start()
        k = setup(d)
        files = [d.db, d.db + "-wal"]
        # The -shm file is left alone: it is mapped, and writing a mapped page
        # of an immutable file is SIGBUS for any SQLite program.
        k = fault_cycle(d, k, "read-only", lambda: chattr("+i", files), lambda: chattr("-i", files))
        check(d.term() == 0, "SIGTERM after read-only")
        # Start-up on an immutable database: refused with a message, unchanged.
        chattr("+i", [d.db])
        before = open(d.db, "rb").read()
        d.spawn()
        rc = d.proc.wait(20)
        chattr("-i", [d.db])
        check(rc == 1, "start on an immutable db: exit %r: %s", rc, d.log())
        check("read-only" in d.log() or "readonly" in d.log(), "start on an immutable db: message %r", d.log())
        check(open(d.db, "rb").read() == before, "the immutable db changed")
        return "start on an immutable db: %r" % d.log().strip().splitlines()[-1][:100]
    finally:
        try:
            chattr("-i", [f for f in files if os.path.exists(f)])
        except Skip:
            pass
        d.cleanup()


def eio_daemon(args=()):
    ctl = tempfile.mktemp(prefix="optd-eio-")
    d = Daemon(args=["--log-level", "quiet"] + list(args), preload=shim_path(), env={"OPTD_EIO_CONTROL": ctl})
    d.ctl = ctl
    return d


def eio_on(d, spec):
    def on():
        with open(d.ctl, "w") as f:
            f.write(spec)
    return on


def eio_off(d):
    def off():
        if os.path.exists(d.ctl):
            os.unlink(d.ctl)
    return off


def eio_cleanup(d):
    for f in (d.ctl, d.ctl + ".count"):
        if os.path.exists(f):
            os.unlink(f)
    d.cleanup()


def eio_hits(d):
    try:
        with open(d.ctl + ".count") as f:
            n = len(f.read())
        os.unlink(d.ctl + ".count")
        return n
    except OSError:
        return 0


def t_eio(spec, label, sync="full"):
    def run():
        d = eio_daemon(["--sync", sync])
        try:
            d.start()
            k = setup(d)
            fault_cycle(d, k, label, eio_on(d, spec), eio_off(d))
            hits = eio_hits(d)
            check(hits > 0, "%s: the shim never failed a call (is it loaded?)", label)
            return "%d calls failed" % hits
        finally:
            eio_cleanup(d)
    return run


def t_eio_reads():
    """Reads that fail: whatever needs the disk answers 503 (never 500, never
    wrong data), writes may succeed or be refused, /healthz stays up; after
    the fault exactly the acknowledged steps are there."""
    d = eio_daemon()
    try:
        d.start()
        k = setup(d)
        eio_on(d, "r")()
        seen = {}
        acked = 0
        try:
            for i in range(20):
                r = d.request("GET", "/v1/sessions/f/params")
                seen.setdefault("GET params", set()).add(r.status)
                check(r.status in (200, 503), "GET params with failing reads: %r", r)
                if r.status == 200:
                    check(r.json["params"] == [x - r.json["step"] for x in P0], "wrong params %r", r)
                r = step(d, "f", 4)
                seen.setdefault("step", set()).add(r.status)
                check(r.status in (200, 503), "step with failing reads: %r", r)
                acked += r.status == 200
                for path in ("/v1/sessions", "/v1/sessions/f/state", "/v1/sessions/f", "/metrics"):
                    r = d.request("GET", path)
                    seen.setdefault("GET " + path, set()).add(r.status)
                    check(r.status in (200, 503), "GET %s with failing reads: %r", path, r)
                check(d.request("GET", "/healthz").status == 200, "/healthz with failing reads")
        finally:
            eio_off(d)()
        hits = eio_hits(d)
        check(hits > 0, "the shim never failed a read")
        check(wait_for(lambda: d.request("GET", "/readyz").status == 200, 10), "/readyz after the fault")
        s, p = params(d, "f")
        check(s == k + acked, "f at step %d after the fault; %d steps were acknowledged from %d", s, acked, k)
        d.kill()
        d.start()
        s, p = params(d, "f")
        check(s == k + acked and p == [x - s for x in P0], "after kill -9: f at step %d, want %d", s, k + acked)
        return "%d reads failed; statuses %s" % (hits, {w: sorted(v) for w, v in seen.items()})
    finally:
        eio_cleanup(d)


def t_eio_flapping_under_load(spec="w", args=("--sync", "normal")):
    """I/O errors (on writes, or with spec "r" on reads) switched on and off
    every few tens of milliseconds while clients step, create and delete (the
    crash test's workload): every reply is 2xx or 503, and after a kill -9
    and a restart the state is exactly what the 2xx replies allow (a 503
    changed nothing). Reports how many groups the writer ran again after a
    failure inside them (engine/writer.c, begin_part)."""
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "crash"))
    from workload import Workload
    d = eio_daemon(list(args))
    try:
        d.start()
        w = Workload(d, random.Random(11))
        w.create()
        stop = threading.Event()
        threads = w.start(stop)
        rng = random.Random(5)
        on, off = eio_on(d, spec), eio_off(d)
        flips = 0
        t0 = time.time()
        while time.time() - t0 < 3:
            time.sleep(rng.uniform(0.01, 0.08))
            on()
            time.sleep(rng.uniform(0.005, 0.05))
            off()
            flips += 1
        stop.set()
        for t in threads:
            t.join(30)
        hits = eio_hits(d)
        check(not w.errors, "during load: %s", "; ".join(w.errors[:3]))
        check(hits > 0, "the shim never failed a call")
        check(wait_for(lambda: d.request("GET", "/readyz").status == 200, 10), "/readyz after the flapping")
        n = metric(d, "optd_writer_group_reruns_total")
        d.kill()
        d.start()
        w.verify()
        return "%d fault windows, %d calls failed, %d groups ran again, %d steps acknowledged and durable" % (
            flips, hits, n, w.checked_total)
    finally:
        eio_cleanup(d)


def t_fsync_ghost():
    """A COMMIT whose fsync fails is answered 503 ("nothing changed, safe to
    retry"), but its frames, commit mark included, are already in the WAL: if
    the process dies before another commit covers them, recovery would replay
    them and the refused writes would be there after the restart. The store
    covers them at once (store.c, wal_tail_cover); checked here for a small
    step, a 40-frame step and a create, with the fault still on at the kill."""
    d = eio_daemon(["--sync", "full"])
    try:
        d.start()
        k = setup(d)
        for what, do in [("small step", lambda: step(d, "f", 4)),
                         ("big step", lambda: step(d, "big", BIG)),
                         ("create", lambda: d.request("POST", "/v1/sessions",
                                                      js={"name": "ghost", "optimizer": "adam", "size": 5000}))]:
            eio_on(d, "s")()
            r = do()
            d.kill()
            eio_off(d)()
            check(r.status == 503, "%s with a failing fsync: %r", what, r)
            d.start()
            s, _ = params(d, "f")
            sb, _ = params(d, "big")
            check((s, sb) == (k, 1), "after a refused %s and kill -9: f at step %d, big at %d (want %d, 1): the "
                  "refused write came back", what, s, sb, k)
            check(d.request("GET", "/v1/sessions/ghost").status == 404, "the refused create came back")
        return "refused writes absent after restart"
    finally:
        eio_cleanup(d)


# ---- files that are not an optd database ---------------------------------------

def refused(path, want_words, label):
    """Starts optd on path: it must exit 1 with a message holding one of
    want_words, leave the file byte for byte as it was and create no -wal or
    -shm beside it."""
    before = open(path, "rb").read() if os.path.isfile(path) else None
    tmp = tempfile.mkdtemp(prefix="optd-foreign-")
    d = Daemon(db=path, args=["--log-level", "quiet"], tmp=tmp)
    try:
        d.spawn()
        try:
            rc = d.proc.wait(20)
        except subprocess.TimeoutExpired:
            rc = "still running"
        log = d.log()
        check(rc == 1, "%s: exit status %r (want 1): %s", label, rc, log)
        check(any(w in log for w in want_words), "%s: message %r does not say %s", label, log.strip(), want_words)
        if before is not None:
            check(open(path, "rb").read() == before, "%s: the file was modified", label)
        for sfx in ("-wal", "-shm", "-journal"):
            check(not os.path.exists(path + sfx), "%s: %s was created", label, path + sfx)
        return log.strip().splitlines()[-1] if log.strip() else ""
    finally:
        d.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def make_optd_db(dirname, sessions=20):
    d = Daemon(db=os.path.join(dirname, "optd.db"), args=["--log-level", "quiet"], tmp=dirname)
    d.start()
    for i in range(sessions):
        d.create("s%d" % i, "adam", [float(j) for j in range(300)])
        d.request("POST", "/v1/sessions/s%d/step" % i, js={"grad": [1.0] * 300})
    check(d.term() == 0, "clean exit")
    return d.db


def t_foreign():
    tmp = tempfile.mkdtemp(prefix="optd-files-")
    lines = []
    try:
        rng = random.Random(7)
        p = os.path.join(tmp, "random.bin")
        with open(p, "wb") as f:
            f.write(bytes(rng.getrandbits(8) for _ in range(65536)))
        lines.append(("random bytes", refused(p, ["not an optd database", "not an SQLite"], "random bytes")))

        p = os.path.join(tmp, "text.txt")
        with open(p, "w") as f:
            f.write("hello, I am a text file\n" * 100)
        lines.append(("text file", refused(p, ["not an optd database"], "text file")))

        p = sqlite_file(os.path.join(tmp, "other.sqlite"), "CREATE TABLE users(id INTEGER PRIMARY KEY, name TEXT)",
                        *("INSERT INTO users(name) VALUES ('u%d')" % i for i in range(500)))
        lines.append(("another application's SQLite file",
                      refused(p, ["not an optd database"], "another application's SQLite file")))

        p = sqlite_file(os.path.join(tmp, "other-wal.sqlite"), "PRAGMA journal_mode=WAL", "CREATE TABLE t(x)")
        lines.append(("another application's SQLite file in WAL mode",
                      refused(p, ["not an optd database"], "another app's WAL-mode file")))

        p = sqlite_file(os.path.join(tmp, "sessions-lookalike.sqlite"),
                        "CREATE TABLE sessions(id INTEGER PRIMARY KEY, name TEXT)", "PRAGMA user_version = 1")
        lines.append(("SQLite file with a 'sessions' table and user_version 1 (no application_id)",
                      refused(p, ["not an optd database"], "look-alike")))

        p = os.path.join(tmp, "header-only")
        with open(p, "wb") as f:
            f.write(b"SQLite format 3\0" + bytes(rng.getrandbits(8) for _ in range(8192)))
        lines.append(("SQLite magic then garbage", refused(p, ["not an optd database", "corrupt"], "magic+garbage")))

        sub = os.path.join(tmp, "optd1")
        os.mkdir(sub)
        db = make_optd_db(sub)
        data = bytearray(open(db, "rb").read())
        pgsz = int.from_bytes(data[16:18], "big")
        corrupt = bytearray(data)
        for pg in range(1, len(data) // pgsz):
            if pg % 3 == 0:
                corrupt[pg * pgsz: pg * pgsz + 64] = bytes(rng.getrandbits(8) for _ in range(64))
        p = os.path.join(tmp, "corrupt.db")
        with open(p, "wb") as f:
            f.write(corrupt)
        lines.append(("optd database with damaged pages", refused(p, ["corrupt"], "corrupt optd db")))

        p = os.path.join(tmp, "truncated.db")
        with open(p, "wb") as f:
            f.write(data[: (len(data) // pgsz // 2) * pgsz])
        lines.append(("optd database cut to half its pages", refused(p, ["corrupt"], "truncated optd db")))

        p = os.path.join(tmp, "newer.db")
        with open(p, "wb") as f:
            f.write(data)
        sqlite_file(p, "PRAGMA user_version = 999")
        lines.append(("optd database of a newer schema", refused(p, ["newer"], "newer schema")))

        p = os.path.join(tmp, "a-directory")
        os.mkdir(p)
        lines.append(("a directory", refused(p, ["not an optd database", "not a regular file"], "directory")))

        p = os.path.join(tmp, "no-such-dir", "optd.db")
        d = Daemon(db=p, args=["--log-level", "quiet"], tmp=tmp)
        d.spawn()
        rc = d.proc.wait(20)
        check(rc == 1, "a db in a missing directory: exit %r", rc)
        lines.append(("a path in a missing directory", d.log().strip().splitlines()[-1]))

        # The real one still opens, after all that.
        d = Daemon(db=db, args=["--log-level", "quiet"], tmp=tmp)
        d.start()
        r = d.request("GET", "/v1/sessions/s3/params")
        check(r.status == 200 and r.json["step"] == 1, "the intact db: %r", r)
        check(d.term() == 0, "clean exit")
        for what, msg in lines:
            print("       %-70s %s" % (what, msg[:110]))
        return "%d files refused" % (len(lines) - 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


TESTS = [
    ("disk full (tmpfs)", t_disk_full),
    ("database locked by another process past the busy timeout", t_locked),
    ("database and WAL immutable (chattr +i)", t_read_only),
    ("EIO on writes (pwrite)", t_eio("w", "EIO on writes")),
    ("EIO on fsync", t_eio("s", "EIO on fsync")),
    ("EIO on fsync of the WAL only", t_eio("s -wal", "EIO on WAL fsync")),
    ("EIO on reads (pread)", t_eio_reads),
    ("EIO on writes with --sync normal", t_eio("w", "EIO on writes (normal)", "normal")),
    ("EIO flapping under concurrent load", t_eio_flapping_under_load),
    ("EIO on reads flapping under concurrent load",
     lambda: t_eio_flapping_under_load("r", ("--sync", "full"))),
    ("fsync failure then kill -9 (refused step must stay absent)", t_fsync_ghost),
    ("foreign, corrupt and unusable files as --db", t_foreign),
]


if __name__ == "__main__":
    sys.exit(run_listed(TESTS))
