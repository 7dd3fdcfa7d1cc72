#!/usr/bin/env python3
"""Hostile input against a real daemon: malformed and adversarial JSON,
numbers at and past the edges of float32/float64, wrong types, bad UTF-8,
vectors of the wrong length, lying Content-Length, slow and idle clients,
connection floods, path tricks in session names. Every answer must be the
contract's (API.md), nothing may change another session, and afterwards the
daemon still answers /healthz.

    python3 tests/faults/hostile_test.py [name-substring ...]

The daemon runs with --header-timeout 2 and --max-connections 100 (and
--max-body 1M), so the slow-client and flood tests take seconds, not minutes."""

import json
import math
import os
import resource
import socket
import struct
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the tree
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from harness import Daemon, Report, check, f32, known, pack, read_reply, unpack, wait_for  # noqa: E402

D = None  # the daemon
HEADER_TIMEOUT = 2
MAX_CONN = 100
MAX_BODY = 1 << 20
SEEN_5XX = []


def req(method, path, body=None, js=None, headers=None, **kw):
    r = D.request(method, path, body=body, js=js, headers=headers, **kw)
    if r.status >= 500 and r.status != 503:
        SEEN_5XX.append((method, path, r.status, r.body[:200]))
    return r


def raw(data, timeout=5.0, read=True):
    """Sends raw bytes on a fresh connection; returns (status or None, bytes)."""
    s = socket.create_connection(("127.0.0.1", D.port), timeout=timeout)
    try:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            # The daemon may answer (413) and close before the whole body is
            # sent: what it answered is still there to read.
            pass
        if not read:
            return None, b""
        return read_reply(s, (socket.timeout, ConnectionResetError))
    finally:
        s.close()


def expect(r, status, code=None, what=""):
    ok = r.status == status if isinstance(status, int) else r.status in status
    check(ok, "%s: got %r, want %s", what, r, status)
    if code:
        check(r.code == code, "%s: error code %r, want %r (%r)", what, r.code, code, r)


def create(name, optimizer="sgd", dtype="float64", params=None, size=None, hp=None):
    body = {"name": name, "optimizer": optimizer, "dtype": dtype, "hyperparams": hp or {}}
    if params is not None:
        body["params"] = params
    else:
        body["size"] = size
    r = req("POST", "/v1/sessions", js=body)
    check(r.status == 201, "create %s: %r", name, r)


def step_json(name, text, headers=None):
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    return req("POST", "/v1/sessions/%s/step" % name, body=text if isinstance(text, bytes) else text.encode(),
               headers=h)


def victim_state():
    r = req("GET", "/v1/sessions/victim/state")
    check(r.status == 200, "victim: %r", r)
    return r.json["step"], r.json["params"]


# ---- the tests ------------------------------------------------------------------

def t_nesting():
    for name, body in [("100000 [", "[" * 100000), ("100000 {\"a\":", '{"a":' * 100000),
                       ("grad nested 100000", '{"grad":' + "[" * 100000 + "]" * 100000 + "}"),
                       ("balanced 5000", '{"grad":' + "[" * 5000 + "]" * 5000 + "}")]:
        r = step_json("v2", body)
        check(r.status in (400, 422), "%s: %r", name, r)
        r = req("POST", "/v1/sessions", body=body.encode(), headers={"Content-Type": "application/json"})
        check(r.status in (400, 422), "create with %s: %r", name, r)
        r = req("PUT", "/v1/sessions/x1/state", body=body.encode(), headers={"Content-Type": "application/json"})
        check(r.status in (400, 422), "checkpoint with %s: %r", name, r)
    expect(step_json("v2", "[" * 100000), 400, "bad_json", "100000 [")


