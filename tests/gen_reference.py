#!/usr/bin/python3
# gen-reference: writes the torch.optim reference trajectories that
# tests/test_optim.c replays against optim/. Regenerate (from the repo root) with
#
#     /usr/bin/python3 tests/gen_reference.py            # writes tests/data/
#
# using Debian's python3-torch (1.13) and python3-numpy, which are installed
# for /usr/bin/python3 only. The output is deterministic: every case seeds its
# own generator from its name, so adding a case does not change the others.
# `--out DIR` writes elsewhere; `--native` keeps torch's own CPU kernels (FMA)
# instead of the portable ones, which is only useful to measure rounding noise.
#
# Format of one case file, tests/data/<case>.bin, all little-endian:
#   char  magic[8]            "OPTDREF\0"
#   u32   version             1
#   u32   dtype               0 = float32, 1 = float64 (optim_dtype)
#   u32   n                   elements in the vector
#   u32   steps               steps recorded
#   char  optimizer[16]       optd name, NUL-padded ("adam")
#   u32   n_hp                then n_hp records of
#     char name[32]           torch/optd hyperparameter name, NUL-padded
#     u32  count              1, or 2 for a pair (betas)
#     u32  is_bool            1 for a boolean (value 0 or 1)
#     f64  value[2]           value[1] is 0 unless count is 2
#   u32   n_buf               then n_buf names, char[32] each: the torch state
#                             buffers present after the last step
#   u32   has_scalar          1 when the optimizer has a scalar state
#   char  scalar_name[32]     ("mu_product"), NUL-padded
#   f64   scalar              its value after the last step
#   then arrays of n elements of dtype:
#     params before the first step
#     steps times: the gradient fed at that step, the params after it
#     n_buf times: the buffer after the last step, in the order named above
# tests/data/index.txt lists the case files, one a line.
#
# Why the portable kernels: torch picks AVX2 kernels at run time, and those
# fuse multiply-adds (vec::fmadd), so its last bit depends on the machine that
# generated the data. ATEN_CPU_CAPABILITY=default keeps torch's order of
# operations but rounds every operation, as plain C does; the data is then
# the same on any x86-64 machine.

import argparse
import os
import struct
import sys
import zlib

if "--native" not in sys.argv:
    os.environ["ATEN_CPU_CAPABILITY"] = "default"

import numpy as np  # noqa: E402
import torch  # noqa: E402

MAGIC = b"OPTDREF\0"
VERSION = 1
DTYPES = {"f32": (0, torch.float32, np.float32), "f64": (1, torch.float64, np.float64)}

# The full hyperparameter set of each optd optimizer, at optd's defaults. A
# case overrides some of them; the file always carries all of them.
BETAS = (0.9, 0.999)
SGD_HP = dict(lr=0.01, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
              maximize=False)
DEFAULTS = {
    "sgd": SGD_HP,
    "momentum": dict(SGD_HP, momentum=0.9),
    "nag": dict(SGD_HP, momentum=0.9, nesterov=True),
    "adagrad": dict(lr=0.01, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                    eps=1e-10, maximize=False),
    "adadelta": dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False),
    "rmsprop": dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                    centered=False, maximize=False),
    "adam": dict(lr=1e-3, betas=BETAS, eps=1e-8, weight_decay=0.0, amsgrad=False,
                 maximize=False),
    "adamax": dict(lr=2e-3, betas=BETAS, eps=1e-8, weight_decay=0.0, maximize=False),
    "adamw": dict(lr=1e-3, betas=BETAS, eps=1e-8, weight_decay=1e-2, amsgrad=False,
                  maximize=False),
    "nadam": dict(lr=2e-3, betas=BETAS, eps=1e-8, weight_decay=0.0, momentum_decay=4e-3,
                  maximize=False),
}

