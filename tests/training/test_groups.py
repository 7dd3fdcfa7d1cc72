"""Tensors, parameter groups and skipped tensors against torch (API.md
"Tensors and parameter groups"): replays data/groups.json.gz (written by
gen_reference.py from torch 1.13: a small model's tensors in groups with
their own hyperparameters, some tensors without a gradient on some steps)
through optd and compares after every step the params (float64 within
1e-12, float32 within 1e-5, relative, with test_reference.py's floor of 16
rounding units of the vector's largest element), each group's lr (1e-15)
and, when clipping, grad_norm. Steps alternate JSON ("skip") and binary
(Optd-Skip, binary reply, Optd-Lr); a skipped tensor's gradient is sent as
garbage, which optd must ignore. At step 100 the session is copied by a
JSON and by a safetensors checkpoint (PUT .../state); the copies take the
same steps and must stay bit for bit equal to it. At the end each tensor's
step count (torch's state["step"]), NAdam's mu_product and the state
buffers are compared with torch's."""

import struct
import sys
import unittest

from harness import DaemonTest, LR_TOL, TOL, Worst, add_case_tests, f32, load_reference, rel_err, ulp_floor
import prng

COPY_AT = 100
OCTET = "application/octet-stream"

WORST = Worst()
EXACT = {}

REF = load_reference("groups.json.gz")


def pack(dtype, xs):
    return struct.pack("<%d%s" % (len(xs), "f" if dtype == "float32" else "d"), *xs)


