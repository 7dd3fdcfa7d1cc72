"""API.md Conventions that concern the HTTP exchange itself: 415 for a
Content-Encoding, 401 with WWW-Authenticate, 400 for an unknown query
parameter, JSON replies ending with a newline, X-Request-Id kept and echoed,
messages that say which header a binary body needs."""

import struct

from optd_e2e import DaemonTest, uniq


class ConventionTests(DaemonTest):

    def test_content_encoding_is_415_and_changes_nothing(self):
        name = uniq()
        for enc in ("gzip", "deflate", "br"):
            with self.subTest(enc=enc):
                r = self.d.request("POST", "/v1/sessions", body=b"\x1f\x8b\x08\x00garbage",
                                   headers={"Content-Encoding": enc})
                err = self.assertError(r, 415, "unsupported_media_type")
                self.assertIn("Content-Encoding", err["message"])
        self.d.create(name, "sgd", params=[1.0])
        before = self.snapshot(name)
        r = self.d.request("POST", "/v1/sessions/%s/step" % name, body=b'{"grad":[1.0]}',
                           headers={"Content-Encoding": "gzip"})
        self.assertError(r, 415, "unsupported_media_type")
        self.assertUnchanged(name, before)
        r = self.d.request("POST", "/v1/sessions/%s/step" % name, body=b'{"grad":[1.0]}',
                           headers={"Content-Encoding": "identity"})
        self.assertEqual(r.status, 200, r)

    def test_unknown_query_parameter_is_400(self):
        for path, near in (("/v1/sessions?limt=5", "limit"), ("/v1/sessions?afterr=x", "after"),
                           ("/v1/optimizers?x=1", None), ("/healthz?verbose=1", None)):
            with self.subTest(path=path):
                err = self.assertError(self.d.get(path), 400, "bad_request")
                self.assertIn(path.split("?")[1].split("=")[0], err["message"])
                if near:
                    self.assertIn('did you mean "%s"?' % near, err["message"])
        name = uniq()
        self.d.create(name, "sgd", params=[1.0])
        self.assertError(self.d.get("/v1/sessions/%s/history?limits=2" % name), 400, "bad_request")
        self.assertEqual(self.d.get("/v1/sessions/%s/history?limit=2&after=0" % name).status, 200)
        self.assertEqual(self.d.get("/v1/sessions?limit=5&after=a").status, 200)
        before = self.snapshot(name)
        r = self.d.request("POST", "/v1/sessions/%s/step?dry_run=1" % name, json_body={"grad": [1.0]})
        self.assertError(r, 400, "bad_request")
        self.assertUnchanged(name, before)

    def test_json_replies_end_with_a_newline(self):
        name = uniq()
        replies = [self.d.post("/v1/sessions", {"name": name, "optimizer": "adam", "params": [1.0, 2.0]}),
                   self.d.step(name, [0.1, 0.2]), self.d.get("/v1/sessions/" + name),
                   self.d.get("/v1/sessions/%s/params" % name), self.d.get("/v1/sessions/%s/state" % name),
                   self.d.get("/v1/sessions?limit=1"), self.d.get("/v1/optimizers"), self.d.get("/healthz"),
                   self.d.get("/readyz"), self.d.get("/v1/sessions/%s/history" % name),
                   self.d.get("/v1/sessions/nope-" + uniq()), self.d.get("/v1/openapi.json"),
                   self.d.request("PATCH", "/v1/sessions/" + name, json_body={"hyperparams": {"lr": 0.1}})]
        for r in replies:
            with self.subTest(r=r.method + " " + r.path):
                self.assertEqual(r.content_type, "application/json")
                self.assertTrue(r.body.endswith(b"\n"), r)
                r.json  # noqa: B018 -- still one JSON value

    def test_x_request_id_is_kept_and_echoed(self):
        r = self.d.get("/healthz", headers={"X-Request-Id": "trace-abc-123"})
        self.assertEqual(r.header("X-Request-Id"), "trace-abc-123")
        r = self.d.get("/v1/sessions/nope-" + uniq(), headers={"X-Request-Id": "e1"})
        self.assertEqual(r.header("X-Request-Id"), "e1")
        a, b = self.d.get("/healthz"), self.d.get("/healthz")
        self.assertTrue(a.header("X-Request-Id"))
        self.assertNotEqual(a.header("X-Request-Id"), b.header("X-Request-Id"))
        # unusable values are replaced, never echoed
        r = self.d.get("/healthz", headers={"X-Request-Id": "x" * 500})
        self.assertNotEqual(r.header("X-Request-Id"), "x" * 500)
        self.assertTrue(r.header("X-Request-Id"))

    def test_binary_body_without_content_type_says_which_header(self):
        name = uniq()
        self.d.create(name, "sgd", params=[1.0, 2.0])
        before = self.snapshot(name)
        r = self.d.request("POST", "/v1/sessions/%s/step" % name, body=struct.pack("<2f", 0.5, 1.5),
                           headers={"Content-Type": None})
        err = self.assertError(r, 400, "bad_json")
        self.assertIn("application/octet-stream", err["message"])
        r = self.d.request("POST", "/v1/sessions/%s/step" % name, body=b"grad=1",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
        err = self.assertError(r, 415, "unsupported_media_type")
        self.assertIn("Content-Type: application/json", err["message"])
        self.assertUnchanged(name, before)


class AuthChallengeTests(DaemonTest):
    daemon_env = {"OPTD_TOKEN": "s3cret"}
    daemon_token = "s3cret"

    def test_401_carries_www_authenticate_and_the_header_form(self):
        for hdrs in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            with self.subTest(headers=hdrs):
                r = self.d.get("/v1/sessions", auth=False, headers=hdrs)
                err = self.assertError(r, 401, "unauthorized")
                self.assertEqual(r.header("WWW-Authenticate"), "Bearer")
                self.assertIn("Authorization: Bearer <token>", err["message"])
        self.assertEqual(self.d.get("/v1/sessions").status, 200)
        self.assertIsNone(self.d.get("/v1/sessions").header("WWW-Authenticate"))
