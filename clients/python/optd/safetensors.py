"""Reading and writing safetensors files with the standard library (and
numpy when present): the form of optd's binary checkpoints. A file is an
8-byte little-endian header size, a JSON header (tensor name -> dtype,
shape, data_offsets; ``__metadata__`` -> strings), then the tensors' bytes.

    meta, tensors = optd.safetensors.load("run-1.safetensors")   # numpy arrays
    meta["optimizer"], int(meta["step"]), json.loads(meta["hyperparams"])
"""

import json
import struct
import sys
from array import array

try:  # optional
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None

__all__ = ["load", "loads", "metadata_values"]

_NP = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1",
       "BOOL": "?"}
_ARRAY = {"F64": "d", "F32": "f"}
_WIDTH = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_HEADER_MAX = 100 << 20  # the format's own limit


def loads(data, as_numpy=True):
    """``(metadata, tensors)`` of a safetensors file's bytes: ``metadata`` the
    ``__metadata__`` dict of strings, ``tensors`` name -> numpy array of its
    dtype and shape (a list of floats without numpy, or with
    ``as_numpy=False``). ValueError when the bytes are not such a file."""
    data = memoryview(data)
    if len(data) < 8:
        raise ValueError("not a safetensors file: %d bytes" % len(data))
    (n,) = struct.unpack("<Q", data[:8])
    if n > _HEADER_MAX or 8 + n > len(data):
        raise ValueError("not a safetensors file: header size %d" % n)
    header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
    meta = header.pop("__metadata__", {}) or {}
    buf = data[8 + n:]
    tensors, spans = {}, []
    for name, t in header.items():
        dtype, shape, (b, e) = t["dtype"], list(t["shape"]), t["data_offsets"]
        count = 1
        for d in shape:
            count *= d
        if not (0 <= b <= e <= len(buf)) or e - b != count * _WIDTH.get(dtype, 0):
            raise ValueError("tensor %s: data_offsets %r do not fit %s%r" % (name, [b, e], dtype, shape))
        spans.append((b, e))
        raw = buf[b:e]
        if as_numpy and _np is not None and dtype in _NP:
            tensors[name] = _np.frombuffer(raw, dtype=_NP[dtype]).reshape(shape).copy()
        elif dtype in _ARRAY:
            a = array(_ARRAY[dtype])
            a.frombytes(raw)
            if sys.byteorder != "little":
                a.byteswap()
            tensors[name] = a.tolist()
        else:
            raise ValueError("tensor %s: dtype %s needs numpy" % (name, dtype))
    at = 0
    for b, e in sorted(spans):
        if b != at:
            raise ValueError("the tensors leave a hole or overlap at byte %d" % at)
        at = e
    if at != len(buf):
        raise ValueError("%d bytes after the last tensor" % (len(buf) - at))
    return meta, tensors


def load(path, as_numpy=True):
    """:func:`loads` of the file at ``path``."""
    with open(path, "rb") as f:
        return loads(f.read(), as_numpy=as_numpy)


def metadata_values(meta):
    """An optd checkpoint's ``__metadata__`` decoded: strings stay strings
    (name, optimizer, dtype), the other values (JSON text) are parsed."""
    out = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v) if k not in ("name", "optimizer", "dtype") else v
        except ValueError:
            out[k] = v
    return out
