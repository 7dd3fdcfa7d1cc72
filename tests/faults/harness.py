"""Shared harness of optd's break-it-on-purpose tests (tests/crash,
tests/faults): starts the real binary on a free loopback port with a database
it is told, speaks raw HTTP to it, kills it, restarts it. Standard library
only, so the tests run wherever python3 does."""

import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


_BIN = []


def optd_bin():
    """The daemon under test: $OPTD_BIN (default build/optd), copied once per
    test process so that every start and restart of a run uses the same
    binary even when a build replaces it meanwhile."""
    if _BIN:
        return _BIN[0]
    path = os.environ.get("OPTD_BIN", "build/optd")
    path = path if os.path.isabs(path) else os.path.join(REPO, path)
    if not os.path.exists(path):
        return path
    import atexit
    import shutil
    d = tempfile.mkdtemp(prefix="optd-bin-")
    atexit.register(shutil.rmtree, d, True)
    for _ in range(50):  # a build may be writing it right now
        try:
            shutil.copy2(path, os.path.join(d, "optd"))
            break
        except OSError:
            time.sleep(0.2)
    _BIN.append(os.path.join(d, "optd"))
    return _BIN[0]


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pack(dtype, values):
    return struct.pack("<%d%s" % (len(values), "f" if dtype == "float32" else "d"), *values)


def unpack(dtype, data):
    w = 4 if dtype == "float32" else 8
    if len(data) % w:
        raise AssertionError("binary body of %d bytes is not a whole number of %s" % (len(data), dtype))
    return list(struct.unpack("<%d%s" % (len(data) // w, "f" if dtype == "float32" else "d"), data))


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


class Resp:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = {k.lower(): v for k, v in headers}
        self.body = body

    def header(self, name):
        return self.headers.get(name.lower())

    @property
    def json(self):
        try:
            return json.loads(self.body.decode("utf-8"))
        except Exception as e:  # noqa: BLE001
            raise AssertionError("reply %d is not JSON (%s): %r" % (self.status, e, self.body[:300]))

    @property
    def code(self):
        """error.code of an error reply, or None."""
        try:
            return self.json["error"]["code"]
        except Exception:  # noqa: BLE001
            return None

    def __repr__(self):
        return "<%d %r>" % (self.status, self.body[:300])


class Daemon:
    """One optd process on a database path that outlives it. args are extra
    flags; preload is an LD_PRELOAD library; env extra environment."""

    def __init__(self, db=None, args=(), env=None, preload=None, tmp=None):
        self.tmp = tmp or tempfile.mkdtemp(prefix="optd-break-")
        self.db = db or os.path.join(self.tmp, "optd.db")
        self.args = list(args)
        self.env = dict(env or {})
        self.preload = preload
        self.proc = None
        self.port = None
        self.starts = 0
        self.log_path = None

    def cmd(self):
        return [optd_bin(), "--listen", "127.0.0.1:%d" % self.port, "--db", self.db] + self.args

    def spawn(self):
        """Starts the process without waiting for it to serve."""
        self.port = free_port()
        self.starts += 1
        self.log_path = os.path.join(self.tmp, "optd-%d.log" % self.starts)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPTD_") or k == "OPTD_BIN"}
        env.update(self.env)
        if self.preload:
            env["LD_PRELOAD"] = self.preload
            # An ASan build (make asan) insists on coming first otherwise.
            env["ASAN_OPTIONS"] = (env.get("ASAN_OPTIONS", "") + ":verify_asan_link_order=0").lstrip(":")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env)
        return self.proc

    def start(self, timeout=20.0):
        for attempt in range(3):
            self.spawn()
            deadline = time.time() + timeout
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    r = self.request("GET", "/healthz", timeout=2)
                    if r.status == 200:
                        return self
                except OSError:
                    pass
                time.sleep(0.02)
            else:
                self.kill()
                raise AssertionError("optd did not answer /healthz within %.0f s: %s" % (timeout, self.log()))
            log = self.log()
            if "in use" not in log and attempt < 2:
                raise AssertionError("optd exited with %s at start: %s" % (self.proc.returncode, log))
        raise AssertionError("optd could not start: %s" % self.log())

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-4000:].decode("utf-8", "replace")
        except (OSError, TypeError):
            return ""

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def term(self, timeout=20.0):
        """SIGTERM; the exit status, or None when it did not exit in time
        (then it is killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def rss_kb(self):
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def cleanup(self):
        self.kill()
        import shutil
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- HTTP ---------------------------------------------------------------
    def conn(self, timeout=30):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, js=None, headers=None, timeout=30, conn=None):
        """One request on conn (kept open) or on a fresh connection (closed).
        js is sent as JSON; body as given."""
        hdrs = {}
        if js is not None:
            body = json.dumps(js).encode()
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        own = conn is None
        c = self.conn(timeout) if own else conn
        try:
            c.request(method, path, body=body, headers=hdrs)
            r = c.getresponse()
            data = r.read()
            return Resp(r.status, r.getheaders(), data)
        finally:
            if own:
                c.close()

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
        line = "%d passed, %d failed" % (self.passed, self.failed)
        if self.skipped:
            line += ", %d skipped" % self.skipped
        print("(%.1f s)" % (time.time() - self.t0))
        print(line, flush=True)
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
