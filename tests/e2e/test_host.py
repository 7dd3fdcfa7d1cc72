"""The Host check (API.md, Conventions: 403 forbidden): a daemon listening
on a loopback address without a token answers only requests whose Host names
the loopback interface, so a DNS-rebinding web page (its own name resolving
to 127.0.0.1, and sent as the Host) cannot drive the API. With a token the
token is the defence and any Host is served."""

import json
import socket

from optd_e2e import DaemonTest, uniq

FOREIGN = ["attacker.example", "attacker.example:8080", "127.0.0.1.attacker.example",
           "localhost.attacker.example", "127.0.0.1:80@attacker.example", "[::1].attacker.example",
           "0x7f.0.0.1", "2130706433", "[::2]", "[::ffff:10.0.0.1]", "10.0.0.1", "0.0.0.0", "", "[::1]x",
           "localhost:123456", "localhost:80:80", "[127.0.0.1]"]
LOOPBACK = ["localhost", "LocalHost", "localhost:{port}", "localhost:", "localhost.", "127.0.0.1", "127.0.0.1:{port}",
            "127.1.2.3", "127.255.255.254:80", "[::1]", "[::1]:{port}", "[0:0:0:0:0:0:0:1]", "[::ffff:127.0.0.1]"]


def raw_exchange(port, data, timeout=5.0):
    """Sends data on a fresh connection; (status, body) of the first response."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        got = b""
        while True:
            head, sep, body = got.partition(b"\r\n\r\n")
            if sep:
                n = [int(ln.split(b":")[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")]
                if n and len(body) >= n[0]:
                    return int(got.split(b" ", 2)[1]), body[:n[0]]
            chunk = s.recv(65536)
            if not chunk:
                raise AssertionError("no complete response: %r" % got[:300])
            got += chunk
    finally:
        s.close()


class LoopbackWithoutTokenTests(DaemonTest):

    def test_a_foreign_host_is_403_and_changes_nothing(self):
        name = uniq("host")
        self.d.create(name, "sgd", params=[1.0])
        for host in FOREIGN:
            with self.subTest(host=host):
                r = self.d.request("DELETE", "/v1/sessions/" + name, headers={"Host": host})
                err = self.assertError(r, 403, "forbidden")
                self.assertIn("token", err["message"])
                r = self.d.request("POST", "/v1/sessions/%s/step" % name, json_body={"grad": [1.0]},
                                   headers={"Host": host})
                self.assertError(r, 403, "forbidden")
        self.assertEqual(self.d.session(name)["step"], 0, "a step with a foreign Host was applied")
        # Every path, not just /v1: the dashboard page drives the API too.
        for path in ("/", "/healthz", "/metrics", "/v1/sessions", "/v1/openapi.json"):
            with self.subTest(path=path):
                self.assertError(self.d.get(path, headers={"Host": "attacker.example"}), 403, "forbidden")

    def test_loopback_names_are_served(self):
        for host in LOOPBACK:
            host = host.format(port=self.d.port)
            with self.subTest(host=host):
                r = self.d.get("/v1/sessions", headers={"Host": host})
                self.assertEqual(r.status, 200, r)

    def test_http_1_0_without_host_is_served_and_1_1_without_host_is_400(self):
        st, body = raw_exchange(self.d.port, b"GET /healthz HTTP/1.0\r\n\r\n")
        self.assertEqual(st, 200, body)
        st, body = raw_exchange(self.d.port, b"GET /healthz HTTP/1.1\r\n\r\n")
        self.assertEqual(st, 400, body)
        self.assertEqual(json.loads(body)["error"]["code"], "bad_request")
        st, body = raw_exchange(self.d.port, b"GET /healthz HTTP/1.0\r\nHost: attacker.example\r\n\r\n")
        self.assertEqual(st, 403, body)

    def test_two_host_headers_are_400(self):
        st, body = raw_exchange(self.d.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: attacker.example"
                                             b"\r\n\r\n")
        self.assertEqual(st, 400, body)


class LoopbackWithTokenTests(DaemonTest):
    daemon_token = "t0ken-for-host-tests"
    daemon_env = {"OPTD_TOKEN": "t0ken-for-host-tests"}

    def test_any_host_is_served_with_the_token(self):
        r = self.d.get("/v1/sessions", headers={"Host": "optd.internal.example"})
        self.assertEqual(r.status, 200, r)
        r = self.d.get("/v1/sessions", headers={"Host": "optd.internal.example"}, auth=False)
        self.assertError(r, 401, "unauthorized")
