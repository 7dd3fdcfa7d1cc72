#!/usr/bin/python3
"""Writes the torch reference trajectories that tests/training/test_reference.py
replays through optd: learning-rate schedules (with and without warmup) and
gradient clipping, float32 and float64. Regenerate from the repository root:

    /usr/bin/python3 tests/training/gen_reference.py

(Debian's python3-torch 1.13 is installed for /usr/bin/python3 only.) Output:
tests/training/data/reference.json.gz, deterministic (gzip mtime 0).

How the reference is made, per case and per step t (t steps already applied):
  - lr_t: a torch.optim.lr_scheduler on a scratch optimizer, stepped t times
    (t - w times after a warmup of w steps), read with its closed form
    _get_closed_form_lr() -- the form API.md names; the recursive get_lr()
    that scheduler.step() uses differs in the last bits, and the file records
    by how much. While t < w the lr is base_lr * ((t + 1) / w).
  - the lr is set into the real optimizer's param group, the gradient (from
    prng.py, exact in both dtypes) is put in p.grad, then
    torch.nn.utils.clip_grad_norm_(p, max_norm) (max_norm = inf when the case
    does not clip, which leaves the gradient alone and still returns torch's
    total_norm), then optimizer.step().
Recorded: params after every step; lr_t (in "lr", by case name: the same
for both dtypes); total_norm before clipping (for the cases that clip; else it
is plain sqrt(sum g^2)). float32 values are written in their shortest form.

ATEN_CPU_CAPABILITY=default keeps torch off its AVX2/FMA kernels, as
tests/gen_reference.py does, so the data does not depend on the machine.

Also tests/training/data/groups.json.gz, which tests/training/test_groups.py
replays: a small model's tensors (API.md "Tensors and parameter groups") in
parameter groups with their own hyperparameters, some tensors skipped on
some steps (p.grad = None in torch; optd is sent their gradient anyway and
must ignore it), every optimizer, both dtypes, with the params after every
step, each group's lr, torch's total_norm when clipping, and at the end each
tensor's state["step"] (and NAdam's mu_product) and state buffers."""

import gzip
import hashlib
import json
import math
import os
import struct
import sys
import warnings
import zlib

os.environ.setdefault("ATEN_CPU_CAPABILITY", "default")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.optim import lr_scheduler as S  # noqa: E402

import prng  # noqa: E402

STEPS = 1000
N = 4
WARMUP = 50

SCHEDULES = {
    "step": {"type": "step", "step_size": 100, "gamma": 0.7},
    "multistep": {"type": "multistep", "milestones": [50, 200, 450, 700], "gamma": 0.5},
    "exponential": {"type": "exponential", "gamma": 0.997},
    # 1,000 steps run past T_max three times: the period must continue.
    "cosine": {"type": "cosine", "T_max": 300, "eta_min": 0.001},
    "linear": {"type": "linear", "start_factor": 0.25, "end_factor": 0.9, "total_iters": 400},
}

SGD = {"lr": 0.05, "momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0,
       "maximize": False}
ADAM = {"lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
        "maximize": False}


def cases():
    """(name, optimizer, hyperparams incl. lr_schedule/max_grad_norm, grad exponent range)."""
    out = []
    for sname, sched in SCHEDULES.items():
        for w in (0, WARMUP):
            s = dict(sched)
            if w:
                s["warmup_steps"] = w
            out.append(("sgd_%s%s" % (sname, "_warmup" if w else ""), "sgd",
                        dict(SGD, lr_schedule=s, max_grad_norm=None), (-1, 1)))
    out.append(("adam_cosine_warmup", "adam",
                dict(ADAM, lr_schedule={"type": "cosine", "T_max": 300, "eta_min": 1e-4,
                                        "warmup_steps": 30}, max_grad_norm=None), (-1, 1)))
    # Clipping: per-step scales 2**-3 .. 2**2 put the norm (about 1.15 * scale)
    # on both sides of max_norm.
    out.append(("sgd_clip", "sgd", dict(SGD, lr_schedule=None, max_grad_norm=1.0), (-3, 2)))
    out.append(("momentum_clip_step_warmup", "sgd",
                dict(SGD, lr=0.02, momentum=0.9,
                     lr_schedule={"type": "step", "step_size": 150, "gamma": 0.5, "warmup_steps": 20},
                     max_grad_norm=0.75), (-3, 2)))
    out.append(("adam_clip", "adam", dict(ADAM, lr_schedule=None, max_grad_norm=0.5), (-3, 2)))
    return out


