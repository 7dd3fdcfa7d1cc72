#!/usr/bin/python3
"""The reference a user would otherwise write: a Flask service holding one
torch.optim.Adam per session and persisting params and optimizer state to
SQLite (WAL, synchronous=FULL, one commit per step) before each reply.

It speaks the subset of optd's API that bench/loadgen uses, with the same
bodies: POST /v1/sessions {"name", "optimizer": "adam", "dtype": "float32",
"size", "fill"} and POST /v1/sessions/<name>/step with a JSON {"grad": [...]}
or a raw float32 body (Content-Type: application/octet-stream); the reply is
{"step", "params"} or, with Accept: application/octet-stream, raw params with
the step in ETag. Steps of one session are applied one at a time (a lock per
session) and committed in order.

Served by werkzeug's threaded server (one thread per connection) with HTTP/1.1
keep-alive. Run with Debian's /usr/bin/python3 (torch 1.13, python3-flask):
    /usr/bin/python3 bench/ref_service.py --port P --db PATH
It prints "listening on P" once serving.
"""
import argparse
import logging
import socket
import sqlite3
import sys
import threading

import torch
from flask import Flask, Response, jsonify, request
from werkzeug.serving import WSGIRequestHandler, make_server

app = Flask(__name__)
DB_PATH = None
SYNC = "FULL"
sessions = {}
sessions_lock = threading.Lock()
# One connection behind one lock: commits queue on the lock instead of on
# SQLite's busy handler, whose sleeps (up to 100 ms) would make this
# reference look worse than it need be.
conn = None
db_lock = threading.Lock()


def commit(sql, args):
    """Runs one statement in its own durable transaction."""
    with db_lock:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(sql, args)
        conn.execute("COMMIT")


class Session:
    def __init__(self, name, size, fill):
        self.name = name
        self.lock = threading.Lock()
        self.param = torch.nn.Parameter(torch.full((size,), float(fill), dtype=torch.float32))
        self.opt = torch.optim.Adam([self.param])
        self.step = 0

    def blob(self):
        """params, exp_avg, exp_avg_sq as one blob, as optd stores them."""
        st = self.opt.state.get(self.param)
        parts = [self.param.detach().numpy().tobytes()]
        if st:
            parts += [st["exp_avg"].numpy().tobytes(), st["exp_avg_sq"].numpy().tobytes()]
        else:
            zeros = torch.zeros_like(self.param).numpy().tobytes()
            parts += [zeros, zeros]
        return b"".join(parts)


def error(status, code, message):
    resp = jsonify({"error": {"code": code, "message": message}})
    resp.status_code = status
    return resp


@app.post("/v1/sessions")
def create():
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        return error(400, "bad_request", "body must be a JSON object with a name")
    if body.get("optimizer", "adam") != "adam" or body.get("dtype", "float32") != "float32":
        return error(422, "invalid", "this reference serves float32 adam only")
    size = int(body.get("size", 0))
    if size < 1:
        return error(422, "invalid", "size must be positive")
    s = Session(body["name"], size, body.get("fill", 0))
    with sessions_lock:
        if s.name in sessions:
            return error(409, "already_exists", "a session with this name exists")
        sessions[s.name] = s
    commit("INSERT OR REPLACE INTO state(name, step, data) VALUES (?, 0, ?)", (s.name, s.blob()))
    resp = jsonify({"name": s.name, "optimizer": "adam", "dtype": "float32", "size": size, "step": 0})
    resp.status_code = 201
    resp.headers["Location"] = f"/v1/sessions/{s.name}"
    return resp


@app.post("/v1/sessions/<name>/step")
def step(name):
    s = sessions.get(name)
    if s is None:
        return error(404, "not_found", "no such session")
    if request.mimetype == "application/octet-stream":
        raw = request.get_data()
        if len(raw) != s.param.numel() * 4:
            return error(422, "size_mismatch", "gradient has the wrong length")
        grad = torch.frombuffer(bytearray(raw), dtype=torch.float32)
    else:
        body = request.get_json(force=True, silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("grad"), list):
            return error(400, "bad_json", "body must be {\"grad\": [...]}")
        if len(body["grad"]) != s.param.numel():
            return error(422, "size_mismatch", "gradient has the wrong length")
        grad = torch.tensor(body["grad"], dtype=torch.float32)
    if not torch.isfinite(grad).all():
        return error(422, "non_finite", "gradient has NaN or Inf")
    with s.lock:
        s.param.grad = grad
        s.opt.step()
        s.step += 1
        commit("UPDATE state SET step = ?, data = ? WHERE name = ?", (s.step, s.blob(), s.name))
        n = s.step
        if request.accept_mimetypes.best == "application/octet-stream":
            out = s.param.detach().numpy().tobytes()
        else:
            out = None
            params = s.param.detach().tolist()
    if out is not None:
        return Response(out, mimetype="application/octet-stream", headers={"ETag": f'"{n}"'})
    resp = jsonify({"step": n, "params": params})
    resp.headers["ETag"] = f'"{n}"'
    return resp


class Handler(WSGIRequestHandler):
    """HTTP/1.1 keep-alive, as optd and the load generator use, and no Nagle
    delay: werkzeug writes the head and the body separately, and Nagle plus
    the client's delayed ACK would add up to 40 ms to a reply."""

    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def main():
    global DB_PATH, SYNC, conn
    ap = argparse.ArgumentParser(description="reference optimizer service (Flask + torch + SQLite)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--db", required=True)
    ap.add_argument("--sync", default="full", choices=["full", "normal"])
    args = ap.parse_args()
    DB_PATH, SYNC = args.db, args.sync.upper()
    conn = sqlite3.connect(DB_PATH, timeout=60, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {SYNC}")
    conn.execute("CREATE TABLE IF NOT EXISTS state(name TEXT PRIMARY KEY, step INTEGER, data BLOB NOT NULL)")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request, as optd --log-level quiet
    srv = make_server("127.0.0.1", args.port, app, threaded=True, request_handler=Handler)
    print(f"listening on {srv.server_port}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