# (suffix, overrides, steps, n, gradient options). Every entry is generated in
# float32 and float64. Gradient options: nozero drops the exact zeros (for
# eps = 0, where a zero first gradient would divide 0 by 0).
LONG = 1200
CASES = {
    "sgd": [
        ("defaults", {}, 100, 13, {}),
        ("lr0", dict(lr=0.0), 50, 7, {}),
        ("lr_large", dict(lr=0.5), 80, 16, {}),
        ("weight_decay", dict(weight_decay=0.1), 120, 24, {}),
        ("maximize", dict(maximize=True), 100, 17, {}),
        ("momentum", dict(momentum=0.5), 150, 31, {}),
        ("momentum_dampening", dict(momentum=0.9, dampening=0.3), 150, 19, {}),
        ("momentum_dampening1", dict(momentum=0.9, dampening=1.0), 100, 8, {}),
        ("nesterov", dict(momentum=0.9, nesterov=True), 150, 33, {}),
        ("all", dict(lr=0.03, momentum=0.99, weight_decay=0.01, nesterov=True, maximize=True),
         200, 40, {}),
        ("long", dict(momentum=0.9, weight_decay=1e-3), LONG, 16, {}),
    ],
    "momentum": [
        ("defaults", {}, 150, 29, {}),
        ("dampening", dict(dampening=0.5), 120, 20, {}),
        ("weight_decay_maximize", dict(weight_decay=0.05, maximize=True), 120, 11, {}),
        ("momentum099", dict(momentum=0.99, lr=0.1), 200, 64, {}),
        ("nesterov", dict(nesterov=True), 100, 9, {}),
        ("long", dict(lr=0.02, dampening=0.1), LONG, 16, {}),
    ],
    "nag": [
        ("defaults", {}, 150, 27, {}),
        ("weight_decay", dict(weight_decay=0.02), 120, 14, {}),
        ("maximize", dict(maximize=True), 100, 35, {}),
        ("momentum05", dict(momentum=0.5, lr=0.2), 150, 21, {}),
        ("nesterov_off", dict(nesterov=False), 100, 10, {}),
        ("long", dict(momentum=0.95), LONG, 16, {}),
    ],
    "adagrad": [
        ("defaults", {}, 150, 23, {}),
        ("lr_decay", dict(lr_decay=0.01, lr=0.1), 150, 18, {}),
        ("initial_accumulator", dict(initial_accumulator_value=0.5), 120, 12, {}),
        ("weight_decay", dict(weight_decay=0.1, lr=0.3), 120, 30, {}),
        ("maximize", dict(maximize=True), 100, 15, {}),
        ("eps0", dict(eps=0.0, lr=0.1), 100, 9, {"nozero": True}),
        ("eps0_accumulator", dict(eps=0.0, initial_accumulator_value=0.1), 100, 17, {}),
        ("lr0", dict(lr=0.0, lr_decay=0.5), 50, 7, {}),
        ("all", dict(lr=0.05, lr_decay=1e-3, weight_decay=1e-2, initial_accumulator_value=1.0,
                     eps=1e-6, maximize=True), 200, 48, {}),
        ("long", dict(lr=0.1, lr_decay=1e-4), LONG, 16, {}),
    ],
    "adadelta": [
        ("defaults", {}, 150, 25, {}),
        ("rho1", dict(rho=1.0), 100, 13, {}),
        ("rho0", dict(rho=0.0), 100, 11, {}),
        ("weight_decay", dict(weight_decay=0.1), 120, 22, {}),
        ("maximize", dict(maximize=True, lr=0.5), 100, 16, {}),
        ("eps_large", dict(eps=1e-2, rho=0.95), 100, 19, {}),
        ("eps0", dict(eps=0.0), 60, 8, {"nozero": True}),
        ("all", dict(lr=2.0, rho=0.5, eps=1e-4, weight_decay=1e-2, maximize=True), 200, 37, {}),
        ("long", dict(rho=0.99, eps=1e-5), LONG, 16, {}),
    ],
    "rmsprop": [
        ("defaults", {}, 150, 26, {}),
        ("centered", dict(centered=True), 150, 20, {}),
        ("momentum", dict(momentum=0.9), 150, 14, {}),
        ("centered_momentum", dict(centered=True, momentum=0.5, lr=1e-3), 150, 33, {}),
        ("weight_decay", dict(weight_decay=0.1), 120, 18, {}),
        ("maximize", dict(maximize=True), 100, 12, {}),
        ("alpha0", dict(alpha=0.0), 100, 10, {}),
        ("alpha_near1", dict(alpha=0.9999), 150, 15, {}),
        ("eps0", dict(eps=0.0), 100, 9, {"nozero": True}),
        ("all", dict(lr=3e-3, alpha=0.9, eps=1e-6, weight_decay=1e-2, momentum=0.9,
                     centered=True, maximize=True), 200, 45, {}),
        ("long", dict(momentum=0.8, centered=True), LONG, 16, {}),
    ],
    "adam": [
        ("defaults", {}, 150, 24, {}),
        ("lr_large", dict(lr=0.1), 150, 32, {}),
        ("amsgrad", dict(amsgrad=True, lr=0.05), 150, 21, {}),
        ("weight_decay", dict(weight_decay=0.1, lr=0.01), 120, 17, {}),
        ("maximize", dict(maximize=True, lr=0.02), 100, 13, {}),
        ("betas_near1", dict(betas=(0.999, 0.99999), lr=0.01), 150, 19, {}),
        ("betas0", dict(betas=(0.0, 0.0), lr=0.01), 100, 10, {}),
        ("eps0", dict(eps=0.0, lr=0.01), 100, 11, {"nozero": True}),
        ("eps_large", dict(eps=1.0, lr=0.1), 100, 8, {}),
        ("lr0", dict(lr=0.0), 50, 7, {}),
        ("all", dict(lr=0.03, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2, amsgrad=True,
                     maximize=True), 200, 50, {}),
        ("long", dict(lr=0.01, amsgrad=True), LONG, 16, {}),
    ],
    "adamax": [
        ("defaults", {}, 150, 22, {}),
        ("lr_large", dict(lr=0.1), 150, 30, {}),
        ("weight_decay", dict(weight_decay=0.1, lr=0.01), 120, 16, {}),
        ("maximize", dict(maximize=True, lr=0.02), 100, 14, {}),
        ("betas_near1", dict(betas=(0.999, 0.99999), lr=0.01), 150, 20, {}),
        ("betas0", dict(betas=(0.0, 0.0), lr=0.01), 100, 9, {}),
        ("eps0", dict(eps=0.0, lr=0.01), 100, 12, {"nozero": True}),
        ("all", dict(lr=0.05, betas=(0.5, 0.9), eps=1e-4, weight_decay=1e-2, maximize=True),
         200, 41, {}),
        ("long", dict(lr=0.01), LONG, 16, {}),
    ],
    "adamw": [
        ("defaults", {}, 150, 28, {}),
        ("lr_large", dict(lr=0.1), 150, 18, {}),
        ("amsgrad", dict(amsgrad=True, lr=0.05), 150, 23, {}),
        ("weight_decay0", dict(weight_decay=0.0, lr=0.01), 100, 12, {}),
        ("weight_decay_large", dict(weight_decay=1.0, lr=0.05), 120, 15, {}),
        ("maximize", dict(maximize=True, lr=0.02), 100, 10, {}),
        ("betas_near1", dict(betas=(0.999, 0.99999), lr=0.01), 150, 17, {}),
        ("eps0", dict(eps=0.0, lr=0.01), 100, 9, {"nozero": True}),
        ("all", dict(lr=0.02, betas=(0.85, 0.995), eps=1e-7, weight_decay=0.1, amsgrad=True,
                     maximize=True), 200, 46, {}),
        ("long", dict(lr=0.01, weight_decay=0.05), LONG, 16, {}),
    ],
    "nadam": [
        ("defaults", {}, 150, 20, {}),
        ("lr_large", dict(lr=0.1), 150, 27, {}),
        ("weight_decay", dict(weight_decay=0.1, lr=0.01), 120, 14, {}),
        ("maximize", dict(maximize=True, lr=0.02), 100, 19, {}),
        ("momentum_decay0", dict(momentum_decay=0.0, lr=0.01), 100, 11, {}),
        ("momentum_decay_large", dict(momentum_decay=0.5, lr=0.01), 100, 16, {}),
        ("betas_near1", dict(betas=(0.999, 0.99999), lr=0.01), 150, 13, {}),
        ("eps0", dict(eps=0.0, lr=0.01), 100, 8, {"nozero": True}),
        ("all", dict(lr=0.03, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2,
                     momentum_decay=1e-2, maximize=True), 200, 43, {}),
        ("long", dict(lr=0.01), LONG, 16, {}),
    ],
}


