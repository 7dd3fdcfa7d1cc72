"""Sessions: create (POST and PUT), read, list, patch, delete."""

import threading

from optd_e2e import DEFAULTS, RFC3339, DaemonTest, uniq


class SessionTests(DaemonTest):

    def test_post_create_with_params_replies_201_location_and_session(self):
        name = uniq("run")
        body = {"name": name, "optimizer": "adam", "hyperparams": {"lr": 0.01}, "dtype": "float32",
                "params": [0.5, -1.25, 3.0]}
        r = self.d.post("/v1/sessions", body)
        self.assertEqual(r.status, 201, r)
        self.assertEqual(r.content_type, "application/json", r)
        self.assertEqual(r.header("Location"), "/v1/sessions/" + name, r)
        s = r.json
        self.assertEqual(s["name"], name)
        self.assertEqual(s["optimizer"], "adam")
        self.assertEqual(s["dtype"], "float32")
        self.assertSame(s["size"], 3)
        self.assertSame(s["step"], 0)
        self.assertIsInstance(s["step"], int)
        for k, v in dict(DEFAULTS["adam"], lr=0.01).items():
            self.assertIn(k, s["hyperparams"], "hyperparams not listed in full: %r" % s)
            self.assertSame(s["hyperparams"][k], v, k)
        for k in ("created_at", "updated_at"):
            self.assertRegex(s[k], RFC3339, "%s is not RFC 3339: %r" % (k, s))
        p = self.d.params(name)
        self.assertEqual(p["params"], [0.5, -1.25, 3.0])
        self.assertSame(p["step"], 0)

    def test_get_session_matches_create_and_has_etag_zero(self):
        name = uniq()
        created = self.d.create(name, "adam", hyperparams={"lr": 0.01}, params=[1.0, 2.0])
        r = self.d.get("/v1/sessions/" + name)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.content_type, "application/json", r)
        self.assertEqual(r.header("ETag"), '"0"', r)
        s = r.json
        for k in ("name", "optimizer", "dtype", "size", "step", "hyperparams", "created_at"):
            self.assertIn(k, s)
            self.assertSame(s[k], created[k], k)
        self.assertSame(s["size"], 2)

    def test_create_with_size_and_fill(self):
        name = uniq()
        s = self.d.create(name, "sgd", size=5, fill=2.5, dtype="float64")
        self.assertSame(s["size"], 5)
        self.assertEqual(s["dtype"], "float64")
        self.assertEqual(self.d.params(name)["params"], [2.5] * 5)

    def test_create_with_size_fill_defaults_to_zero(self):
        name = uniq()
        s = self.d.create(name, "sgd", size=4)
        self.assertSame(s["size"], 4)
        self.assertEqual(self.d.params(name)["params"], [0, 0, 0, 0])

    def test_dtype_defaults_to_float32(self):
        s = self.d.create(None, "sgd", params=[1.0])
        self.assertEqual(s["dtype"], "float32")
        self.assertEqual(self.d.session(s["name"])["dtype"], "float32")

    def test_hyperparams_listed_in_full_with_defaults_for_every_optimizer(self):
        for opt, defaults in DEFAULTS.items():
            with self.subTest(optimizer=opt):
                name = uniq(opt)
                s = self.d.create(name, opt, size=2)
                self.assertEqual(s["optimizer"], opt)
                for src, hp in (("create reply", s["hyperparams"]), ("GET", self.d.session(name)["hyperparams"])):
                    for k, v in defaults.items():
                        self.assertIn(k, hp, "%s: %s lacks default %s: %r" % (opt, src, k, hp))
                        self.assertSame(hp[k], v, "%s: %s default %s" % (opt, src, k))

    def test_given_hyperparams_override_only_themselves(self):
        name = uniq()
        s = self.d.create(name, "rmsprop", size=1, hyperparams={"alpha": 0.5, "centered": True})
        want = dict(DEFAULTS["rmsprop"], alpha=0.5, centered=True)
        for k, v in want.items():
            self.assertSame(s["hyperparams"][k], v, k)

    def test_put_creates_by_name_then_409(self):
        name = uniq("put")
        r = self.d.request("PUT", "/v1/sessions/" + name, json_body={"optimizer": "adam", "size": 3})
        self.assertEqual(r.status, 201, r)
        self.assertEqual(r.header("Location"), "/v1/sessions/" + name, r)
        self.assertEqual(r.json["name"], name)
        self.assertSame(r.json["size"], 3)
        self.assertEqual(r.json["optimizer"], "adam")
        self.assertEqual(self.d.session(name)["optimizer"], "adam")
        r = self.d.request("PUT", "/v1/sessions/" + name, json_body={"optimizer": "sgd", "size": 7})
        self.assertError(r, 409, "already_exists")
        s = self.d.session(name)
        self.assertEqual(s["optimizer"], "adam", "a 409 PUT changed the session")
        self.assertSame(s["size"], 3)

    def test_put_with_equal_body_name_creates(self):
        name = uniq("put")
        r = self.d.request("PUT", "/v1/sessions/" + name, json_body={"name": name, "optimizer": "sgd", "size": 1})
        self.assertEqual(r.status, 201, r)
        self.assertEqual(r.header("Location"), "/v1/sessions/" + name, r)

    def test_put_with_mismatched_body_name_is_422_and_creates_nothing(self):
        name, other = uniq("put"), uniq("other")
        r = self.d.request("PUT", "/v1/sessions/" + name, json_body={"name": other, "optimizer": "sgd", "size": 1})
        self.assertError(r, 422)
        self.assertError(self.d.get("/v1/sessions/" + name), 404, "not_found")
        self.assertError(self.d.get("/v1/sessions/" + other), 404, "not_found")

    def test_unknown_session_is_404_not_found(self):
        name = uniq("nope")
        for method, path, body in (("GET", "/v1/sessions/" + name, None),
                                   ("GET", "/v1/sessions/%s/params" % name, None),
                                   ("GET", "/v1/sessions/%s/state" % name, None),
                                   ("POST", "/v1/sessions/%s/step" % name, {"grad": [1.0]}),
                                   ("PATCH", "/v1/sessions/" + name, {"hyperparams": {"lr": 0.1}}),
                                   ("DELETE", "/v1/sessions/" + name, None)):
            with self.subTest(method=method, path=path):
                r = self.d.request(method, path, json_body=body)
                self.assertError(r, 404, "not_found")
        self.assertError(self.d.get("/v1/sessions/" + name), 404, "not_found")

    def test_duplicate_post_is_409_and_leaves_original(self):
        name = uniq("dup")
        self.d.create(name, "adam", params=[1.0, 2.0])
        r = self.d.post("/v1/sessions", {"name": name, "optimizer": "sgd", "params": [5.0]})
        self.assertError(r, 409, "already_exists")
        s = self.d.session(name)
        self.assertEqual(s["optimizer"], "adam")
        self.assertEqual(self.d.params(name)["params"], [1.0, 2.0])

    def test_patch_merges_hyperparams(self):
        name = uniq()
        self.d.create(name, "adam", hyperparams={"lr": 0.01, "eps": 1e-6}, params=[1.0])
        r = self.d.request("PATCH", "/v1/sessions/" + name, json_body={"hyperparams": {"lr": 0.0005}})
        self.assertEqual(r.status, 200, r)
        want = dict(DEFAULTS["adam"], lr=0.0005, eps=1e-6)
        for src, hp in (("PATCH reply", r.json["hyperparams"]), ("GET", self.d.session(name)["hyperparams"])):
            for k, v in want.items():
                self.assertSame(hp[k], v, "%s %s" % (src, k))
        self.assertEqual(r.json["name"], name)
        self.assertEqual(r.json["optimizer"], "adam")
        self.assertEqual(self.d.params(name)["params"], [1.0], "PATCH changed params")

    def test_patch_with_bad_value_is_422_and_changes_nothing(self):
        name = uniq()
        self.d.create(name, "adam", hyperparams={"lr": 0.01}, params=[1.0])
        before = self.snapshot(name)
        r = self.d.request("PATCH", "/v1/sessions/" + name, json_body={"hyperparams": {"lr": -1}})
        self.assertError(r, 422, "bad_hyperparam")
        self.assertUnchanged(name, before)
        # one good and one bad value together: all or nothing
        r = self.d.request("PATCH", "/v1/sessions/" + name,
                           json_body={"hyperparams": {"lr": 0.5, "betas": [1.5, 0.999]}})
        self.assertError(r, 422, "bad_hyperparam")
        self.assertUnchanged(name, before)
        self.assertSame(self.d.session(name)["hyperparams"]["lr"], 0.01)

    def test_patch_unknown_hyperparam_is_422(self):
        name = uniq()
        self.d.create(name, "sgd", params=[1.0])
        before = self.snapshot(name)
        r = self.d.request("PATCH", "/v1/sessions/" + name, json_body={"hyperparams": {"lr": 0.5, "betas": [0.9, 0.9]}})
        self.assertError(r, 422)
        self.assertUnchanged(name, before)

    def test_patch_cannot_change_optimizer_dtype_or_size(self):
        name = uniq()
        self.d.create(name, "adam", params=[1.0, 2.0])
        before = self.snapshot(name)
        for change in ({"optimizer": "sgd"}, {"dtype": "float64"}, {"size": 5}):
            with self.subTest(change=change):
                r = self.d.request("PATCH", "/v1/sessions/" + name, json_body=change)
                self.assertIn(r.status, (400, 409, 422), "PATCH %r: %r" % (change, r))
                self.assertError(r, r.status)
                s = self.d.session(name)
                self.assertEqual((s["optimizer"], s["dtype"], s["size"]), ("adam", "float32", 2))
                self.assertUnchanged(name, before)

    def test_patch_invalid_json_is_400(self):
        name = uniq()
        self.d.create(name, "sgd", params=[1.0])
        r = self.d.request("PATCH", "/v1/sessions/" + name, body=b'{"hyperparams": {"lr": ')
        self.assertError(r, 400, "bad_json")

    def test_delete_is_204_then_404(self):
        name = uniq("del")
        self.d.create(name, "adam", params=[1.0, 2.0])
        self.d.step(name, [0.5, 0.5])
        r = self.d.request("DELETE", "/v1/sessions/" + name)
        self.assertEqual(r.status, 204, r)
        self.assertEqual(r.body, b"", "204 with a body")
        self.assertError(self.d.get("/v1/sessions/" + name), 404, "not_found")
        self.assertError(self.d.get("/v1/sessions/%s/params" % name), 404, "not_found")
        self.assertError(self.d.get("/v1/sessions/%s/state" % name), 404, "not_found")
        self.assertError(self.d.request("DELETE", "/v1/sessions/" + name), 404, "not_found")
        # the name is free again, and nothing of the old state is left
        s = self.d.create(name, "adam", params=[7.0])
        self.assertSame(s["step"], 0)
        self.assertSame(s["size"], 1)
        self.assertEqual(self.d.params(name)["params"], [7.0])
        st = self.d.get("/v1/sessions/%s/state" % name).json
        for buf in st.get("state", {}).values():
            if isinstance(buf, list):
                self.assertTrue(all(x == 0 for x in buf), "state survived DELETE: %r" % st)

    def test_concurrent_creates_of_one_name_exactly_one_wins(self):
        name = uniq("race")
        n = 20
        barrier = threading.Barrier(n)
        results = [None] * n

        def worker(i):
            c = self.d.conn()
            c.connect()
            barrier.wait()
            try:
                results[i] = self.d.request("POST", "/v1/sessions", conn=c,
                                            json_body={"name": name, "optimizer": "sgd", "params": [float(i)]})
            except Exception as e:  # noqa: BLE001
                results[i] = e
            finally:
                c.close()

        ts = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        statuses = [getattr(r, "status", r) for r in results]
        self.assertEqual(statuses.count(201), 1, statuses)
        self.assertEqual(statuses.count(409), n - 1, statuses)
        winner = results[statuses.index(201)]
        for r in results:
            if r.status == 409:
                self.assertError(r, 409, "already_exists")
        i = results.index(winner)
        self.assertEqual(self.d.params(name)["params"], [float(i)], "the stored session is not the winner's")


