"""Bearer-token authentication (OPTD_TOKEN and --token-file)."""

import os
import tempfile
import unittest

from optd_e2e import Daemon, DaemonTest, uniq


class EnvTokenTests(DaemonTest):
    daemon_env = {"OPTD_TOKEN": "secret"}

    def test_v1_without_token_is_401(self):
        for method, path in (("GET", "/v1/sessions"), ("GET", "/v1/optimizers"),
                             ("GET", "/v1/sessions/" + uniq()), ("GET", "/v1/nope")):
            with self.subTest(path=path):
                self.assertError(self.d.request(method, path), 401, "unauthorized")

    def test_wrong_token_is_401(self):
        for value in ("Bearer wrong", "Bearer secretx", "Bearer secre", "Bearer ", "secret", "Basic c2VjcmV0",
                      "Bearer secret extra"):
            with self.subTest(authorization=value):
                r = self.d.get("/v1/sessions", headers={"Authorization": value})
                self.assertError(r, 401, "unauthorized")

    def test_right_token_is_200(self):
        r = self.d.get("/v1/sessions", headers={"Authorization": "Bearer secret"})
        self.assertEqual(r.status, 200, r)
        self.assertIn("sessions", r.json)

    def test_auth_scheme_is_case_insensitive(self):
        # RFC 7235 section 2.1: the scheme name is case-insensitive; the token is not.
        for value in ("bearer secret", "BEARER secret"):
            with self.subTest(authorization=value):
                self.assertEqual(self.d.get("/v1/sessions", headers={"Authorization": value}).status, 200)
        self.assertError(self.d.get("/v1/sessions", headers={"Authorization": "Bearer SECRET"}), 401, "unauthorized")

    def test_write_without_token_changes_nothing(self):
        name = uniq()
        r = self.d.post("/v1/sessions", {"name": name, "optimizer": "sgd", "size": 1})
        self.assertError(r, 401, "unauthorized")
        r = self.d.get("/v1/sessions/" + name, headers={"Authorization": "Bearer secret"})
        self.assertError(r, 404, "not_found")
        r = self.d.post("/v1/sessions", {"name": name, "optimizer": "sgd", "params": [1.0]},
                        headers={"Authorization": "Bearer secret"})
        self.assertEqual(r.status, 201, r)
        r = self.d.post("/v1/sessions/%s/step" % name, {"grad": [1.0]}, headers={"Authorization": "Bearer nope"})
        self.assertError(r, 401, "unauthorized")
        r = self.d.get("/v1/sessions/%s/params" % name, headers={"Authorization": "Bearer secret"})
        self.assertEqual(r.json["step"], 0)

    def test_ops_endpoints_stay_open(self):
        for path in ("/healthz", "/readyz", "/metrics"):
            with self.subTest(path=path):
                self.assertEqual(self.d.get(path).status, 200)


class TokenFileTests(DaemonTest):

    @classmethod
    def setUpClass(cls):
        fd, cls.token_path = tempfile.mkstemp(prefix="optd-token-")
        os.write(fd, b"filetoken\n")
        os.close(fd)
        cls.daemon_args = ("--token-file", cls.token_path)
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        os.unlink(cls.token_path)

    def test_token_without_newline_works(self):
        r = self.d.get("/v1/sessions", headers={"Authorization": "Bearer filetoken"})
        self.assertEqual(r.status, 200, r)

    def test_missing_or_wrong_token_is_401(self):
        self.assertError(self.d.get("/v1/sessions"), 401, "unauthorized")
        self.assertError(self.d.get("/v1/sessions", headers={"Authorization": "Bearer filetokenx"}), 401,
                         "unauthorized")
        self.assertError(self.d.get("/v1/sessions", headers={"Authorization": "Bearer secret"}), 401, "unauthorized")

    def test_ops_endpoints_stay_open(self):
        for path in ("/healthz", "/readyz", "/metrics"):
            with self.subTest(path=path):
                self.assertEqual(self.d.get(path).status, 200)


class TokenFileMissingTests(unittest.TestCase):
    """Starting with a --token-file that does not exist must not serve unauthenticated."""

    def test_missing_token_file_refuses_to_start(self):
        d = Daemon(("--token-file", "/nonexistent/optd-token"))
        try:
            with self.assertRaises(AssertionError):
                d.start(timeout=5)
            self.assertIsNotNone(d.proc.poll(), "optd serves although its token file is missing")
            self.assertNotEqual(d.proc.returncode, 0)
        finally:
            d.cleanup()