def t_out_of_range():
    for body, what in [('{"grad":[1e309,0]}', "1e309"), ('{"grad":[-1e309,0]}', "-1e309"),
                       ('{"grad":[0,1.8e308]}', "1.8e308")]:
        expect(step_json("v2", body), 422, "non_finite", what + " in a float64 gradient")
    expect(step_json("v32", '{"grad":[1e39,0]}'), 422, "non_finite", "1e39 in a float32 gradient")
    expect(step_json("v32", '{"grad":[3.5e38,0]}'), 422, "non_finite", "3.5e38 in a float32 gradient")
    # 3.4028235e38 is FLT_MAX; 3.40282356e38 still rounds to it.
    expect(step_json("v32", '{"grad":[3.4028235e38,0]}'), 200, None, "FLT_MAX")
    r = req("POST", "/v1/sessions", js=None, body=b'{"name":"big1","optimizer":"sgd","dtype":"float64",'
            b'"params":[1e309]}', headers={"Content-Type": "application/json"})
    expect(r, 422, "non_finite", "1e309 in params")
    r = req("POST", "/v1/sessions", body=b'{"name":"big2","optimizer":"sgd","size":2,"fill":1e39}',
            headers={"Content-Type": "application/json"})
    expect(r, 422, "non_finite", "fill 1e39 in float32")
    r = req("POST", "/v1/sessions", body=b'{"name":"big3","optimizer":"sgd","size":2,"hyperparams":{"lr":1e309}}',
            headers={"Content-Type": "application/json"})
    check(r.status == 422, "lr 1e309: %r", r)
    r = req("PUT", "/v1/sessions/big4/state", body=b'{"optimizer":"adam","dtype":"float64","params":[1],'
            b'"step":1,"state":{"exp_avg":[1e309],"exp_avg_sq":[0]}}', headers={"Content-Type": "application/json"})
    check(r.status == 422, "checkpoint buffer 1e309: %r", r)
    expect(step_json("v2", '{"grad":[1e-400,-1e-400]}'), 200, None, "1e-400 (underflows to 0)")
    # A hyperparameter that becomes a float32 buffer must be finite in float32:
    # else the state is inf, which JSON cannot carry (found by make fuzz).
    r = req("POST", "/v1/sessions", js={"name": "iav", "optimizer": "adagrad", "dtype": "float32", "size": 2,
                                         "hyperparams": {"initial_accumulator_value": 1e39}})
    check(r.status == 422, "initial_accumulator_value 1e39 in float32: %r", r)
    for nm in ("big1", "big2", "big3", "big4"):
        expect(req("GET", "/v1/sessions/" + nm), 404, None, "refused %s exists" % nm)


def t_negative_zero_and_subnormals():
    tiny64 = [5e-324, -5e-324, 2.2250738585072009e-308, -0.0, 0.0]
    create("sub64", dtype="float64", params=tiny64, hp={"lr": 0})
    r = req("GET", "/v1/sessions/sub64/params")
    got = json.loads(r.body, parse_int=float)["params"]  # "-0" is an int to Python
    check(got == tiny64 and math.copysign(1, got[3]) == -1, "float64 subnormals/-0 round trip: %r", got)
    r = req("GET", "/v1/sessions/sub64/params", headers={"Accept": "application/octet-stream"})
    check(r.body == pack("float64", tiny64), "float64 binary round trip")
    tiny32 = [f32(1.401298464324817e-45), f32(-1e-40), f32(1.1754942e-38), -0.0, f32(9.99e-39)]
    check(tiny32[0] != 0 and tiny32[1] != 0, "python float32 subnormals")
    create("sub32", dtype="float32", params=tiny32, hp={"lr": 0})
    r = req("GET", "/v1/sessions/sub32/params")
    got = json.loads(r.body, parse_int=float)["params"]
    check([f32(x) for x in got] == tiny32 and math.copysign(1, got[3]) == -1,
          "float32 subnormals/-0 JSON round trip: %r vs %r", got, tiny32)
    r = req("GET", "/v1/sessions/sub32/params", headers={"Accept": "application/octet-stream"})
    check(r.body == pack("float32", tiny32), "float32 binary round trip: %r", unpack("float32", r.body))
    r = req("GET", "/v1/sessions/sub32/state")
    cp = json.loads(r.body, parse_int=float)
    cp["step"] = int(cp["step"])
    check([f32(x) for x in cp["params"]] == tiny32, "float32 subnormals in the checkpoint")
    # A checkpoint of subnormals restores bit for bit.
    cp.pop("name", None)
    r = req("PUT", "/v1/sessions/sub32b/state", js=cp)
    check(r.status == 201, "restore subnormal checkpoint: %r", r)
    r = req("GET", "/v1/sessions/sub32b/params", headers={"Accept": "application/octet-stream"})
    check(r.body == pack("float32", tiny32), "restored float32 subnormals")
    # Steps with subnormal and negative-zero gradients are fine.
    expect(step_json("sub32", '{"grad":[1e-45,-1e-45,-0,-0.0,1e-40]}'), 200, None, "subnormal float32 gradient")
    expect(step_json("sub64", '{"grad":[5e-324,-0,-0.0,4.9e-324,1e-310]}'), 200, None, "subnormal float64 gradient")
    # A float32 subnormal below half the smallest rounds to zero: accepted.
    expect(step_json("sub32", '{"grad":[1e-46,0,0,0,0]}'), 200, None, "below float32 subnormals")


