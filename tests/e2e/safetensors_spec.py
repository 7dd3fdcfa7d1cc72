"""A reader of the safetensors format written from its specification
(https://huggingface.co/docs/safetensors, "Format"), standard library only,
strict where the specification says MUST: an 8-byte little-endian unsigned
header size N; N bytes of UTF-8 JSON that begin with "{" and may be padded
at the end with spaces; a __metadata__ entry, if any, mapping strings to
strings; every other entry a tensor with dtype, shape and data_offsets
[BEGIN, END) relative to the byte buffer after the header; no duplicate
keys; the byte buffer indexed whole, without holes or overlaps (no polyglot
files); little-endian, row-major data."""

import json
import struct

WIDTH = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
CODE = {"F64": "d", "F32": "f"}


class FormatError(AssertionError):
    pass


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise FormatError("duplicate keys in the header: %r" % keys)
    return dict(pairs)


def parse(data):
    """(metadata dict, {name: (dtype, shape, bytes)}) of a safetensors file."""
    if len(data) < 8:
        raise FormatError("shorter than the 8-byte header size")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise FormatError("header size %d past the end of the file" % n)
    raw = data[8:8 + n]
    if not raw.startswith(b"{"):
        raise FormatError("the header must begin with {")
    text = raw.decode("utf-8")
    stripped = text.rstrip(" ")
    header = json.loads(stripped, object_pairs_hook=_no_duplicates)
    buf = data[8 + n:]
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise FormatError("__metadata__ must map strings to strings: %r" % meta)
    spans, tensors = [], {}
    for name, t in header.items():
        if set(t) != {"dtype", "shape", "data_offsets"}:
            raise FormatError("tensor %s has keys %r" % (name, sorted(t)))
        dtype, shape, (b, e) = t["dtype"], t["shape"], t["data_offsets"]
        if dtype not in WIDTH:
            raise FormatError("tensor %s: unknown dtype %r" % (name, dtype))
        count = 1
        for d in shape:
            if not isinstance(d, int) or d < 0:
                raise FormatError("tensor %s: bad shape %r" % (name, shape))
            count *= d
        if not (isinstance(b, int) and isinstance(e, int) and 0 <= b <= e <= len(buf)):
            raise FormatError("tensor %s: data_offsets %r outside the buffer" % (name, [b, e]))
        if e - b != count * WIDTH[dtype]:
            raise FormatError("tensor %s: %d bytes for shape %r of %s" % (name, e - b, shape, dtype))
        spans.append((b, e, name))
        tensors[name] = (dtype, shape, buf[b:e])
    at = 0
    for b, e, name in sorted(spans):
        if b != at:
            raise FormatError("tensor %s starts at %d, not %d: a hole or an overlap" % (name, b, at))
        at = e
    if at != len(buf):
        raise FormatError("%d bytes after the last tensor: the buffer is not indexed whole" % (len(buf) - at))
    return meta, tensors


def values(tensor):
    dtype, shape, data = tensor
    return list(struct.unpack("<%d%s" % (len(data) // WIDTH[dtype], CODE[dtype]), data))


def build(meta, tensors, pad=True):
    """A file from metadata and {name: (dtype, shape, bytes)}, tensors in the order given."""
    header, off, blobs = {}, 0, []
    if meta is not None:
        header["__metadata__"] = meta
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
        blobs.append(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * (-(len(h) + 8) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)
