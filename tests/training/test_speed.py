"""The rounds/s figure (a measurement, not an assertion beyond "it works"):
k = 1, 2, 4, 8 workers, each a thread with its own keep-alive http.client
connection, stepping a 1,000-element float32 Adam session with workers=k;
k = 1 is the plain single-worker step rate (no round machinery). Printed and
written to tests/training/ROUNDS.md when OPTD_WRITE_ROUNDS=1."""

import os
import platform
import struct
import threading
import time
import unittest

from harness import Daemon, HERE, uniq

N = 1000
KS = (1, 2, 4, 8)
TARGET_S = 0.4  # seconds per measurement; a figure is the median of REPEATS
REPEATS = 3


def grad_bytes(seed):
    return struct.pack("<%df" % N, *[((i * 7919 + seed * 104729) % 2001 - 1000) / 1000.0 for i in range(N)])


def measure(d, k, rounds, binary):
    name = uniq("speed")
    api = d.client()
    r = api.post("/v1/sessions", {"name": name, "optimizer": "adam", "dtype": "float32", "size": N,
                                  "fill": 0.5, "workers": k, "round_timeout": 30})
    assert r.status == 201, r
    api.close()
    path = "/v1/sessions/%s/step" % name
    if binary:
        bodies = [grad_bytes(t) for t in range(k)]
        headers = {"Content-Type": "application/octet-stream", "Accept": "application/octet-stream"}
    else:
        import json
        bodies = [json.dumps({"grad": list(struct.unpack("<%df" % N, grad_bytes(t)))}) for t in range(k)]
        headers = {"Content-Type": "application/json"}
    barrier = threading.Barrier(k + 1)
    errors = []

    def worker(t):
        c = d.client()
        try:
            c.get("/healthz")  # connect before the clock starts
            barrier.wait()
            for _ in range(rounds):
                resp = c.post(path, bodies[t], headers=headers)
                if resp.status != 200:
                    errors.append(resp)
                    return
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            c.close()

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(k)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.monotonic()
    for t in ts:
        t.join()
    elapsed = time.monotonic() - t0
    if errors:
        raise AssertionError("k=%d: %r" % (k, errors[0]))
    api = d.client()
    step = api.get("/v1/sessions/%s/params" % name).json["step"]
    api.close()
    assert step == rounds, (step, rounds)
    return rounds / elapsed


def figure(d, k, binary):
    per = measure(d, k, 20, binary)  # warm-up and calibration
    rounds = max(30, min(5000, int(per * TARGET_S)))
    return sorted(measure(d, k, rounds, binary) for _ in range(REPEATS))[REPEATS // 2]


class SpeedFigure(unittest.TestCase):
    def test_rounds_per_second(self):
        load0 = os.getloadavg()[0]
        rows = []
        for sync in ("full", "normal"):
            d = Daemon(["--sync", sync]).start()
            try:
                for binary in (True, False):
                    if sync == "normal" and not binary:
                        continue
                    rates = {k: figure(d, k, binary) for k in KS}
                    rows.append((sync, "binary" if binary else "JSON", rates))
            finally:
                d.cleanup()
        lines = [
            "# Worker rounds: rounds/s",
            "",
            "Written by `tests/training/test_speed.py` (part of `make training-test`).",
            "One float32 Adam session of %d elements with `workers` = k; k threads, each" % N,
            "a worker with its own keep-alive `http.client` connection, posting its",
            "gradient and waiting for the round's reply (params in the reply), then",
            "the next. k = 1 is the plain single-worker step rate (no round). Default",
            "`--threads 4`; `--sync full` is the default (one fsync per commit group).",
            "Each figure is the median of %d runs of about %.1f s; fsync latency on a" % (REPEATS, TARGET_S),
            "shared machine makes the `--sync full` rows the noisiest.",
            "",
            "Machine: %s, %s CPUs, Python %s client in the same box; 1-minute load" % (
                platform.machine(), os.cpu_count(), platform.python_version()),
            "average %.1f before and %.1f after the measurement (anything well above 0" % (
                load0, os.getloadavg()[0]),
            "means other work shared the CPUs and the figures are low and noisy).",
            "",
            "| --sync | body | " + " | ".join("k=%d rounds/s" % k for k in KS) + " | "
            + " | ".join("k=%d vs k=1" % k for k in KS[1:]) + " |",
            "|---|---|" + "---:|" * (2 * len(KS) - 1),
        ]
        for sync, body, rates in rows:
            lines.append("| %s | %s | " % (sync, body) + " | ".join("%.0f" % rates[k] for k in KS) + " | "
                         + " | ".join("%.2f" % (rates[k] / rates[1]) for k in KS[1:]) + " |")
        lines += ["", "Contributions/s (k x rounds/s):", "",
                  "| --sync | body | " + " | ".join("k=%d" % k for k in KS) + " |",
                  "|---|---|" + "---:|" * len(KS)]
        for sync, body, rates in rows:
            lines.append("| %s | %s | " % (sync, body) + " | ".join("%.0f" % (k * rates[k]) for k in KS) + " |")
        lines += ["", "A round costs one optimizer step and one commit whatever k is; what grows",
                  "with k is HTTP requests and their parking. The client threads share the",
                  "machine (and one Python GIL) with the daemon, so on a small box the larger",
                  "k figures are partly the client's own limit."]
        text = "\n".join(lines) + "\n"
        # make test only prints the figures: a test run leaves the tree as it was.
        if os.environ.get("OPTD_WRITE_ROUNDS"):
            with open(os.path.join(HERE, "ROUNDS.md"), "w") as f:
                f.write(text)
        print("\n" + text, end="", flush=True)


if __name__ == "__main__":
    unittest.main()
