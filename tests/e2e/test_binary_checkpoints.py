"""Binary checkpoints (API.md Steps, "Binary checkpoints"): GET .../state
with Accept: application/octet-stream is a safetensors file (checked against
the format's specification by safetensors_spec.py), tensor params and one
per state buffer in the session's dtype, the rest in __metadata__ as
strings; PUT .../state with Content-Type: application/octet-stream takes it
back, validated like a create; the restored session continues exactly."""

import json
import struct

import safetensors_spec as spec
from optd_e2e import uniq
from test_checkpoints import CONFIGS, CheckpointCase

BIN = "application/octet-stream"


class BinaryCheckpointTests(CheckpointCase):

    def binary_state(self, name):
        r = self.d.get("/v1/sessions/%s/state" % name, headers={"Accept": BIN})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.content_type, BIN)
        return r

    def put_binary(self, name, data, **hdrs):
        return self.d.request("PUT", "/v1/sessions/%s/state" % name, body=data,
                              headers=dict({"Content-Type": BIN}, **hdrs))

    def test_the_file_follows_the_format_and_holds_the_checkpoint(self):
        for opt, dtype, hp in CONFIGS:
            with self.subTest(optimizer=opt, dtype=dtype, hyperparams=hp):
                name = self.trained(uniq(opt), opt, [0.5, -1.25, 3.0, 1e-3], 1, 3, dtype=dtype, hyperparams=hp)
                r = self.binary_state(name)
                self.assertEqual(r.header("ETag"), '"3"')
                meta, tensors = spec.parse(r.body)
                st = self.d.get("/v1/sessions/%s/state" % name).json
                want_dt = "F64" if dtype == "float64" else "F32"
                self.assertEqual(tensors["params"][0], want_dt)
                self.assertEqual(tensors["params"][1], [4])
                self.assertEqual(spec.values(tensors["params"]), st["params"] if dtype == "float64"
                                 else [spec_f32(x) for x in st["params"]])
                vectors = {k: v for k, v in st["state"].items() if isinstance(v, list)}
                self.assertEqual(set(tensors), {"params"} | set(vectors))
                for k, v in vectors.items():
                    self.assertEqual(tensors[k][0], want_dt)
                    got = spec.values(tensors[k])
                    self.assertEqual(got, v if dtype == "float64" else [spec_f32(x) for x in v], k)
                # __metadata__: the rest of the checkpoint, strings as they are, the others as JSON text
                self.assertEqual(meta["optimizer"], opt)
                self.assertEqual(meta["dtype"], dtype)
                self.assertEqual(json.loads(meta["step"]), 3)
                self.assertEqual(json.loads(meta["size"]), 4)
                self.assertEqual(json.loads(meta["hyperparams"]), st["hyperparams"])
                for k in ("workers", "min_workers", "round_timeout"):
                    self.assertEqual(json.loads(meta[k]), st[k])
                scalars = {k: v for k, v in st["state"].items() if not isinstance(v, list)}
                if scalars:
                    self.assertEqual(json.loads(meta["state"]), scalars)

    def test_put_binary_restores_and_continues_bit_identically(self):
        for opt, dtype, hp in CONFIGS:
            with self.subTest(optimizer=opt, dtype=dtype, hyperparams=hp):
                a = self.trained(uniq(opt), opt, [0.5, -1.25, 3.0, 1e-3, 7.0], 2, 6, dtype=dtype, hyperparams=hp)
                b = uniq(opt + "-bin")
                data = self.binary_state(a).body
                r = self.put_binary(b, data)
                self.assertEqual(r.status, 201, r)
                self.assertEqual(r.json["step"], 6)
                self.assertEqual(self.d.get("/v1/sessions/%s/state" % b).json["state"],
                                 self.d.get("/v1/sessions/%s/state" % a).json["state"])
                for g in self.grads(3, 5, 4):
                    self.assertEqual(self.d.step(a, g).json["params"], self.d.step(b, g).json["params"])
                (ma, ta), (mb, tb) = spec.parse(self.binary_state(a).body), spec.parse(self.binary_state(b).body)
                self.assertEqual(ta, tb)
                self.assertEqual(dict(ma, name=b), mb)
                r = self.put_binary(b, self.binary_state(a).body)  # replacing: 200
                self.assertEqual(r.status, 200, r)

    def test_a_file_written_by_another_writer_is_taken(self):
        """Tensors in another order, no padding, metadata values JSON-quoted."""
        name = uniq()
        p, m, v = [1.0, 2.0], [0.1, -0.2], [0.01, 0.04]
        f = lambda xs: struct.pack("<%dd" % len(xs), *xs)  # noqa: E731
        data = spec.build({"optimizer": '"adam"', "dtype": "float64", "step": "1",
                           "hyperparams": json.dumps({"lr": 0.01}), "format": "pt"},
                          {"exp_avg_sq": ("F64", [2], f(v)), "params": ("F64", [2], f(p)), "exp_avg": ("F64", [2], f(m))},
                          pad=False)
        r = self.put_binary(name, data)
        self.assertEqual(r.status, 201, r)
        st = self.d.get("/v1/sessions/%s/state" % name).json
        self.assertEqual((st["params"], st["state"]["exp_avg"], st["state"]["exp_avg_sq"]), (p, m, v))
        self.assertEqual((st["step"], st["hyperparams"]["lr"]), (1, 0.01))

    def test_bad_files_are_refused_and_change_nothing(self):
        a = uniq()
        self.d.create(a, "adam", params=[1.0, 2.0, 3.0])
        self.d.step(a, [0.1, 0.2, 0.3])
        good = self.binary_state(a).body
        meta, tensors = spec.parse(good)
        f32 = lambda xs: struct.pack("<%df" % len(xs), *xs)  # noqa: E731

        def variant(**changes):
            t = dict(tensors)
            m = dict(meta)
            for k, v in changes.items():
                if k == "meta":
                    m.update(v)
                elif v is None:
                    del t[k]
                else:
                    t[k] = v
            return spec.build(m, t)
        (n,) = struct.unpack("<Q", good[:8])
        cases = [
            ("cut short", good[:-3], 400, None),
            ("header cut", good[:20], 400, None),
            ("trailing bytes", good + b"\0\0\0\0", 400, None),
            ("not safetensors", b'{"params": [1, 2, 3]}', 400, None),
            ("empty", b"", 400, None),
            ("a hole", good[:8] + good[8:8 + n].replace(b'"data_offsets":[12,24]', b'"data_offsets":[16,28]') + good[8 + n:], 400, None),
            ("wrong dtype", variant(exp_avg=("F64", [3], struct.pack("<3d", 0, 0, 0))), 422, None),
            ("wrong length", variant(exp_avg=("F32", [2], f32([0, 0]))), 422, "size_mismatch"),
            ("unknown tensor", variant(exp_avgs=("F32", [3], f32([0, 0, 0]))), 422, "unknown_field"),
            ("unknown metadata", variant(meta={"lr": "0.1"}), 422, "unknown_field"),
            ("negative exp_avg_sq", variant(exp_avg_sq=("F32", [3], f32([-1, 2, 3]))), 422, "invalid"),
            ("NaN", variant(exp_avg=("F32", [3], f32([float("nan"), 0, 0]))), 422, "non_finite"),
            ("missing buffer", variant(exp_avg=None), 422, "invalid"),
            ("unknown optimizer", variant(meta={"optimizer": "Adam"}), 422, "unknown_optimizer"),
            ("metadata not JSON", variant(meta={"step": "one"}), 400, "bad_request"),
        ]
        for label, data, status, code in cases:
            with self.subTest(label):
                fresh = uniq()
                self.assertError(self.put_binary(fresh, data), status, code)
                self.assertError(self.d.get("/v1/sessions/" + fresh), 404)
                before = self.snapshot(a)
                self.assertError(self.put_binary(a, data), status, code)
                self.assertUnchanged(a, before)
        self.assertEqual(self.binary_state(a).body, good)

    def test_octet_stream_elsewhere_is_still_415(self):
        r = self.d.request("POST", "/v1/sessions", body=b"\0" * 8, headers={"Content-Type": BIN})
        self.assertError(r, 415, "unsupported_media_type")


def spec_f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]