def t_nan_inf_spelled():
    bad = []
    for tok in ("NaN", "nan", "Infinity", "-Infinity", "inf", "-inf", "Inf", "NAN", "-NaN"):
        r = step_json("v2", '{"grad":[%s,0]}' % tok)
        if r.status != 400 or r.code != "bad_json":
            bad.append("%s -> %d %s" % (tok, r.status, r.code))
    check(not bad, "NaN/Infinity spelled out: %s", "; ".join(bad))


def t_lenient_numbers():
    """Not JSON numbers, though strtod reads them."""
    bad = []
    for tok in ("+1", "0x10", ".5", "1.", "01", "1e", "--1", "1e+", "- 1", "0.e1"):
        r = step_json("v2", '{"grad":[%s,0]}' % tok)
        if r.status != 400:
            bad.append("%s -> %d" % (tok, r.status))
    check(not bad, "accepted as numbers: %s", "; ".join(bad))


def t_trailing_garbage():
    bad = []
    for body in ('{"grad":[1,1]} x', '{"grad":[1,1]}}', '{"grad":[1,1]},{}', '{"grad":[1,1]}\x00junk',
                 '{"grad":[1,1],}', '{"grad":[1,1,]}', "{'grad':[1,1]}", '{"grad":[1 1]}', ''):
        r = step_json("v2", body)
        if r.status != 400:
            bad.append("%r -> %d" % (body, r.status))
    check(not bad, "not JSON but accepted: %s", "; ".join(bad))


def t_duplicate_keys():
    before = req("GET", "/v1/sessions/v2/params").json["step"]
    r = step_json("v2", '{"grad":[1,1],"grad":[2,2,2]}')
    check(r.status in (200, 400, 422), "duplicate grad: %r", r)
    first = r.status == 200
    r2 = step_json("v2", '{"grad":[2,2,2],"grad":[1,1]}')
    check(r2.status in (200, 400, 422), "duplicate grad (reversed): %r", r2)
    r3 = req("POST", "/v1/sessions", body=b'{"name":"dup1","name":"dup2","optimizer":"sgd","size":1}',
             headers={"Content-Type": "application/json"})
    check(r3.status in (201, 400, 422), "duplicate name: %r", r3)
    after = req("GET", "/v1/sessions/v2/params").json["step"]
    check(after - before == (r.status == 200) + (r2.status == 200), "steps applied: %d", after - before)
    created = [n for n in ("dup1", "dup2") if req("GET", "/v1/sessions/" + n).status == 200]
    return "grad: %s; name: %s" % ("first wins" if first and r2.status != 200 else
                                    "last wins" if r2.status == 200 and not first else
                                    "%d/%d" % (r.status, r2.status), created or r3.status)


