"""Several daemons as one (API.md "Operations"): with --peers, GET
/v1/sessions?scope=cluster lists every shard's sessions in one name order,
with paging whose `next` works across shards, from whichever shard is asked;
a peer that does not answer (or refuses us) makes the reply a 503 naming
it, never a short list. The daemon's own URL may be among its --peers."""

import random
import subprocess
import unittest

from optd_e2e import Daemon, free_port, optd_bin, uniq


def names_of(page):
    return [s["name"] for s in page["sessions"]]


class ClusterTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        ports = [free_port() for _ in range(3)]
        peers = ",".join("http://127.0.0.1:%d" % p for p in ports)  # each lists itself too
        cls.shards = []
        for p in ports:
            d = Daemon(["--sync", "normal", "--peers", peers])
            d.port, d.keep_port = p, True
            cls.shards.append(d)
        cls.addClassCleanup(lambda: [d.cleanup() for d in cls.shards])
        for d in cls.shards:
            d.start()
        cls.prefix = uniq("cl", 6)
        rng = random.Random(7)
        cls.names = sorted("%s-%s" % (cls.prefix, "".join(rng.choice("abcdefghij") for _ in range(5)))
                           for _ in range(23))
        cls.home = {}
        for i, n in enumerate(cls.names):
            d = cls.shards[i % 3]
            d.create(n, "sgd", size=2)
            d.step(n, [1.0, 2.0])
            cls.home[n] = d

    def listing(self, d, limit, after=None):
        path = "/v1/sessions?scope=cluster&limit=%d" % limit + ("&after=" + after if after else "")
        r = d.get(path)
        self.assertEqual(r.status, 200, r)
        return r.json

    def test_every_shard_lists_the_whole_cluster_in_name_order(self):
        for d in self.shards:
            page = self.listing(d, 1000, self.prefix)
            got = [n for n in names_of(page) if n.startswith(self.prefix)]
            self.assertEqual(got, self.names)
            self.assertEqual(page["shards"], 3, "itself among its peers is counted once")
            for s in page["sessions"]:
                if s["name"].startswith(self.prefix):
                    self.assertEqual((s["step"], s["optimizer"], s["size"]), (1, "sgd", 2))

    def test_paging_with_one_next_across_shards(self):
        for limit in (1, 4, 7):
            d = self.shards[limit % 3]
            got, after, pages = [], self.prefix, 0
            while after is not None and pages < 100:
                page = self.listing(self.shards[pages % 3], limit, after)  # any shard may serve any page
                self.assertLessEqual(len(page["sessions"]), limit)
                got += names_of(page)
                after = page["next"]
                pages += 1
                if page["sessions"] and not page["sessions"][-1]["name"].startswith(self.prefix):
                    break
            got = [n for n in got if n.startswith(self.prefix)]
            self.assertEqual(got, self.names, "limit %d via %s" % (limit, d.url))
        last = self.listing(self.shards[0], 1000, self.names[-1])
        self.assertFalse([n for n in names_of(last) if n.startswith(self.prefix)])

    def test_local_scope_is_one_shard(self):
        for d in self.shards:
            local = [n for n in names_of(d.get("/v1/sessions?limit=1000&after=" + self.prefix).json)
                     if n.startswith(self.prefix)]
            self.assertEqual(local, sorted(n for n in self.names if self.home[n] is d))
            explicit = d.get("/v1/sessions?scope=local&limit=1000&after=" + self.prefix).json
            self.assertEqual([n for n in names_of(explicit) if n.startswith(self.prefix)], local)

    def test_bad_scope_is_400(self):
        r = self.shards[0].get("/v1/sessions?scope=world")
        self.assertEqual(r.status, 400, r)
        self.assertEqual(r.code, "bad_request")
        self.assertIn("cluster", r.json["error"]["message"])
        r = self.shards[0].get("/v1/sessions?scope=cluster&limit=0")
        self.assertEqual(r.status, 400, r)

    def test_zz_a_peer_down_is_a_503_naming_it(self):
        victim = self.shards[2]
        victim.kill()
        try:
            for d in self.shards[:2]:
                r = d.get("/v1/sessions?scope=cluster")
                self.assertEqual(r.status, 503, r)
                self.assertEqual(r.code, "unavailable")
                self.assertIn("127.0.0.1:%d" % victim.port, r.json["error"]["message"])
                self.assertEqual(d.get("/v1/sessions").status, 200, "the local listing still works")
        finally:
            victim.start()
        page = self.listing(self.shards[0], 1000, self.prefix)
        self.assertEqual([n for n in names_of(page) if n.startswith(self.prefix)], self.names)


class PeerTokenTests(unittest.TestCase):
    """A peer that refuses the token this daemon sends is named in the 503."""

    def test_peer_refusing_our_token(self):
        other = Daemon(env={"OPTD_TOKEN": "other"}, token="other").start()
        me = None
        try:
            me = Daemon(["--peers", other.url], env={"OPTD_TOKEN": "mine"}, token="mine").start()
            r = me.get("/v1/sessions?scope=cluster")
            self.assertEqual(r.status, 503, r)
            self.assertIn(other.url, r.json["error"]["message"])
            self.assertIn("401", r.json["error"]["message"])
        finally:
            if me:
                me.cleanup()
            other.cleanup()

    def test_same_token_is_sent_to_peers(self):
        other = Daemon(env={"OPTD_TOKEN": "shared"}, token="shared").start()
        me = None
        try:
            other.create("on-the-peer", "sgd", size=1)
            me = Daemon(["--peers", other.url], env={"OPTD_TOKEN": "shared"}, token="shared").start()
            me.create("on-me", "sgd", size=1)
            r = me.get("/v1/sessions?scope=cluster")
            self.assertEqual(r.status, 200, r)
            self.assertEqual(names_of(r.json), ["on-me", "on-the-peer"])
        finally:
            if me:
                me.cleanup()
            other.cleanup()


class NoPeersTests(unittest.TestCase):
    def test_without_peers_the_cluster_is_this_daemon(self):
        d = Daemon().start()
        try:
            d.create("only", "sgd", size=1)
            r = d.get("/v1/sessions?scope=cluster")
            self.assertEqual(r.status, 200, r)
            self.assertEqual((names_of(r.json), r.json["next"], r.json["shards"]), (["only"], None, 1))
        finally:
            d.cleanup()

    def test_bad_peer_urls_are_refused_at_start(self):
        for bad in ("10.0.0.1:8080", "ftp://x:1", "http://", "http://a/b", ","):
            r = subprocess.run([optd_bin(), "--peers", bad, "--listen", "127.0.0.1:0"], capture_output=True,
                               text=True, timeout=10)
            self.assertEqual(r.returncode, 2, (bad, r.stderr))
            self.assertIn("--peers", r.stderr)
