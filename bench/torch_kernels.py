#!/usr/bin/python3
"""torch.optim's step beside optd's optim_step, measured side by side.

For every optimizer, dtype and size, each repetition times optd's kernel (with
and without the history statistics, through `kernels --serve`), then torch's
single-tensor step (foreach=False) and its multi-tensor step (foreach=True),
each for ~50 ms, so a ratio is taken between runs seconds apart and machine
noise hits both sides alike. At 1e7 elements each repetition also runs the
STREAM loops for the bandwidth bound, and at every size it measures the
configuration's floor (`kernels --serve`'s "floor": the update's square roots
and divisions alone on data in L1, and its bytes at the in-place update's
bandwidth for a working set its size), the time no implementation beats. Ratios are medians of per-repetition
ratios. One thread on each side (torch.set_num_threads(1)).

Run with Debian's /usr/bin/python3 (torch 1.13, numpy). Prints one JSON object
per line: {"kind": "kernel", ...} per configuration, {"kind": "stream", ...}.
"""
import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

OPTIMIZERS = ["sgd", "momentum", "nag", "adagrad", "adadelta", "rmsprop", "adam", "adamax", "adamw", "nadam"]
SIZES = [1000, 10000, 100000, 1000000, 10000000]
DTYPES = {"f32": torch.float32, "f64": torch.float64}


def make_torch_opt(name, params, foreach):
    """The torch optimizer that optd's `name` follows, with optd's (= torch's) defaults."""
    o = torch.optim
    if name == "sgd":
        return o.SGD(params, lr=0.01, foreach=foreach)
    if name == "momentum":
        return o.SGD(params, lr=0.01, momentum=0.9, foreach=foreach)
    if name == "nag":
        return o.SGD(params, lr=0.01, momentum=0.9, nesterov=True, foreach=foreach)
    cls = {"adagrad": o.Adagrad, "adadelta": o.Adadelta, "rmsprop": o.RMSprop, "adam": o.Adam,
           "adamax": o.Adamax, "adamw": o.AdamW, "nadam": o.NAdam}[name]
    return cls(params, foreach=foreach)


_inputs_cache = {}


def inputs(n, dtype):
    """The same params and grad as bench/kernels.c fills (fresh tensors)."""
    if n not in _inputs_cache:
        h = np.arange(n, dtype=np.uint32) * np.uint32(2654435761)  # wraps mod 2^32, as in C
        g = (((h >> 16) & 1023).astype(np.float64) / 1024.0 - 0.5) * 0.1 + 0.001
        p = 0.5 + ((h >> 8) & 255).astype(np.float64) / 256.0
        _inputs_cache[n] = (torch.from_numpy(p), torch.from_numpy(g))
    p, g = _inputs_cache[n]
    return p.to(dtype, copy=True), g.to(dtype, copy=True)


class TorchCase:
    """One torch optimizer on one parameter with a preset .grad, warmed and sized."""

    def __init__(self, name, n, dtype, foreach, target_ms):
        p0, g = inputs(n, dtype)
        self.param = torch.nn.Parameter(p0)
        self.param.grad = g
        self.opt = make_torch_opt(name, [self.param], foreach)
        self.n = n
        t0 = time.perf_counter()
        warm = 0
        # The first step allocates the state; time from the second on.
        while warm < 1 or time.perf_counter() - t0 < 0.01:
            self.opt.step()
            warm += 1
        per = (time.perf_counter() - t0) / warm
        self.iters = max(1, math.ceil(target_ms / 1e3 / per))

    def run(self):
        """One timed run; ns per element."""
        step = self.opt.step
        t = time.perf_counter_ns()
        for _ in range(self.iters):
            step()
        return (time.perf_counter_ns() - t) / (self.iters * self.n)


