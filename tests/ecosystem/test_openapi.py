"""http/openapi.json against API.md and the daemon: a well-formed OpenAPI 3.1
document whose every $ref resolves; every endpoint API.md names is in it;
every documented path and method is served (not 404 "no such path", not
405); the Allow header of each path lists exactly the documented methods;
plausible undocumented paths are 404; real replies validate against the
documented schemas; and GET /v1/openapi.json, once served, is the file."""

import json
import os
import re
import struct
import unittest
import uuid

from harness import REPO, DaemonCase, raw

DOC_PATH = os.path.join(REPO, "http", "openapi.json")
API_MD = os.path.join(os.path.dirname(REPO), "shared", "API.md")
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# Training features (API.md "Training features"): a daemon without them yet
# gives 404 there; the test of those is skipped rather than failed.
TRAINING_PATHS = {"/v1/sessions/{name}/history", "/"}
# Endpoints API.md names that are not served yet, each with the issue that
# serves it. They are documented in openapi.json when served, not before;
# the check below fails as soon as one is documented, so this
# list cannot go stale.
PENDING = {}
UNDOCUMENTED = [
    "/v1", "/v1/", "/v2/sessions", "/v1/session", "/v1/sessions/", "/sessions", "/health",
    "/v1/healthz", "/v1/metrics", "/v1/optimizers/adam", "/v1/optimizer", "/openapi.json",
    "/v1/sessions/{name}/steps", "/v1/sessions/{name}/param", "/v1/sessions/{name}/state/x",
    "/v1/sessions/{name}/step/1", "/v1/sessions/{name}/checkpoint", "/v1/sessions/{name}/",
    "/v1/sessions/{name}/params/", "/v1/sessions/a/b/step", "/healthz/x", "/metricsz", "/index.html",
]


def load_doc():
    with open(DOC_PATH) as f:
        return json.load(f)


def resolve(doc, node):
    seen = 0
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), ref
        node = doc
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        seen += 1
        assert seen < 20, "reference loop at %s" % ref
    return node


class SchemaError(AssertionError):
    pass


