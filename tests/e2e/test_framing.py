"""Request framing (API.md, Operations; RFC 9112 section 6): a request with
both Transfer-Encoding and Content-Length, or with a Transfer-Encoding other
than chunked, is 400 bad_request and its connection is closed, so nothing
smuggled after it is ever read as a request of its own."""

import json
import socket
import time

from optd_e2e import DaemonTest, uniq


def exchange(port, data, seconds=5.0):
    """Sends data on a fresh connection and reads until the daemon closes it
    or seconds pass. Returns (bytes received, whether it closed)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=seconds)
    got = b""
    try:
        try:
            s.sendall(data)
        except OSError:
            pass  # answered and closed before taking all of it: what it sent is still there
        deadline = time.time() + seconds
        while time.time() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                return got, False
            except ConnectionResetError:
                return got, True
            if not chunk:
                return got, True
            got += chunk
        return got, False
    finally:
        s.close()


def responses(data):
    """The responses in data, each as (status, headers dict lower-cased, body)."""
    out = []
    while data.startswith(b"HTTP/1."):
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.decode("latin-1").split("\r\n")
        hdrs = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        n = int(hdrs.get("content-length", "0"))
        out.append((int(lines[0].split()[1]), hdrs, rest[:n]))
        data = rest[n:]
    return out


class FramingTests(DaemonTest):

    def setUp(self):
        super().setUp()
        self.name = uniq("frame")
        self.d.create(self.name, "sgd", dtype="float64", params=[0.0, 0.0], hyperparams={"lr": 1.0})
        self.victim = uniq("victim")
        self.d.create(self.victim, "sgd", params=[1.0])

    def step_head(self, version=b"HTTP/1.1"):
        return (b"POST /v1/sessions/%s/step %s\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                % (self.name.encode(), version))

    def assertRefusedAndClosed(self, data, what):
        got, closed = exchange(self.d.port, data)
        rs = responses(got)
        self.assertTrue(rs, "%s: no response (the daemon waits for a body it cannot delimit): %r" % (what, got[:200]))
        status, hdrs, body = rs[0]
        self.assertEqual(status, 400, "%s: %r" % (what, got[:400]))
        self.assertEqual(json.loads(body)["error"]["code"], "bad_request", what)
        self.assertEqual(hdrs.get("connection", "").lower(), "close", "%s: no Connection: close" % what)
        self.assertTrue(closed, "%s: the connection was left open" % what)
        self.assertEqual(len(rs), 1, "%s: more was read from the connection as requests: %r" % (what, got[:600]))
        self.assertEqual(self.d.params(self.name)["step"], 0, "%s: the step was applied" % what)

    def test_chunked_with_content_length_does_not_smuggle_a_delete(self):
        smuggled = b"DELETE /v1/sessions/%s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % self.victim.encode()
        body = b'e\r\n{"grad":[1,1]}\r\n0\r\n\r\n' + smuggled
        self.assertRefusedAndClosed(self.step_head() + b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n"
                                    % len(body) + body, "TE chunked + CL")
        self.assertEqual(self.d.get("/v1/sessions/" + self.victim).status, 200, "the smuggled DELETE ran")
        # Content-Length first makes no difference.
        self.assertRefusedAndClosed(self.step_head() + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    % len(body) + body, "CL + TE chunked")
        self.assertEqual(self.d.get("/v1/sessions/" + self.victim).status, 200, "the smuggled DELETE ran")

    def test_codings_other_than_chunked_are_refused_at_once(self):
        body = b'e\r\n{"grad":[1,1]}\r\n0\r\n\r\n'
        for te in (b"gzip, chunked", b"xchunked", b"chunked, chunked", b"identity", b"gzip", b"chunked;x=1",
                   b"chunked , gzip", b""):
            self.assertRefusedAndClosed(self.step_head() + b"Transfer-Encoding: " + te + b"\r\n\r\n" + body,
                                        "Transfer-Encoding: %r" % te)
        self.assertRefusedAndClosed(self.step_head() + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked"
                                    b"\r\n\r\n" + body, "two Transfer-Encoding headers")

    def test_chunked_on_http_1_0_is_refused(self):
        body = b'e\r\n{"grad":[1,1]}\r\n0\r\n\r\n'
        self.assertRefusedAndClosed(self.step_head(b"HTTP/1.0") + b"Transfer-Encoding: chunked\r\n\r\n" + body,
                                    "HTTP/1.0 with Transfer-Encoding")

    def test_conflicting_content_lengths_close_the_connection(self):
        body = b'{"grad":[1,1]}'
        self.assertRefusedAndClosed(self.step_head() + b"Content-Length: 14\r\nContent-Length: 15\r\n\r\n" + body
                                    + b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "two Content-Lengths")

    def test_plain_chunked_and_content_length_still_work_and_keep_the_connection(self):
        chunked = self.step_head() + b'Transfer-Encoding: Chunked\r\n\r\n5\r\n{"gra\r\n9\r\nd":[1,1]}\r\n0\r\n\r\n'
        plain = self.step_head() + b'Content-Length: 14\r\n\r\n{"grad":[1,1]}'
        s = socket.create_connection(("127.0.0.1", self.d.port), timeout=10)
        try:
            got = b""
            for i, req in enumerate((chunked, plain, chunked)):
                s.sendall(req)
                while len(responses(got)) <= i:
                    chunk = s.recv(65536)
                    self.assertTrue(chunk, "the connection closed after %d requests: %r" % (i, got[:300]))
                    got += chunk
        finally:
            s.close()
        rs = responses(got)
        self.assertEqual([r[0] for r in rs], [200, 200, 200], got[:600])
        self.assertEqual([json.loads(r[2])["step"] for r in rs], [1, 2, 3])

    def test_a_long_request_head_is_refused_whole_with_json_431(self):
        # The connection's pool (HTTP_CONN_MEMORY, 32 KiB) holds the head and
        # the reply's headers: a 24 KB head, past the common 8-16 KB limits,
        # still steps; past HTTP_HEAD_MAX (28 KiB) optd answers 431
        # headers_too_large before any of it runs; past the pool
        # libmicrohttpd answers 431 itself. None of the refused ones applies.
        def step(pad):
            body = b'{"grad":[1.0,1.0]}'
            return exchange(self.d.port, self.step_head() + b"X-Pad: " + b"a" * pad +
                            b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)[0]
        rs = responses(step(24000))
        self.assertEqual([r[0] for r in rs], [200], rs)
        self.assertEqual(json.loads(rs[0][2])["step"], 1)
        rs = responses(step(30000))
        self.assertEqual([r[0] for r in rs], [431], rs)
        err = json.loads(rs[0][2])["error"]
        self.assertEqual(err["code"], "headers_too_large", err)
        self.assertIn("skip", err["message"])
        rs = responses(step(40000))
        self.assertEqual([r[0] for r in rs], [431], rs)
        self.assertEqual(self.d.params(self.name)["step"], 1, "a refused request was applied")
