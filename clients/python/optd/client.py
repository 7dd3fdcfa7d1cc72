"""The optd HTTP client: standard library only (numpy is used when present and
numpy arrays are given)."""

import http.client
import json
import os
import random
import sys
import threading
import time
import urllib.parse
import uuid
from array import array

from . import errors
from .errors import ConnectionFailed, NotFound, OptdError

try:  # optional
    import numpy as _np
except ImportError:  # pragma: no cover - exercised on machines without numpy
    _np = None

__all__ = ["Client", "Session", "StepResult", "ParamsResult"]

USER_AGENT = "optd-python/0.1.0"
JSON = "application/json"
BINARY = "application/octet-stream"
_TYPECODE = {"float32": "f", "float64": "d"}
_NPDTYPE = {"float32": "<f4", "float64": "<f8"}
_WIDTH = {"float32": 4, "float64": 8}
# Narrow wire types (API.md "Binary vectors"): a vector may travel as these
# instead of the session's dtype, named by the media type's dtype parameter.
WIRE_DTYPES = ("bfloat16", "float16", "float32", "float64")
# The longest request head a binary step with a skip list sends: the daemon
# reads heads of up to 28 KiB (431 headers_too_large past it). A step whose
# Optd-Skip would make its head longer goes as JSON, the list in its body.
HEAD_BUDGET = 24 * 1024
_WIRE_WIDTH = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


def _is_numpy(x):
    return _np is not None and isinstance(x, _np.ndarray)


def _etag_step(value):
    """ETag "N" (or W/"N") -> N, else None."""
    if not value:
        return None
    v = value.strip()
    if v.startswith("W/"):
        v = v[2:]
    v = v.strip('"')
    return int(v) if v.isdigit() else None


def _encode_vector(values, dtype):
    """A gradient as raw little-endian elements of dtype."""
    if _is_numpy(values):
        return _np.ascontiguousarray(values.reshape(-1), dtype=_NPDTYPE[dtype]).tobytes()
    if isinstance(values, (bytes, bytearray, memoryview)):
        return bytes(values)
    a = array(_TYPECODE[dtype], (float(v) for v in values))
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


def _wire_name(wire):
    if wire is None:
        return None
    s = getattr(wire, "__name__", None) or str(wire)
    s = s.replace("torch.", "")
    s = {"half": "float16", "bf16": "bfloat16", "float": "float32", "double": "float64"}.get(s, s)
    if s not in WIRE_DTYPES:
        raise ValueError("a wire dtype is one of %s, not %r" % (", ".join(WIRE_DTYPES), wire))
    return s


def _f32_bits(values):
    """float values -> their float32 bit patterns (rounded to float32 first,
    as torch's conversions to bfloat16 and float16 do)."""
    a = array("f", (float(v) for v in values))
    return array("I", a.tobytes())


def _encode_narrow(values, wire):
    """values as little-endian ``wire`` elements (bfloat16 or float16),
    rounded to nearest even from their float32 value."""
    if _is_numpy(values) and _np is not None:
        with _np.errstate(over="ignore"):  # past a type's range: infinity, as the daemon makes it
            f = _np.ascontiguousarray(values.reshape(-1), dtype=_np.float32)
            if wire == "float16":
                return f.astype("<f2").tobytes()
        u = f.view(_np.uint32)
        r = (u + (_np.uint32(0x7FFF) + ((u >> 16) & _np.uint32(1)))) >> 16
        return r.astype("<u2").tobytes()
    if wire == "float16":
        import struct
        f = array("f", (float(v) for v in values))
        try:
            return struct.pack("<%de" % len(f), *f)
        except OverflowError:  # past float16's range: infinity, as numpy and the daemon make it
            return b"".join(struct.pack("<e", v) if abs(v) < 65520 or v != v else (b"\x00\x7c" if v > 0 else b"\x00\xfc")
                            for v in f)
    out = array("H", (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF for u in _f32_bits(values)))
    if sys.byteorder != "little":
        out.byteswap()
    return out.tobytes()