# optd optimizer -> (torch.optim class, the hyperparameters passed to it,
# foreach). NAdam has no maximize in 1.13 (the caller negates the gradient
# instead), and its single-tensor path is wrong there (pytorch#92699).
_SGD = ("SGD", ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"), False)
_ADAM = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
TORCH_OPTIMIZERS = {
    "sgd": _SGD,
    "momentum": _SGD,
    "nag": _SGD,
    "adagrad": ("Adagrad", ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps", "maximize"),
                False),
    "adadelta": ("Adadelta", ("lr", "rho", "eps", "weight_decay", "maximize"), False),
    "rmsprop": ("RMSprop", ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize"), False),
    "adam": ("Adam", _ADAM, False),
    "adamw": ("AdamW", _ADAM, False),
    "adamax": ("Adamax", ("lr", "betas", "eps", "weight_decay", "maximize"), False),
    "nadam": ("NAdam", ("lr", "betas", "eps", "weight_decay", "momentum_decay"), True),
}


def make_optimizer(opt, hp, p):
    """torch.optim for one optd optimizer, from TORCH_OPTIMIZERS."""
    if opt not in TORCH_OPTIMIZERS:
        raise ValueError(opt)
    cls, names, foreach = TORCH_OPTIMIZERS[opt]
    return getattr(torch.optim, cls)([p], foreach=foreach, **{k: hp[k] for k in names})


def gradients(rng, steps, n, nozero):
    """Gradients independent of the params: a random sign times 10**U(-4, 2),
    so one vector mixes magnitudes 1e-4..1e2, with about 8% exact zeros."""
    sign = rng.choice([-1.0, 1.0], size=(steps, n))
    g = sign * 10.0 ** rng.uniform(-4.0, 2.0, size=(steps, n))
    if not nozero:
        g[rng.random(size=(steps, n)) < 0.08] = 0.0
    return g


def initial_params(rng, n):
    """Mixed scales too, and one exact zero so weight decay starts from it."""
    p = rng.normal(size=n) * 10.0 ** rng.uniform(-2.0, 0.5, size=n)
    p[rng.integers(n)] = 0.0
    return p


def run_case(opt, hp, dtype, steps, n, gopts, seed):
    code, tdtype, ndtype = DTYPES[dtype]
    # Scalar state (nadam's mu_product, the step counters) is made with the
    # default dtype, so match it to the case's dtype.
    torch.set_default_dtype(tdtype)
    rng = np.random.default_rng(seed)
    p0 = initial_params(rng, n).astype(ndtype)
    grads = gradients(rng, steps, n, gopts.get("nozero", False)).astype(ndtype)

    p = torch.tensor(p0, dtype=tdtype)
    optimizer = make_optimizer(opt, hp, p)
    negate = opt == "nadam" and hp["maximize"]
    traj = np.empty((steps, n), dtype=ndtype)
    for t in range(steps):
        g = torch.tensor(grads[t], dtype=tdtype)  # a fresh copy: foreach nadam writes to it
        p.grad = -g if negate else g
        optimizer.step()
        traj[t] = p.numpy()
    if not np.all(np.isfinite(traj)):
        raise SystemExit(f"{opt} {hp} {dtype}: non-finite params")

    state = optimizer.state[p]
    bufs = [(k, v.numpy().astype(ndtype)) for k, v in state.items()
            if torch.is_tensor(v) and tuple(v.shape) == (n,)]
    scalar = None
    if "mu_product" in state:
        scalar = ("mu_product", float(state["mu_product"].item()))
    return code, p0, grads, traj, bufs, scalar


def name32(s, width=32):
    b = s.encode()
    assert len(b) < width, s
    return b + b"\0" * (width - len(b))


def write_case(path, opt, hp, code, n, steps, p0, grads, traj, bufs, scalar):
    out = [MAGIC, struct.pack("<IIII", VERSION, code, n, steps), name32(opt, 16),
           struct.pack("<I", len(hp))]
    for k, v in hp.items():
        if isinstance(v, tuple):
            out.append(name32(k) + struct.pack("<II2d", 2, 0, v[0], v[1]))
        elif isinstance(v, bool):
            out.append(name32(k) + struct.pack("<II2d", 1, 1, float(v), 0.0))
        else:
            out.append(name32(k) + struct.pack("<II2d", 1, 0, float(v), 0.0))
    out.append(struct.pack("<I", len(bufs)))
    out += [name32(k) for k, _ in bufs]
    if scalar:
        out.append(struct.pack("<I", 1) + name32(scalar[0]) + struct.pack("<d", scalar[1]))
    else:
        out.append(struct.pack("<I", 0) + name32("") + struct.pack("<d", 1.0))
    le = np.dtype(p0.dtype).newbyteorder("<")
    out.append(p0.astype(le).tobytes())
    for t in range(steps):
        out.append(grads[t].astype(le).tobytes())
        out.append(traj[t].astype(le).tobytes())
    for _, b in bufs:
        out.append(b.astype(le).tobytes())
    with open(path, "wb") as f:
        f.write(b"".join(out))


def main():
    ap = argparse.ArgumentParser(description="write torch.optim reference trajectories")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "data"))
    ap.add_argument("--native", action="store_true",
                    help="use torch's AVX2/FMA kernels (rounding-noise study only)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)

    index = []
    total = 0
    for opt, cases in CASES.items():
        for suffix, over, steps, n, gopts in cases:
            unknown = set(over) - set(DEFAULTS[opt])
            assert not unknown, (opt, suffix, unknown)
            hp = dict(DEFAULTS[opt], **over)
            for dtype in ("f32", "f64"):
                name = f"{opt}_{suffix}_{dtype}"
                seed = zlib.crc32(name.encode())
                res = run_case(opt, hp, dtype, steps, n, gopts, seed)
                path = os.path.join(args.out, name + ".bin")
                write_case(path, opt, hp, res[0], n, steps, *res[1:])
                total += os.path.getsize(path)
                index.append(name + ".bin")
    with open(os.path.join(args.out, "index.txt"), "w") as f:
        f.write("# Written by tests/gen_reference.py: one reference case file a line.\n")
        f.write("".join(x + "\n" for x in index))
    print(f"{len(index)} cases, {total} bytes in {args.out}")


if __name__ == "__main__":
    main()
