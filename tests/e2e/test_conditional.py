"""If-Match on PATCH, DELETE and PUT .../state (API.md Sessions): exactly as
on a step, 412 step_mismatch with the current step, and nothing changes."""

from optd_e2e import DaemonTest, uniq


class ConditionalWriteTests(DaemonTest):

    def make(self, steps=2):
        name = uniq()
        self.d.create(name, "adam", params=[1.0, 2.0])
        for _ in range(steps):
            self.d.step(name, [0.1, 0.2])
        return name

    def mismatch(self, r, step):
        err = self.assertError(r, 412, "step_mismatch")
        self.assertEqual(err.get("step"), step, r)

    def test_delete_with_a_stale_step_is_412_and_keeps_the_session(self):
        name = self.make()
        before = self.snapshot(name)
        for tag in ('"0"', '"1"', 'W/"3"', "7"):
            with self.subTest(tag=tag):
                self.mismatch(self.d.request("DELETE", "/v1/sessions/" + name, headers={"If-Match": tag}), 2)
                self.assertUnchanged(name, before)
        r = self.d.request("DELETE", "/v1/sessions/" + name, headers={"If-Match": '"2"'})
        self.assertEqual(r.status, 204, r)
        self.assertError(self.d.get("/v1/sessions/" + name), 404)

    def test_patch_with_a_stale_step_is_412_and_changes_nothing(self):
        name = self.make()
        before = self.snapshot(name)
        r = self.d.request("PATCH", "/v1/sessions/" + name, json_body={"hyperparams": {"lr": 0.5}},
                           headers={"If-Match": '"1"'})
        self.mismatch(r, 2)
        self.assertUnchanged(name, before)
        r = self.d.request("PATCH", "/v1/sessions/" + name, json_body={"hyperparams": {"lr": 0.5}},
                           headers={"If-Match": '"2"'})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json["hyperparams"]["lr"], 0.5)
        self.assertEqual(r.header("ETag"), '"2"')

    def test_put_state_with_a_stale_step_is_412_and_changes_nothing(self):
        src, dst = self.make(3), self.make(2)
        ck = self.d.get("/v1/sessions/%s/state" % src).json
        before = self.snapshot(dst)
        r = self.d.request("PUT", "/v1/sessions/%s/state" % dst, json_body=ck, headers={"If-Match": '"0"'})
        self.mismatch(r, 2)
        self.assertUnchanged(dst, before)
        r = self.d.request("PUT", "/v1/sessions/%s/state" % dst, json_body=ck, headers={"If-Match": '"2"'})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.d.session(dst)["step"], 3)
        # a condition on a session that does not exist cannot hold: nothing is created
        ghost = uniq()
        r = self.d.request("PUT", "/v1/sessions/%s/state" % ghost, json_body=ck, headers={"If-Match": '"3"'})
        self.assertIn(r.status, (404, 412), r)
        self.assertError(self.d.get("/v1/sessions/" + ghost), 404)

    def test_malformed_if_match_is_400(self):
        name = self.make()
        before = self.snapshot(name)
        for method, body in (("DELETE", None), ("PATCH", {"hyperparams": {"lr": 0.5}})):
            with self.subTest(method=method):
                r = self.d.request(method, "/v1/sessions/" + name, json_body=body, headers={"If-Match": "abc"})
                self.assertError(r, 400, "bad_request")
                self.assertUnchanged(name, before)

    def test_star_and_absent_if_match_are_unconditional(self):
        name = self.make()
        r = self.d.request("PATCH", "/v1/sessions/" + name, json_body={"hyperparams": {"lr": 0.2}},
                           headers={"If-Match": "*"})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.d.request("DELETE", "/v1/sessions/" + name).status, 204)