def make_scheduler(opt, sched):
    t = sched["type"]
    if t == "step":
        return S.StepLR(opt, step_size=sched["step_size"], gamma=sched["gamma"])
    if t == "multistep":
        return S.MultiStepLR(opt, milestones=sched["milestones"], gamma=sched["gamma"])
    if t == "exponential":
        return S.ExponentialLR(opt, gamma=sched["gamma"])
    if t == "cosine":
        return S.CosineAnnealingLR(opt, T_max=sched["T_max"], eta_min=sched["eta_min"])
    if t == "linear":
        return S.LinearLR(opt, start_factor=sched["start_factor"], end_factor=sched["end_factor"],
                          total_iters=sched["total_iters"])
    raise ValueError(t)


class LrReference:
    """lr for each step from a scheduler's closed form (plus warmup)."""

    def __init__(self, base_lr, sched):
        self.base_lr, self.sched = base_lr, sched
        self.max_rel_recursive = 0.0
        if sched:
            self.w = sched.get("warmup_steps", 0)
            dummy = torch.zeros(1, requires_grad=True)
            self.opt = torch.optim.SGD([dummy], lr=base_lr)
            self.sch = make_scheduler(self.opt, sched)  # last_epoch = 0

    def lr(self, t):
        if not self.sched:
            return self.base_lr
        if t < self.w:
            return self.base_lr * ((t + 1) / self.w)
        k = t - self.w
        while self.sch.last_epoch < k:
            self.sch.step()
        assert self.sch.last_epoch == k
        closed = self.sch._get_closed_form_lr()[0]
        recursive = self.opt.param_groups[0]["lr"]
        if closed:
            self.max_rel_recursive = max(self.max_rel_recursive, abs(recursive - closed) / abs(closed))
        return closed


def torch_optimizer(name, hp, p):
    if name == "sgd":
        return torch.optim.SGD([p], lr=hp["lr"], momentum=hp["momentum"], dampening=hp["dampening"],
                               nesterov=hp["nesterov"], weight_decay=hp["weight_decay"],
                               maximize=hp["maximize"], foreach=False)
    if name == "adam":
        return torch.optim.Adam([p], lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"],
                                weight_decay=hp["weight_decay"], amsgrad=hp["amsgrad"],
                                maximize=hp["maximize"], foreach=False)
    raise ValueError(name)


def grads_digest(grads):
    h = hashlib.sha256()
    for g in grads:
        h.update(struct.pack("<%dd" % len(g), *g))
    return h.hexdigest()