def _decode_narrow(data, wire, dtype, as_numpy):
    """little-endian ``wire`` elements -> values of the session's ``dtype``."""
    if len(data) % 2:
        raise OptdError("binary body of %d bytes is not a whole number of %s" % (len(data), wire))
    if as_numpy and _np is not None:
        if wire == "float16":
            return _np.frombuffer(data, dtype="<f2").astype(_np.dtype(dtype))
        u = _np.frombuffer(data, dtype="<u2").astype(_np.uint32) << 16
        return u.view(_np.float32).astype(_np.dtype(dtype))
    import struct
    n = len(data) // 2
    if wire == "float16":
        return list(struct.unpack("<%de" % n, data))
    bits = struct.unpack("<%dH" % n, data)
    return list(struct.unpack("<%df" % n, struct.pack("<%dI" % n, *[b << 16 for b in bits])))


def _media_dtype(ctype):
    """The dtype parameter of a Content-Type, or None."""
    for part in (ctype or "").split(";")[1:]:
        k, _, v = part.partition("=")
        if k.strip().lower() == "dtype":
            return v.strip().strip('"')
    return None


def _header_number(v):
    """A reply header holding a number, or a list of them (one per group)."""
    if v is None:
        return None
    try:
        return json.loads(v)
    except ValueError:
        try:
            return [float(x) for x in v.split(",")]
        except ValueError:
            return v


def _decode_vector(data, dtype, as_numpy):
    w = _WIDTH[dtype]
    if len(data) % w:
        raise OptdError("binary body of %d bytes is not a whole number of %s" % (len(data), dtype))
    if as_numpy and _np is not None:
        return _np.frombuffer(data, dtype=_NPDTYPE[dtype]).astype(_np.dtype(dtype), copy=True)
    a = array(_TYPECODE[dtype])
    a.frombytes(data)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tolist()


def _as_dtype(values, dtype):
    """JSON numbers of a float32 session as the float32 values they stand for
    (the daemon prints the shortest text that reads back as the same float32)."""
    if values is None or dtype != "float32":
        return values
    return array("f", values).tolist()


def _to_list(values):
    if _is_numpy(values):
        return values.reshape(-1).tolist()
    if isinstance(values, array):
        return values.tolist()
    return list(values)


def _set_given(target, fields):
    """Sets target[key] = convert(value) for each (key, value, convert) of
    fields whose value was given (is not None): the optional fields of a
    request body or its headers. Returns target."""
    for key, value, convert in fields:
        if value is not None:
            target[key] = convert(value)
    return target


