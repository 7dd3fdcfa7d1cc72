"""Memory per request body (issue 12, defect 8): a create, a checkpoint PUT or
a step fallback decodes its vectors without a tree of every number, so the
daemon's peak RSS for a 32 MB create body stays a small multiple of the body
(it was 43 times: 1.38 GB)."""

import json
import os
import random
import unittest

from optd_e2e import Daemon, optd_bin, uniq

MB = 1 << 20


def peak_rss(pid):
    """VmHWM of the process, in bytes: the most it ever held resident."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM for pid %d" % pid)


def body_of(size_bytes, **fields):
    """A create body of about size_bytes: sgd (no state buffers) so what is
    measured is the body's decoding, with params of 4- or 5-character numbers."""
    rnd = random.Random(size_bytes)
    n = size_bytes // 5  # short numbers: the most elements a body can carry
    params = ",".join("%.2f" % rnd.uniform(-1, 1) for _ in range(n))
    head = json.dumps(dict({"name": uniq("mem"), "optimizer": "sgd"}, **fields))[:-1]
    return ('%s, "params": [%s]}' % (head, params)).encode(), n


def sanitized():
    """Whether the binary is an ASan build (whose RSS measures ASan)."""
    try:
        with open(optd_bin(), "rb") as f:
            return b"__asan_init" in f.read()
    except OSError:
        return False


@unittest.skipUnless(os.path.exists("/proc/self/status"), "needs /proc")
@unittest.skipIf(sanitized(), "an AddressSanitizer build: its RSS is ASan's shadow memory and quarantine")
class BodyMemoryTests(unittest.TestCase):

    def measure(self, body, path="/v1/sessions", method="POST"):
        d = Daemon(["--max-body", "64M"])
        d.start()
        try:
            # warm up: SQLite's cache, MHD's buffers, a first session
            r = d.request("POST", "/v1/sessions", body=json.dumps({"name": "warm", "optimizer": "sgd",
                                                                   "params": [0.5] * 1000}))
            self.assertEqual(r.status, 201, r)
            before = peak_rss(d.proc.pid)
            r = d.request(method, path, body=body, timeout=120)
            after = peak_rss(d.proc.pid)
            return r, after - before
        finally:
            d.cleanup()

    def test_a_32_mb_create_body_peaks_at_a_small_multiple_of_its_size(self):
        for fields in ({"dtype": "float64"}, {}):  # dtype first, or none (the vector waits as text)
            with self.subTest(fields=fields):
                body, n = body_of(32 * MB, **fields)
                r, grew = self.measure(body)
                self.assertEqual(r.status, 201, r)
                self.assertEqual(r.json["size"], n)
                print("\n  %s: %.1f MB body, peak RSS grew %.1f MB (%.2fx)"
                      % (fields or "no dtype", len(body) / MB, grew / MB, grew / len(body)))
                self.assertLess(grew, 4 * len(body), "peak RSS grew %.0f MB for a %.0f MB body"
                                % (grew / MB, len(body) / MB))
