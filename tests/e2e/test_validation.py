"""Request validation and HTTP-level errors: bad JSON, wrong types, bad
hyperparameters, names, media types, body limits, methods, unknown paths."""

import json
from urllib.parse import quote

from optd_e2e import DaemonTest, uniq


class ValidationTests(DaemonTest):

    def create_rejected(self, body, status, code=None, codes=None, raw=None):
        """POST /v1/sessions is rejected with status/code and creates nothing."""
        r = self.d.request("POST", "/v1/sessions", body=raw) if raw is not None else self.d.post("/v1/sessions", body)
        err = self.assertError(r, status, code, codes)
        name = body.get("name") if isinstance(body, dict) else None
        if isinstance(name, str) and name and name not in (".", ".."):
            g = self.d.get("/v1/sessions/" + quote(name, safe=""))
            self.assertNotEqual(g.status, 200, "a rejected create left session %r behind" % name)
        return err

    # -- JSON and types ---------------------------------------------------
    def test_invalid_json_is_400_bad_json(self):
        for raw in (b'{"name": "x", "optimizer": ', b'{name: "x"}', b"nope", b'{"a": 1,}', b"\xff\xfe",
                    b'{"name": "x", "optimizer": "sgd", "size": 1} trailing'):
            with self.subTest(raw=raw):
                self.create_rejected(None, 400, "bad_json", raw=raw)

    def test_empty_body_is_400(self):
        r = self.d.request("POST", "/v1/sessions", body=b"")
        self.assertError(r, 400, codes=("bad_json", "bad_request"))

    def test_wrong_json_types_are_400_bad_request(self):
        cases = [
            {"name": uniq(), "optimizer": "adam", "hyperparams": {"lr": "0.1"}, "size": 2},
            {"name": uniq(), "optimizer": "adam", "hyperparams": {"amsgrad": "yes"}, "size": 2},
            {"name": uniq(), "optimizer": "adam", "hyperparams": {"betas": 0.9}, "size": 2},
            {"name": uniq(), "optimizer": "adam", "hyperparams": [0.1], "size": 2},
            {"name": uniq(), "optimizer": "sgd", "params": "1,2,3"},
            {"name": uniq(), "optimizer": "sgd", "params": [1.0, "2.0"]},
            {"name": uniq(), "optimizer": "sgd", "size": "3"},
            {"name": 42, "optimizer": "sgd", "size": 3},
            {"name": uniq(), "optimizer": 7, "size": 3},
            {"name": uniq(), "optimizer": "sgd", "dtype": 32, "size": 3},
        ]
        for body in cases:
            with self.subTest(body=body):
                self.create_rejected(body, 400, "bad_request")
        for raw in (b"[1, 2, 3]", b'"sgd"', b"null", b"12"):
            with self.subTest(raw=raw):
                self.create_rejected(None, 400, "bad_request", raw=raw)

    def test_step_with_wrong_types_is_400_and_changes_nothing(self):
        name = uniq()
        self.d.create(name, "sgd", params=[1.0, 2.0])
        before = self.snapshot(name)
        for body in ({"grad": "1,2"}, {"grad": [1.0, "2"]}, {"grad": {"0": 1}}, {"grad": [1.0, None]},
                     {"grad": [1.0, [2.0]]}, [1.0, 2.0]):
            with self.subTest(body=body):
                r = self.d.request("POST", "/v1/sessions/%s/step" % name, json_body=body)
                self.assertError(r, 400, "bad_request")
                self.assertUnchanged(name, before)
        r = self.d.request("POST", "/v1/sessions/%s/step" % name, body=b'{"grad": [1.0, ')
        self.assertError(r, 400, "bad_json")
        self.assertUnchanged(name, before)

    def test_step_without_grad_is_rejected(self):
        name = uniq()
        self.d.create(name, "sgd", params=[1.0, 2.0])
        before = self.snapshot(name)
        r = self.d.request("POST", "/v1/sessions/%s/step" % name, json_body={"gradient": [1.0, 2.0]})
        self.assertIn(r.status, (400, 422), r)
        self.assertError(r, r.status)
        self.assertUnchanged(name, before)

    # -- meaning ----------------------------------------------------------
    def test_unknown_optimizer_is_422(self):
        self.create_rejected({"name": uniq(), "optimizer": "lbfgs", "size": 2}, 422, "unknown_optimizer")
        self.create_rejected({"name": uniq(), "optimizer": "Adam", "size": 2}, 422, "unknown_optimizer")

    def test_unknown_hyperparameter_is_422(self):
        self.create_rejected({"name": uniq(), "optimizer": "sgd", "hyperparams": {"betas": [0.9, 0.99]}, "size": 2},
                             422)
        self.create_rejected({"name": uniq(), "optimizer": "adam", "hyperparams": {"learning_rate": 0.1}, "size": 2},
                             422)

    def test_out_of_range_hyperparams_are_422_bad_hyperparam(self):
        cases = [
            ("sgd", {"lr": -0.1}),
            ("adam", {"lr": -1e-3}),
            ("adam", {"betas": [1.0, 0.999]}),
            ("adam", {"betas": [1.5, 0.999]}),
            ("adam", {"betas": [0.9, 1.0]}),
            ("adam", {"betas": [-0.1, 0.999]}),
            ("adam", {"eps": -1e-8}),
            ("adam", {"weight_decay": -0.1}),
            ("sgd", {"nesterov": True}),
            ("sgd", {"nesterov": True, "momentum": 0.9, "dampening": 0.5}),
            ("sgd", {"momentum": -0.5}),
            ("adadelta", {"rho": 1.5}),
            ("adadelta", {"rho": -0.1}),
            ("rmsprop", {"alpha": -0.1}),
            ("rmsprop", {"momentum": -0.1}),
            ("adagrad", {"lr_decay": -0.1}),
            ("adagrad", {"initial_accumulator_value": -1}),
            ("adamax", {"betas": [0.9, 1.0]}),
            ("adamw", {"betas": [1.0, 0.9]}),
            ("nadam", {"momentum_decay": -0.004}),
        ]
        for opt, hp in cases:
            with self.subTest(optimizer=opt, hyperparams=hp):
                self.create_rejected({"name": uniq(), "optimizer": opt, "hyperparams": hp, "size": 2},
                                     422, "bad_hyperparam")

    def test_boundary_hyperparams_torch_accepts_are_201(self):
        for opt, hp in (("adadelta", {"rho": 1.0}), ("adadelta", {"rho": 0.0}), ("adam", {"betas": [0.0, 0.0]}),
                        ("sgd", {"lr": 0.0}), ("adam", {"eps": 0.0}), ("nag", {"momentum": 0.5})):
            with self.subTest(optimizer=opt, hyperparams=hp):
                s = self.d.create(uniq(), opt, hyperparams=hp, size=1)
                for k, v in hp.items():
                    self.assertSame(s["hyperparams"][k], v)

    def test_params_and_size_together_is_422(self):
        self.create_rejected({"name": uniq(), "optimizer": "sgd", "params": [1.0, 2.0], "size": 2}, 422)

    def test_neither_params_nor_size_is_rejected(self):
        r = self.d.post("/v1/sessions", {"name": uniq(), "optimizer": "sgd"})
        self.assertIn(r.status, (400, 422), r)
        self.assertError(r, r.status)

    def test_bad_size_and_dtype_are_422(self):
        self.create_rejected({"name": uniq(), "optimizer": "sgd", "size": -3}, 422)
        self.create_rejected({"name": uniq(), "optimizer": "sgd", "size": 2, "dtype": "float16"}, 422)
        self.create_rejected({"name": uniq(), "optimizer": "sgd", "params": [1.0, 1e39], "dtype": "float32"}, 422,
                             codes=("non_finite", "invalid"))
        self.create_rejected({"name": uniq(), "optimizer": "sgd", "size": 2, "fill": 1e39}, 422,
                             codes=("non_finite", "invalid"))

    # -- names ------------------------------------------------------------
    def test_name_of_128_chars_is_fine_129_is_422(self):
        ok = "a" + "b" * 127
        s = self.d.create(ok, "sgd", size=1)
        self.assertEqual(s["name"], ok)
        self.assertEqual(self.d.session(ok)["name"], ok)
        self.create_rejected({"name": "a" * 129, "optimizer": "sgd", "size": 1}, 422)
        self.assertError(self.d.get("/v1/sessions/" + "a" * 129), 404, "not_found")

    def test_names_with_all_allowed_characters(self):
        for n in ("A", "0", "a.b_c-d", "x..", "Z-_.9"):
            with self.subTest(name=n):
                self.assertEqual(self.d.create(n + uniq(""), "sgd", size=1)["step"], 0)

    def test_invalid_names_are_422_on_create(self):
        for n in ("", "..", ".", ".hidden", "-a", "_a", "a/b", "a b", "a\0b", "\u00e9t\u00e9", "a%00", "a?b", "a:b"):
            with self.subTest(name=n):
                self.create_rejected({"name": n, "optimizer": "sgd", "size": 1}, 422)

    def test_invalid_names_are_404_on_access(self):
        for path in ("/v1/sessions/..", "/v1/sessions/%00", "/v1/sessions/a%00", "/v1/sessions/.hidden",
                     "/v1/sessions/-a", "/v1/sessions/" + "a" * 129, "/v1/sessions/a%20b"):
            with self.subTest(path=path):
                self.assertError(self.d.get(path), 404, "not_found")

    def test_invalid_names_on_put_create_nothing(self):
        for n in (".hidden", "-a", "a%20b", "a" * 129):
            with self.subTest(name=n):
                r = self.d.request("PUT", "/v1/sessions/" + n, json_body={"optimizer": "sgd", "size": 1})
                self.assertIn(r.status, (404, 422), r)
                self.assertError(r, r.status)
                self.assertError(self.d.get("/v1/sessions/" + n), 404, "not_found")

    # -- media types, methods, paths ---------------------------------------
    def test_text_plain_is_415(self):
        body = json.dumps({"name": uniq(), "optimizer": "sgd", "size": 1})
        r = self.d.request("POST", "/v1/sessions", body=body, headers={"Content-Type": "text/plain"})
        self.assertError(r, 415, "unsupported_media_type")
        self.assertError(self.d.get("/v1/sessions/" + json.loads(body)["name"]), 404)
        name = uniq()
        self.d.create(name, "sgd", params=[1.0])
        before = self.snapshot(name)
        r = self.d.request("POST", "/v1/sessions/%s/step" % name, body='{"grad": [1.0]}',
                           headers={"Content-Type": "text/plain"})
        self.assertError(r, 415, "unsupported_media_type")
        r = self.d.request("POST", "/v1/sessions/%s/step" % name, body='{"grad": [1.0]}',
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
        self.assertError(r, 415, "unsupported_media_type")
        self.assertUnchanged(name, before)

    def test_json_with_charset_parameter_is_accepted(self):
        body = json.dumps({"name": uniq(), "optimizer": "sgd", "size": 1})
        r = self.d.request("POST", "/v1/sessions", body=body, headers={"Content-Type": "application/json; charset=utf-8"})
        self.assertEqual(r.status, 201, r)

    def test_wrong_method_is_405_with_allow(self):
        name = uniq()
        self.d.create(name, "sgd", params=[1.0])
        cases = [("DELETE", "/v1/sessions", {"GET", "POST"}),
                 ("PATCH", "/v1/sessions", {"GET", "POST"}),
                 ("POST", "/v1/sessions/" + name, {"GET", "PUT", "PATCH", "DELETE"}),
                 ("GET", "/v1/sessions/%s/step" % name, {"POST"}),
                 ("DELETE", "/v1/sessions/%s/params" % name, {"GET"}),
                 ("POST", "/v1/sessions/%s/state" % name, {"GET", "PUT"}),
                 ("POST", "/healthz", {"GET"}),
                 ("DELETE", "/v1/optimizers", {"GET"})]
        for method, path, allow in cases:
            with self.subTest(method=method, path=path):
                r = self.d.request(method, path, json_body={} if method in ("POST", "PATCH") else None)
                self.assertError(r, 405, "method_not_allowed")
                hdr = r.header("Allow")
                self.assertIsNotNone(hdr, "405 without Allow: %r" % r)
                got = {m.strip().upper() for m in hdr.split(",") if m.strip()}
                self.assertTrue(allow <= got, "Allow %r lacks some of %r" % (hdr, allow))
                self.assertNotIn(method, got, "Allow %r names the refused method" % hdr)
        self.assertEqual(self.d.params(name)["step"], 0)

    def test_unknown_path_is_404_json(self):
        for method, path in (("GET", "/v1/nope"), ("GET", "/v2/sessions"), ("GET", "/v1/sessions/x/y/z"),
                             ("GET", "/v1/sessions/%s/unknown" % uniq()), ("POST", "/v1"), ("GET", "/nope")):
            with self.subTest(method=method, path=path):
                self.assertError(self.d.request(method, path), 404, "not_found")

    def test_error_message_is_a_sentence_not_a_code(self):
        err = self.assertError(self.d.get("/v1/sessions/" + uniq()), 404, "not_found")
        self.assertNotEqual(err["message"], err["code"])
        self.assertIn(" ", err["message"].strip())


class BodyLimitTests(DaemonTest):
    daemon_args = ("--max-body", "1000")

    def test_body_under_limit_is_fine(self):
        body = {"name": uniq(), "optimizer": "sgd", "params": [0.25] * 100}
        self.assertLess(len(json.dumps(body)), 1000)
        self.assertEqual(self.d.post("/v1/sessions", body).status, 201)

    def test_body_over_limit_is_413(self):
        name = uniq()
        body = {"name": name, "optimizer": "sgd", "params": [0.123456789] * 400}
        self.assertGreater(len(json.dumps(body)), 1000)
        self.assertError(self.d.post("/v1/sessions", body), 413, "too_large")
        self.assertError(self.d.get("/v1/sessions/" + name), 404)

    def test_step_over_limit_is_413_and_changes_nothing(self):
        name = uniq()
        self.d.create(name, "sgd", size=300)
        before = self.snapshot(name)
        r = self.d.request("POST", "/v1/sessions/%s/step" % name, json_body={"grad": [0.125] * 300})
        self.assertError(r, 413, "too_large")
        r = self.d.request("POST", "/v1/sessions/%s/step" % name, body=b"\0" * 1200,
                           headers={"Content-Type": "application/octet-stream"})
        self.assertError(r, 413, "too_large")
        self.assertUnchanged(name, before)

    def assertRawCreateIs413(self, name, framing, body):
        """A POST /v1/sessions sent raw with the framing header line and body
        is answered 413 too_large, and name was not created."""
        req = (b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               + framing + b"\r\n\r\n" + body)
        status, hdrs, reply = self.d.raw(req, timeout=5)
        self.assertEqual(status, 413, reply)
        self.assertEqual(json.loads(reply)["error"]["code"], "too_large")
        self.assertError(self.d.get("/v1/sessions/" + name), 404)

    def test_lying_content_length_is_413_without_waiting_for_body(self):
        name = uniq()
        small = json.dumps({"name": name, "optimizer": "sgd", "size": 1}).encode()
        self.assertRawCreateIs413(name, b"Content-Length: 1000000000", small)

    def test_chunked_body_over_limit_is_413(self):
        name = uniq()
        payload = json.dumps({"name": name, "optimizer": "sgd", "params": [0.123456789] * 400}).encode()
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(payload[i:i + 500]), payload[i:i + 500])
                          for i in range(0, len(payload), 500)) + b"0\r\n\r\n"
        self.assertRawCreateIs413(name, b"Transfer-Encoding: chunked", chunks)

    def test_daemon_still_serves_after_413s(self):
        self.assertEqual(self.d.get("/healthz").status, 200)
        self.assertEqual(self.d.get("/v1/sessions").status, 200)