def validate(doc, schema, value, where="$"):
    """A JSON Schema check of the subset the document uses: $ref, type (and
    lists of types), const, enum, properties, required, items, min/maxItems,
    minimum/maximum (and exclusive), pattern, oneOf, additionalProperties."""
    schema = resolve(doc, schema)
    if not isinstance(schema, dict) or not schema:
        return
    if "oneOf" in schema:
        ok = 0
        errs = []
        for sub in schema["oneOf"]:
            try:
                validate(doc, sub, value, where)
                ok += 1
            except SchemaError as e:
                errs.append(str(e))
        if ok != 1:
            raise SchemaError("%s: %d of oneOf match (%s)" % (where, ok, "; ".join(errs)[:300]))
    types = schema.get("type")
    if types is not None:
        types = types if isinstance(types, list) else [types]
        checks = {
            "object": lambda v: isinstance(v, dict),
            "array": lambda v: isinstance(v, list),
            "string": lambda v: isinstance(v, str),
            "boolean": lambda v: isinstance(v, bool),
            "null": lambda v: v is None,
            "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        }
        if not any(checks[t](value) for t in types):
            raise SchemaError("%s: %r is not of type %s" % (where, value, types))
    if "const" in schema and value != schema["const"]:
        raise SchemaError("%s: %r is not %r" % (where, value, schema["const"]))
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaError("%s: %r is not one of %r" % (where, value, schema["enum"]))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise SchemaError("%s: %r < minimum %r" % (where, value, schema["minimum"]))
        if "maximum" in schema and value > schema["maximum"]:
            raise SchemaError("%s: %r > maximum %r" % (where, value, schema["maximum"]))
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            raise SchemaError("%s: %r <= exclusiveMinimum" % (where, value))
        if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
            raise SchemaError("%s: %r >= exclusiveMaximum" % (where, value))
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        raise SchemaError("%s: %r does not match %s" % (where, value, schema["pattern"]))
    if isinstance(value, dict):
        for r in schema.get("required", []):
            if r not in value:
                raise SchemaError("%s: %r is required" % (where, r))
        props = schema.get("properties", {})
        for k, v in value.items():
            if k in props:
                validate(doc, props[k], v, "%s.%s" % (where, k))
            elif "additionalProperties" in schema:
                ap = schema["additionalProperties"]
                if ap is False:
                    raise SchemaError("%s: %r is not allowed" % (where, k))
                if isinstance(ap, dict):
                    validate(doc, ap, v, "%s.%s" % (where, k))
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            raise SchemaError("%s: fewer than %d items" % (where, schema["minItems"]))
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise SchemaError("%s: more than %d items" % (where, schema["maxItems"]))
        if "items" in schema:
            for i, v in enumerate(value):
                validate(doc, schema["items"], v, "%s[%d]" % (where, i))


def operations(doc):
    for path, item in doc["paths"].items():
        for m in METHODS:
            if m in item:
                yield path, m, item[m]


class DocumentTests(unittest.TestCase):
    def setUp(self):
        self.doc = load_doc()

    def test_openapi_31_shape(self):
        d = self.doc
        self.assertRegex(d["openapi"], r"^3\.1\.\d+$")
        for k in ("title", "version"):
            self.assertIn(k, d["info"])
        self.assertIn("bearer", d["components"]["securitySchemes"])
        ids = [op["operationId"] for _, _, op in operations(d)]
        self.assertEqual(len(ids), len(set(ids)), "operationIds are unique")
        for path, m, op in operations(d):
            with self.subTest(path=path, method=m):
                self.assertTrue(path == "/" or not path.endswith("/"))
                self.assertTrue(op.get("summary") and op.get("description"))
                self.assertTrue(op["responses"])
                for code, r in op["responses"].items():
                    self.assertRegex(code, r"^[1-5]\d\d$")
                    r = resolve(d, r)
                    self.assertIn("description", r)
                    if int(code) >= 400 and m != "head":  # errors are the Error schema (a HEAD has no body)
                        self.assertEqual(r["content"]["application/json"]["schema"], {"$ref": "#/components/schemas/Error"})
                params = [resolve(d, p) for p in d["paths"][path].get("parameters", []) + op.get("parameters", [])]
                declared = {p["name"] for p in params if p["in"] == "path"}
                self.assertEqual(declared, set(re.findall(r"\{(\w+)\}", path)))
                for p in params:
                    self.assertIn(p["in"], ("path", "query", "header", "cookie"))
                    self.assertIn("schema", p)
                    if p["in"] == "path":
                        self.assertTrue(p.get("required"))
                if m in ("get", "delete", "head"):
                    self.assertNotIn("requestBody", op)

    def test_every_ref_resolves_and_every_component_is_used(self):
        refs = set()

        def walk(n):
            if isinstance(n, dict):
                if "$ref" in n:
                    refs.add(n["$ref"])
                    resolve(self.doc, n)
                for v in n.values():
                    walk(v)
            elif isinstance(n, list):
                for v in n:
                    walk(v)
        walk(self.doc)
        for kind, comps in self.doc["components"].items():
            if kind == "securitySchemes":
                continue
            for name in comps:
                self.assertIn("#/components/%s/%s" % (kind, name), refs, "unused component")

    def test_examples_validate(self):
        d = self.doc
        for name, s in d["components"]["schemas"].items():
            if "example" in s:
                with self.subTest(schema=name):
                    validate(d, s, s["example"], name)
        for path, m, op in operations(d):
            bodies = [("request", op.get("requestBody", {}).get("content", {}))]
            bodies += [(c, resolve(d, r).get("content", {})) for c, r in op["responses"].items()]
            for what, content in bodies:
                media = content.get("application/json")
                if media and "example" in media:
                    with self.subTest(path=path, method=m, what=what):
                        validate(d, media["schema"], media["example"], "%s %s %s" % (m, path, what))

    def test_api_md_endpoints_are_documented(self):
        if not os.path.exists(API_MD):
            self.skipTest("no %s" % API_MD)
        with open(API_MD) as f:
            text = f.read()
        found = set(re.findall(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`\s?]*)", text))
        self.assertGreater(len(found), 10)
        for method, path in found:
            path = re.sub(r"\.\.\.$", "", path).rstrip("/") or "/"
            with self.subTest(endpoint="%s %s" % (method, path)):
                if (method, path) in PENDING:
                    documented = method.lower() in self.doc["paths"].get(path, {})
                    self.assertFalse(documented, "%s %s is documented now: drop it from PENDING (%s)"
                                     % (method, path, PENDING[(method, path)]))
                    continue
                self.assertIn(path, self.doc["paths"])
                self.assertIn(method.lower(), self.doc["paths"][path])
        for header in ("If-Match", "Idempotency-Key", "Prefer", "Accept", "Optd-Loss"):
            self.assertIn(header, self.doc["components"]["parameters"])
        for code in ("bad_json", "bad_request", "unauthorized", "not_found", "method_not_allowed",
                     "already_exists", "step_mismatch", "too_large", "unsupported_media_type", "invalid",
                     "size_mismatch", "non_finite", "unknown_optimizer", "bad_hyperparam",
                     "idempotency_mismatch", "unavailable", "round_timeout", "unknown_field"):
            where = self.doc["components"]["responses"] if code != "method_not_allowed" else self.doc["info"]
            self.assertIn(code, json.dumps(where), code)


class RouteTests(DaemonCase):
    """The document against the routes the daemon serves."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.doc = load_doc()
        cls.port = cls.d.port
        cls.name = "probe-%s" % uuid.uuid4().hex[:8]
        st, _, body = raw(cls.port, "PUT", "/v1/sessions/" + cls.name,
                          json.dumps({"optimizer": "adam", "params": [0.5, -1.0, 2.0], "dtype": "float64"}),
                          {"Content-Type": "application/json"})
        assert st == 201, body
        st, _, _ = raw(cls.port, "POST", "/v1/sessions/%s/step" % cls.name, b'{"grad":[0.1,0.2,0.3]}',
                       {"Content-Type": "application/json"})
        assert st == 200

    def request_for(self, path, method):
        """A plausible, valid request for the documented operation."""
        name = self.name
        body, headers = None, {}
        if method == "delete" or (method == "put" and path == "/v1/sessions/{name}"):
            name = "probe-%s" % uuid.uuid4().hex[:8]
            if method == "delete":
                raw(self.port, "PUT", "/v1/sessions/" + name, b'{"optimizer":"sgd","size":1}',
                    {"Content-Type": "application/json"})
        if method in ("post", "put", "patch"):
            headers["Content-Type"] = "application/json"
            if path == "/v1/sessions":
                body = {"name": "probe-%s" % uuid.uuid4().hex[:8], "optimizer": "sgd", "size": 2}
            elif path == "/v1/sessions/{name}":
                body = {"optimizer": "sgd", "size": 2} if method == "put" else {"hyperparams": {"lr": 0.002}}
            elif path.endswith("/step"):
                body = {"grad": [0.1, -0.1, 0.2]}
            elif path == "/v1/backups":
                body = {}
            elif path.endswith("/state"):
                st, _, ck = raw(self.port, "GET", "/v1/sessions/%s/state" % self.name)
                body = json.loads(ck)
            body = json.dumps(body).encode()
        return path.replace("{name}", name), body, headers

    def test_documented_operations_are_served(self):
        self._probe(core=True)

    def test_training_feature_operations_are_served(self):
        self._probe(core=False)

    def _probe(self, core):
        missing = []
        for path, m, op in operations(self.doc):
            if (path in TRAINING_PATHS) == core:
                continue
            url, body, headers = self.request_for(path, m)
            if path == "/v1/openapi.json":
                continue  # its own test below
            st, hd, data = raw(self.port, m.upper(), url, body, headers)
            with self.subTest(path=path, method=m, status=st):
                self.assertNotEqual(st, 405, "%s %s: 405 (Allow: %s)" % (m.upper(), url, hd.get("allow")))
                if st == 404:
                    if not core:
                        missing.append("%s %s" % (m.upper(), path))
                        continue
                    self.fail("%s %s: 404 %r" % (m.upper(), url, data[:200]))
                self.assertIn(str(st), op["responses"], "%s %s answered %d, not documented" % (m.upper(), url, st))
                self.check_reply(path, m, op, st, hd, data)
        if missing:
            self.skipTest("not served yet: %s" % ", ".join(missing))

    def check_reply(self, path, m, op, st, hd, data):
        r = resolve(self.doc, op["responses"][str(st)])
        ctype = (hd.get("content-type") or "").split(";")[0].strip()
        if "content" in r and data:
            self.assertIn(ctype, r["content"], "%s %s: Content-Type %s not documented" % (m, path, ctype))
            schema = r["content"][ctype].get("schema")
            if ctype == "application/json" and schema:
                try:
                    validate(self.doc, schema, json.loads(data), "%s %s %d" % (m.upper(), path, st))
                except SchemaError as e:
                    self.fail(str(e))
        for h in r.get("headers", {}):
            if h in ("ETag", "Location"):
                self.assertIn(h.lower(), hd, "%s %s %d lacks %s" % (m.upper(), path, st, h))
                validate(self.doc, resolve(self.doc, r["headers"][h])["schema"], hd[h.lower()], h)

    def test_allow_lists_the_documented_methods(self):
        for path, item in self.doc["paths"].items():
            documented = {m.upper() for m in METHODS if m in item} - {"HEAD"}
            url = path.replace("{name}", self.name)
            st, hd, data = raw(self.port, "TRACE", url)
            with self.subTest(path=path):
                if st == 404 and path in TRAINING_PATHS | {"/v1/openapi.json"}:
                    continue
                self.assertEqual(st, 405, data[:200])
                self.assertEqual(json.loads(data)["error"]["code"], "method_not_allowed")
                allowed = {a.strip() for a in hd.get("allow", "").split(",") if a.strip()} - {"HEAD", "OPTIONS"}
                self.assertEqual(allowed, documented)

    def test_undocumented_paths_are_404(self):
        for path in UNDOCUMENTED:
            url = path.replace("{name}", self.name)
            for m in ("GET", "POST"):
                st, hd, data = raw(self.port, m, url, b"{}" if m == "POST" else None,
                                   {"Content-Type": "application/json"} if m == "POST" else {})
                with self.subTest(path=url, method=m):
                    self.assertEqual(st, 404, data[:200])
                    self.assertEqual(json.loads(data)["error"]["code"], "not_found")

    def test_error_replies_validate(self):
        cases = [
            ("GET", "/v1/sessions/nope-%s" % uuid.uuid4().hex[:6], None, {}, 404),
            ("GET", "/v1/sessions?limit=0", None, {}, 400),
            ("POST", "/v1/sessions/%s/step" % self.name, b'{"grad":[1]}', {"Content-Type": "application/json"}, 422),
            ("POST", "/v1/sessions/%s/step" % self.name, b'{"grad":[1,2,3]}',
             {"Content-Type": "application/json", "If-Match": '"0"'}, 412),
            ("POST", "/v1/sessions/%s/step" % self.name, b'x', {"Content-Type": "text/plain"}, 415),
            ("PUT", "/v1/sessions/" + self.name, b'{"optimizer":"sgd","size":1}', {"Content-Type": "application/json"}, 409),
            ("POST", "/v1/sessions", b'{', {"Content-Type": "application/json"}, 400),
        ]
        error = self.doc["components"]["schemas"]["Error"]
        for method, url, body, headers, want in cases:
            st, hd, data = raw(self.port, method, url, body, headers)
            with self.subTest(method=method, url=url):
                self.assertEqual(st, want, data[:200])
                validate(self.doc, error, json.loads(data))
        st, hd, data = raw(self.port, "POST", "/v1/sessions/%s/step" % self.name, b'{"grad":[1,2,3]}',
                           {"Content-Type": "application/json", "If-Match": '"0"'})
        self.assertIsInstance(json.loads(data)["error"].get("step"), int)

    def test_served_document_is_the_file(self):
        st, hd, data = raw(self.port, "GET", "/v1/openapi.json")
        if st == 404:
            self.skipTest("GET /v1/openapi.json is not served yet")
        self.assertEqual(st, 200)
        self.assertEqual((hd.get("content-type") or "").split(";")[0], "application/json")
        served = json.loads(data)
        if served != load_doc():
            self.fail("GET /v1/openapi.json differs from api/openapi.json (%d vs %d bytes as JSON): "
                      "a binary built before the file last changed? (make)"
                      % (len(json.dumps(served)), len(json.dumps(load_doc()))))


class ReplyValidationTests(DaemonCase):
    """Real replies of every route, successes and errors, JSON and binary,
    GET and HEAD, validated against the document: the status is documented
    for the operation, so is the Content-Type, a JSON body matches its
    schema, and the documented ETag/Location headers are there."""

    def check(self, method, template, url, body=None, headers=None, want=None):
        doc = self.doc
        st, hd, data = raw(self.port, method, url, body, headers)
        where = "%s %s -> %d" % (method, url, st)
        if want is not None:
            self.assertEqual(st, want, "%s: %r" % (where, data[:300]))
        op = doc["paths"][template].get(method.lower())
        self.assertIsNotNone(op, "%s %s is not documented" % (method, template))
        self.assertIn(str(st), op["responses"], "%s: status not documented" % where)
        resp = resolve(doc, op["responses"][str(st)])
        ctype = (hd.get("content-type") or "").split(";")[0].strip()
        if method == "HEAD":
            self.assertEqual(data, b"", where)
        elif data:
            self.assertIn("content", resp, "%s: a body, but none documented" % where)
            self.assertIn(ctype, resp["content"], "%s: Content-Type %s not documented" % (where, ctype))
            schema = resolve(doc, resp["content"][ctype].get("schema", {}))
            if ctype == "application/json":
                self.assertTrue(data.endswith(b"\n"), where)
                try:
                    validate(doc, schema, json.loads(data), where)
                except SchemaError as e:
                    self.fail(str(e))
            elif ctype == "application/octet-stream":
                self.assertEqual((schema.get("type"), schema.get("format")), ("string", "binary"), where)
        for h in resp.get("headers", {}):
            if h in ("ETag", "Location"):
                self.assertIn(h.lower(), hd, "%s lacks %s" % (where, h))
                validate(doc, resolve(doc, resp["headers"][h])["schema"], hd[h.lower()], h)
        self.assertTrue(hd.get("x-request-id"), where)
        return st, hd, data

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.doc = load_doc()
        cls.port = cls.d.port

    def test_every_route_replies_as_documented(self):
        J = {"Content-Type": "application/json"}
        B = {"Content-Type": "application/octet-stream"}
        A = {"Accept": "application/octet-stream"}
        n = "v-%s" % uuid.uuid4().hex[:8]
        S, N, ST, P, SP, H = ("/v1/sessions", "/v1/sessions/{name}", "/v1/sessions/{name}/step",
                              "/v1/sessions/{name}/params", "/v1/sessions/{name}/state", "/v1/sessions/{name}/history")
        u = lambda t, name=n: t.replace("{name}", name)  # noqa: E731
        enc = lambda o: json.dumps(o).encode()  # noqa: E731
        for path in ("/healthz", "/readyz", "/metrics", "/", "/v1/optimizers", "/v1/openapi.json", S):
            for m in ("GET", "HEAD"):
                with self.subTest(method=m, path=path):
                    self.check(m, path, path, want=200)
        self.check("GET", S, S + "?limit=0", want=400)
        self.check("GET", S, S + "?limt=5", want=400)
        self.check("GET", "/v1/optimizers", "/v1/optimizers?x=1", want=400)
        self.check("POST", S, S, enc({"name": n, "optimizer": "adam", "params": [0.5, -1.0, 2.0]}), J, 201)
        self.check("POST", S, S, enc({"name": n + "-f", "from": n, "hyperparams": {"lr": 0.1}}), J, 201)
        self.check("POST", S, S, b"{", J, 400)
        self.check("POST", S, S, enc({"name": n + "-x", "optimizer": "adam", "lr": 0.1, "size": 2}), J, 422)
        self.check("POST", S, S, enc({"name": n, "optimizer": "adam", "size": 2}), J, 409)
        self.check("POST", S, S, b"x", {"Content-Type": "text/plain"}, 415)
        self.check("POST", S, S, b"x", dict(J, **{"Content-Encoding": "gzip"}), 415)
        self.check("POST", S, S, enc({"name": n + "-y", "from": "nope-" + n}), J, 404)
        for m in ("GET", "HEAD"):
            self.check(m, N, u(N), want=200)
            self.check(m, N, u(N, "nope-" + n), want=404)
        self.check("PUT", N, u(N, n + "-p"), enc({"optimizer": "sgd", "size": 3}), J, 201)
        self.check("PUT", N, u(N, n + "-p"), enc({"optimizer": "sgd", "size": 3}), J, 409)
        self.check("PATCH", N, u(N), enc({"hyperparams": {"lr": 0.002}}), J, 200)
        self.check("PATCH", N, u(N), enc({"hyperparams": {"lr": 0.002}}), dict(J, **{"If-Match": '"7"'}), 412)
        self.check("PATCH", N, u(N), enc({"hyperparam": {"lr": 0.002}}), J, 422)
        self.check("POST", ST, u(ST), enc({"grad": [0.1, 0.2, 0.3]}), J, 200)
        self.check("POST", ST, u(ST), struct.pack("<3f", 0.1, 0.2, 0.3), dict(B, **A), 200)
        self.check("POST", ST, u(ST), enc({"grad": [0.1, 0.2, 0.3]}), dict(J, Prefer="return=minimal"), 200)
        self.check("POST", ST, u(ST), enc({"grad": [0.1]}), J, 422)
        self.check("POST", ST, u(ST), enc({"grad": [0.1, 0.2, 0.3], "los": 1}), J, 422)
        self.check("POST", ST, u(ST), enc({"grad": [0.1, 0.2, 0.3]}), dict(J, **{"If-Match": '"0"'}), 412)
        self.check("POST", ST, u(ST, "nope-" + n), enc({"grad": [0.1]}), J, 404)
        for m in ("GET", "HEAD"):
            self.check(m, P, u(P), want=200)
            self.check(m, P, u(P), headers=A, want=200)
            self.check(m, SP, u(SP), want=200)
            self.check(m, SP, u(SP), headers=A, want=200)
            self.check(m, H, u(H), want=200)
        self.check("GET", H, u(H) + "?limit=0", want=400)
        _, _, ck = self.check("GET", SP, u(SP), want=200)
        _, _, ckb = self.check("GET", SP, u(SP), headers=A, want=200)
        self.check("PUT", SP, u(SP, n + "-c"), ck, J, 201)
        self.check("PUT", SP, u(SP, n + "-c"), ckb, B, 200)
        self.check("PUT", SP, u(SP, n + "-c"), ck, dict(J, **{"If-Match": '"0"'}), 412)
        bad = json.loads(ck)
        bad["state"]["exp_avg_sq"] = [-1, 2, 3]
        self.check("PUT", SP, u(SP, n + "-d"), enc(bad), J, 422)
        self.check("PUT", SP, u(SP, n + "-d"), ckb[:-2], B, 400)
        self.check("DELETE", N, u(N), headers={"If-Match": '"0"'}, want=412)
        self.check("DELETE", N, u(N), want=204)
        self.check("DELETE", N, u(N), want=404)

    def test_sessions_with_groups_reply_as_documented(self):
        """Tensors and parameter groups, narrow binary vectors and the step
        headers: the replies of a shaped session validate too."""
        J = {"Content-Type": "application/json"}
        S, N, ST, P, SP = ("/v1/sessions", "/v1/sessions/{name}", "/v1/sessions/{name}/step",
                           "/v1/sessions/{name}/params", "/v1/sessions/{name}/state")
        n = "g-%s" % uuid.uuid4().hex[:8]
        u = lambda t, name=n: t.replace("{name}", name)  # noqa: E731
        enc = lambda o: json.dumps(o).encode()  # noqa: E731
        groups = [{"tensors": [{"name": "w", "shape": [2, 1]}]},
                  {"hyperparams": {"lr": 0.5}, "tensors": [{"name": "b", "shape": []}]}]
        self.check("POST", S, S, enc({"name": n, "optimizer": "nadam", "groups": groups}), J, 201)
        self.check("POST", S, S, enc({"name": n + "-x", "optimizer": "nadam", "groups": [{"tensors": []}]}), J, 422)
        self.check("GET", N, u(N), want=200)
        self.check("PATCH", N, u(N), enc({"groups": [{}, {"hyperparams": {"lr": 0.25}}]}), J, 200)
        self.check("POST", ST, u(ST), enc({"grad": [0.1, 0.2, 0.3], "skip": ["b"]}), J, 200)
        _, hd, _ = self.check("POST", ST, u(ST), struct.pack("<3e", 0.1, 0.2, 0.3),
                              {"Content-Type": "application/octet-stream; dtype=float16",
                               "Accept": "application/octet-stream; dtype=bfloat16", "Optd-Skip": "w"}, 200)
        self.assertEqual(hd.get("optd-lr", "").count(","), 1)
        self.check("POST", ST, u(ST), b"\0" * 6, {"Content-Type": "application/octet-stream; dtype=int8"}, 415)
        self.check("GET", P, u(P), headers={"Accept": "application/octet-stream; dtype=float16"}, want=200)
        self.check("GET", P, u(P), headers={"Accept": "application/octet-stream; dtype=float64"}, want=422)
        _, _, ck = self.check("GET", SP, u(SP), want=200)
        self.check("PUT", SP, u(SP, n + "-c"), ck, J, 201)