def t_wrong_types():
    cases = [
        ("step", '{"grad":"1,2"}', 400), ("step", '{"grad":["1","2"]}', 400), ("step", '{"grad":{"0":1}}', 400),
        ("step", '{"grad":null}', (400, 422)), ("step", '{"grad":[true,false]}', 400), ("step", '[1,2]', 400),
        ("step", '"grad"', 400), ("step", '{"grad":[[1],[2]]}', 400), ("step", '{"grad":[null,1]}', 400),
        ("step", '{}', (400, 422)), ("step", 'null', 400), ("step", '12', 400),
        ("create", '{"name":5,"optimizer":"sgd","size":1}', 400),
        ("create", '{"name":"t1","optimizer":5,"size":1}', 400),
        ("create", '{"name":"t1","optimizer":"sgd","size":"3"}', 400),
        ("create", '{"name":"t1","optimizer":"sgd","size":2.5}', 422),
        ("create", '{"name":"t1","optimizer":"sgd","size":-1}', 422),
        ("create", '{"name":"t1","optimizer":"sgd","size":0}', 422),
        ("create", '{"name":"t1","optimizer":"sgd","size":1e20}', 422),
        ("create", '{"name":"t1","optimizer":"sgd","size":268435457}', 422),
        ("create", '{"name":"t1","optimizer":"sgd","size":1,"dtype":64}', 400),
        ("create", '{"name":"t1","optimizer":"sgd","size":1,"dtype":"float16"}', 422),
        ("create", '{"name":"t1","optimizer":"sgd","size":1,"hyperparams":{"lr":"0.1"}}', 400),
        ("create", '{"name":"t1","optimizer":"sgd","size":1,"hyperparams":[0.1]}', 400),
        ("create", '{"name":"t1","optimizer":"sgd","size":1,"hyperparams":{"nesterov":1}}', 400),
        ("create", '{"name":"t1","optimizer":"adam","size":1,"hyperparams":{"betas":[0.9]}}', 400),
        ("create", '{"name":"t1","optimizer":"adam","size":1,"hyperparams":{"betas":"0.9,0.99"}}', 400),
        ("create", '{"name":"t1","optimizer":"sgd","params":"1,2"}', 400),
        ("create", '{"name":"t1","optimizer":"sgd","params":[]}', 422),
        ("create", '{"name":"t1","optimizer":"sgd","params":[1,"2"]}', 400),
        ("create", '{"name":"t1","optimizer":"sgd","size":1,"fill":"1"}', 400),
        ("create", '{"name":"t1","optimizer":"nope","size":1}', 422),
        ("patch", '{"hyperparams":{"lr":"x"}}', 400), ("patch", '{"hyperparams":5}', 400),
        ("patch", '{"hyperparams":{"lr":-1}}', 422), ("patch", '[]', 400),
        ("state", '{"optimizer":"sgd","params":[1],"step":"3"}', 400),
        ("state", '{"optimizer":"sgd","params":[1],"step":-1}', 400),
        ("state", '{"optimizer":"sgd","params":[1],"step":1.5}', 400),
        ("state", '{"optimizer":"sgd","params":[1],"state":[]}', 400),
        ("state", '{"optimizer":"adam","params":[1],"step":2,"state":{"exp_avg":[1]}}', 422),
        ("state", '{"optimizer":"adam","params":[1],"state":{"exp_avg":[1,2],"exp_avg_sq":[1]}}', 422),
        ("state", '{"optimizer":"adam","params":[1],"state":{"bogus":[1]}}', 422),
        ("state", '{"optimizer":"nadam","params":[1],"state":{"mu_product":"1"}}', 400),
    ]
    bad = []
    for kind, body, want in cases:
        path, method = {"step": ("/v1/sessions/v2/step", "POST"), "create": ("/v1/sessions", "POST"),
                        "patch": ("/v1/sessions/v2", "PATCH"), "state": ("/v1/sessions/t2/state", "PUT")}[kind]
        r = req(method, path, body=body.encode(), headers={"Content-Type": "application/json"})
        ok = r.status == want if isinstance(want, int) else r.status in want
        if not ok or r.code is None:
            bad.append("%s %s -> %d %s (want %s)" % (kind, body[:70], r.status, r.code, want))
    for nm in ("t1", "t2"):
        check(req("GET", "/v1/sessions/" + nm).status == 404, "%s was created by a bad request", nm)
    check(req("GET", "/v1/sessions/v2").json["hyperparams"]["lr"] == 1, "a bad PATCH changed v2")
    for h, v in [("If-Match", "abc"), ("If-Match", '"99999999999999999999999"'), ("If-Match", '"-1"'),
                 ("If-Match", '"1" "2"'), ("Idempotency-Key", "k" * 256)]:
        r = step_json("v2", '{"grad":[1,1]}', headers={h: v})
        if r.status != 400:
            bad.append("%s: %s -> %d" % (h, v[:30], r.status))
    for q in ("limit=abc", "limit=0", "limit=1001", "limit=-1", "limit=99999999999999999999999", "limit=1.5",
              "limit="):
        r = req("GET", "/v1/sessions?" + q)
        if r.status != 400:
            bad.append("GET /v1/sessions?%s -> %d" % (q, r.status))
    check(not bad, "%d wrong answers: %s", len(bad), "; ".join(bad))
    return "%d cases" % (len(cases) + 12)


def t_utf8():
    bad = []
    for raw_body in (b'{"grad":[1,1],"x":"\xff"}', b'{"grad":[1,1],"x":"\xc0\xaf"}',
                     b'{"grad":[1,1],"x":"\xed\xa0\x80"}', b'{"grad":[1,1],"x":"\xf4\x90\x80\x80"}',
                     b'{"grad":[1,1],"x":"\xe2\x82"}', b'{"grad":[1,1],"x":"\x80"}', b'{"grad":[1,1]}\xfe'):
        r = step_json("v2", raw_body)
        if r.status != 400 or r.code != "bad_json":
            bad.append("%r -> %d %s" % (raw_body[-8:], r.status, r.code))
    r = req("POST", "/v1/sessions", body=b'{"name":"u\xff1","optimizer":"sgd","size":1}',
            headers={"Content-Type": "application/json"})
    if r.status != 400:
        bad.append("create with a bad UTF-8 name -> %d" % r.status)
    # Valid UTF-8 elsewhere in the body reads as JSON (here a field a step
    # does not take: 422 unknown_field, not 400); a non-ASCII name is a 422.
    expect(step_json("v2", '{"grad":[1,1],"note":"h\u00e9llo \u2603 \U0001F600"}'.encode("utf-8")), 422,
           "unknown_field", "valid UTF-8")
    r = req("POST", "/v1/sessions", js={"name": "h\u00e9", "optimizer": "sgd", "size": 1})
    if r.status != 422:
        bad.append("non-ASCII name -> %d" % r.status)
    check(not bad, "%s", "; ".join(bad))


