"""Steps: exact arithmetic, ETag, rejection, If-Match, Idempotency-Key,
Prefer: return=minimal, binary vectors and exact number printing."""

import random
import re
import struct

from optd_e2e import DaemonTest, f32, pack, unpack, uniq

OCTET = "application/octet-stream"


class StepTests(DaemonTest):

    def step_path(self, name):
        return "/v1/sessions/%s/step" % name

    # -- arithmetic -------------------------------------------------------
    def test_sgd_float64_step_is_exact(self):
        # lr and grads are powers of two times small integers: lr*g is exact,
        # so p - lr*g has one rounding whatever the evaluation order (FMA or not).
        name = uniq()
        p = [0.5, -1.25, 3.0, 0.1, 1.0 / 3.0]
        lr = 0.25
        self.d.create(name, "sgd", dtype="float64", hyperparams={"lr": lr}, params=p)
        for k, g in enumerate(([0.5, 0.25, -3.0, 1.0, 2.0], [1.5, -0.125, 4.0, 0.0625, -8.0],
                               [0.0, 0.0, 0.0, 0.0, 0.0]), start=1):
            r = self.d.step(name, g)
            p = [pi - lr * gi for pi, gi in zip(p, g)]
            self.assertEqual(r.json["step"], k)
            self.assertEqual(r.json["params"], p, "step %d" % k)
            self.assertEqual(r.header("ETag"), '"%d"' % k)
        got = self.d.params(name)
        self.assertEqual((got["step"], got["params"]), (3, p))

    def test_sgd_float64_general_values_within_1e12(self):
        name = uniq()
        rnd = random.Random(7)
        p = [rnd.uniform(-10, 10) for _ in range(16)]
        lr = 0.1
        self.d.create(name, "sgd", dtype="float64", hyperparams={"lr": lr}, params=p)
        for _ in range(5):
            g = [rnd.uniform(-3, 3) for _ in range(16)]
            got = self.d.step(name, g).json["params"]
            p = [pi - lr * gi for pi, gi in zip(p, g)]
            for a, b in zip(got, p):
                self.assertLessEqual(abs(a - b), 1e-12 * max(abs(b), 1e-300), (a, b))
            p = got

    def test_sgd_float32_step_is_exact_for_exact_values(self):
        name = uniq()
        self.d.create(name, "sgd", hyperparams={"lr": 0.5}, params=[1.0, 2.0, -3.0, 0.5])
        r = self.d.step(name, [1.0, 2.0, 0.25, -1.0])
        self.assertEqual((r.json["step"], r.json["params"]), (1, [0.5, 1.0, -3.125, 1.0]))

    def test_float32_replies_read_back_as_the_same_float32(self):
        # Values with 9 significant digits: printing with fewer loses them.
        name = uniq()
        rnd = random.Random(3)
        init = [f32(rnd.uniform(-100, 100)) for _ in range(64)] + [f32(1e-30), f32(3.0e38), f32(1.401298464e-45)]
        n = len(init)
        self.d.create(name, "sgd", hyperparams={"lr": 0.001}, params=init)
        r = self.d.get("/v1/sessions/%s/params" % name, headers={"Accept": OCTET})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(unpack("float32", r.body), init, "binary params differ from the float32 values created")
        js = self.d.params(name)["params"]
        self.assertEqual([f32(v) for v in js], init, "JSON float32 params do not read back as the same float32")
        g = [f32(rnd.uniform(-1, 1)) for _ in range(n)]
        rj = self.d.step(name, g).json["params"]
        rb = unpack("float32", self.d.get("/v1/sessions/%s/params" % name, headers={"Accept": OCTET}).body)
        self.assertEqual([f32(v) for v in rj], rb, "step reply does not read back as the stored float32s")
        for a, b, gg in zip(rb, init, g):
            want = f32(b - f32(0.001) * gg)
            self.assertLessEqual(abs(a - want), 1e-6 * max(abs(want), 1e-30) + 1e-45, (a, want))

    def test_float64_values_round_trip_exactly(self):
        name = uniq()
        vals = [0.1, 1.0 / 3.0, -2.5e-300, 1e300, 5e-324, 1.7976931348623157e308, -0.0, 123456789.12345678,
                2.0 ** -1074 * 3]
        self.d.create(name, "sgd", dtype="float64", params=vals)
        js = self.d.params(name)["params"]
        self.assertEqual(js, vals)
        r = self.d.get("/v1/sessions/%s/params" % name, headers={"Accept": OCTET})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.body, pack("float64", vals))

    def test_step_increments_and_etag_follows(self):
        name = uniq()
        self.d.create(name, "adam", params=[1.0, 2.0])
        for k in range(1, 4):
            r = self.d.step(name, [0.1, -0.1])
            self.assertEqual(r.content_type, "application/json", r)
            self.assertSame(r.json["step"], k)
            self.assertEqual(len(r.json["params"]), 2)
            self.assertEqual(r.header("ETag"), '"%d"' % k, r)
        r = self.d.get("/v1/sessions/" + name)
        self.assertEqual(r.header("ETag"), '"3"', r)
        self.assertSame(r.json["step"], 3)
        self.assertEqual(self.d.params(name)["step"], 3)

    # -- rejection --------------------------------------------------------
    def test_wrong_length_is_422_size_mismatch_and_changes_nothing(self):
        name = uniq()
        self.d.create(name, "sgd", params=[1.0, 2.0, 3.0])
        self.d.step(name, [1.0, 1.0, 1.0])
        before = self.snapshot(name)
        for g in ([1.0, 1.0], [1.0] * 4, []):
            with self.subTest(grad=g):
                self.assertError(self.d.step(name, g, expect=None), 422, "size_mismatch")
                self.assertUnchanged(name, before)

    def test_non_finite_grads_are_422_and_change_nothing(self):
        s32, s64 = uniq(), uniq()
        self.d.create(s32, "sgd", params=[1.0, 2.0, 3.0])
        self.d.create(s64, "sgd", dtype="float64", params=[1.0, 2.0, 3.0])
        b32, b64 = self.snapshot(s32), self.snapshot(s64)
        for g in ([1e39, 0, 0], [0, -1e39, 0], [0, 0, 3.5e38]):
            with self.subTest(grad=g):
                self.assertError(self.d.step(s32, g, expect=None), 422, "non_finite")
                self.assertUnchanged(s32, b32)
        # 1e39 is finite as a float64
        self.d.step(s64, [1e39, 0, 0])
        b64 = self.snapshot(s64)
        for raw in (b'{"grad": [1e309, 0, 0]}', b'{"grad": [0, -1e309, 0]}'):
            for name, before in ((s32, b32), (s64, b64)):
                with self.subTest(raw=raw, session=name):
                    r = self.d.request("POST", self.step_path(name), body=raw)
                    self.assertIn(r.status, (400, 422), r)
                    self.assertError(r, r.status)
                    self.assertUnchanged(name, before)
        for raw in (b'{"grad": [NaN, 0, 0]}', b'{"grad": [Infinity, 0, 0]}'):
            with self.subTest(raw=raw):
                r = self.d.request("POST", self.step_path(s64), body=raw)
                self.assertIn(r.status, (400, 422), r)
                self.assertError(r, r.status)
                self.assertUnchanged(s64, b64)

    def test_step_overflowing_params_still_replies_strict_json(self):
        # The contract is silent on a step whose result overflows float32; but
        # every reply is JSON, and JSON has no inf/NaN.
        name = uniq()
        self.d.create(name, "sgd", hyperparams={"lr": 1.0}, params=[3.0e38])
        r = self.d.step(name, [-3.0e38], expect=None)
        self.assertIn(r.status, (200, 422), r)
        r.json  # noqa: B018 -- asserts strict JSON
        p = self.d.get("/v1/sessions/%s/params" % name)
        for v in p.json["params"]:
            self.assertIsInstance(v, (int, float), "params hold a non-number: %r" % p)
        if r.status == 422:
            # Compared as float32: the reply prints the shortest digits that
            # read back as the same float32 ("3e38"), not the double's.
            self.assertEqual([f32(v) for v in p.json["params"]], [f32(3.0e38)])

    def test_state_overflowing_float32_still_replies_strict_json(self):
        # grad 1e25 is a finite float32, but (1 - 0.999) * 1e50 (adam's exp_avg_sq) is not.
        name = uniq()
        self.d.create(name, "adam", params=[1.0, 2.0])
        r = self.d.step(name, [1e25, 1.0], expect=None)
        self.assertIn(r.status, (200, 422), r)
        r.json  # noqa: B018 -- asserts strict JSON
        st = self.d.get("/v1/sessions/%s/state" % name)
        self.assertEqual(st.status, 200, st)
        st.json  # noqa: B018

    # -- If-Match ---------------------------------------------------------
    def _error_mentions_step(self, err, step):
        def ints(x):
            if isinstance(x, bool):
                return
            if isinstance(x, int):
                yield x
            elif isinstance(x, dict):
                for v in x.values():
                    yield from ints(v)
            elif isinstance(x, list):
                for v in x:
                    yield from ints(v)
        if step in ints({k: v for k, v in err.items() if k != "message"}):
            return True
        return re.search(r"(?<![\d.])%d(?![\d.])" % step, err.get("message", "")) is not None

    def test_if_match(self):
        name = uniq()
        self.d.create(name, "sgd", hyperparams={"lr": 0.5}, params=[1.0])
        self.d.step(name, [1.0])
        r = self.d.step(name, [1.0], headers={"If-Match": '"1"'})
        self.assertEqual(r.json["step"], 2)
        self.assertEqual(r.json["params"], [0.0])
        self.assertEqual(r.header("ETag"), '"2"')
        before = self.snapshot(name)
        for tag in ('"1"', '"7"', '"0"', '"3"'):
            with self.subTest(if_match=tag):
                r = self.d.step(name, [1.0], headers={"If-Match": tag}, expect=None)
                err = self.assertError(r, 412, "step_mismatch")
                self.assertTrue(self._error_mentions_step(err, 2), "412 does not carry the current step 2: %r" % r)
                self.assertUnchanged(name, before)

    def test_if_match_on_binary_step(self):
        name = uniq()
        self.d.create(name, "sgd", hyperparams={"lr": 0.5}, params=[1.0, 2.0])
        hdr = {"Content-Type": OCTET}
        r = self.d.request("POST", self.step_path(name), body=pack("float32", [1.0, 1.0]),
                           headers=dict(hdr, **{"If-Match": '"5"'}))
        err = self.assertError(r, 412, "step_mismatch")
        self.assertTrue(self._error_mentions_step(err, 0), r)
        r = self.d.request("POST", self.step_path(name), body=pack("float32", [1.0, 1.0]),
                           headers=dict(hdr, **{"If-Match": '"0"'}))
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json["params"], [0.5, 1.5])

    # -- Idempotency-Key ---------------------------------------------------
    def test_idempotency_key_replays_first_reply(self):
        name = uniq()
        self.d.create(name, "adam", hyperparams={"lr": 0.1}, params=[1.0, 2.0, 3.0])
        key = "key-" + uniq()
        first = self.d.step(name, [0.1, 0.2, 0.3], headers={"Idempotency-Key": key})
        self.assertNotEqual((first.header("Idempotent-Replayed") or "").lower(), "true", first)
        self.assertEqual(first.json["step"], 1)
        again = self.d.step(name, [0.1, 0.2, 0.3], headers={"Idempotency-Key": key})
        self.assertEqual((again.header("Idempotent-Replayed") or "").lower(), "true", again)
        self.assertEqual(again.json, first.json)
        self.assertEqual(again.header("ETag"), '"1"')
        self.assertEqual(self.d.session(name)["step"], 1, "a replay advanced the step")
        self.assertEqual(self.d.params(name)["params"], first.json["params"])
        # After more steps a replay still answers as then.
        later = self.d.step(name, [1.0, 1.0, 1.0])
        self.assertEqual(later.json["step"], 2)
        again = self.d.step(name, [0.1, 0.2, 0.3], headers={"Idempotency-Key": key})
        self.assertEqual((again.header("Idempotent-Replayed") or "").lower(), "true", again)
        self.assertEqual(again.json, first.json)
        self.assertEqual(self.d.params(name)["params"], later.json["params"])
        self.assertEqual(self.d.session(name)["step"], 2)

    def test_idempotency_key_remembered_over_hundreds_of_steps(self):
        name = uniq()
        self.d.create(name, "sgd", dtype="float64", hyperparams={"lr": 1.0}, params=[0.0])
        key = uniq("old")
        first = self.d.step(name, [1.0], headers={"Idempotency-Key": key})
        c = self.d.conn()
        for i in range(300):
            r = self.d.request("POST", self.step_path(name), json_body={"grad": [1.0]},
                               headers={"Idempotency-Key": "k%d" % i}, conn=c)
            self.assertEqual(r.status, 200, r)
        c.close()
        again = self.d.step(name, [1.0], headers={"Idempotency-Key": key})
        self.assertEqual((again.header("Idempotent-Replayed") or "").lower(), "true", again)
        self.assertEqual(again.json, first.json)
        self.assertEqual(self.d.params(name), {"step": 301, "params": [-301.0]})

    def test_idempotency_key_with_other_grad_is_422(self):
        name = uniq()
        self.d.create(name, "sgd", params=[1.0, 2.0])
        key = uniq("k")
        self.d.step(name, [1.0, 1.0], headers={"Idempotency-Key": key})
        before = self.snapshot(name)
        r = self.d.step(name, [1.0, 2.0], headers={"Idempotency-Key": key}, expect=None)
        self.assertError(r, 422, "idempotency_mismatch")
        self.assertUnchanged(name, before)

    def test_idempotency_keys_are_per_session(self):
        a, b = uniq(), uniq()
        self.d.create(a, "sgd", hyperparams={"lr": 1.0}, params=[1.0])
        self.d.create(b, "sgd", hyperparams={"lr": 1.0}, params=[1.0])
        key = uniq("k")
        self.d.step(a, [1.0], headers={"Idempotency-Key": key})
        r = self.d.step(b, [0.5], headers={"Idempotency-Key": key})
        self.assertNotEqual((r.header("Idempotent-Replayed") or "").lower(), "true", r)
        self.assertEqual(r.json["params"], [0.5])
        self.assertEqual(self.d.params(b)["step"], 1)

    def test_idempotency_key_on_binary_step_replays(self):
        name = uniq()
        self.d.create(name, "sgd", hyperparams={"lr": 0.5}, params=[1.0, 2.0])
        key = uniq("k")
        hdr = {"Content-Type": OCTET, "Accept": OCTET, "Idempotency-Key": key}
        first = self.d.request("POST", self.step_path(name), body=pack("float32", [1.0, 2.0]), headers=hdr)
        self.assertEqual(first.status, 200, first)
        again = self.d.request("POST", self.step_path(name), body=pack("float32", [1.0, 2.0]), headers=hdr)
        self.assertEqual(again.status, 200, again)
        self.assertEqual((again.header("Idempotent-Replayed") or "").lower(), "true", again)
        self.assertEqual(again.body, first.body)
        self.assertEqual(unpack("float32", again.body), [0.5, 1.0])
        self.assertEqual(again.header("ETag"), '"1"')
        self.assertEqual(self.d.session(name)["step"], 1)

    def test_failed_step_does_not_consume_its_key(self):
        name = uniq()
        self.d.create(name, "sgd", hyperparams={"lr": 1.0}, params=[1.0, 2.0])
        key = uniq("k")
        r = self.d.step(name, [1.0], headers={"Idempotency-Key": key}, expect=None)
        self.assertError(r, 422, "size_mismatch")
        r = self.d.step(name, [1.0, 1.0], headers={"Idempotency-Key": key})
        self.assertNotEqual((r.header("Idempotent-Replayed") or "").lower(), "true", r)
        self.assertEqual(r.json["params"], [0.0, 1.0])

    def test_idempotency_key_over_255_chars_is_rejected(self):
        name = uniq()
        self.d.create(name, "sgd", params=[1.0])
        before = self.snapshot(name)
        r = self.d.step(name, [1.0], headers={"Idempotency-Key": "k" * 256}, expect=None)
        self.assertIn(r.status, (400, 422), r)
        self.assertError(r, r.status)
        self.assertUnchanged(name, before)
        r = self.d.step(name, [1.0], headers={"Idempotency-Key": "k" * 255})
        self.assertEqual(r.json["step"], 1)

    # -- Prefer: return=minimal --------------------------------------------
    def test_prefer_return_minimal(self):
        name = uniq()
        self.d.create(name, "sgd", hyperparams={"lr": 0.5}, params=[1.0, 2.0])
        r = self.d.step(name, [1.0, 1.0], headers={"Prefer": "return=minimal"})
        self.assertEqual(r.json.get("step"), 1, r)
        self.assertNotIn("params", r.json, r)
        self.assertEqual(r.header("ETag"), '"1"')
        self.assertEqual(self.d.params(name)["params"], [0.5, 1.5], "minimal step not applied")
        r = self.d.step(name, [1.0, 1.0], headers={"Prefer": "return=minimal", "Accept": OCTET})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.body, b"", r)
        self.assertEqual(r.header("ETag"), '"2"')
        self.assertEqual(self.d.params(name)["params"], [0.0, 1.0])

    # -- binary vectors ----------------------------------------------------
    def test_binary_step_float32(self):
        name = uniq()
        self.d.create(name, "sgd", hyperparams={"lr": 0.5}, params=[1.0, 2.0, -3.0, 0.5])
        r = self.d.request("POST", self.step_path(name), body=pack("float32", [1.0, 2.0, 0.25, -1.0]),
                           headers={"Content-Type": OCTET})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.content_type, "application/json", r)
        self.assertEqual(r.json["step"], 1)
        self.assertEqual(r.json["params"], [0.5, 1.0, -3.125, 1.0])
        self.assertEqual(r.header("ETag"), '"1"')

    def test_binary_step_with_binary_reply(self):
        name = uniq()
        self.d.create(name, "sgd", hyperparams={"lr": 0.5}, params=[1.0, 2.0, -3.0, 0.5])
        r = self.d.request("POST", self.step_path(name), body=pack("float32", [1.0, 2.0, 0.25, -1.0]),
                           headers={"Content-Type": OCTET, "Accept": OCTET})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.content_type, OCTET, r)
        self.assertEqual(len(r.body), 16)
        self.assertEqual(unpack("float32", r.body), [0.5, 1.0, -3.125, 1.0])
        self.assertEqual(r.header("ETag"), '"1"')
        # JSON step, binary reply
        r = self.d.step(name, [1.0, 0.0, 0.0, 0.0], headers={"Accept": OCTET})
        self.assertEqual(r.content_type, OCTET, r)
        self.assertEqual(unpack("float32", r.body), [0.0, 1.0, -3.125, 1.0])
        self.assertEqual(r.header("ETag"), '"2"')

    def test_binary_step_float64_round_trip(self):
        name = uniq()
        init = [0.1, 1.0 / 3.0, -7.25, 1e-200]
        g = [0.3, -1.0 / 7.0, 2.0, 1e-199]
        lr = 0.25
        self.d.create(name, "sgd", dtype="float64", hyperparams={"lr": lr}, params=init)
        r = self.d.request("POST", self.step_path(name), body=pack("float64", g),
                           headers={"Content-Type": OCTET, "Accept": OCTET})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(len(r.body), 32)
        want = [p - lr * x for p, x in zip(init, g)]
        self.assertEqual(unpack("float64", r.body), want)
        self.assertEqual(self.d.params(name)["params"], want)
        r = self.d.get("/v1/sessions/%s/params" % name, headers={"Accept": OCTET})
        self.assertEqual(r.body, pack("float64", want))

    def test_get_params_json_and_binary(self):
        name = uniq()
        self.d.create(name, "sgd", params=[1.5, -2.0, 0.25])
        self.d.step(name, [0.0, 0.0, 0.0])
        r = self.d.get("/v1/sessions/%s/params" % name)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.content_type, "application/json")
        self.assertEqual(r.json["step"], 1)
        self.assertEqual(r.json["params"], [1.5, -2.0, 0.25])
        r = self.d.get("/v1/sessions/%s/params" % name, headers={"Accept": OCTET})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.content_type, OCTET)
        self.assertEqual(r.body, pack("float32", [1.5, -2.0, 0.25]))
        self.assertEqual(r.header("ETag"), '"1"')

    def test_binary_wrong_length_is_rejected_and_changes_nothing(self):
        name = uniq()
        self.d.create(name, "sgd", params=[1.0, 2.0, 3.0])
        before = self.snapshot(name)
        for body, statuses in ((b"\0" * 11, (400, 422)), (b"\0" * 13, (400, 422)),
                               (b"\0" * 8, (422,)), (b"\0" * 16, (422,)), (b"\0" * 24, (422,))):
            with self.subTest(length=len(body)):
                r = self.d.request("POST", self.step_path(name), body=body, headers={"Content-Type": OCTET})
                self.assertIn(r.status, statuses, r)
                err = self.assertError(r, r.status)
                if r.status == 422:
                    self.assertEqual(err["code"], "size_mismatch", r)
                self.assertUnchanged(name, before)
        r = self.d.request("POST", self.step_path(name), body=b"", headers={"Content-Type": OCTET})
        self.assertIn(r.status, (400, 422), r)
        self.assertUnchanged(name, before)

    def test_binary_non_finite_is_422(self):
        name = uniq()
        self.d.create(name, "sgd", params=[1.0, 2.0])
        before = self.snapshot(name)
        for g in ([float("nan"), 0.0], [0.0, float("inf")], [float("-inf"), 0.0]):
            with self.subTest(grad=g):
                r = self.d.request("POST", self.step_path(name), body=pack("float32", g),
                                   headers={"Content-Type": OCTET})
                self.assertError(r, 422, "non_finite")
                self.assertUnchanged(name, before)
        name64 = uniq()
        self.d.create(name64, "sgd", dtype="float64", params=[1.0])
        before = self.snapshot(name64)
        r = self.d.request("POST", self.step_path(name64), body=struct.pack("<d", float("nan")),
                           headers={"Content-Type": OCTET})
        self.assertError(r, 422, "non_finite")
        self.assertUnchanged(name64, before)

    def test_float32_session_binary_is_4_bytes_per_element(self):
        name = uniq()
        self.d.create(name, "sgd", params=[1.0, 2.0])
        r = self.d.request("POST", self.step_path(name), body=pack("float64", [1.0, 1.0]),
                           headers={"Content-Type": OCTET})
        self.assertError(r, 422, "size_mismatch")  # 16 bytes = 4 float32s, not 2
