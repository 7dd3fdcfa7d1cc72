#!/usr/bin/python3
# gen-wire-reference: writes tests/data/wire_reference.bin, torch's own
# conversions between the wire types of API.md "Binary vectors", which
# tests/test_wire.c replays against http/wire.c. Regenerate (from the repo
# root) with
#
#     /usr/bin/python3 tests/gen_wire_reference.py     # writes tests/data/
#
# using Debian's python3-torch (1.13). Deterministic (a fixed seed). Run with
# ATEN_CPU_CAPABILITY=default, as tests/gen_reference.py: torch's AVX2
# kernels write a NaN as bfloat16 0xffff, its portable ones (and c10's
# BFloat16) as 0x7fc0; every other value is the same either way.
#
# Format, all little-endian:
#   char magic[8]   "OPTDWIRE"
#   u32  n32        float32 inputs
#   u32  n64        float64 inputs
#   f32  in32[n32]
#   u16  bf16_of_32[n32]   in32.to(torch.bfloat16)
#   u16  f16_of_32[n32]    in32.to(torch.float16)
#   f64  in64[n64]
#   u16  bf16_of_64[n64]   in64.to(torch.bfloat16)
#   u16  f16_of_64[n64]    in64.to(torch.float16)
#   f32  f32_of_64[n64]    in64.to(torch.float32)
#   f32  f32_of_bf16[65536]   every bfloat16 bit pattern .to(torch.float32)
#   f32  f32_of_f16[65536]    every float16 bit pattern .to(torch.float32)
# torch's .to(torch.float64) of every bfloat16 and float16 pattern is the
# float32 one widened (checked here), so the test widens those tables.

import os
import struct
import sys

os.environ["ATEN_CPU_CAPABILITY"] = "default"

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "data", "wire_reference.bin")


def f32_of_bits(u):
    return np.array(u, dtype=np.uint32).view(np.float32)


def float32_inputs(rng):
    bits = []
    # Specials and the edges of each narrow type's range.
    for b in (0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF,
              0x7F7FFFFF, 0xFF7FFFFF, 0x00800000, 0x00000001, 0x807FFFFF, 0x007FFFFF,
              0x7F7F7FFF, 0x7F7F8000, 0x7F7F8001, 0x7F7EFFFF, 0x7F7F0000, 0x7F7E8000):
        bits.append(b)
    edges = [65504.0, 65519.0, 65519.996, 65520.0, 65536.0, 2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 2.0 ** -26,
             3 * 2.0 ** -25, 2.0 ** -25 + 2.0 ** -40, 1.0, 1.00390625, 1.0009765625, 0.1, 1 / 3, 1e-8, 1e-40,
             1e-45, 3.3895313892515355e38, 3.3961e38]
    for e in edges:
        for s in (1, -1):
            bits.append(int(np.array([s * e], dtype=np.float32).view(np.uint32)[0]))
    # bfloat16 ties: the exact midpoints between neighbours, and one float
    # ulp either side, over every exponent.
    hi = rng.integers(0, 1 << 16, 3000, dtype=np.uint32)
    for d in (0x8000, 0x7FFF, 0x8001):
        bits.extend(((hi << 16) | d).tolist())
    # float16 ties: the midpoint between two halves is a float (13 spare bits).
    h = rng.integers(0, 0x7C00, 3000, dtype=np.uint16)
    lo = torch.from_numpy(h.view(np.int16)).view(torch.float16).to(torch.float32).numpy()
    nxt = torch.from_numpy((h + 1).astype(np.uint16).view(np.int16)).view(torch.float16).to(torch.float32).numpy()
    mid = ((lo.astype(np.float64) + nxt.astype(np.float64)) / 2).astype(np.float32)
    mb = mid.view(np.uint32)
    for d in (0, 1, -1):
        v = (mb.astype(np.int64) + d).astype(np.uint32)
        bits.extend(v.tolist())
        bits.extend((v | 0x80000000).tolist())
    # Subnormal halves and the float16 underflow zone.
    sub = rng.uniform(-2.0 ** -13, 2.0 ** -13, 4000).astype(np.float32)
    bits.extend(sub.view(np.uint32).tolist())
    # Any bit pattern at all.
    bits.extend(rng.integers(0, 1 << 32, 10000, dtype=np.uint64).astype(np.uint32).tolist())
    return f32_of_bits(bits)


def float64_inputs(rng, in32):
    vals = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e39, -1e39, 1e300, 5e-324, 1e-46,
            3.4028235677973366e38, 3.4028235e38 * (1 + 2 ** -30), 65519.99999999, 65520.0, 2.0 ** -25,
            2.0 ** -25 * (1 + 2 ** -40), 2.0 ** -150, 2.0 ** -149 * 1.5]
    # Double rounding: torch goes float64 -> float32 -> narrow, so a double
    # just past a narrow tie that rounds onto the tie in float32 lands on the
    # even side. Near every float32 input, a tiny step either way.
    base = in32[np.isfinite(in32)].astype(np.float64)
    base = base[rng.choice(len(base), 6000, replace=False)]
    for rel in (2.0 ** -30, -(2.0 ** -30), 2.0 ** -25, -(2.0 ** -25), 2.0 ** -24):
        vals.extend((base * (1 + rel)).tolist())
    # float32 ties themselves (a double exactly between two floats).
    f = rng.integers(0, 0x7F000000, 3000, dtype=np.uint64).astype(np.uint32)
    a = f32_of_bits(f).astype(np.float64)
    b = f32_of_bits(f + 1).astype(np.float64)
    vals.extend(((a + b) / 2).tolist())
    vals.extend((-(a + b) / 2).tolist())
    vals.extend(rng.standard_normal(3000).tolist())
    vals.extend(np.ldexp(rng.standard_normal(5000), rng.integers(-160, 140, 5000)).tolist())
    return np.array(vals, dtype=np.float64)


def bits16(t):
    return t.view(torch.int16).numpy().view(np.uint16)


def main():
    rng = np.random.default_rng(16)
    in32 = float32_inputs(rng)
    in64 = float64_inputs(rng, in32)
    t32 = torch.from_numpy(in32.copy())
    t64 = torch.from_numpy(in64.copy())
    every = torch.from_numpy(np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.int16))
    parts = [
        b"OPTDWIRE", struct.pack("<II", len(in32), len(in64)),
        in32.tobytes(), bits16(t32.to(torch.bfloat16)).tobytes(), bits16(t32.to(torch.float16)).tobytes(),
        in64.tobytes(), bits16(t64.to(torch.bfloat16)).tobytes(), bits16(t64.to(torch.float16)).tobytes(),
        t64.to(torch.float32).numpy().tobytes(),
        every.view(torch.bfloat16).to(torch.float32).numpy().tobytes(),
        every.view(torch.float16).to(torch.float32).numpy().tobytes(),
    ]
    for narrow in (torch.bfloat16, torch.float16):
        wide = every.view(narrow).to(torch.float64).numpy()
        with np.errstate(invalid="ignore"):
            via = every.view(narrow).to(torch.float32).numpy().astype(np.float64)
        same = (wide == via) | (np.isnan(wide) & np.isnan(via))
        assert same.all(), "torch widens %s to float64 otherwise than through float32" % narrow
    with open(OUT, "wb") as fh:
        for p in parts:
            fh.write(p)
    print("wrote %s: %d float32 and %d float64 inputs" % (OUT, len(in32), len(in64)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