def t_nul_in_strings():
    """A JSON string holding \\u0000 must not be read as the part before it."""
    bad = []
    for method, path, body, made_name in [
            ("POST", "/v1/sessions", b'{"name":"nul\\u0000x","optimizer":"sgd","size":1}', "nul"),
            ("PUT", "/v1/sessions/nul2", b'{"name":"nul2\\u0000","optimizer":"sgd","size":1}', "nul2"),
            ("POST", "/v1/sessions", b'{"name":"n3","optimizer":"sgd\\u0000xyz","size":1}', "n3"),
            ("POST", "/v1/sessions", b'{"name":"n4","optimizer":"sgd","dtype":"float64\\u0000!","size":1}', "n4"),
            ("PUT", "/v1/sessions/n5/state", b'{"optimizer":"adam\\u0000","params":[1]}', "n5")]:
        r = req(method, path, body=body, headers={"Content-Type": "application/json"})
        made = req("GET", "/v1/sessions/" + made_name).status == 200
        if made:
            req("DELETE", "/v1/sessions/" + made_name)
        if r.status not in (400, 422) or made:
            bad.append("%s %s %s -> %d%s" % (method, path, body.decode()[:50], r.status,
                                              ", created '%s'" % made_name if made else ""))
    check(not bad, "%s", "; ".join(bad))


def t_lengths():
    n = 2
    for k in (n - 1, n + 1, 0, 1000):
        expect(step_json("v2", json.dumps({"grad": [1.0] * k})), 422, "size_mismatch", "JSON grad of %d" % k)
    for nbytes in (8 * n - 8, 8 * n + 8, 8 * n - 1, 8 * n + 1, 8 * n + 3, 1, 7):
        r = req("POST", "/v1/sessions/v2/step", body=b"\x00" * nbytes,
                headers={"Content-Type": "application/octet-stream"})
        expect(r, 422, "size_mismatch", "binary gradient of %d bytes" % nbytes)
    for nbytes in (4 * n - 1, 4 * n + 2, 4 * n + 4):
        r = req("POST", "/v1/sessions/v32/step", body=b"\x00" * nbytes,
                headers={"Content-Type": "application/octet-stream"})
        expect(r, 422, "size_mismatch", "float32 binary gradient of %d bytes" % nbytes)
    r = req("POST", "/v1/sessions/v2/step", body=b"", headers={"Content-Type": "application/octet-stream"})
    check(r.status in (400, 422), "empty binary body: %r", r)
    r = req("POST", "/v1/sessions/v2/step", body=struct.pack("<2d", float("nan"), 0),
            headers={"Content-Type": "application/octet-stream"})
    expect(r, 422, "non_finite", "binary NaN")
    r = req("POST", "/v1/sessions/v32/step", body=struct.pack("<2f", float("inf"), 0),
            headers={"Content-Type": "application/octet-stream"})
    expect(r, 422, "non_finite", "binary float32 inf")


