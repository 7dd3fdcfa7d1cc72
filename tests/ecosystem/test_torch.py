"""optd.torch.RemoteOptimizer against local torch.optim: logistic regression
on scikit-learn's bundled digits, the same loop twice (remote and local),
parameters compared after every step. Needs torch and sklearn in the running
interpreter (Debian's /usr/bin/python3 with python3-torch, python3-sklearn);
skipped otherwise. Also runs clients/python/examples/train_digits.py."""

import copy
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
import uuid

from harness import CLIENT_DIR, DaemonCase, have

HAVE = have("torch") and have("sklearn")
if HAVE:
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    import optd
    import optd.torch

STEPS = 60
BATCH = 128


def uniq():
    return "torch-%s" % uuid.uuid4().hex[:10]


@unittest.skipUnless(HAVE, "needs torch and sklearn (apt-get install python3-torch python3-sklearn)")
class RemoteOptimizerTests(DaemonCase):
    worst = {}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        d = load_digits()
        cls.x64 = torch.tensor(d.data / 16.0, dtype=torch.float64)
        cls.y = torch.tensor(d.target, dtype=torch.long)

    def setUp(self):
        self.client = optd.Client(self.url)

    def batch(self, step, dtype):
        n = len(self.y) // BATCH
        lo = (step % n) * BATCH
        return self.x64[lo:lo + BATCH].to(dtype), self.y[lo:lo + BATCH]

    @staticmethod
    def rel_err(a, b, tol):
        """The metric of tests/test_optim.c: max over elements of |a-b| / max(|b|, floor),
        floor = 16 u M / tol (M = max |b|, u the dtype's unit roundoff): tol relative,
        or within 16 rounding units of the vector's largest element for an
        element that cancels (torch's own FMA and portable kernels differ so)."""
        u = 2.0 ** -53 if b.dtype == torch.float64 else 2.0 ** -24
        m = b.abs().max().item()
        scale = b.abs().clamp_min(16 * u * m / tol)
        return ((a - b).abs() / scale).max().item()

    def train_pair(self, optimizer, local_cls, hp, dtype=None, rtol=1e-12, steps=STEPS,
                   scheduler=None, remote_hp=None):
        dtype = dtype or torch.float64
        torch.manual_seed(7)
        remote = torch.nn.Linear(64, 10, dtype=dtype)
        local = copy.deepcopy(remote)
        name = uniq()
        ropt = optd.torch.RemoteOptimizer(remote.parameters(), session=name, client=self.client,
                                          optimizer=optimizer, **(remote_hp if remote_hp is not None else hp))
        lopt = local_cls(local.parameters(), **hp)
        scheds = []
        if scheduler:
            scheds = [scheduler(ropt), scheduler(lopt)]
        worst = 0.0
        for step in range(steps):
            xb, yb = self.batch(step, dtype)
            for m, o in ((remote, ropt), (local, lopt)):
                o.zero_grad()
                loss = F.cross_entropy(m(xb), yb)
                loss.backward()
                o.step()
            for s in scheds:
                s.step()
            for (pn, pr), pl in zip(remote.named_parameters(), local.parameters()):
                err = self.rel_err(pr.detach(), pl.detach(), rtol)
                worst = max(worst, err)
                self.assertLessEqual(err, rtol, "%s %s after step %d: relative deviation %.3g"
                                     % (optimizer, pn, step + 1, err))
        self.assertEqual(ropt.last_step, steps)
        self.assertEqual(self.client.get(name).current_step, steps)
        key = "%s/%s" % (optimizer, str(dtype).replace("torch.", ""))
        RemoteOptimizerTests.worst[key] = max(worst, RemoteOptimizerTests.worst.get(key, 0.0))
        return name, remote, local, ropt, lopt

    def test_adam_float64(self):
        self.train_pair("adam", torch.optim.Adam, {"lr": 0.01})

    def test_adam_amsgrad_weight_decay_float64(self):
        self.train_pair("adam", torch.optim.Adam, {"lr": 0.02, "betas": (0.8, 0.99), "amsgrad": True,
                                                   "weight_decay": 0.01})

    def test_sgd_momentum_float64(self):
        self.train_pair("sgd", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})

    def test_sgd_nesterov_float64(self):
        self.train_pair("sgd", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True,
                                                 "weight_decay": 1e-3})

    def test_adam_float32(self):
        self.train_pair("adam", torch.optim.Adam, {"lr": 0.01}, dtype=torch.float32, rtol=1e-5)

    def test_lr_scheduler_patches_lr(self):
        """torch.optim.lr_scheduler changes group['lr']; the next step PATCHes it."""
        sched = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=10, gamma=0.5)  # noqa: E731
        name, *_ = self.train_pair("adam", torch.optim.Adam, {"lr": 0.05}, steps=35, scheduler=sched)
        self.assertEqual(self.client.get(name).hyperparams["lr"], 0.05 * 0.5 ** 3)

    def test_resume_from_existing_session(self):
        name, remote, local, ropt, lopt = self.train_pair("sgd", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9},
                                                          steps=20)
        torch.manual_seed(99)
        again = torch.nn.Linear(64, 10, dtype=torch.float64)  # another init: replaced by the session's values
        opt = optd.torch.RemoteOptimizer(again.parameters(), session=name, client=self.client,
                                         optimizer="sgd", lr=0.1, momentum=0.9)
        self.assertEqual(opt.last_step, 20)
        for pa, pr in zip(again.parameters(), remote.parameters()):
            self.assertTrue(torch.equal(pa.detach(), pr.detach()))
        for step in range(20, 30):  # the momentum buffer was on the daemon all along
            xb, yb = self.batch(step, torch.float64)
            for m, o in ((again, opt), (local, lopt)):
                o.zero_grad()
                F.cross_entropy(m(xb), yb).backward()
                o.step()
            for pa, pl in zip(again.parameters(), local.parameters()):
                self.assertLessEqual(self.rel_err(pa.detach(), pl.detach(), 1e-12), 1e-12)
        with self.assertRaises(ValueError):  # another shape
            optd.torch.RemoteOptimizer(torch.nn.Linear(3, 2).parameters(), session=name, client=self.client,
                                       optimizer="sgd")

    def test_closure_and_loss_reported(self):
        torch.manual_seed(3)
        m = torch.nn.Linear(64, 10, dtype=torch.float64)
        name = uniq()
        opt = optd.torch.RemoteOptimizer(m.parameters(), session=name, url=self.url, optimizer="adamw", lr=0.01)
        self.assertEqual(opt.param_groups[0]["weight_decay"], 0.01)  # the daemon's defaults fill the group
        xb, yb = self.batch(0, torch.float64)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(m(xb), yb)
            loss.backward()
            return loss
        losses = [opt.step(closure).item() for _ in range(5)]
        self.assertLess(losses[-1], losses[0])
        self.assertEqual(opt.last_step, 5)
        try:
            hist = self.client.history(name)
        except optd.OptdError:
            return  # a daemon without /history
        self.assertEqual([round(h["loss"], 12) for h in hist], [round(v, 12) for v in losses])

    def test_zzz_report(self):
        if self.worst:
            print("\n    worst relative deviation (tests/test_optim.c's metric), remote vs local torch.optim: " +
                  ", ".join("%s %.2g" % kv for kv in sorted(self.worst.items())), end=" ")


@unittest.skipUnless(HAVE and have("matplotlib"), "needs torch, sklearn and matplotlib")
class ExampleTests(DaemonCase):
    def test_train_digits_example(self):
        tmp = tempfile.mkdtemp(prefix="optd-example-")
        self.addCleanup(shutil.rmtree, tmp, True)
        out = os.path.join(tmp, "loss.png")
        script = os.path.join(CLIENT_DIR, "examples", "train_digits.py")
        r = subprocess.run([sys.executable, script, "--url", self.url, "--steps", "40", "--out", out],
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("test accuracy", r.stdout)
        with open(out, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        self.assertGreater(os.path.getsize(out), 5000)
