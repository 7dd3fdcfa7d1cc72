#!/usr/bin/env python3
"""Writes the seed corpus of fuzz_decode (tests/fuzz/corpus/decode/) and its
dictionary (tests/fuzz/decode.dict). The first byte of a seed picks the
decoder (see fuzz_decode.c): '0' a JSON body, '2' a URL path, '3' a header.
Run it again after changing the API's JSON; `make fuzz` adds what libFuzzer
finds to a scratch corpus, not to this one, so the committed corpus stays
small and reviewable."""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus", "decode")

OPTIMIZERS = {
    "sgd": ({"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": False, "weight_decay": 0.01,
             "maximize": True}, ["momentum_buffer"], None),
    "momentum": ({"lr": 0.1, "momentum": 0.5}, ["momentum_buffer"], None),
    "nag": ({"lr": 0.1, "momentum": 0.9, "nesterov": True}, ["momentum_buffer"], None),
    "adagrad": ({"lr": 0.01, "lr_decay": 0.001, "weight_decay": 0, "initial_accumulator_value": 0.1, "eps": 1e-10},
                ["sum"], None),
    "adadelta": ({"lr": 1.0, "rho": 0.9, "eps": 1e-6}, ["square_avg", "acc_delta"], None),
    "rmsprop": ({"lr": 0.01, "alpha": 0.99, "eps": 1e-8, "momentum": 0.9, "centered": True},
                ["square_avg", "momentum_buffer", "grad_avg"], None),
    "adam": ({"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8, "amsgrad": True},
             ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"], None),
    "adamax": ({"lr": 0.002, "betas": [0.9, 0.999]}, ["exp_avg", "exp_inf"], None),
    "adamw": ({"lr": 0.001, "weight_decay": 0.01, "amsgrad": False}, ["exp_avg", "exp_avg_sq"], None),
    "nadam": ({"lr": 0.002, "momentum_decay": 0.004}, ["exp_avg", "exp_avg_sq"], "mu_product"),
}

SCHEDULES = [
    {"type": "step", "step_size": 10, "gamma": 0.5},
    {"type": "multistep", "milestones": [3, 7, 20], "gamma": 0.1, "warmup_steps": 2},
    {"type": "exponential", "gamma": 0.99},
    {"type": "cosine", "T_max": 100, "eta_min": 0.0001},
    {"type": "linear", "start_factor": 0.1, "end_factor": 1.0, "total_iters": 50},
]


def seeds():
    out = []
    for opt, (hp, bufs, scalar) in OPTIMIZERS.items():
        for dtype in ("float32", "float64"):
            state = {b: [0.25, -1.5e-3, 3.0] for b in bufs}
            if scalar:
                state[scalar] = 0.987654321
            out.append(("cp-%s-%s" % (opt, dtype), "0" + json.dumps(
                {"name": "x", "optimizer": opt, "dtype": dtype, "hyperparams": hp, "step": 7,
                 "params": [1.0, -0.0, 1e-45 if dtype == "float32" else 5e-324], "state": state})))
        out.append(("create-%s" % opt, "0" + json.dumps(
            {"name": "run-1", "optimizer": opt, "hyperparams": hp, "params": [0.5, -1.25, 3.0]})))
    for i, sch in enumerate(SCHEDULES):
        out.append(("sched-%d" % i, "0" + json.dumps(
            {"hyperparams": {"lr": 0.1, "lr_schedule": sch, "max_grad_norm": 1.0}, "workers": 4, "min_workers": 2,
             "round_timeout": 30})))
    out += [
        ("step", '0{"grad":[0.1,-0.2,0.3],"loss":1.5,"weight":32}'),
        ("step-edge", '0{"grad":[1e308,-1e-320,-0,3.4028235e38,1e39]}'),
        ("size", '0{"name":"n","optimizer":"adam","size":3,"fill":0.5,"dtype":"float64"}'),
        ("patch", '0{"hyperparams":{"lr":0.0005,"betas":[0.8,0.9]}}'),
        ("fork", '0{"name":"b","from":"a","hyperparams":{"lr":0.5}}'),
        ("nested", "0" + "[" * 50 + "]" * 50),
        ("utf8", '0{"note":"h\u00e9llo \u2603","grad":[1]}'),
        ("badutf8", b'0{"x":"\xff\xc0\xaf"}'),
        ("nul", '0{"name":"a\\u0000b","optimizer":"sgd\\u0000"}'),
    ]
    for path in ("/healthz", "/readyz", "/metrics", "/v1/optimizers", "/v1/sessions", "/v1/sessions/run-1",
                 "/v1/sessions/run-1/step", "/v1/sessions/a.b_c-d/params", "/v1/sessions/x/state",
                 "/v1/sessions/x/history", "/v1/sessions/%2e%2e/step", "/v1/sessions/a%00b", "/v1/sessions/a%2Fb/step",
                 "/v1/sessions/" + "a" * 129, "/v1/sessions//step", "/"):
        out.append(("route-%d" % len(out), "2" + path))
    for h in ('"12"', 'W/"3"', "7", "*", '"18446744073709551615"', '"-1"', "1e3", "0x10", " 2.5 ", "nan"):
        out.append(("header-%d" % len(out), "3" + h))
    return out


DICT = ['"{"', '"}"', '"["', '"]"', '":"', '","', '"true"', '"false"', '"null"', '"-0"', '"1e309"', '"1e-400"',
        '"\\\\u0000"', '"\\\\ud800"', '"%00"', '"%2F"', '"/v1/sessions/"', '"/step"', '"/state"', '"/params"',
        '"/history"', '"W/"']
for k in ("name", "optimizer", "dtype", "float32", "float64", "hyperparams", "params", "size", "fill", "state",
          "step", "grad", "loss", "weight", "workers", "min_workers", "round_timeout", "lr_schedule", "type",
          "max_grad_norm", "warmup_steps", "milestones", "gamma", "step_size", "T_max", "eta_min", "start_factor",
          "end_factor", "total_iters", "multistep", "exponential", "cosine", "linear", "from"):
    DICT.append('"\\"%s\\""' % k)
for opt, (hp, bufs, scalar) in OPTIMIZERS.items():
    DICT.append('"\\"%s\\""' % opt)
    for k in list(hp) + bufs + ([scalar] if scalar else []):
        DICT.append('"\\"%s\\""' % k)


def main():
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        os.unlink(os.path.join(OUT, f))
    for name, data in seeds():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
    with open(os.path.join(HERE, "decode.dict"), "w") as f:
        f.write("# fuzz_decode dictionary (written by make_corpus.py)\n")
        for d in sorted(set(DICT)):
            f.write(d + "\n")
    print("%d seeds in %s" % (len(os.listdir(OUT)), OUT))


if __name__ == "__main__":
    main()