def unpack(dtype, b):
    w = 4 if dtype == "float32" else 8
    return list(struct.unpack("<%d%s" % (len(b) // w, "f" if dtype == "float32" else "d"), b))


class GroupReferenceTests(DaemonTest):
    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        lines = ["", "Largest deviation from torch with groups and skipped tensors (relative, as test_optim.c "
                 "measures it), and the share of params bit-identical to torch's:"]
        for key in sorted(WORST):
            v, where = WORST[key]
            ex, tot = EXACT.get(key[:2], (0, 1))
            lines.append("  %-10s %-8s %-11s %.3e  (%s)  exact %d/%d" % (key + (v, where, ex, tot)))
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()

    def step_on(self, name, case, t, grad, skip):
        """Step t (from 0): JSON on even steps, binary on odd ones; the
        reply's params, lr list and grad_norm."""
        dtype = case["dtype"]
        if t % 2 == 0:
            r = self.api.post("/v1/sessions/%s/step" % name, {"grad": grad, "skip": skip})
            self.assertEqual(r.status, 200, "step %d: %r" % (t + 1, r))
            b = r.json
            return b["params"], b["lr"], b["grad_norm"], b
        hdr = {"Content-Type": OCTET, "Accept": OCTET}
        if skip:
            hdr["Optd-Skip"] = ",".join(skip)
        r = self.api.post("/v1/sessions/%s/step" % name, pack(dtype, grad), headers=hdr)
        self.assertEqual(r.status, 200, "step %d: %r" % (t + 1, r))
        lrs = [float(x) for x in r.header("Optd-Lr").split(",")]
        return unpack(dtype, r.body), lrs, float(r.header("Optd-Grad-Norm")), None

    def copy_by_checkpoints(self, name):
        """Two copies of name: by its JSON checkpoint and by its safetensors one."""
        js = self.api.get("/v1/sessions/%s/state" % name)
        self.assertEqual(js.status, 200, js)
        a = name + "-json"
        r = self.api.put("/v1/sessions/%s/state" % a, js.body, headers={"Content-Type": "application/json"})
        self.assertEqual(r.status, 201, r)
        st = self.api.get("/v1/sessions/%s/state" % name, headers={"Accept": OCTET})
        self.assertEqual(st.status, 200, st)
        b = name + "-st"
        r = self.api.put("/v1/sessions/%s/state" % b, st.body, headers={"Content-Type": OCTET})
        self.assertEqual(r.status, 201, r)
        # Both restore the same checkpoint, which reads back as it was written.
        for c in (a, b):
            back = self.api.get("/v1/sessions/%s/state" % c).json
            orig = js.json
            back["name"] = orig["name"]
            self.assertEqual(back, orig, "the checkpoint of %s differs from its source's" % c)
        return [a, b]

    def replay(self, case):
        dtype, n, steps = case["dtype"], case["n"], case["steps"]
        rnd = (lambda x: f32(x)) if dtype == "float32" else (lambda x: x)
        grads = prng.gradients(case["seed"], steps, n, *case["grad_exponents"])
        self.assertEqual(prng.initial_params(case["seed"], n), case["p0"])
        ref_params = [rnd(x) for x in case["params"]]
        ref_norm = [rnd(x) for x in case["grad_norm"]] if "grad_norm" in case else None
        name = "grp-" + case["name"].replace("_", "-")
        s = self.create({"name": name, "optimizer": case["optimizer"], "dtype": dtype, "params": case["p0"],
                         "hyperparams": case["hyperparams"], "groups": case["groups"]})
        # Every group listed with its full hyperparams: the session's, then its own.
        self.assertEqual(len(s["groups"]), len(case["groups"]))
        for g, want in zip(s["groups"], case["groups"]):
            full = {k: v for k, v in s["hyperparams"].items() if k not in ("lr_schedule", "max_grad_norm")}
            full.update(want["hyperparams"])
            self.assertEqual(g["hyperparams"], full)
            self.assertEqual(g["tensors"], want["tensors"])
        kind = case["optimizer"]
        worst_p = worst_lr = worst_n = 0.0
        exact = total = 0
        copies = []
        for t in range(steps):
            # Garbage where the tensor is skipped: it must be ignored.
            grad = list(grads[t])
            params, lrs, norm, _ = self.step_on(name, case, t, grad, case["skip"][t])
            for c in copies:
                cp, clrs, cnorm, _ = self.step_on(c, case, t, grad, case["skip"][t])
                self.assertEqual((pack(dtype, cp), clrs, cnorm), (pack(dtype, params), lrs, norm),
                                 "step %d: the copy %s differs from the original" % (t + 1, c))
            ref_lrs = case["lr"][t]
            self.assertEqual(len(lrs), len(ref_lrs))
            for a, b in zip(lrs, ref_lrs):
                e = abs(a - b) / abs(b)
                worst_lr = max(worst_lr, e)
                self.assertLessEqual(e, LR_TOL, "step %d: lr %r, torch %r" % (t + 1, lrs, ref_lrs))
            if ref_norm is not None:
                e = abs(norm - ref_norm[t]) / ref_norm[t]
                worst_n = max(worst_n, e)
                self.assertLessEqual(e, TOL[dtype], "step %d: grad_norm %r, torch %r" % (t + 1, norm, ref_norm[t]))
            row = ref_params[t * n:(t + 1) * n]
            floor = ulp_floor(dtype, max(abs(x) for x in row))
            for i in range(n):
                got = rnd(params[i])
                exact += got == row[i]
                total += 1
                e = rel_err(got, row[i], floor)
                if e > worst_p:
                    worst_p = e
                    self.assertLessEqual(e, TOL[dtype], "step %d param %d: optd %r, torch %r"
                                         % (t + 1, i, params[i], row[i]))
            if t + 1 == COPY_AT:
                copies = self.copy_by_checkpoints(name)
        # Each tensor's own step count and scalar state, and the buffers.
        st = self.api.get("/v1/sessions/%s/state" % name).json
        self.assertEqual(st["step"], steps)
        self.assertEqual(sorted(st["tensor_state"]), sorted(st2["name"] for g in st["groups"] for st2 in g["tensors"]))
        for tn, k in case["tensor_steps"].items():  # SGD keeps no step in torch
            self.assertEqual(st["tensor_state"][tn]["step"], k, tn)
        for tn, mu in case.get("mu_product", {}).items():  # it underflows in float32
            self.assertLessEqual(rel_err(st["tensor_state"][tn]["mu_product"], mu, 1e-300), TOL[dtype], tn)
        offs, off = {}, 0
        for g in st["groups"]:
            for x in g["tensors"]:
                size = 1
                for d in x["shape"]:
                    size *= d
                offs[x["name"]] = (off, off + size)
                off += size
        worst_b = 0.0
        for buf, per in case["state"].items():
            self.assertIn(buf, st["state"], "optd has no %s" % buf)
            for tn, vals in per.items():
                a, b = offs[tn]
                got = [rnd(x) for x in st["state"][buf][a:b]]
                want = [rnd(float(x)) for x in vals]
                big = max([abs(x) for x in want] + [1e-300])
                fl = ulp_floor(dtype, big)
                for x, y in zip(got, want):
                    e = rel_err(x, y, fl)
                    worst_b = max(worst_b, e)
                    self.assertLessEqual(e, TOL[dtype], "%s of %s: optd %r, torch %r" % (buf, tn, x, y))
        # History records the first group's lr.
        hist = self.api.get("/v1/sessions/%s/history?after=%d&limit=5" % (name, steps - 5)).json["history"]
        self.assertEqual([h["lr"] for h in hist], [case["lr"][h["step"] - 1][0] for h in hist])
        WORST.note((kind, dtype, "params"), worst_p, case["name"])
        WORST.note((kind, dtype, "buffers"), worst_b, case["name"])
        WORST.note((kind, dtype, "lr"), worst_lr, case["name"])
        if ref_norm is not None:
            WORST.note((kind, dtype, "grad_norm"), worst_n, case["name"])
        ex, tot = EXACT.get((kind, dtype), (0, 0))
        EXACT[(kind, dtype)] = (ex + exact, tot + total)


add_case_tests(GroupReferenceTests, REF["cases"])


if __name__ == "__main__":
    unittest.main()