def run(name, optname, hp, exps, dtype):
    tdtype = torch.float32 if dtype == "float32" else torch.float64
    torch.set_default_dtype(tdtype)
    seed = zlib.crc32(name.encode())
    p0 = prng.initial_params(seed, N)
    grads = prng.gradients(seed, STEPS, N, *exps)
    p = torch.tensor(p0, dtype=tdtype)
    opt = torch_optimizer(optname, hp, p)
    lref = LrReference(hp["lr"], hp["lr_schedule"])
    max_norm = hp["max_grad_norm"] if hp["max_grad_norm"] is not None else math.inf
    params, lrs, norms = [], [], []
    clipped = 0
    for t in range(STEPS):
        lr = lref.lr(t)
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.tensor(grads[t], dtype=tdtype)
        total = torch.nn.utils.clip_grad_norm_([p], max_norm)
        if hp["max_grad_norm"] is not None and float(total) + 1e-6 > hp["max_grad_norm"]:
            clipped += 1
        opt.step()
        params.append([float(x) for x in p.tolist()])
        lrs.append(lr)
        norms.append(float(total))
    assert all(math.isfinite(x) for row in params for x in row)
    case = {
        "name": "%s_%s" % (name, "f32" if dtype == "float32" else "f64"),
        "optimizer": optname, "dtype": dtype, "hyperparams": hp,
        "n": N, "steps": STEPS, "seed": seed, "grad_exponents": list(exps),
        "grads_sha256": grads_digest(grads), "p0": p0,
        "params": Raw([fmt(x, dtype) for row in params for x in row]),
        "lr": name, "steps_clipped": clipped,
        "recursive_vs_closed_form_max_rel": lref.max_rel_recursive,
    }
    if hp["max_grad_norm"] is not None:  # else the norm is plain sqrt(sum g^2)
        case["grad_norm"] = Raw([fmt(x, dtype) for x in norms])
    return case, lrs


class Raw(list):
    """A list of numbers already formatted for JSON."""


def fmt(x, dtype):
    """Shortest text that reads back as x in dtype (float32: via the nearest
    double, then the nearest float32, which is checked here)."""
    if dtype == "float64":
        return repr(float(x))
    s = np.format_float_positional(np.float32(x), unique=True, trim="-") \
        if 1e-4 <= abs(x) < 1e16 else np.format_float_scientific(np.float32(x), unique=True, trim="-")
    back = struct.unpack("<f", struct.pack("<f", float(s)))[0]
    assert back == x, (x, s)
    return s


def dumps(o):
    if isinstance(o, Raw):
        return "[" + ",".join(o) + "]"
    if isinstance(o, dict):
        return "{" + ",".join(json.dumps(k) + ":" + dumps(v) for k, v in o.items()) + "}"
    if isinstance(o, list):
        return "[" + ",".join(dumps(v) for v in o) + "]"
    return json.dumps(o)


# ---- parameter groups and skipped tensors -----------------------------------

# A small model: name -> shape (flat in this order when the groups list them
# in it; each case lists them in its own group order).
TENSORS = {"fc1.weight": [3, 4], "fc1.bias": [3], "fc2.weight": [2, 3], "fc2.bias": [2],
           "emb": [5], "scale": []}
GROUP_STEPS = 200
OPT_CLASSES = {"sgd": "SGD", "adagrad": "Adagrad", "adadelta": "Adadelta", "rmsprop": "RMSprop",
               "adam": "Adam", "adamw": "AdamW", "adamax": "Adamax", "nadam": "NAdam"}


def group_cases():
    """(name, optimizer, session hyperparams, [(group hyperparams, [tensor names])], grad exponents).
    The session's hyperparams are the defaults every group starts from, as
    torch's defaults; lr_schedule and max_grad_norm are the session's."""
    W = ["fc1.weight", "fc2.weight", "emb"]
    B = ["fc1.bias", "fc2.bias", "scale"]
    return [
        ("adamw_decay_nodecay", "adamw", {"lr": 0.01, "weight_decay": 0.1},
         [({}, W), ({"weight_decay": 0.0, "lr": 0.005, "amsgrad": True}, B)], (-1, 1)),
        ("sgd_lr_momentum", "sgd", {"lr": 0.05},
         [({"momentum": 0.9, "nesterov": True}, ["fc1.weight", "fc1.bias"]),
          ({"lr": 0.1}, ["fc2.weight", "fc2.bias"]),
          ({"lr": 0.02, "momentum": 0.5, "dampening": 0.1, "weight_decay": 0.01}, ["emb", "scale"])], (-1, 1)),
        ("nadam_groups", "nadam", {"lr": 0.002},
         [({}, W), ({"momentum_decay": 0.01, "lr": 0.001, "weight_decay": 0.01}, B)], (-1, 1)),
        # initial_accumulator_value is the session's: torch's Adagrad takes
        # it from its constructor only (a group's own is ignored).
        ("adagrad_lr_decay", "adagrad", {"lr": 0.05, "initial_accumulator_value": 0.1},
         [({"lr_decay": 0.01}, W), ({"lr": 0.1, "weight_decay": 0.01}, B)], (-1, 1)),
        ("adam_cosine_clip", "adam", {"lr": 0.01, "max_grad_norm": 0.5,
                                      "lr_schedule": {"type": "cosine", "T_max": 80, "eta_min": 1e-4,
                                                      "warmup_steps": 10}},
         [({}, W), ({"lr": 0.02, "betas": [0.8, 0.99]}, B)], (-3, 2)),
        ("rmsprop_centered_momentum", "rmsprop", {"lr": 0.01},
         [({"centered": True}, W), ({"momentum": 0.9}, B)], (-1, 1)),
        ("adamax_groups", "adamax", {"lr": 0.002},
         [({}, W), ({"lr": 0.004, "weight_decay": 0.01}, B)], (-1, 1)),
        ("adadelta_step_schedule", "adadelta", {"lr": 1.0, "lr_schedule": {"type": "step", "step_size": 50,
                                                                           "gamma": 0.5}},
         [({"rho": 0.95}, W), ({"lr": 0.5}, B)], (-1, 1)),
    ]


