"""The dashboard behind a router: three daemons started with --peers naming
each other, HAProxy in front with deploy/haproxy.cfg, and the page loaded
from the router in headless Chromium. It lists every shard's sessions (GET
/v1/sessions?scope=cluster, whichever shard the router picks) and charts a
session on any shard (its /history goes through the router to its shard).
With a shard down, the page says which peer does not answer."""

import os
import shutil
import sys
import tempfile
import unittest

from harness import Daemon
from test_dashboard import page, points, train

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))
import optdtest  # noqa: E402

NAMES = ["exp-%s" % c for c in "abcdefghi"]
STEPS = 12


@unittest.skipUnless(optdtest.HAPROXY, "needs haproxy (apt-get install haproxy)")
class ClusterDashboardTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.shards, cls.haproxy, cls.tmp = [], None, tempfile.mkdtemp(prefix="optd-dash-router-")
        cls.addClassCleanup(cls.cleanup)
        ports = [optdtest.free_port() for _ in range(3)]
        peers = ",".join("http://127.0.0.1:%d" % p for p in ports)
        for p in ports:
            d = Daemon(args=["--sync", "normal", "--peers", peers])
            d.port, d.keep_port = p, True
            cls.shards.append(d.start())
        cls.router_port = optdtest.free_port()
        cls.log = open(os.path.join(cls.tmp, "haproxy.log"), "wb")
        cls.haproxy = optdtest.start_haproxy(optdtest.haproxy_env(cls.router_port, ports), cls.log)
        # A handle on the router with the harness's HTTP helpers.
        cls.router = Daemon()
        cls.router.port = cls.router_port
        for i, name in enumerate(NAMES):
            train(cls.router, name, STEPS, n=8, seed=i)
        cls.home = {}
        for i, d in enumerate(cls.shards):
            for s in d.ok("GET", "/v1/sessions?limit=1000")["sessions"]:
                cls.home[s["name"]] = i

    @classmethod
    def cleanup(cls):
        if cls.haproxy is not None:
            optdtest.stop_process(cls.haproxy)
        if getattr(cls, "log", None):
            cls.log.close()
        for d in cls.shards:
            d.cleanup()
        if getattr(cls, "router", None):
            cls.router.close()
            shutil.rmtree(cls.router.tmp, ignore_errors=True)
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def url(self):
        return "http://127.0.0.1:%d/" % self.router_port

    def test_every_shard_listed_and_any_session_charted(self):
        self.assertEqual(sorted(self.home), NAMES)
        self.assertGreater(len(set(self.home.values())), 1, "the router spread them: %r" % self.home)
        # one session of each shard, charted through the router
        picks = {}
        for n in NAMES:
            picks.setdefault(self.home[n], n)
        first = picks[min(picks)]
        with page(self, self.url() + "#session=" + first) as t:
            rows = t.wait("(() => { const r = [...document.querySelectorAll('tr[data-session]')];"
                          " return r.length === %d && r.map((x) => x.dataset.session); })()" % len(NAMES),
                          what="every shard's sessions")
            self.assertEqual(rows, NAMES)
            self.assertEqual(t.eval("document.getElementById('session-count').dataset.shards"), "3")
            self.assertIn("3 shards", t.eval("document.getElementById('session-count').textContent"))
            for shard, name in sorted(picks.items()):
                t.eval("location.hash = '#session=%s', true" % name)
                t.wait("document.getElementById('detail-h').textContent === '%s'" % name, what=name)
                t.wait(points("loss") + " === '%d'" % STEPS, what="%s's loss on shard %d" % (name, shard))
                self.assertEqual(t.eval(points("lr")), str(STEPS))

    def test_zz_a_shard_down_is_named_on_the_page(self):
        victim = self.shards[2]
        with page(self, self.url()) as t:
            t.wait("document.querySelectorAll('tr[data-session]').length === %d" % len(NAMES), what="the rows")
            victim.kill()
            try:
                # (A first poll may fail on the selected session, if it lives
                # there; the listing of the next one names the peer.)
                text = t.wait("(() => { const s = document.getElementById('status');"
                              " return s.dataset.kind === 'error' && s.textContent.includes('127.0.0.1:%d')"
                              " && s.textContent; })()" % victim.port,
                              what="the error status naming the peer", timeout=30)
                self.assertIn("503", text)
            finally:
                victim.start()
            t.wait("document.getElementById('status').dataset.kind === 'live'", what="live again", timeout=30)
            self.assertEqual(t.eval("document.querySelectorAll('tr[data-session]').length"), len(NAMES))
