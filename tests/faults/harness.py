"""Shared harness of optd's break-it-on-purpose tests (tests/crash,
tests/faults): the real binary on a free loopback port with a database it is
told (the Daemon of tests/lib/optdtest.py), raw HTTP to it, and the checks and
report of these scripts. Standard library only, so the tests run wherever
python3 does."""

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "lib"))
import optdtest  # noqa: E402
from optdtest import f32, pack, sqlite_file, unpack  # noqa: E402,F401 (the tests import them from here)


def optd_bin():
    """The daemon under test: a copy of $OPTD_BIN (default build/optd) taken
    once per test process, so that every start and restart of a run uses the
    same binary even when a build replaces it meanwhile."""
    return optdtest.optd_bin(snapshot=True)


class Resp(optdtest.Reply):
    # Lenient json (NaN and Infinity read): these tests check that the daemon
    # survives; tests/e2e holds it to strict JSON.
    strict = False


class Daemon(optdtest.Daemon):
    """One optd process on a database path that outlives it. args are extra
    flags; preload is an LD_PRELOAD library; env extra environment."""

    tmp_prefix = "optd-break-"
    snapshot = True

    def __init__(self, db=None, args=(), env=None, preload=None, tmp=None):
        super().__init__(args, env, db, tmp)
        self.preload = preload

    def environment(self):
        env = super().environment()
        if self.preload:
            env["LD_PRELOAD"] = self.preload
            # An ASan build (make asan) insists on coming first otherwise.
            env["ASAN_OPTIONS"] = (env.get("ASAN_OPTIONS", "") + ":verify_asan_link_order=0").lstrip(":")
        return env

    def term(self, timeout=20.0):
        """SIGTERM; the exit status, or None when it did not exit in time
        (then it is killed)."""
        return self.stop(timeout=timeout)

    def rss_kb(self):
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def request(self, method, path, body=None, js=None, headers=None, timeout=30, conn=None):
        """One request on conn (kept open) or on a fresh connection (closed).
        js is sent as JSON; body as given."""
        hdrs = {}
        if js is not None:
            body = json.dumps(js).encode()
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        return optdtest.request(self.port, method, path, body, hdrs, timeout, conn, Resp)

    def create(self, name, optimizer, params, dtype="float64", hyperparams=None):
        r = self.request("POST", "/v1/sessions", js={"name": name, "optimizer": optimizer, "dtype": dtype,
                                                     "params": params, "hyperparams": hyperparams or {}})
        if r.status != 201:
            raise AssertionError("create %s: %r" % (name, r))
        return r


def check(cond, what, *args):
    if not cond:
        raise AssertionError(what % args if args else what)


class Report:
    """Counts passed and failed checks of a test script and prints the
    closing line 'N passed, N failed' that CI reads."""

    def __init__(self):
        self.passed = 0
        self.failed = 0
        self.skipped = 0
        self.t0 = time.time()

    def run(self, name, fn, *args):
        t = time.time()
        try:
            out = fn(*args)
        except Skip as e:
            self.skipped += 1
            print("SKIP %s: %s" % (name, e), flush=True)
            return None
        except Exception as e:  # noqa: BLE001
            self.failed += 1
            import traceback
            print("FAIL %s (%.1f s): %s" % (name, time.time() - t, e), flush=True)
            if os.environ.get("VERBOSE"):
                traceback.print_exc()
            return None
        self.passed += 1
        print("ok   %s (%.1f s)%s" % (name, time.time() - t, (": " + out) if isinstance(out, str) else ""),
              flush=True)
        return out

    def finish(self):
        optdtest.summary(self.passed, self.failed, self.skipped, self.t0)
        return 1 if self.failed or not self.passed else 0


class Skip(Exception):
    pass


def known(cond, issue, what, *args):
    """Like check, for a bug that is reported and not yet fixed: when cond is
    false the test is counted as skipped with "KNOWN ISSUE <issue>" (so the
    suite stays green and the line stays visible), or fails under STRICT=1.
    Delete the call's known-ness (make it a check) once the fix lands."""
    if cond:
        return
    msg = what % args if args else what
    if os.environ.get("STRICT"):
        raise AssertionError("%s (known issue %s)" % (msg, issue))
    raise Skip("KNOWN ISSUE %s: %s" % (issue, msg))


def step(d, name, n, **kw):
    """A binary float64 step of n ones on session name, Prefer: return=minimal."""
    return d.request("POST", "/v1/sessions/%s/step" % name, body=optdtest.pack("float64", [1.0] * n),
                     headers={"Content-Type": "application/octet-stream", "Prefer": "return=minimal"}, **kw)


def params(d, name):
    """(step, params) of a float64 session, read in binary."""
    r = d.request("GET", "/v1/sessions/%s/params" % name, headers={"Accept": "application/octet-stream"})
    check(r.status == 200, "GET params %s: %r", name, r)
    return int(r.header("ETag").strip('"')), optdtest.unpack("float64", r.body)


def run_listed(tests, argv=None):
    """Runs the (name, fn) pairs of tests whose name contains one of argv
    (default: the command line's arguments; every one when there are none);
    the exit status for sys.exit."""
    if argv is None:
        argv = sys.argv[1:]
    if not os.path.exists(optd_bin()):
        print("no %s: run make" % optd_bin())
        return 1
    rep = Report()
    for name, fn in tests:
        if argv and not any(o in name for o in argv):
            continue
        rep.run(name, fn)
    return rep.finish()


def read_reply(sock, quiet=(OSError,)):
    """Reads one HTTP reply from sock: until its Content-Length is in, the
    peer closes, or recv raises one of quiet. (status, or None when what
    came is not a status line; the bytes read)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except quiet:
            break
        if not chunk:
            break
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            cl = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")]
            if cl and len(body) >= int(cl[0].split(b":")[1]):
                break
    if not data.startswith(b"HTTP/1."):
        return None, data
    return int(data.split(b" ", 2)[1]), data


@contextlib.contextmanager
def small_disk(size):
    """A tmpfs of size (mount's spelling: "3m") mounted for the block; its
    mount point. Skip where it cannot be mounted (not root)."""
    mnt = tempfile.mkdtemp(prefix="optd-full-")
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + size, "optd-fault", mnt],
                       capture_output=True, text=True)
    if m.returncode != 0:
        os.rmdir(mnt)
        raise Skip("cannot mount a tmpfs here: %s" % m.stderr.strip())
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt])
        os.rmdir(mnt)


def fill_disk(path):
    """Writes zeros to the new file path until its disk is full."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass


def metric(d, name):
    """The value of the unlabelled series name in d's /metrics."""
    m = re.search(r"^%s (\S+)$" % re.escape(name), d.request("GET", "/metrics").body.decode(), re.M)
    check(m, "%s missing from /metrics", name)
    return float(m.group(1))


def wait_for(pred, timeout, step=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


def main_guard(fn):
    try:
        sys.exit(fn())
    except KeyboardInterrupt:
        sys.exit(130)