class ListTests(DaemonTest):
    """Listing, on a daemon of its own so that the set of names is known."""

    NAMES = ["a-1", "a.2", "a10", "a9", "a_3", "B-1", "Z9", "0x", "b", "A"]

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        if cls.start_error is None:
            try:
                for n in cls.NAMES:
                    cls.d.create(n, "sgd", size=1)
            except Exception as e:  # noqa: BLE001
                cls.start_error = e

    def _all(self, limit):
        pages, after = [], None
        for _ in range(100):
            q = "/v1/sessions?limit=%d" % limit + ("&after=" + after if after else "")
            r = self.d.get(q)
            self.assertEqual(r.status, 200, r)
            body = r.json
            self.assertIn("sessions", body)
            self.assertIn("next", body, "list reply lacks next: %r" % body)
            pages.append(body)
            if body["next"] is None:
                return pages
            after = body["next"]
        self.fail("pagination did not end")

    def test_list_in_byte_order_with_limit_and_next(self):
        want = sorted(self.NAMES, key=lambda s: s.encode())
        pages = self._all(3)
        got = [s["name"] for p in pages for s in p["sessions"]]
        self.assertEqual(got, want)
        self.assertEqual([len(p["sessions"]) for p in pages], [3, 3, 3, 1])
        for p in pages[:-1]:
            self.assertEqual(p["next"], p["sessions"][-1]["name"], "next is not the last name of the page")
        self.assertIsNone(pages[-1]["next"])

    def test_list_items_are_full_sessions(self):
        r = self.d.get("/v1/sessions?limit=1")
        self.assertEqual(r.status, 200, r)
        s = r.json["sessions"][0]
        for k in ("name", "optimizer", "dtype", "size", "step", "hyperparams"):
            self.assertIn(k, s)
        for k, v in DEFAULTS["sgd"].items():
            self.assertSame(s["hyperparams"][k], v)

    def test_list_default_is_everything_when_small(self):
        r = self.d.get("/v1/sessions")
        self.assertEqual(r.status, 200, r)
        self.assertEqual([s["name"] for s in r.json["sessions"]], sorted(self.NAMES, key=lambda s: s.encode()))
        self.assertIsNone(r.json["next"])

    def test_after_is_exclusive_and_need_not_exist(self):
        want = sorted(self.NAMES, key=lambda s: s.encode())
        r = self.d.get("/v1/sessions?after=a-1&limit=1000")
        self.assertEqual(r.status, 200, r)
        self.assertEqual([s["name"] for s in r.json["sessions"]], want[want.index("a-1") + 1:])
        r = self.d.get("/v1/sessions?after=a0&limit=1000")  # not a session: names after it in byte order
        self.assertEqual(r.status, 200, r)
        self.assertEqual([s["name"] for s in r.json["sessions"]], [n for n in want if n.encode() > b"a0"])
        r = self.d.get("/v1/sessions?after=zzz")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json["sessions"], [])
        self.assertIsNone(r.json["next"])

    def test_limit_bounds(self):
        r = self.d.get("/v1/sessions?limit=1000")
        self.assertEqual(r.status, 200, r)
        r = self.d.get("/v1/sessions?limit=1")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(len(r.json["sessions"]), 1)
        for bad in ("1001", "0", "-1", "abc", "", "1.5", "10x", "99999999999999999999999"):
            with self.subTest(limit=bad):
                self.assertError(self.d.get("/v1/sessions?limit=" + bad), 400, "bad_request")


class ListDefaultLimitTests(DaemonTest):

    def test_default_limit_is_100(self):
        c = self.d.conn()
        names = ["s%04d" % i for i in range(105)]
        for n in names:
            r = self.d.request("POST", "/v1/sessions", json_body={"name": n, "optimizer": "sgd", "size": 1}, conn=c)
            self.assertEqual(r.status, 201, r)
        c.close()
        r = self.d.get("/v1/sessions")
        self.assertEqual(r.status, 200, r)
        self.assertEqual([s["name"] for s in r.json["sessions"]], names[:100])
        self.assertEqual(r.json["next"], "s0099")
        r = self.d.get("/v1/sessions?after=s0099")
        self.assertEqual([s["name"] for s in r.json["sessions"]], names[100:])
        self.assertIsNone(r.json["next"])

