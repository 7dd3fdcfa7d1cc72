"""Narrow binary vectors (API.md "Binary vectors"): gradients sent and params
returned as bfloat16, float16 or float32 (the dtype parameter of the media
type), exactly as torch's Tensor.to() converts them (the reference data of
tests/gen_wire_reference.py), bad dtype parameters refused with a message
that teaches; and the scalars of a binary step reply in its headers
(Optd-Lr, Optd-Grad-Norm, Optd-Contributors)."""

import json
import math
import os
import struct
import threading

from optd_e2e import DaemonTest, f32, pack, unpack, uniq

OCTET = "application/octet-stream"
HERE = os.path.dirname(os.path.abspath(__file__))
REF = os.path.join(os.path.dirname(HERE), "data", "wire_reference.bin")


def load_reference():
    """torch's conversions: see tests/gen_wire_reference.py for the layout."""
    with open(REF, "rb") as f:
        raw = f.read()
    assert raw[:8] == b"OPTDWIRE"
    n32, n64 = struct.unpack_from("<II", raw, 8)
    off = 16
    out = {}
    for key, fmt, n in (("in32", "f", n32), ("bf16_of_32", "H", n32), ("f16_of_32", "H", n32),
                        ("in64", "d", n64), ("bf16_of_64", "H", n64), ("f16_of_64", "H", n64),
                        ("f32_of_64", "f", n64), ("f32_of_bf16", "f", 65536), ("f32_of_f16", "f", 65536)):
        out[key] = list(struct.unpack_from("<%d%s" % (n, fmt), raw, off))
        off += n * struct.calcsize(fmt)
    assert off == len(raw)
    return out


