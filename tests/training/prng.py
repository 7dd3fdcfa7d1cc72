"""The deterministic pseudo-random numbers shared by gen_reference.py (which
feeds them to torch) and the tests (which replay them through optd), so the
reference data need not carry the gradients. Standard library only.

Every value is a dyadic rational with at most 24 significant bits, so it is
exact in float32 and float64 and both sides see the very same gradient."""

M64 = (1 << 64) - 1


class SplitMix64:
    def __init__(self, seed):
        self.state = seed & M64

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & M64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    def unit(self):
        """A value in [-1, 1) with 24 significant bits."""
        return ((self.next() >> 40) - (1 << 23)) / float(1 << 23)

    def below(self, k):
        return self.next() % k


def initial_params(seed, n):
    r = SplitMix64(seed ^ 0x5EED)
    return [2.0 * r.unit() for _ in range(n)]


def gradients(seed, steps, n, exp_lo, exp_hi):
    """steps gradients of n elements: each step one scale 2**e, e uniform in
    [exp_lo, exp_hi], times values uniform in [-1, 1)."""
    r = SplitMix64(seed)
    out = []
    for _ in range(steps):
        scale = 2.0 ** (exp_lo + r.below(exp_hi - exp_lo + 1))
        out.append([scale * r.unit() for _ in range(n)])
    return out
