"""Learning-rate schedules and gradient clipping against torch: replays the
gradients of data/reference.json.gz (written by gen_reference.py from torch
1.13) through optd, step by step, and compares the params after every step
(float64 within 1e-12, float32 within 1e-5, relative), the reply's "lr"
(1e-15 relative) and "grad_norm" (torch's total_norm, same tolerances).

"Relative" is tests/test_optim.c's rule: |got - ref| <= TOL * max(|ref|, floor)
with floor = 16 * u * M / TOL, M the largest |ref| of the vector at that step
and u the unit roundoff (2^-24, 2^-53): TOL relative, or within 16 rounding
units of the vector's largest element for an element that cancels (a param
crossing zero keeps the absolute error of its operands). That is floor =
0.095 M in float32 and 1.8e-3 M in float64."""

import math
import struct
import hashlib
import sys
import unittest

from harness import (DaemonTest, LR_TOL, TOL, ULP_ALLOWANCE, Worst, add_case_tests, f32, load_reference, rel_err,
                     ulp_floor)
import prng


# Largest deviations seen, by (kind, dtype, what): printed at the end.
WORST = Worst()

REF = load_reference("reference.json.gz")


class ReferenceTests(DaemonTest):
    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        lines = ["", "Largest deviation from torch (relative, as test_optim.c measures it):"]
        for key in sorted(WORST):
            v, where = WORST[key]
            lines.append("  %-10s %-8s %-11s %.3e  (%s)" % (key + (v, where)))
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()

    def replay(self, case):
        dtype, n, steps = case["dtype"], case["n"], case["steps"]
        rnd = (lambda x: f32(x)) if dtype == "float32" else (lambda x: x)
        grads = prng.gradients(case["seed"], steps, n, *case["grad_exponents"])
        h = hashlib.sha256()
        for g in grads:
            h.update(struct.pack("<%dd" % n, *g))
        self.assertEqual(h.hexdigest(), case["grads_sha256"], "prng.py no longer makes the reference gradients")
        self.assertEqual(prng.initial_params(case["seed"], n), case["p0"])
        # float32 values are written in their shortest form: read them back
        # as the float32 they name.
        ref_params = [rnd(x) for x in case["params"]]
        ref_lr = REF["lr"][case["lr"]]
        ref_norm = [rnd(x) for x in case["grad_norm"]] if "grad_norm" in case else None
        hp = case["hyperparams"]
        kind = "clipping" if hp["max_grad_norm"] is not None else "schedule"
        name = "ref-" + case["name"].replace("_", "-")
        s = self.create({"name": name, "optimizer": case["optimizer"], "dtype": dtype,
                         "params": case["p0"], "hyperparams": hp})
        # Listed in full and as given.
        self.assertEqual(s["hyperparams"]["max_grad_norm"], hp["max_grad_norm"])
        want_sched = dict(hp["lr_schedule"], warmup_steps=hp["lr_schedule"].get("warmup_steps", 0)) \
            if hp["lr_schedule"] else None
        self.assertEqual(s["hyperparams"]["lr_schedule"], want_sched)
        worst_p = worst_lr = worst_n = worst_u = 0.0
        for t in range(steps):
            r = self.step(name, grads[t])
            self.assertEqual(r.status, 200, "step %d: %r" % (t + 1, r))
            b = r.json
            self.assertEqual(b["step"], t + 1)
            self.assertEqual(b.get("contributors"), 1)
            lr_err = abs(b["lr"] - ref_lr[t]) / abs(ref_lr[t])
            worst_lr = max(worst_lr, lr_err)
            self.assertLessEqual(lr_err, LR_TOL, "step %d: lr %r, torch %r" % (t + 1, b["lr"], ref_lr[t]))
            if ref_norm is not None:
                want_norm = ref_norm[t]
            else:  # no clipping: torch's total_norm is plain sqrt(sum g^2)
                want_norm = math.sqrt(math.fsum(rnd(x) * rnd(x) for x in grads[t]))
            n_err = abs(b["grad_norm"] - want_norm) / want_norm
            worst_n = max(worst_n, n_err)
            self.assertLessEqual(n_err, TOL[dtype], "step %d: grad_norm %r, torch %r"
                                 % (t + 1, b["grad_norm"], want_norm))
            row = ref_params[t * n:(t + 1) * n]
            floor = ulp_floor(dtype, max(abs(x) for x in row))
            for i in range(n):
                ref = row[i]
                got = rnd(b["params"][i])
                e = rel_err(got, ref, floor)
                worst_u = max(worst_u, abs(got - ref) / (floor * TOL[dtype] / ULP_ALLOWANCE))
                if e > worst_p:
                    worst_p = e
                    self.assertLessEqual(e, TOL[dtype], "step %d param %d: optd %r, torch %r"
                                         % (t + 1, i, b["params"][i], ref))
        # History records the same lr and grad_norm per step.
        hist = self.api.get("/v1/sessions/%s/history?after=%d&limit=100" % (name, steps - 20))
        self.assertEqual(hist.status, 200, hist)
        rows = hist.json["history"]
        self.assertEqual([x["step"] for x in rows], list(range(steps - 19, steps + 1)))
        for x in rows:
            t = x["step"] - 1
            self.assertEqual(x["lr"], ref_lr[t])
            self.assertEqual(x["contributors"], 1)
            want_norm = ref_norm[t] if ref_norm is not None else None
            if want_norm is not None:
                self.assertLessEqual(abs(x["grad_norm"] - want_norm) / want_norm, TOL[dtype])
        # The schedule's state is the step count: a checkpoint carries the
        # hyperparams, so a restored copy continues with the same lr.
        st = self.api.get("/v1/sessions/%s/state" % name)
        self.assertEqual(st.status, 200, st)
        self.assertEqual(st.json["hyperparams"]["lr_schedule"], want_sched)
        self.assertEqual(st.json["hyperparams"]["max_grad_norm"], hp["max_grad_norm"])
        WORST.note((kind, dtype, "params"), worst_p, case["name"])
        WORST.note((kind, dtype, "params u*M"), worst_u, case["name"])
        WORST.note((kind, dtype, "lr"), worst_lr, case["name"])
        WORST.note((kind, dtype, "grad_norm"), worst_n, case["name"])


add_case_tests(ReferenceTests, REF["cases"])


if __name__ == "__main__":
    unittest.main()