def t_content_length_lies():
    t0 = time.time()
    st, data = raw(b"POST /v1/sessions/v2/step HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 99999999999\r\n\r\n{\"grad\":[1,1]}", timeout=5)
    dt = time.time() - t0
    check(st == 413, "Content-Length 99999999999 with a small body: %r", data[:200])
    check(dt < 2, "413 took %.1f s", dt)
    st, data = raw(b"POST /v1/sessions/v2/step HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 18446744073709551617\r\n\r\n{}", timeout=5)
    check(st in (400, 413), "Content-Length past 2^64: %r", data[:200])
    for cl in (b"-5", b"abc", b"1, 2", b" 12 x"):
        st, data = raw(b"POST /v1/sessions/v2/step HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: " + cl + b"\r\n\r\n{\"grad\":[1,1]}", timeout=5)
        check(st in (400, 413, None), "Content-Length %r: %r", cl, data[:200])
    st, data = raw(b"POST /v1/sessions/v2/step HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 14\r\nContent-Length: 15\r\n\r\n{\"grad\":[1,1]}", timeout=5)
    check(st in (400, 413, None), "two different Content-Lengths answered %r",
          data[:12])
    # A real body over --max-body, streamed: 413 without the daemon keeping it.
    body = b"[" + b"1," * (MAX_BODY) + b"1]"
    st, data = raw(b"POST /v1/sessions/v2/step HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(body) + body, timeout=10)
    check(st == 413, "a %d-byte body over --max-body: %r", len(body), data[:200])
    # Chunked with an absurd chunk size, and chunked past --max-body.
    st, data = raw(b"POST /v1/sessions/v2/step HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFF\r\n{\"grad\":[1,1]}\r\n0\r\n\r\n", timeout=5)
    check(st in (400, 413, None), "chunk size 2^64-1: %r", data[:200])
    chunks = b"".join(b"%x\r\n%s\r\n" % (65536, b" " * 65536) for _ in range(MAX_BODY // 65536 + 2))
    st, data = raw(b"POST /v1/sessions/v2/step HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n", timeout=10)
    check(st == 413, "chunked body over --max-body: %r", data[:200])
    return "413 in %.0f ms" % (dt * 1000)


def t_garbage_requests():
    results = {}
    for name, data in [
        ("garbage line", b"GARBAGE\r\n\r\n"),
        ("binary zeros", b"\x00" * 1000),
        ("NUL in path", b"GET /v1/sessions/v\x002 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
        ("unknown method", b"FOO /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
        ("HTTP/9.9", b"GET /healthz HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n"),
        ("70 KB header", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n"),
        ("5000 headers", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-A: b\r\n" * 5000 + b"\r\n"),
        ("70 KB URL", b"GET /v1/sessions/" + b"a" * 70000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
        ("header without colon", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nNoColon\r\n\r\n"),
        ("CL and chunked", b"POST /v1/sessions/v2/step HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("bare LF", b"GET /healthz HTTP/1.1\nHost: 127.0.0.1\n\n"),
    ]:
        try:
            st, out = raw(data, timeout=5)
        except OSError as e:
            st = type(e).__name__
        results[name] = st
        check(st is None or isinstance(st, str) or st < 500 or st in (501, 503, 505),
              "%s: answered %r", name, st)
    # 100 pipelined requests in one write are all answered, in order.
    s = socket.create_connection(("127.0.0.1", D.port), timeout=10)
    s.sendall(b"".join(b"GET /v1/sessions/v2 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" for _ in range(100)))
    got = b""
    deadline = time.time() + 10
    while got.count(b"HTTP/1.1 200") < 100 and time.time() < deadline:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    s.close()
    check(got.count(b"HTTP/1.1 200") == 100, "pipelined: %d of 100 answered", got.count(b"HTTP/1.1 200"))
    return ", ".join("%s: %s" % kv for kv in results.items())


def t_names():
    before = victim_state()
    long = "a" * 129
    sgd1 = {"optimizer": "sgd", "size": 1}
    cases = [
        ("GET", "/v1/sessions/" + long, None, (404,)),
        ("PUT", "/v1/sessions/" + long, sgd1, (404, 422)),
        ("POST", "/v1/sessions", {"name": long, **sgd1}, (422,)),
        ("POST", "/v1/sessions/" + long + "/step", {"grad": [1]}, (404,)),
    ]
    # Names a create refuses; names a PUT path refuses or cannot reach;
    # step paths that are not victim's, however close.
    cases += [("POST", "/v1/sessions", {"name": n, **sgd1}, (422,))
              for n in ("a/b", "..", "../victim", "victim/../x", "", "-lead", "sp ace", "victim%00")]
    cases += [("PUT", "/v1/sessions/" + n, sgd1, (404, 422))
              for n in ("..", "%2e%2e", "a%2Fb", "victim%00", "victim%2500", "victim%", "victim%zz")]
    cases += [("POST", "/v1/sessions/" + p, {"grad": [1, 1]}, (404,))
              for p in ("victim%00/step", "victim%2F/step", "victim/step/", "victim//step", "/victim/step",
                        "../sessions/victim/step", "./victim/step", "victim/./step", "VICTIM/step",
                        "victim%20/step")]
    cases += [
        ("POST", "/v1/sessions/vic%74im/step", {"grad": [1, 1]}, (200,)),
        # a query parameter the path does not take is 400 (API.md Conventions)
        ("POST", "/v1/sessions/vic%74im/step?x=1", {"grad": [1, 1]}, (400,)),
        ("DELETE", "/v1/sessions/victim%00", None, (404,)),
        ("DELETE", "/v1/sessions/victim/", None, (404, 405)),
        ("DELETE", "/v1/sessions/victim%2F..", None, (404,)),
        ("DELETE", "/v1/sessions/%76ictim%3F", None, (404,)),
        ("PATCH", "/v1/sessions/victim%00", {"hyperparams": {"lr": 5}}, (404,)),
        ("GET", "/v1/sessions/victim%00/state", None, (404,)),
        ("PUT", "/v1/sessions/victim%00/state", {"optimizer": "sgd", "params": [9, 9]}, (404, 422)),
        # A checkpoint restores under the path's name, whatever name it carries
        # (README: restore run-1's checkpoint as run-1-copy): never onto victim.
        ("PUT", "/v1/sessions/x9/state", {"name": "victim", "optimizer": "sgd", "params": [9, 9]}, (201, 422)),
        ("PUT", "/v1/sessions/x9", {"name": "victim", "optimizer": "sgd", "size": 2}, (422,)),
    ]
    bad = []
    applied = 0
    for method, path, body, want in cases:
        r = req(method, path, js=body)
        if r.status not in want:
            bad.append("%s %s -> %d (want %s)" % (method, path[:60], r.status, want))
        if r.status == 200 and path.endswith("/step"):
            applied += 1
    req("DELETE", "/v1/sessions/x9")
    after = victim_state()
    check(after[0] == before[0] + applied, "victim moved from step %d to %d (%d legit)", before[0], after[0],
          applied)
    check(after[1] == [1.0 - after[0], 2.0 - after[0]], "victim's params are %r at step %d", after[1], after[0])
    r = req("GET", "/v1/sessions?limit=1000")
    names = sorted(s["name"] for s in r.json["sessions"])
    strange = [n for n in names if not n.replace(".", "").replace("-", "").replace("_", "").isalnum()
               or len(n) > 128]
    check(not strange, "strange session names exist: %r", strange)
    check(not bad, "%d wrong answers: %s", len(bad), "; ".join(bad))
    return "%d requests; sessions now: %s" % (len(cases), ", ".join(names))


def t_slow_client():
    s = socket.create_connection(("127.0.0.1", D.port), timeout=30)
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 40 + b"\r\n\r\n"
    t0 = time.time()
    closed_at = None
    sent = 0
    try:
        for b in head:
            try:
                s.sendall(bytes([b]))
                sent += 1
            except OSError:
                closed_at = time.time()
                break
            # Did the server close it?
            s.settimeout(1.0)
            try:
                data = s.recv(4096)
                if not data or data:
                    closed_at = time.time()
                    break
            except socket.timeout:
                pass
            except OSError:
                closed_at = time.time()
                break
            if time.time() - t0 > HEADER_TIMEOUT + 8:
                break
    finally:
        s.close()
    check(closed_at is not None, "a client sending one byte a second was still connected after %.0f s "
          "(--header-timeout %d); %d bytes sent", time.time() - t0, HEADER_TIMEOUT, sent)
    dt = closed_at - t0
    check(dt < HEADER_TIMEOUT + 2.5, "the slow client was closed after %.1f s (--header-timeout %d)", dt,
          HEADER_TIMEOUT)
    # The daemon serves others meanwhile and after.
    check(req("GET", "/healthz").status == 200, "healthz after the slow client")
    return "closed after %.1f s, %d bytes in" % (dt, sent)


def t_slow_clients_do_not_block():
    """20 trickling clients at once do not delay a normal request."""
    socks = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", D.port), timeout=10)
        s.sendall(b"POST /v1/sessions/v2/step HTTP/1.1\r\nHo")
        socks.append(s)
    t0 = time.time()
    r = step_json("v2", '{"grad":[1,1]}')
    dt = time.time() - t0
    for s in socks:
        s.close()
    check(r.status == 200 and dt < 1, "step beside 20 slow clients: %r in %.2f s", r, dt)


def t_idle_flood():
    """Past --max-connections new connections are refused, while a client
    already connected keeps being served (it steps every 50 ms throughout)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1500
    if soft < want + 100:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, want + 200), hard))
        except (ValueError, OSError):
            pass
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    n = min(want, soft - 100)
    stop = threading.Event()
    served = {"ok": 0, "bad": []}

    def active_client():
        c = D.conn(timeout=10)
        try:
            while not stop.is_set():
                try:
                    c.request("POST", "/v1/sessions/v2/step", body=b'{"grad":[1,1]}',
                              headers={"Content-Type": "application/json"})
                    r = c.getresponse()
                    r.read()
                except Exception as e:  # noqa: BLE001
                    served["bad"].append(repr(e))
                    return
                if r.status == 200:
                    served["ok"] += 1
                else:
                    served["bad"].append(r.status)
                time.sleep(0.05)
        finally:
            c.close()
    at = threading.Thread(target=active_client, daemon=True)
    at.start()
    time.sleep(0.2)
    idle = []
    timeouts = 0
    t0 = time.time()
    try:
        while len(idle) + timeouts < n and time.time() - t0 < 20:
            try:
                idle.append(socket.create_connection(("127.0.0.1", D.port), timeout=0.3))
            except OSError:
                timeouts += 1
                if timeouts > 20:
                    break
        time.sleep(0.5)
        # New connections past the limit are not served: the kernel may
        # complete the handshake (backlog), but the daemon answers nothing.
        extra_ok = 0
        for _ in range(5):
            try:
                st, _data = raw(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", timeout=1.0)
                extra_ok += st == 200
            except OSError:
                pass
        check(extra_ok == 0, "%d of 5 new connections were served while %d were open (--max-connections %d)",
              extra_ok, len(idle) + 1, MAX_CONN)
        # How many of the flood still hold a connection the daemon accepted
        # (the rest were closed by it, or wait in the kernel's backlog).
        alive = 0
        for s in idle:
            s.setblocking(False)
            try:
                if s.recv(1) != b"":
                    alive += 1
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
        time.sleep(0.5)
    finally:
        stop.set()
        at.join(15)
        for s in idle:
            s.close()
    check(not served["bad"], "the active client failed during the flood: %r", served["bad"][:3])
    check(served["ok"] > 10, "the active client was served only %d times", served["ok"])
    ok = wait_for(lambda: D.request("GET", "/healthz", timeout=2).status == 200, 10)
    check(ok, "new connections are not served after the flood ended")
    return ("%d connections opened in %.1f s (%d connect timeouts), %d still open at the end; "
            "the active client was served %d steps meanwhile" % (len(idle), time.time() - t0, timeouts, alive,
                                                                 served["ok"]))


def t_idle_timeout():
    """An idle kept-alive connection is closed after --connection-timeout."""
    s = socket.create_connection(("127.0.0.1", D.port), timeout=15)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data = s.recv(4096)
    check(data.startswith(b"HTTP/1.1 200"), "first request: %r", data[:50])
    t0 = time.time()
    s.settimeout(15)
    try:
        rest = s.recv(4096)
    except OSError:
        rest = b""
    dt = time.time() - t0
    s.close()
    check(rest == b"" and dt < IDLE_TIMEOUT + 3, "idle connection: %r after %.1f s (--connection-timeout %d)",
          rest[:40], dt, IDLE_TIMEOUT)
    return "closed after %.1f s idle" % dt


IDLE_TIMEOUT = 4

TESTS = [
    ("deeply nested JSON", t_nesting),
    ("numbers out of range", t_out_of_range),
    ("-0 and subnormals round-trip", t_negative_zero_and_subnormals),
    ("NaN/Infinity spelled in JSON", t_nan_inf_spelled),
    ("numbers JSON does not allow", t_lenient_numbers),
    ("trailing garbage after the JSON value", t_trailing_garbage),
    ("duplicate keys", t_duplicate_keys),
    ("wrong types and bad headers/queries", t_wrong_types),
    ("invalid UTF-8", t_utf8),
    ("NUL escaped in JSON strings", t_nul_in_strings),
    ("vector lengths off by one", t_lengths),
    ("lying Content-Length, oversized and chunked bodies", t_content_length_lies),
    ("garbage and oversized requests, pipelining", t_garbage_requests),
    ("session names: too long, /, .., %00", t_names),
    ("slow client (one byte a second)", t_slow_client),
    ("slow clients do not block others", t_slow_clients_do_not_block),
    ("idle connection flood past --max-connections", t_idle_flood),
    ("idle connection timeout", t_idle_timeout),
]


def main():
    global D
    only = sys.argv[1:]
    rep = Report()
    D = Daemon(args=["--header-timeout", str(HEADER_TIMEOUT), "--max-connections", str(MAX_CONN),
                     "--max-body", str(MAX_BODY), "--connection-timeout", str(IDLE_TIMEOUT),
                     "--log-level", "quiet"])
    try:
        D.start()
        create("victim", params=[1.0, 2.0], hp={"lr": 1})
        create("v2", params=[0.0, 0.0], hp={"lr": 1})
        create("v32", dtype="float32", params=[0.0, 0.0], hp={"lr": 1})
        for name, fn in TESTS:
            if only and not any(o in name for o in only):
                continue
            if not D.alive():
                print("FAIL the daemon died (exit %s): %s" % (D.proc.returncode, D.log()))
                rep.failed += 1
                break
            rep.run(name, fn)

        def still_alive():
            check(D.alive(), "the daemon died: %s", D.log())
            check(req("GET", "/healthz").status == 200, "healthz")
            check(not SEEN_5XX, "5xx answers seen: %r", SEEN_5XX[:5])
            rc = D.term()
            check(rc == 0, "SIGTERM: exit %r", rc)
        rep.run("afterwards: alive, /healthz, no 5xx, clean exit", still_alive)
    finally:
        D.cleanup()
    return rep.finish()


if __name__ == "__main__":
    sys.exit(main())