def skips_for(seed, steps, names):
    """Which tensors have no gradient at each step: emb is frozen for the
    first 20 steps, fc2.bias misses every third step, fc1.weight one in
    eleven, scale at random one in four; never all of them."""
    r = prng.SplitMix64(seed ^ 0x5C1F)
    out = []
    for t in range(steps):
        sk = []
        if t < 20:
            sk.append("emb")
        if t % 3 == 1:
            sk.append("fc2.bias")
        if t % 11 == 5:
            sk.append("fc1.weight")
        if r.below(4) == 0:
            sk.append("scale")
        out.append([n for n in names if n in sk])
    return out


def group_hp(optname, session, own):
    """A group's full torch hyperparameters: the optimizer's, the session's,
    then the group's own."""
    base = {"sgd": SGD, "adam": ADAM}.get(optname)
    hp = dict(base) if base else {}
    hp.update({k: v for k, v in session.items() if k not in ("lr_schedule", "max_grad_norm")})
    hp.update(own)
    return hp


def run_groups(name, optname, session, groups, exps, dtype):
    tdtype = torch.float32 if dtype == "float32" else torch.float64
    torch.set_default_dtype(tdtype)
    seed = zlib.crc32(("groups-" + name).encode())
    order = [t for _, names in groups for t in names]
    sizes = [int(np.prod(TENSORS[t])) if TENSORS[t] else 1 for t in order]
    n = sum(sizes)
    p0 = prng.initial_params(seed, n)
    grads = prng.gradients(seed, GROUP_STEPS, n, *exps)
    skips = skips_for(seed, GROUP_STEPS, order)
    offs = np.cumsum([0] + sizes)
    params = {}
    for k, t in enumerate(order):
        params[t] = torch.tensor(p0[offs[k]:offs[k + 1]], dtype=tdtype).reshape(TENSORS[t])
    pgroups = []
    for own, names in groups:
        hp = group_hp(optname, session, own)
        g = {"params": [params[t] for t in names]}
        for k, v in hp.items():
            if k == "maximize" and optname == "nadam":
                continue  # not in 1.13's NAdam
            g[k] = tuple(v) if k == "betas" else v
        pgroups.append(g)
    cls = getattr(torch.optim, OPT_CLASSES[optname])
    # foreach=False everywhere except NAdam, as tests/gen_reference.py (pytorch#92699).
    extra = {"initial_accumulator_value": session["initial_accumulator_value"]} \
        if "initial_accumulator_value" in session else {}
    opt = cls(pgroups, foreach=(optname == "nadam"), **extra)
    lrefs = [LrReference(g["lr"], session.get("lr_schedule")) for g in pgroups]
    clip = session.get("max_grad_norm")
    traj, lrs, norms = [], [], []
    for t in range(GROUP_STEPS):
        step_lrs = [lref.lr(t) for lref in lrefs]
        for g, lr in zip(opt.param_groups, step_lrs):
            g["lr"] = lr
        with_grad = []
        for k, tn in enumerate(order):
            p = params[tn]
            if tn in skips[t]:
                p.grad = None
            else:
                p.grad = torch.tensor(grads[t][offs[k]:offs[k + 1]], dtype=tdtype).reshape(TENSORS[tn])
                with_grad.append(p)
        total = torch.nn.utils.clip_grad_norm_(with_grad, clip if clip is not None else math.inf)
        opt.step()
        traj.append([float(x) for tn in order for x in params[tn].reshape(-1).tolist()])
        lrs.append(step_lrs)
        norms.append(float(total))
    steps, mu, bufs = {}, {}, {}
    for tn in order:
        st = opt.state[params[tn]]
        if "step" in st:  # SGD keeps none
            steps[tn] = int(float(st["step"]))
        if "mu_product" in st:
            mu[tn] = float(st["mu_product"])
        for k, v in st.items():
            if torch.is_tensor(v) and k not in ("step", "mu_product"):
                bufs.setdefault(k, {})[tn] = Raw([fmt(x, dtype) for x in v.reshape(-1).tolist()])
    case = {
        "name": "%s_%s" % (name, "f32" if dtype == "float32" else "f64"),
        "optimizer": optname, "dtype": dtype, "hyperparams": session,
        "groups": [{"hyperparams": own, "tensors": [{"name": t, "shape": TENSORS[t]} for t in names]}
                   for own, names in groups],
        "steps": GROUP_STEPS, "seed": seed, "grad_exponents": list(exps), "n": n,
        "grads_sha256": grads_digest(grads), "p0": p0, "skip": skips,
        "params": Raw([fmt(x, dtype) for row in traj for x in row]),
        "lr": lrs, "tensor_steps": steps, "state": bufs,
    }
    if mu:
        case["mu_product"] = mu
    if clip is not None:
        case["grad_norm"] = Raw([fmt(x, dtype) for x in norms])
    return case


