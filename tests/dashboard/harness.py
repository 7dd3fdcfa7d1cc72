"""Shared harness for the dashboard and history tests: the real optd binary
on a free loopback port with a fresh database (the Daemon of
tests/lib/optdtest.py), HTTP to it (http.client) and headless Chromium on the
dashboard. Standard library
only; Chromium comes from Debian (`apt-get install chromium`)."""

import http.client
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "lib"))
import optdtest  # noqa: E402
from optdtest import pack  # noqa: E402,F401 (the tests import it from here)


class Daemon(optdtest.Daemon):
    """One optd process on a fresh database in a temp dir, and a kept-alive
    connection to it."""

    tmp_prefix = "optd-dash-"

    def __init__(self, args=(), env=None, token=None):
        super().__init__(args, env)
        self.token = token  # sent as Authorization: Bearer by default
        self._conn = None

    def close(self):
        """Closes this handle's connection (the process keeps running)."""
        if self._conn:
            self._conn.close()
            self._conn = None

    def stop(self, *args, **kw):
        self.close()
        return super().stop(*args, **kw)

    def cleanup(self):
        self.close()
        super().cleanup()

    def client(self):
        """A handle on the same daemon with its own connection, for another
        thread (http.client connections are not thread-safe)."""
        c = self.__class__.__new__(self.__class__)
        c.__dict__.update(self.__dict__)
        c._conn = None
        return c

    @property
    def url(self):
        return "http://127.0.0.1:%d/" % self.port

    def request(self, method, path, json_body=None, body=None, headers=None, auth=True):
        """One request on a kept-alive connection (reopened once if it dropped)."""
        hdrs = {}
        if json_body is not None:
            body = json.dumps(json_body).encode()
            hdrs["Content-Type"] = "application/json"
        if auth and self.token:
            hdrs["Authorization"] = "Bearer " + self.token
        hdrs.update(headers or {})
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                self._conn.request(method, path, body=body, headers=hdrs)
                r = self._conn.getresponse()
                data = r.read()
                return optdtest.Reply(method, path, r.status, r.reason, r.getheaders(), data)
            except (http.client.HTTPException, OSError):
                self._conn.close()
                self._conn = None
                if attempt:
                    raise

    def ok(self, method, path, json_body=None, **kw):
        r = self.request(method, path, json_body=json_body, **kw)
        if r.status // 100 != 2:
            raise AssertionError("%s %s -> %r" % (method, path, r))
        return r.json if r.body else None

    def history(self, name, after=0, limit=10000):
        """Every history row after `after`, following `next`."""
        rows = []
        while True:
            page = self.ok("GET", "/v1/sessions/%s/history?after=%d&limit=%d" % (name, after, limit))
            rows += page["history"]
            if page["next"] is None:
                return rows
            after = page["next"]


# -- Chromium -------------------------------------------------------------

def chromium_path():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


