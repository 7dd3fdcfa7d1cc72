// The C shim of common/shortest.h over Dragonbox (Debian's libdragonbox-dev,
// header-only). Compiled with -fno-exceptions -fno-rtti and using nothing of
// the C++ runtime, so the daemon links without libstdc++.
#include "common/shortest.h"

#include <dragonbox/dragonbox.h>

namespace dbp = jkj::dragonbox::policy;

// The sign is the caller's; trailing zeros are removed here so the digits
// are the shortest; rounding (both ways) is IEEE's round-to-nearest-even,
// what strtod and every JSON parser worth the name use.
void optd_shortest_f32(float x, uint32_t *digits, int *exp10)
{
    auto r = jkj::dragonbox::to_decimal(x, dbp::sign::ignore, dbp::trailing_zero::remove);
    *digits = r.significand;
    *exp10 = r.exponent;
}

void optd_shortest_f64(double x, uint64_t *digits, int *exp10)
{
    auto r = jkj::dragonbox::to_decimal(x, dbp::sign::ignore, dbp::trailing_zero::remove);
    *digits = r.significand;
    *exp10 = r.exponent;
}
