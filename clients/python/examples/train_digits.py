#!/usr/bin/env python3
"""Trains a logistic-regression classifier of scikit-learn's bundled 8x8
digits through optd, and saves the loss curve to a PNG.

    /usr/bin/python3 clients/python/examples/train_digits.py --url http://127.0.0.1:8080
    /usr/bin/python3 clients/python/examples/train_digits.py --spawn      # starts build/optd itself

The model lives in torch; the optimizer (its state and the authoritative
parameters) lives in the daemon, behind optd.torch.RemoteOptimizer. Needs
Debian's python3-torch, python3-sklearn and python3-matplotlib.

Run it again with the same --session after it was killed (--stop-at N
stands for a kill) and it goes on where the session is: --steps is the
session's total, the data loop and the lr scheduler restart at
opt.last_step, and the result is bit-identical to a run never interrupted.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the optd package next to this folder

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import optd  # noqa: E402
import optd.torch  # noqa: E402


def spawn_daemon():
    """Starts the repository's build/optd on a free port with a temporary database."""
    import socket
    repo = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
    binary = os.environ.get("OPTD_BIN", os.path.join(repo, "build", "optd"))
    tmp = tempfile.mkdtemp(prefix="optd-digits-")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    url = "http://127.0.0.1:%d" % s.getsockname()[1]
    s.close()
    proc = subprocess.Popen([binary, "--listen", url[len("http://"):], "--db", os.path.join(tmp, "optd.db"),
                             "--log-level", "quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(500):
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1).read()
            return url, proc, tmp
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.02)
    proc.kill()
    raise SystemExit("could not start %s on %s" % (binary, url))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=os.environ.get("OPTD_URL", "http://127.0.0.1:8080"))
    ap.add_argument("--token", default=os.environ.get("OPTD_TOKEN"))
    ap.add_argument("--spawn", action="store_true", help="start build/optd on a free port for this run")
    ap.add_argument("--session", default=None, help="session name (default: a new one)")
    ap.add_argument("--optimizer", default="adam")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--steps", type=int, default=300, help="the session's total steps (a resumed run "
                    "makes only those left)")
    ap.add_argument("--stop-at", type=int, default=None, metavar="N",
                    help="stop once the session is at step N, as if the job were killed there")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--out", default="digits_loss.png")
    args = ap.parse_args(argv)

    proc = tmp = None
    url = args.url
    if args.spawn:
        url, proc, tmp = spawn_daemon()
    try:
        return train(args, url)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
            shutil.rmtree(tmp, ignore_errors=True)


def train(args, url):
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y))
    x, y = x[perm], y[perm]
    n_test = len(y) // 5
    x_test, y_test, x_train, y_train = x[:n_test], y[:n_test], x[n_test:], y[n_test:]

    model = torch.nn.Linear(64, 10, dtype=torch.float64)
    client = optd.Client(url, token=args.token)
    session = args.session or "digits-%s" % uuid.uuid4().hex[:8]
    # An existing session (a restarted job) loads its params into the model;
    # lr=args.lr is the schedule's base value, set again on a resumed session.
    opt = optd.torch.RemoteOptimizer(model.parameters(), session=session, client=client,
                                     optimizer=args.optimizer, lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    start = opt.fast_forward(sched)  # the scheduler catches up with the session: opt.last_step
    if start:
        print("resuming session %s at step %d of %d" % (session, start, args.steps))
    loss_fn = torch.nn.CrossEntropyLoss()

    end = args.steps if args.stop_at is None else min(args.steps, args.stop_at)
    losses = []
    for step in range(start, end):  # the data loop starts where the session is
        lo = (step % max(1, len(y_train) // args.batch)) * args.batch  # whole batches only
        xb, yb = x_train[lo:lo + args.batch], y_train[lo:lo + args.batch]
        opt.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step(loss=loss)
        sched.step()
        losses.append((step + 1, loss.item()))

    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).double().mean().item()
    print("session %s: %d steps of %s (%d in this run), final loss %s, test accuracy %.3f"
          % (session, opt.last_step, args.optimizer, len(losses),
             "%.4f" % losses[-1][1] if losses else "-", acc))

    fig, ax = plt.subplots(figsize=(7, 4))
    if losses:
        ax.plot(*zip(*losses), label="batch loss (client, this run)")
    try:
        hist = client.history(session)
        pts = [(h["step"], h["loss"]) for h in hist if h.get("loss") is not None]
        if pts:
            ax.plot(*zip(*pts), linestyle=":", label="loss recorded by optd")
    except optd.OptdError:
        pass  # a daemon without /history
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_yscale("log")
    ax.set_title("digits, logistic regression via optd (%s, lr=%g, cosine): test accuracy %.3f"
                 % (args.optimizer, args.lr, acc), fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print("loss curve saved to %s" % args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