def write_gz(path, raw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
            gz.write(raw)


def main_groups():
    out = {"generator": "tests/training/gen_reference.py", "torch": torch.__version__,
           "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY"), "cases": []}
    for name, optname, session, groups, exps in group_cases():
        for dtype in ("float32", "float64"):
            out["cases"].append(run_groups(name, optname, session, groups, exps, dtype))
    path = os.path.join(HERE, "data", "groups.json.gz")
    raw = dumps(out).encode()
    assert json.loads(raw)
    write_gz(path, raw)
    print("%d group cases, %d bytes -> %s" % (len(out["cases"]), os.path.getsize(path), path))


def main():
    warnings.simplefilter("ignore")  # scheduler.step() before optimizer.step()
    torch.set_num_threads(1)
    out = {"generator": "tests/training/gen_reference.py", "torch": torch.__version__,
           "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY"),
           "lr": {}, "cases": []}
    for name, optname, hp, exps in cases():
        for dtype in ("float32", "float64"):
            case, lrs = run(name, optname, hp, exps, dtype)
            assert out["lr"].setdefault(name, lrs) == lrs  # the same in both dtypes
            out["cases"].append(case)
    path = os.path.join(HERE, "data", "reference.json.gz")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    raw = dumps(out).encode()
    assert json.loads(raw)
    with open(path, "wb") as f:
        with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
            gz.write(raw)
    for c in out["cases"]:
        print("%-36s clipped %4d  recursive-vs-closed %.3g" % (c["name"], c["steps_clipped"],
                                                               c["recursive_vs_closed_form_max_rel"]))
    print("%d cases, %d bytes (%d raw) -> %s" % (len(out["cases"]), os.path.getsize(path), len(raw), path))
    main_groups()


if __name__ == "__main__":
    main()