def chromium(url, extra, budget_ms=5000, timeout=60):
    """Runs headless Chromium once on url with extra flags (--dump-dom or
    --screenshot=...); returns its stdout. A fresh profile every time, so no
    sessionStorage or cache carries over."""
    exe = chromium_path()
    profile = tempfile.mkdtemp(prefix="optd-chromium-")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-extensions",
           "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "--force-device-scale-factor=1",
           "--user-data-dir=" + profile, "--virtual-time-budget=%d" % budget_ms] + list(extra) + [url]
    # Its own process group, so a hung run is ended with all its helpers.
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=profile, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise AssertionError("chromium did not finish within %d s" % timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    if p.returncode != 0:
        raise AssertionError("chromium exited %d: %s" % (p.returncode, err.decode("utf-8", "replace")[-2000:]))
    return out.decode("utf-8", "replace")


def dump_dom(url, budget_ms=5000):
    return chromium(url, ["--dump-dom"], budget_ms)


def screenshot(url, path, size=(1280, 800), budget_ms=5000):
    chromium(url, ["--screenshot=" + path, "--window-size=%d,%d" % size], budget_ms)
    return png_size(path)


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise AssertionError("%s is not a PNG" % path)
    return struct.unpack(">II", head[16:24])


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe
    (--remote-debugging-pipe: JSON messages ended by NUL on fds 3 and 4), for
    the tests that must type into the page or wait for live data. One process
    serves many tests: each gets a Tab in its own browser context (no shared
    storage or cache), which costs far less than starting Chromium again."""

    def __init__(self, size=(1280, 800)):
        import fcntl
        import threading
        self.size = size

        def high(fd):
            # Above 9, clear of 3 and 4 where bash puts Chromium's ends.
            h = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
            os.close(fd)
            return h
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        to_chrome_r, from_chrome_w = high(to_chrome_r), high(from_chrome_w)
        self.profile = tempfile.mkdtemp(prefix="optd-chromium-")
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-extensions",
                "--disable-dev-shm-usage", "--force-device-scale-factor=1", "--remote-debugging-pipe",
                "--window-size=%d,%d" % size, "--user-data-dir=" + self.profile, "about:blank"]
        # bash (dash takes single-digit fds only) puts the pipe ends on the fds Chromium expects.
        script = 'exec "$0" "$@" 3<&%d 4>&%d %d<&- %d>&-' % (to_chrome_r, from_chrome_w, to_chrome_r, from_chrome_w)
        self._err = open(os.path.join(self.profile, "stderr"), "wb")
        self.proc = subprocess.Popen(["bash", "-c", script, chromium_path()] + args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self._err,
                                     pass_fds=(to_chrome_r, from_chrome_w), cwd=self.profile,
                                     start_new_session=True)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next = 0
        self._replies = {}
        self.exceptions = {}  # DevTools session -> uncaught exceptions in its page
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.send("Browser.getVersion")
        except AssertionError as e:
            self.close()
            raise AssertionError("%s; chromium said: %s" % (e, self.stderr))

    @property
    def stderr(self):
        try:
            with open(os.path.join(self.profile, "stderr"), "rb") as f:
                return f.read()[-2000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def _read(self):
        buf = b""
        while True:
            try:
                chunk = os.read(self._r, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cv:
                    self._replies[None] = "closed"
                    self._cv.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                msg, buf = buf.split(b"\0", 1)
                m = json.loads(msg)
                if "id" in m:
                    with self._cv:
                        self._replies[m["id"]] = m
                        self._cv.notify_all()
                elif m.get("method") == "Runtime.exceptionThrown":
                    d = m["params"]["exceptionDetails"]
                    text = (d.get("exception") or {}).get("description") or d.get("text")
                    with self._cv:
                        self.exceptions.setdefault(m.get("sessionId"), []).append(text)

    def send(self, method, params=None, session=None, timeout=30):
        """One DevTools command (to a tab when session is given); its result."""
        with self._cv:
            self._next += 1
            mid = self._next
        msg = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        try:
            os.write(self._w, json.dumps(msg).encode() + b"\0")
        except OSError:
            raise AssertionError("chromium closed the DevTools pipe")
        deadline = time.time() + timeout
        with self._cv:
            while mid not in self._replies:
                if None in self._replies:
                    raise AssertionError("chromium closed the DevTools pipe")
                left = deadline - time.time()
                if left <= 0:
                    raise AssertionError("no reply to %s within %.0f s" % (method, timeout))
                self._cv.wait(left)
            m = self._replies.pop(mid)
        if "error" in m:
            raise AssertionError("%s: %s" % (method, m["error"]))
        return m.get("result", {})

    def tab(self):
        """A new tab in a fresh browser context; close it when done."""
        return Tab(self)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.send("Browser.close", timeout=5)
            except AssertionError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        os.close(self._w)
        self._err.close()
        shutil.rmtree(self.profile, ignore_errors=True)


class Tab:
    def __init__(self, browser):
        self.b = browser
        self.context = browser.send("Target.createBrowserContext")["browserContextId"]
        self.target = browser.send("Target.createTarget", {"url": "about:blank", "browserContextId": self.context,
                                                           "width": browser.size[0], "height": browser.size[1]}
                                   )["targetId"]
        self.session = browser.send("Target.attachToTarget", {"targetId": self.target, "flatten": True})["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", {"width": browser.size[0], "height": browser.size[1],
                                                         "deviceScaleFactor": 1, "mobile": False})
        self.send("Runtime.enable")

    def exceptions(self):
        """Uncaught JavaScript exceptions in this tab so far."""
        return list(self.b.exceptions.get(self.session, []))

    def send(self, method, params=None, timeout=30):
        return self.b.send(method, params, self.session, timeout)

    def goto(self, url):
        self.send("Page.navigate", {"url": url})

    def eval(self, expr):
        """The value of a JavaScript expression in the page (promises awaited)."""
        r = self.send("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise AssertionError("%s threw: %s" % (expr, r["exceptionDetails"]))
        return r["result"].get("value")

    def wait(self, expr, timeout=15.0, what=None):
        """Polls expr until it is truthy; returns its value."""
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            try:
                last = self.eval(expr)
            except AssertionError as e:
                last = e
            if last and not isinstance(last, AssertionError):
                return last
            time.sleep(0.1)
        raise AssertionError("timed out waiting for %s (last: %r)" % (what or expr, last))

    def close(self):
        try:
            self.b.send("Target.closeTarget", {"targetId": self.target}, timeout=10)
            self.b.send("Target.disposeBrowserContext", {"browserContextId": self.context}, timeout=10)
        except AssertionError:
            pass


# -- a small DOM of --dump-dom output ---------------------------------------

class Node:
    def __init__(self, tag, attrs, parent):
        self.tag, self.attrs, self.parent, self.children = tag, dict(attrs), parent, []

    def get(self, name, default=None):
        return self.attrs.get(name, default)

    def text(self):
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def walk(self):
        for c in self.children:
            if isinstance(c, Node):
                yield c
                yield from c.walk()

    def find(self, pred):
        return [n for n in self.walk() if pred(n)]

    def by_id(self, ident):
        found = self.find(lambda n: n.get("id") == ident)
        return found[0] if found else None

    def hidden(self):
        """True when this node or an ancestor carries the hidden attribute."""
        n = self
        while n is not None:
            if "hidden" in n.attrs:
                return True
            n = n.parent
        return False


def parse_dom(html):
    from html.parser import HTMLParser
    void = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
    root = Node("#document", {}, None)

    class P(HTMLParser):
        cur = root

        def handle_starttag(self, tag, attrs):
            n = Node(tag, attrs, self.cur)
            self.cur.children.append(n)
            if tag not in void:
                self.cur = n

        def handle_startendtag(self, tag, attrs):
            self.cur.children.append(Node(tag, attrs, self.cur))

        def handle_endtag(self, tag):
            n = self.cur
            while n is not None and n.tag != tag:
                n = n.parent
            if n is not None and n.parent is not None:
                self.cur = n.parent

        def handle_data(self, data):
            self.cur.children.append(data)

    P(convert_charrefs=True).feed(html)
    return root