def u16(data):
    return list(struct.unpack("<%dH" % (len(data) // 2), data))


def finite_patterns(exp_mask):
    """Every 16-bit pattern whose exponent bits are not all ones."""
    return [h for h in range(65536) if (h & exp_mask) != exp_mask]


class WireTypeTests(DaemonTest):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.ref = load_reference()

    def step_path(self, name):
        return "/v1/sessions/%s/step" % name

    def params_as(self, name, dtype):
        r = self.d.get("/v1/sessions/%s/params" % name, headers={"Accept": "%s; dtype=%s" % (OCTET, dtype)})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("Content-Type"), "%s; dtype=%s" % (OCTET, dtype))
        return r

    def create_with(self, dtype, values):
        name = uniq()
        # sgd with lr 0 and zero gradients leaves every param as it is.
        self.d.create(name, "sgd", dtype=dtype, hyperparams={"lr": 0.0}, params=values)
        return name

    def create_finite(self, dtype, key):
        """A session of dtype holding the finite values of the reference's
        key; the session and the indices of those values."""
        keep = [i for i, v in enumerate(self.ref[key]) if math.isfinite(v)]
        return self.create_with(dtype, [self.ref[key][i] for i in keep]), keep

    def assert_params_as_narrow(self, name, keep, cases):
        """The params of name read as each (dtype, want) of cases, a 16-bit
        type, are want's values at keep, two bytes each."""
        for dtype, want in cases:
            with self.subTest(dtype=dtype):
                r = self.params_as(name, dtype)
                self.assertEqual(len(r.body), 2 * len(keep), "two bytes an element")
                got = u16(r.body)
                bad = [(i, hex(got[k]), hex(want[i])) for k, i in enumerate(keep) if got[k] != want[i]]
                self.assertEqual(bad[:5], [], "%d of %d differ from torch" % (len(bad), len(keep)))

    # -- params returned narrow -------------------------------------------
    def test_float32_params_as_bfloat16_and_float16_are_torchs_bit_for_bit(self):
        ref = self.ref
        name, keep = self.create_finite("float32", "in32")
        self.assert_params_as_narrow(name, keep, (("bfloat16", ref["bf16_of_32"]), ("float16", ref["f16_of_32"])))
        # The step reply converts the same way.
        r = self.d.request("POST", self.step_path(name), body=b"\0" * (4 * len(keep)),
                           headers={"Content-Type": OCTET, "Accept": OCTET + ";dtype=bfloat16"})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(u16(r.body), [ref["bf16_of_32"][i] for i in keep])

    def test_float64_params_as_bfloat16_float16_and_float32_are_torchs_bit_for_bit(self):
        ref = self.ref
        name, keep = self.create_finite("float64", "in64")
        self.assert_params_as_narrow(name, keep, (("bfloat16", ref["bf16_of_64"]), ("float16", ref["f16_of_64"])))
        got = unpack("float32", self.params_as(name, "float32").body)
        want = [ref["f32_of_64"][i] for i in keep]
        self.assertEqual(struct.pack("<%df" % len(got), *got), struct.pack("<%df" % len(want), *want))
        # The session's own dtype, named or not, is the session's bytes.
        r = self.d.get("/v1/sessions/%s/params" % name, headers={"Accept": OCTET + "; dtype=float64"})
        self.assertEqual(r.body, pack("float64", [ref["in64"][i] for i in keep]))
        self.assertEqual(r.header("Content-Type"), OCTET)

    # -- gradients received narrow ----------------------------------------
    def check_gradients(self, session_dtype, wire, exp_mask, widened):
        """Every finite pattern of wire as one gradient: sgd with lr 1 from
        zeros makes the params minus the widened gradient, exactly."""
        pats = finite_patterns(exp_mask)
        name = uniq()
        self.d.create(name, "sgd", dtype=session_dtype, hyperparams={"lr": 1.0}, size=len(pats))
        r = self.d.request("POST", self.step_path(name), body=struct.pack("<%dH" % len(pats), *pats),
                           headers={"Content-Type": "%s; dtype=%s" % (OCTET, wire), "Accept": OCTET})
        self.assertEqual(r.status, 200, r)
        got = unpack(session_dtype, r.body)
        bad = [(hex(h), g, -widened[h]) for h, g in zip(pats, got) if g != -widened[h]]
        self.assertEqual(bad[:5], [], "%d of %d gradients differ from torch's widening" % (len(bad), len(pats)))

    def test_every_finite_bfloat16_gradient_widens_as_torch(self):
        for dtype in ("float32", "float64"):
            with self.subTest(session=dtype):
                self.check_gradients(dtype, "bfloat16", 0x7F80, self.ref["f32_of_bf16"])

    def test_every_finite_float16_gradient_widens_as_torch(self):
        for dtype in ("float32", "float64"):
            with self.subTest(session=dtype):
                self.check_gradients(dtype, "float16", 0x7C00, self.ref["f32_of_f16"])

    def test_float32_gradient_into_a_float64_session(self):
        name = uniq()
        g = [f32(0.1), f32(-1.0 / 3.0), f32(1e-45), f32(-3.0e38)]
        self.d.create(name, "sgd", dtype="float64", hyperparams={"lr": 1.0}, size=4)
        r = self.d.request("POST", self.step_path(name), body=pack("float32", g),
                           headers={"Content-Type": OCTET + "; dtype=float32"})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json["params"], [-x for x in g])

    def test_non_finite_narrow_gradients_are_422_and_change_nothing(self):
        name = uniq()
        self.d.create(name, "adam", params=[1.0, 2.0, 3.0])
        before = self.snapshot(name)
        for wire, bad in (("bfloat16", 0x7F80), ("bfloat16", 0xFF80), ("bfloat16", 0x7FC0),
                          ("float16", 0x7C00), ("float16", 0xFC00), ("float16", 0x7E00)):
            with self.subTest(wire=wire, bits=hex(bad)):
                r = self.d.request("POST", self.step_path(name), body=struct.pack("<3H", 0x3F80, 0x3C00, bad),
                                   headers={"Content-Type": "%s; dtype=%s" % (OCTET, wire)})
                err = self.assertError(r, 422, "non_finite")
                self.assertIn("element 2", err["message"])
                self.assertIn(wire, err["message"])
                self.assertUnchanged(name, before)

    def test_a_narrow_body_of_the_wrong_length_is_size_mismatch(self):
        name = uniq()
        self.d.create(name, "sgd", params=[1.0, 2.0, 3.0])
        before = self.snapshot(name)
        r = self.d.request("POST", self.step_path(name), body=pack("float32", [1.0, 2.0, 3.0]),
                           headers={"Content-Type": OCTET + "; dtype=bfloat16"})
        err = self.assertError(r, 422, "size_mismatch")
        self.assertIn("6", err["message"])
        self.assertIn("bfloat16", err["message"])
        self.assertUnchanged(name, before)

    def test_a_bfloat16_step_halves_the_bytes_and_matches_the_float32_one(self):
        a, b = uniq(), uniq()
        for n in (a, b):
            self.d.create(n, "adamw", params=[0.5, -1.0, 2.0, 0.25], hyperparams={"lr": 0.01})
        g = [0.5, -0.25, 1.5, 3.0]  # exact in bfloat16
        bf = struct.pack("<4H", *[struct.unpack("<I", struct.pack("<f", x))[0] >> 16 for x in g])
        for _ in range(3):
            ra = self.d.request("POST", self.step_path(a), body=pack("float32", g),
                                headers={"Content-Type": OCTET, "Accept": OCTET})
            rb = self.d.request("POST", self.step_path(b), body=bf,
                                headers={"Content-Type": OCTET + "; dtype=bfloat16", "Accept": OCTET})
            self.assertEqual((ra.status, rb.status), (200, 200), (ra, rb))
            self.assertEqual(len(bf) * 2, len(pack("float32", g)))
            self.assertEqual(ra.body, rb.body)

    def test_the_same_gradient_in_another_wire_type_replays_its_key(self):
        name = uniq()
        self.d.create(name, "sgd", params=[1.0, 2.0])
        g = [0.5, -2.0]
        hdr = {"Idempotency-Key": "k-" + uniq(), "Accept": OCTET + "; dtype=float16"}
        r1 = self.d.request("POST", self.step_path(name), body=pack("float32", g),
                            headers=dict(hdr, **{"Content-Type": OCTET}))
        self.assertEqual(r1.status, 200, r1)
        bf = struct.pack("<2H", 0x3F00, 0xC000)  # 0.5, -2.0
        r2 = self.d.request("POST", self.step_path(name), body=bf,
                            headers=dict(hdr, **{"Content-Type": OCTET + "; dtype=bfloat16"}))
        self.assertEqual(r2.status, 200, r2)
        self.assertEqual(r2.header("Idempotent-Replayed"), "true")
        self.assertEqual(r2.body, r1.body)
        self.assertEqual(len(r2.body), 4)
        self.assertEqual(self.d.session(name)["step"], 1)

    # -- bad dtype parameters ---------------------------------------------
    def test_an_unknown_dtype_parameter_is_415_naming_the_valid_ones(self):
        name = uniq()
        self.d.create(name, "sgd", params=[1.0, 2.0])
        before = self.snapshot(name)
        for dtype, hint in (("bf16", None), ("flaot16", "float16"), ("int8", None), ("", None)):
            with self.subTest(dtype=dtype):
                r = self.d.request("POST", self.step_path(name), body=b"\0" * 4,
                                   headers={"Content-Type": "%s; dtype=%s" % (OCTET, dtype)})
                err = self.assertError(r, 415, "unsupported_media_type")
                for valid in ("bfloat16", "float16", "float32"):
                    self.assertIn(valid, err["message"])
                if hint:
                    self.assertIn('did you mean dtype=%s?' % hint, err["message"])
                self.assertUnchanged(name, before)
        for path, method in ((self.step_path(name), "POST"), ("/v1/sessions/%s/params" % name, "GET")):
            with self.subTest(accept=path):
                r = self.d.request(method, path, body=pack("float32", [0, 0]) if method == "POST" else None,
                                   headers={"Content-Type": OCTET, "Accept": OCTET + "; dtype=half"})
                err = self.assertError(r, 415, "unsupported_media_type")
                self.assertIn("Accept", err["message"])
                self.assertUnchanged(name, before)

    def test_float64_on_a_float32_session_is_422_and_fine_on_a_float64_one(self):
        name = uniq()
        self.d.create(name, "sgd", params=[1.0, 2.0])
        before = self.snapshot(name)
        r = self.d.request("POST", self.step_path(name), body=pack("float64", [0, 0]),
                           headers={"Content-Type": OCTET + "; dtype=float64"})
        err = self.assertError(r, 422, "invalid")
        self.assertIn("wider", err["message"])
        r = self.d.get("/v1/sessions/%s/params" % name, headers={"Accept": OCTET + "; dtype=float64"})
        self.assertError(r, 422, "invalid")
        self.assertUnchanged(name, before)
        n64 = uniq()
        self.d.create(n64, "sgd", dtype="float64", hyperparams={"lr": 1.0}, params=[1.0, 2.0])
        r = self.d.request("POST", self.step_path(n64), body=pack("float64", [0.5, 0.25]),
                           headers={"Content-Type": OCTET + "; dtype=float64", "Accept": OCTET + ";dtype=float64"})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(unpack("float64", r.body), [0.5, 1.75])

    def test_a_binary_checkpoint_with_a_dtype_parameter_is_415(self):
        name = uniq()
        self.d.create(name, "adam", params=[1.0, 2.0])
        ck = self.d.get("/v1/sessions/%s/state" % name, headers={"Accept": OCTET})
        self.assertEqual(ck.status, 200)
        r = self.d.request("PUT", "/v1/sessions/%s/state" % uniq(), body=ck.body,
                           headers={"Content-Type": OCTET + "; dtype=bfloat16"})
        err = self.assertError(r, 415, "unsupported_media_type")
        self.assertIn("safetensors", err["message"])


class BinaryReplyHeaderTests(DaemonTest):
    """A binary step reply carries lr, grad_norm and contributors in headers,
    with the values the JSON reply has."""

    def step_path(self, name):
        return "/v1/sessions/%s/step" % name

    def twin(self, **fields):
        a, b = uniq(), uniq()
        for n in (a, b):
            self.d.create(n, "adam", params=[0.5, -1.0, 2.0], **fields)
        return a, b

    def assertHeadersMatch(self, binary, js):
        self.assertEqual(binary.status, 200, binary)
        self.assertEqual(js.status, 200, js)
        body = json.loads(js.body)
        self.assertEqual(float(binary.header("Optd-Lr")), body["lr"])
        self.assertEqual(float(binary.header("Optd-Grad-Norm")), body["grad_norm"])
        self.assertEqual(int(binary.header("Optd-Contributors")), body["contributors"])
        # Printed as the JSON reply prints them.
        self.assertIn('"lr":%s' % binary.header("Optd-Lr"), js.body.decode())
        self.assertIn('"grad_norm":%s' % binary.header("Optd-Grad-Norm"), js.body.decode())

    def test_headers_carry_lr_grad_norm_and_contributors(self):
        a, b = self.twin(hyperparams={"lr": 0.01, "max_grad_norm": 0.5,
                                      "lr_schedule": {"type": "exponential", "gamma": 0.5}})
        for k in range(3):
            g = [0.3 * (k + 1), -0.7, 0.1]
            rb = self.d.request("POST", self.step_path(a), body=pack("float32", g),
                                headers={"Content-Type": OCTET, "Accept": OCTET})
            rj = self.d.step(b, g)
            self.assertHeadersMatch(rb, rj)
            self.assertEqual(unpack("float32", rb.body), [f32(x) for x in rj.json["params"]])
        self.assertEqual(float(rb.header("Optd-Lr")), 0.01 * 0.25)

    def test_minimal_and_narrow_replies_carry_them_too(self):
        a, b = self.twin()
        for accept in (OCTET, OCTET + "; dtype=bfloat16"):
            rb = self.d.request("POST", self.step_path(a), body=pack("float32", [1, 2, 3]),
                                headers={"Content-Type": OCTET, "Accept": accept, "Prefer": "return=minimal"})
            self.assertEqual(rb.body, b"")
            self.assertHeadersMatch(rb, self.d.step(b, [1, 2, 3]))

    def test_an_idempotent_replay_carries_the_first_replys_headers(self):
        name = uniq()
        self.d.create(name, "sgd", params=[1.0])
        hdr = {"Content-Type": OCTET, "Accept": OCTET, "Idempotency-Key": uniq()}
        r1 = self.d.request("POST", self.step_path(name), body=pack("float32", [2.0]), headers=hdr)
        r2 = self.d.request("POST", self.step_path(name), body=pack("float32", [2.0]), headers=hdr)
        self.assertEqual(r2.header("Idempotent-Replayed"), "true")
        for h in ("Optd-Lr", "Optd-Grad-Norm", "Optd-Contributors"):
            self.assertEqual(r2.header(h), r1.header(h), h)
        self.assertEqual(r1.header("Optd-Grad-Norm"), "2")

    def test_every_contributor_of_a_round_sees_the_count(self):
        name = uniq()
        self.d.create(name, "sgd", params=[1.0, 1.0], workers=2)
        replies = [None, None]

        def contribute(i):
            replies[i] = self.d.request("POST", self.step_path(name), body=pack("float32", [i, 1.0]),
                                        headers={"Content-Type": OCTET, "Accept": OCTET})
        ts = [threading.Thread(target=contribute, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        for r in replies:
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.header("Optd-Contributors"), "2")
            self.assertEqual(r.header("Optd-Lr"), "0.01")
        self.assertEqual(replies[0].body, replies[1].body)

    def test_json_step_replies_have_no_such_headers(self):
        name = uniq()
        self.d.create(name, "sgd", params=[1.0])
        r = self.d.step(name, [1.0])
        self.assertIsNone(r.header("Optd-Lr"))