class Optd:
    """bench/kernels --serve, one request per line."""

    def __init__(self, path, isa=None):
        cmd = [path, "--serve"] + (["--isa", isa] if isa else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.proc.stdin.write("isa\n")
        self.proc.stdin.flush()
        self.isa = self.proc.stdout.readline().strip()

    def ask(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().split()
        if not reply or reply[0] == "error":
            raise RuntimeError("kernels --serve refused: " + line)
        return [float(x) for x in reply]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def med(xs):
    return statistics.median(xs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernels", default="build/bench/kernels", help="path of the kernels binary")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--reps-large", type=int, default=3, help="repetitions at 1e5 <= n < 1e7")
    ap.add_argument("--reps-huge", type=int, default=2,
                    help="repetitions at n >= 1e7, where one torch step takes up to a second")
    ap.add_argument("--ms", type=float, default=50.0, help="target ms per timed run")
    ap.add_argument("--opt", action="append", help="only these optimizers")
    ap.add_argument("--dtype", action="append", choices=list(DTYPES), help="only these dtypes")
    ap.add_argument("--size", action="append", type=float, help="only these sizes")
    ap.add_argument("--isa", help="optd's instruction set (sse2, avx2, avx512f); default: the best this CPU has")
    args = ap.parse_args()
    torch.set_num_threads(1)
    optd = Optd(args.kernels, args.isa)

    # Machine bandwidth, as kernels.c measures it standalone.
    sb = [optd.ask("stream") for _ in range(10)]
    print(json.dumps({"kind": "stream", "copy": med([x[0] for x in sb]), "triad": med([x[1] for x in sb]),
                      "update": med([x[2] for x in sb]), "torch": torch.__version__,
                      "torch_threads": torch.get_num_threads(), "isa": optd.isa}), flush=True)

    for name in args.opt or OPTIMIZERS:
        for dname in args.dtype or list(DTYPES):
            for n in [int(s) for s in (args.size or SIZES)]:
                cfg = f"{name} {dname} {n} {args.ms}"
                single = TorchCase(name, n, DTYPES[dname], False, args.ms)
                multi = TorchCase(name, n, DTYPES[dname], True, args.ms)
                optd.ask(cfg + " 0")  # sets up and warms optd's side
                rows = []
                reps = args.reps if n < 100_000 else min(args.reps, args.reps_large if n < 10_000_000
                                                         else args.reps_huge)
                for _ in range(reps):
                    o, bpe = optd.ask(cfg + " 0")
                    os_, _ = optd.ask(cfg + " 1")
                    ts = single.run()
                    tf = multi.run()
                    fd, fm = optd.ask(f"floor {name} {dname} {n}")
                    r = {"optd": o, "optd_stats": os_, "single": ts, "foreach": tf, "floor": max(fd, fm),
                         "floor_div": fd, "floor_mem": fm}
                    if n >= 10_000_000:
                        c, t, u = optd.ask("stream")
                        r["bw_stream"] = max(c, t)
                        r["bw_update"] = u
                    rows.append(r)
                out = {"kind": "kernel", "opt": name, "dtype": dname, "n": n, "bpe": bpe, "reps": reps,
                       "optd": med([r["optd"] for r in rows]),
                       "optd_stats": med([r["optd_stats"] for r in rows]),
                       "torch_single": med([r["single"] for r in rows]),
                       "torch_foreach": med([r["foreach"] for r in rows]),
                       "single_over_optd": med([r["single"] / r["optd"] for r in rows]),
                       "foreach_over_optd": med([r["foreach"] / r["optd"] for r in rows]),
                       "stats_over_optd": med([r["optd_stats"] / r["optd"] for r in rows]),
                       "single_over_optd_stats": med([r["single"] / r["optd_stats"] for r in rows]),
                       "floor": med([r["floor"] for r in rows]),
                       "floor_by": "divider" if med([r["floor_div"] - r["floor_mem"] for r in rows]) > 0 else "memory",
                       "optd_over_floor": med([r["optd"] / r["floor"] for r in rows]),
                       # 8x torch is reachable only where this is at least 8.
                       "single_over_floor": med([r["single"] / r["floor"] for r in rows])}
                if n >= 10_000_000:
                    out["bw_stream"] = med([r["bw_stream"] for r in rows])
                    out["bw_update"] = med([r["bw_update"] for r in rows])
                    # optd's time over the time its bytes take at each bandwidth.
                    out["optd_over_stream_bound"] = med([r["optd"] / (bpe / r["bw_stream"]) for r in rows])
                    out["optd_over_update_bound"] = med([r["optd"] / (bpe / r["bw_update"]) for r in rows])
                    out["stats_over_stream_bound"] = med([r["optd_stats"] / (bpe / r["bw_stream"]) for r in rows])
                    out["torch_single_over_stream_bound"] = med(
                        [r["single"] / (bpe / r["bw_stream"]) for r in rows])
                print(json.dumps(out), flush=True)
                del single, multi
    optd.close()


if __name__ == "__main__":
    sys.exit(main())