def _dumps(obj):
    try:
        return json.dumps(obj, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except ValueError as e:
        raise errors.NonFinite("NaN or infinity cannot be sent as JSON (%s)" % e, status=None) from None


class StepResult(tuple):
    """``(step, params)`` as a tuple, plus what else the reply said:
    ``.replayed`` (an Idempotency-Key replay), ``.lr``, ``.grad_norm``,
    ``.contributors`` (None when absent) and ``.data`` (the JSON reply, or
    ``{}`` for a binary one). ``params`` is None with ``minimal=True`` and for a
    replay of a key too old for the daemon to keep its parameters."""

    def __new__(cls, step, params, data=None, replayed=False):
        self = super().__new__(cls, (step, params))
        self.data = data or {}
        self.replayed = replayed
        return self

    step = property(lambda self: self[0])
    params = property(lambda self: self[1])
    lr = property(lambda self: self.data.get("lr"))
    grad_norm = property(lambda self: self.data.get("grad_norm"))
    contributors = property(lambda self: self.data.get("contributors"))

    def __repr__(self):
        return "StepResult(step=%r, params=%s%s)" % (
            self[0], "None" if self[1] is None else "<%d values>" % len(self[1]),
            ", replayed=True" if self.replayed else "")


ParamsResult = StepResult


class _Response:
    __slots__ = ("status", "headers", "body", "method", "path")

    def __init__(self, status, headers, body, method, path):
        self.status, self.headers, self.body = status, headers, body
        self.method, self.path = method, path

    def header(self, name):
        return self.headers.get(name)

    def json(self):
        if not self.body:
            return {}
        try:
            return json.loads(self.body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise OptdError("%s %s -> %d: reply is not JSON: %r"
                            % (self.method, self.path, self.status, self.body[:200]), status=self.status)


class Client:
    """A client of one optd daemon (or of a router in front of several).

    ``url`` defaults to ``$OPTD_URL`` or ``http://127.0.0.1:8080``; ``token`` to
    ``$OPTD_TOKEN``. ``timeout`` is per request, in seconds. Requests that are
    safe to repeat (reads, PUT, PATCH, DELETE, and steps, which always carry an
    ``Idempotency-Key``) are retried up to ``retries`` times on connection
    errors and on 503, with exponential backoff from ``backoff`` up to
    ``max_backoff`` seconds (with jitter). A create (POST/PUT of a new session)
    is retried on 503 and when the connection could not be made at all. The
    default budget (12 retries, backoff to 30 s: one to two minutes in all)
    outlasts a daemon's restart; ``retries=0`` fails at once.

    One client may be shared by threads: each thread keeps its own keep-alive
    connection.
    """

    def __init__(self, url=None, token=None, timeout=60.0, retries=12, backoff=0.05,
                 max_backoff=30.0, auto_idempotency=True, user_agent=USER_AGENT):
        url = url or os.environ.get("OPTD_URL") or "http://127.0.0.1:8080"
        if "://" not in url:
            url = "http://" + url
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError("optd url must be http:// or https://, not %r" % url)
        self.url = url.rstrip("/")
        self._scheme = parts.scheme
        self._host = parts.hostname or "127.0.0.1"
        if ":" in self._host:  # IPv6 literal: http.client wants it bare
            self._host = self._host.strip("[]")
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._prefix = parts.path.rstrip("/")
        self.token = token if token is not None else os.environ.get("OPTD_TOKEN")
        self.timeout = timeout
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.auto_idempotency = auto_idempotency
        self.user_agent = user_agent
        self._local = threading.local()
        self._dtypes = {}  # session name -> dtype, for binary transport
        self._dtypes_lock = threading.Lock()

    def __repr__(self):
        return "optd.Client(%r)" % self.url

    # -- transport ---------------------------------------------------------
    def _conn(self):
        c = getattr(self._local, "conn", None)
        if c is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            c = cls(self._host, self._port, timeout=self.timeout)
            self._local.conn = c
        return c

    def _drop_conn(self):
        c = getattr(self._local, "conn", None)
        if c is not None:
            try:
                c.close()
            except OSError:
                pass
        self._local.conn = None

    def close(self):
        """Closes this thread's connection (others close when their threads end)."""
        self._drop_conn()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _sleep(self, attempt, retry_after=None):
        delay = min(self.max_backoff, self.backoff * (2 ** attempt))
        delay = delay * (0.5 + random.random() / 2)
        if retry_after:
            try:
                delay = max(delay, min(float(retry_after), self.max_backoff * 4))
            except ValueError:
                pass
        time.sleep(delay)

    def request(self, method, path, query=None, json_body=None, body=None, headers=None,
                safe=None, expect=None):
        """One HTTP exchange with retries; returns the reply (status, headers,
        body) or raises the matching :class:`OptdError` for a status >= 400.
        ``safe`` says whether the request may be repeated after it might have
        reached the daemon (default: every method but POST)."""
        if safe is None:
            safe = method != "POST"
        url = self._prefix + path
        if query:
            q = {k: v for k, v in query.items() if v is not None}
            if q:
                url += "?" + urllib.parse.urlencode(q)
        hdrs = {"User-Agent": self.user_agent}
        if json_body is not None:
            body = _dumps(json_body)
            hdrs["Content-Type"] = JSON
        if self.token:
            hdrs["Authorization"] = "Bearer " + self.token
        if headers:
            hdrs.update({k: v for k, v in headers.items() if v is not None})
        attempt = 0
        stale_retried = False
        while True:
            conn = self._conn()
            reused = conn.sock is not None
            try:
                conn.request(method, url, body=body, headers=hdrs)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as e:
                self._drop_conn()
                never_sent = isinstance(e, ConnectionRefusedError)
                # a keep-alive connection the daemon closed while idle: one
                # immediate reconnect, whatever the retry budget
                if reused and not stale_retried and isinstance(
                        e, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)):
                    stale_retried = True
                    continue
                if attempt < self.retries and (safe or never_sent):
                    self._sleep(attempt)
                    attempt += 1
                    continue
                raise ConnectionFailed("%s %s%s: %s: %s" % (method, self.url, path, type(e).__name__, e),
                                       body={}) from e
            if resp.will_close:
                self._drop_conn()
            r = _Response(resp.status, resp.headers, data, method, path)
            if r.status >= 400:
                err = self._error(r)
                if isinstance(err, errors.Unavailable) and not isinstance(err, errors.RoundTimeout) \
                        and attempt < self.retries:
                    self._sleep(attempt, r.header("Retry-After"))
                    attempt += 1
                    continue
                raise err
            return r

    def _error(self, r):
        ctype = (r.header("Content-Type") or "").split(";")[0].strip()
        parsed = None
        if ctype == JSON:
            try:
                parsed = json.loads(r.body.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                parsed = None
        return errors.error_for(r.status, parsed if isinstance(parsed, dict) else r.body, dict(r.headers))

    @staticmethod
    def _path(name, suffix=""):
        if not isinstance(name, str) or not name:
            raise ValueError("a session name is a non-empty string")
        return "/v1/sessions/" + urllib.parse.quote(name, safe="") + suffix

    # -- service -----------------------------------------------------------
    def health(self):
        """GET /healthz -> {"status": "ok"}."""
        return self.request("GET", "/healthz").json()

    def ready(self):
        """GET /readyz -> True when the database is open and writable."""
        try:
            self.request("GET", "/readyz", headers=None)
            return True
        except errors.Unavailable:
            return False

    def metrics(self):
        """GET /metrics -> the Prometheus text."""
        return self.request("GET", "/metrics").body.decode("utf-8")

    def optimizers(self):
        """GET /v1/optimizers -> the list of algorithms with their hyperparameters."""
        return self.request("GET", "/v1/optimizers").json()["optimizers"]

    def openapi(self):
        """GET /v1/openapi.json -> the OpenAPI document the daemon serves."""
        return self.request("GET", "/v1/openapi.json").json()

    # -- sessions ----------------------------------------------------------
    def session(self, name):
        """A handle on a session, without asking the daemon anything."""
        return Session(self, name)

    def create(self, name, optimizer, params=None, size=None, fill=None, hyperparams=None,
               dtype=None, exist_ok=False, **fields):
        """Creates a session (PUT /v1/sessions/{name}, so a router can place it
        by name) and returns its :class:`Session`. Give ``params`` (a list or
        numpy array: its length is the size) or ``size`` with optional
        ``fill``. Extra keyword fields (``workers=``, ``min_workers=``,
        ``round_timeout=`` ...) go into the body as they are. With
        ``exist_ok=True`` a session of that name is returned instead of
        raising :class:`Conflict`."""
        body = _set_given({"optimizer": optimizer},
                          (("params", params, _to_list), ("size", size, int), ("fill", fill, float),
                           ("hyperparams", hyperparams or None, _jsonable), ("dtype", dtype, _dtype_name)))
        body.update(_jsonable(fields))
        try:
            r = self.request("PUT", self._path(name), json_body=body, safe=False)
        except errors.Conflict:
            if not exist_ok:
                raise
            return self.get(name)
        return self._session(r.json())

    def fork(self, name, source, hyperparams=None, **fields):
        """Creates ``name`` as a copy of ``source``'s params, state and step
        (POST /v1/sessions with ``"from"``), optionally with new hyperparams."""
        body = {"name": name, "from": source}
        if hyperparams:
            body["hyperparams"] = _jsonable(hyperparams)
        body.update(_jsonable(fields))
        return self._session(self.request("POST", "/v1/sessions", json_body=body).json())

    def get(self, name):
        """GET /v1/sessions/{name} -> :class:`Session` (raises :class:`NotFound`)."""
        try:
            return self._session(self.request("GET", self._path(name)).json())
        except NotFound:
            self._forget(name)
            raise

    def list_page(self, limit=None, after=None):
        """One page: ``([Session, ...], next_name_or_None)``."""
        r = self.request("GET", "/v1/sessions", query={"limit": limit, "after": after}).json()
        return [self._session(s) for s in r.get("sessions", [])], r.get("next")

    def list(self, limit=None, after=None, page_size=None):
        """Iterates over the sessions in name order, page by page (``page_size``
        per request; ``limit`` caps the total; ``after`` starts past a name)."""
        count = 0
        while True:
            want = page_size
            if limit is not None:
                left = limit - count
                if left <= 0:
                    return
                if want is None or want > left:
                    want = min(left, 1000)
            page, nxt = self.list_page(limit=want, after=after)
            for s in page:
                yield s
                count += 1
                if limit is not None and count >= limit:
                    return
            if not page or not nxt:
                return
            after = nxt

    def patch(self, name, hyperparams=None, **fields):
        """PATCH /v1/sessions/{name}: merges hyperparams (and session fields
        such as ``workers=``); returns the :class:`Session`."""
        body = {}
        if hyperparams is not None:
            body["hyperparams"] = _jsonable(hyperparams)
        body.update(_jsonable(fields))
        return self._session(self.request("PATCH", self._path(name), json_body=body).json())

    def delete(self, name, missing_ok=False):
        """DELETE /v1/sessions/{name}. A retry that finds the session already
        gone (the first attempt's reply was lost) counts as success."""
        try:
            self.request("DELETE", self._path(name))
        except NotFound:
            if not missing_ok:
                raise
        finally:
            self._forget(name)

    # -- steps and vectors -------------------------------------------------
    def step(self, name, grad, idempotency_key=None, if_match=None, loss=None, weight=None,
             binary=None, minimal=False, wire_dtype=None, reply_dtype=None, skip=None, lr=None, **fields):
        """Applies one optimizer step; returns :class:`StepResult` ``(step, params)``.

        A numpy ``grad`` travels as raw bytes of the session's dtype (and the
        params come back as a numpy array); a list as JSON (``binary=True``
        forces bytes). ``if_match`` makes the step conditional on the current
        step (:class:`StepMismatch` otherwise). Every step carries an
        ``Idempotency-Key`` (a uuid4 unless given), so the client's retries
        never apply it twice. ``loss`` and ``weight`` (and any extra keyword
        fields) go into the step body; for binary steps loss and weight go in
        the ``Optd-Loss`` / ``Optd-Weight`` headers.

        ``wire_dtype="bfloat16"`` (or ``"float16"``, ``"float32"``) sends the
        gradient in that narrower type (rounded to nearest even; bytes given
        are taken as already of that type) and asks for the params in it too,
        unless ``reply_dtype`` names another (e.g. the session's, for full
        precision). A binary reply's lr, grad_norm and contributors come from
        its ``Optd-Lr``, ``Optd-Grad-Norm`` and ``Optd-Contributors`` headers.

        ``skip``: names of tensors of a shaped session that have no gradient
        this step (torch's ``grad is None``): their params and state stay
        (header ``Optd-Skip`` of a binary step, ``"skip"`` in a JSON one; a
        binary step whose list would not fit in a request head goes as the
        same step in JSON).

        ``lr``: a number (or, for a session with groups, a list with one per
        group) set as the session's lr with this step, as a PATCH of lr
        would, in the same transaction (header ``Optd-Lr``)."""
        as_numpy = _is_numpy(grad)
        wire = _wire_name(wire_dtype)
        reply = _wire_name(reply_dtype) or wire
        if binary is None:
            binary = as_numpy or isinstance(grad, (bytes, bytearray, memoryview)) or wire is not None
        key = idempotency_key
        if key is None and self.auto_idempotency:
            key = uuid.uuid4().hex
        headers = {"Idempotency-Key": key}
        if if_match is not None:
            headers["If-Match"] = '"%d"' % int(if_match)
        if minimal:
            headers["Prefer"] = "return=minimal"
        if lr is not None:
            headers["Optd-Lr"] = ",".join(repr(float(v)) for v in (lr if isinstance(lr, (list, tuple)) else [lr]))
        path = self._path(name, "/step")
        if binary:
            if fields:
                raise ValueError("fields %s need a JSON step (binary=False)" % sorted(fields))
            dtype = self.dtype_of(name)
            headers["Content-Type"] = BINARY if wire in (None, dtype) else "%s; dtype=%s" % (BINARY, wire)
            headers["Accept"] = BINARY if reply in (None, dtype) else "%s; dtype=%s" % (BINARY, reply)
            _set_given(headers, (("Optd-Loss", loss, lambda v: repr(float(v))),
                                 ("Optd-Weight", weight, lambda v: repr(float(v)))))
            if wire in ("bfloat16", "float16") and not isinstance(grad, (bytes, bytearray, memoryview)):
                body = _encode_narrow(grad, wire)
            else:
                body = _encode_vector(grad, wire or dtype)
            if skip:
                headers["Optd-Skip"] = ",".join(skip)
                if self._head_bytes(path, headers) > HEAD_BUDGET:
                    return self._step_skip_in_body(name, path, body, dtype, wire, reply, as_numpy, minimal, loss,
                                                   weight, skip, headers)
            r = self._step_request(name, path, body, headers)
            step = _etag_step(r.header("ETag"))
            full_ctype = r.header("Content-Type") or ""
            ctype = full_ctype.split(";")[0].strip()
            if ctype == JSON:  # e.g. a replay the daemon answers in JSON
                data = r.json()
                params = _as_dtype(data.get("params"), dtype)
                if params is not None and as_numpy:
                    params = _np.asarray(params, dtype=_np.dtype(dtype))
                return StepResult(data.get("step", step), params, data, self._replayed(r))
            data = {}
            for k, h in (("lr", "Optd-Lr"), ("grad_norm", "Optd-Grad-Norm"), ("contributors", "Optd-Contributors")):
                v = _header_number(r.header(h))
                if v is not None:
                    data[k] = v
            params = None
            if not minimal and r.body:
                got = _media_dtype(full_ctype) or dtype
                params = self._decode_params(r.body, got, dtype, as_numpy)
            return StepResult(step, params, data, self._replayed(r))
        body = _set_given({"grad": _to_list(grad)}, (("loss", loss, float), ("weight", weight, float)))
        if skip:
            body["skip"] = list(skip)
        body.update(_jsonable(fields))
        headers["Content-Type"] = JSON
        r = self._step_request(name, path, _dumps(body), headers)
        data = r.json()
        step = data.get("step", _etag_step(r.header("ETag")))
        params = _as_dtype(data.get("params"), self._cached_dtype(name))
        return StepResult(step, params, data, self._replayed(r))

    def _head_bytes(self, path, headers):
        """About the bytes of a request's head: its line, headers and those
        request() adds (Host, User-Agent, Content-Length, Authorization)."""
        n = len(path) + 32 + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 256
        return n + (len(self.token) + 24 if self.token else 0)

    def _step_skip_in_body(self, name, path, body, dtype, wire, reply, as_numpy, minimal, loss, weight, skip,
                           headers):
        """A binary step whose Optd-Skip would take its head past HEAD_BUDGET,
        sent as the same step in JSON with the skip list in the body: the
        gradient is the values ``body`` (binary, of ``wire`` or ``dtype``)
        holds, and the params come back as the binary step would return them.
        JSON takes ~20 bytes an element: past --max-body (64 MiB by default,
        about 3M elements) the daemon says 413, and the error says why."""
        got = wire or dtype
        if got in ("bfloat16", "float16"):
            values = _decode_narrow(body, got, "float64", False)
        else:
            values = _decode_vector(body, got, False)
        doc = _set_given({"grad": values, "skip": list(skip)}, (("loss", loss, float), ("weight", weight, float)))
        h = {k: v for k, v in headers.items() if k not in ("Content-Type", "Accept", "Optd-Skip", "Optd-Loss",
                                                              "Optd-Weight")}
        h["Content-Type"] = JSON
        try:
            r = self._step_request(name, path, _dumps(doc), h)
        except errors.TooLarge as e:
            e.message = ("%s (this binary step went as JSON, as its Optd-Skip of %d bytes does not fit in a "
                         "request head: raise --max-body, or skip fewer tensors)" % (e.message,
                                                                                   len(headers["Optd-Skip"])))
            raise
        data = r.json()
        params = data.pop("params", None)
        if params is not None and not minimal:
            if _np is not None:  # the list path encodes element by element
                params = _np.asarray(params, dtype=_np.float64)
            back = reply or dtype
            enc = _encode_narrow(params, back) if back in ("bfloat16", "float16") else _encode_vector(params, back)
            params = self._decode_params(enc, back, dtype, as_numpy)
        return StepResult(data.get("step", _etag_step(r.header("ETag"))), params, data, self._replayed(r))

    @staticmethod
    def _decode_params(body, wire, dtype, as_numpy):
        """A binary vector of type ``wire`` as values of ``dtype``."""
        if wire == dtype:
            return _decode_vector(body, dtype, as_numpy)
        if wire in ("float32", "float64"):
            v = _decode_vector(body, wire, as_numpy)
            return v.astype(_np.dtype(dtype)) if _is_numpy(v) else v
        return _decode_narrow(body, wire, dtype, as_numpy)

    def _step_request(self, name, path, body, headers):
        try:
            return self.request("POST", path, body=body, headers=headers,
                                safe=headers.get("Idempotency-Key") is not None)
        except NotFound:
            self._forget(name)
            raise

    @staticmethod
    def _replayed(r):
        return (r.header("Idempotent-Replayed") or "").lower() == "true"

    def params(self, name, binary=False, wire_dtype=None):
        """GET /v1/sessions/{name}/params -> ``(step, params)``; with
        ``binary=True`` the values travel as raw bytes and come back as a numpy
        array (a list without numpy), in ``wire_dtype`` (e.g. ``"bfloat16"``)
        when given."""
        path = self._path(name, "/params")
        wire = _wire_name(wire_dtype)
        if binary or wire:
            dtype = self.dtype_of(name)
            accept = BINARY if wire in (None, dtype) else "%s; dtype=%s" % (BINARY, wire)
            r = self.request("GET", path, headers={"Accept": accept})
            got = _media_dtype(r.header("Content-Type")) or dtype
            return StepResult(_etag_step(r.header("ETag")), self._decode_params(r.body, got, dtype, True))
        data = self.request("GET", path).json()
        return StepResult(data.get("step"), _as_dtype(data.get("params"), self._cached_dtype(name)), data)

    def checkpoint(self, name, path=None):
        """GET /v1/sessions/{name}/state. Without ``path``: the full
        checkpoint as a dict. With ``path``: writes it to that file, a
        safetensors file (tensor ``params`` and one per state buffer in the
        session's dtype, the rest in ``__metadata__``; read it with
        :func:`optd.safetensors.load`, numpy or the ``safetensors`` package),
        or JSON when ``path`` ends in ``.json``; returns ``path``."""
        if path is None:
            return self.request("GET", self._path(name, "/state")).json()
        as_json = os.fsdecode(path).endswith(".json")
        r = self.request("GET", self._path(name, "/state"), headers=None if as_json else {"Accept": BINARY})
        tmp = "%s.tmp-%s" % (os.fsdecode(path), uuid.uuid4().hex[:8])
        with open(tmp, "wb") as f:  # whole or not at all
            f.write(r.body)
        os.replace(tmp, path)
        return path

    def restore(self, name, checkpoint, if_match=None):
        """PUT /v1/sessions/{name}/state: creates or replaces ``name`` from a
        checkpoint: a dict from :meth:`checkpoint` (possibly of another
        session: its ``name`` is replaced), or the path of a file
        :meth:`checkpoint` wrote (safetensors, or JSON for ``.json``).
        ``if_match=n`` replaces only a session still at step ``n``
        (:class:`StepMismatch` otherwise). Returns the reply as a dict."""
        headers = {"If-Match": '"%d"' % int(if_match)} if if_match is not None else {}
        self._forget(name)
        if isinstance(checkpoint, (str, bytes, os.PathLike)):
            with open(checkpoint, "rb") as f:
                data = f.read()
            ctype = JSON if os.fsdecode(checkpoint).endswith(".json") else BINARY
            headers["Content-Type"] = ctype
            r = self.request("PUT", self._path(name, "/state"), body=data, headers=headers)
            return r.json()
        body = dict(checkpoint)
        body["name"] = name
        r = self.request("PUT", self._path(name, "/state"), json_body=body, headers=headers)
        return r.json()

    def history(self, name, after=None, limit=None):
        """GET /v1/sessions/{name}/history, following ``next`` page by page
        (``limit`` per page): returns the list of step records."""
        out = []
        while True:
            r = self.request("GET", self._path(name, "/history"),
                             query={"after": after, "limit": limit}).json()
            page = r.get("history", [])
            out.extend(page)
            nxt = r.get("next")
            if not page or nxt is None:
                return out
            after = nxt

    # -- helpers -----------------------------------------------------------
    def dtype_of(self, name):
        with self._dtypes_lock:
            dt = self._dtypes.get(name)
        if dt is None:
            dt = self.get(name).dtype
        return dt

    def _cached_dtype(self, name):
        with self._dtypes_lock:
            return self._dtypes.get(name)

    def _forget(self, name):
        with self._dtypes_lock:
            self._dtypes.pop(name, None)

    def _session(self, info):
        s = Session(self, info["name"], info)
        with self._dtypes_lock:
            if info.get("dtype"):
                self._dtypes[s.name] = info["dtype"]
        return s


class Session:
    """A named session on a daemon. ``info`` is the last JSON the daemon gave
    about it (``refresh()`` re-reads it); ``current_step`` follows the steps
    made through this object."""

    def __init__(self, client, name, info=None):
        self.client = client
        self.name = name
        self.info = info

    def __repr__(self):
        if self.info:
            return "Session(%r, %s, %s[%d], step=%d)" % (
                self.name, self.info.get("optimizer"), self.info.get("dtype"),
                self.info.get("size", 0), self.info.get("step", 0))
        return "Session(%r)" % self.name

    def _get(self, key):
        if self.info is None:
            self.refresh()
        return self.info.get(key)

    optimizer = property(lambda self: self._get("optimizer"))
    dtype = property(lambda self: self._get("dtype"))
    size = property(lambda self: self._get("size"))
    hyperparams = property(lambda self: self._get("hyperparams"))
    created_at = property(lambda self: self._get("created_at"))
    updated_at = property(lambda self: self._get("updated_at"))
    current_step = property(lambda self: self._get("step"))

    def refresh(self):
        self.info = self.client.get(self.name).info
        return self

    def step(self, grad, **kw):
        """See :meth:`Client.step`."""
        r = self.client.step(self.name, grad, **kw)
        if self.info is not None and isinstance(r.step, int):
            self.info["step"] = max(self.info.get("step", 0), r.step)
        return r

    def params(self, binary=False):
        return self.client.params(self.name, binary=binary)

    def checkpoint(self, path=None):
        """See :meth:`Client.checkpoint`: a dict, or ``path`` written."""
        return self.client.checkpoint(self.name, path)

    def restore(self, checkpoint, if_match=None):
        """See :meth:`Client.restore`: from a dict or a file's path."""
        self.client.restore(self.name, checkpoint, if_match=if_match)
        self.info = None
        return self

    def patch(self, hyperparams=None, **fields):
        self.info = self.client.patch(self.name, hyperparams, **fields).info
        return self

    def delete(self, missing_ok=False):
        self.client.delete(self.name, missing_ok=missing_ok)

    def history(self, after=None, limit=None):
        return self.client.history(self.name, after=after, limit=limit)

    def fork(self, name, hyperparams=None, **fields):
        return self.client.fork(name, self.name, hyperparams=hyperparams, **fields)


def _dtype_name(dtype):
    s = getattr(dtype, "__name__", None) or str(dtype)  # "float64", np.float64, np.dtype, torch.float64
    for n in ("float32", "float64"):
        if s == n or s.endswith("." + n) or s == "<f%d" % _WIDTH[n]:
            return n
    if s in ("double", "float"):
        return "float64" if s == "double" else "float32"
    raise ValueError("dtype must be float32 or float64, not %r" % (dtype,))


def _jsonable(obj):
    """Tuples to lists, numpy scalars/arrays to Python numbers (betas=(0.9, 0.99) works)."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if _np is not None:
        if isinstance(obj, _np.ndarray):
            return obj.tolist()
        if isinstance(obj, _np.generic):
            return obj.item()
    return obj

