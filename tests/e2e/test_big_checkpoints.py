"""Checkpoints round-trip at any size the daemon accepts, with its default
flags (API.md Steps): a 2e6-element Adam session's JSON checkpoint is about
76 MB, over the default --max-body of 64 MiB, and PUT .../state takes it back
(it was 413); so does its safetensors form. The PUT's limit derives from the
largest session the daemon holds."""

import json
import random
import struct

from optd_e2e import DaemonTest, uniq

N = 2_000_000


class BigCheckpointTests(DaemonTest):

    def test_a_76_mb_checkpoint_round_trips_with_the_default_flags(self):
        a = uniq("big")
        r = self.d.post("/v1/sessions", {"name": a, "optimizer": "adam", "size": N, "fill": 0.25})
        self.assertEqual(r.status, 201, r)
        rnd = random.Random(7)
        grad = struct.pack("<%df" % N, *(rnd.uniform(-1, 1) for _ in range(N)))
        for _ in range(2):
            r = self.d.request("POST", "/v1/sessions/%s/step" % a, body=grad,
                               headers={"Content-Type": "application/octet-stream", "Prefer": "return=minimal"})
            self.assertEqual(r.status, 200, r)
        r = self.d.get("/v1/sessions/%s/state" % a, timeout=120)
        self.assertEqual(r.status, 200)
        body = r.body
        self.assertGreater(len(body), 64 << 20, "the checkpoint should be over the default --max-body")
        b = uniq("big-json")
        r = self.d.request("PUT", "/v1/sessions/%s/state" % b, body=body, timeout=120)
        self.assertEqual(r.status, 201, r)
        # a client that re-serializes it with spaces (Python's json.dumps) is taken too
        c = uniq("big-spaces")
        ck = json.loads(body)
        spaced = json.dumps(ck).encode()
        del ck
        r = self.d.request("PUT", "/v1/sessions/%s/state" % c, body=spaced, timeout=120)
        self.assertEqual(r.status, 201, r)
        del spaced
        bin_a = self.d.get("/v1/sessions/%s/state" % a, headers={"Accept": "application/octet-stream"}, timeout=120)
        self.assertEqual(bin_a.status, 200)
        self.assertEqual(len(bin_a.body) - struct.unpack("<Q", bin_a.body[:8])[0] - 8, 3 * 4 * N)
        d = uniq("big-bin")
        r = self.d.request("PUT", "/v1/sessions/%s/state" % d, body=bin_a.body, timeout=120,
                           headers={"Content-Type": "application/octet-stream"})
        self.assertEqual(r.status, 201, r)
        for name in (b, c, d):
            with self.subTest(name=name):
                self.assertEqual(self.d.get("/v1/sessions/%s/state" % name, timeout=120).body.replace(
                    b'"name":"%s"' % name.encode(), b'"name":"%s"' % a.encode(), 1), body)
        # and the next step is the same everywhere
        outs = set()
        for name in (a, b, d):
            r = self.d.request("POST", "/v1/sessions/%s/step" % name, body=grad,
                               headers={"Content-Type": "application/octet-stream",
                                        "Accept": "application/octet-stream"}, timeout=120)
            self.assertEqual(r.status, 200, r)
            outs.add(r.body)
        self.assertEqual(len(outs), 1)
        for name in (a, b, c, d):
            self.assertEqual(self.d.request("DELETE", "/v1/sessions/" + name).status, 204)
