/* The shortest decimal that reads back as exactly a given float32 or
 * float64 (common/shortest.cpp: a C shim over Debian's libdragonbox-dev,
 * Junekey Jeon's Dragonbox, a C++ header-only library). */
#ifndef OPTD_SHORTEST_H
#define OPTD_SHORTEST_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* For a finite, nonzero x: the fewest significant digits (*digits, with no
 * trailing zeros) and the exponent (*exp10) such that digits * 10^exp10
 * reads back as |x| under round-to-nearest-even; of several such decimals,
 * the nearest to x. float32: up to 9 digits; float64: up to 17. */
void optd_shortest_f32(float x, uint32_t *digits, int *exp10);
void optd_shortest_f64(double x, uint64_t *digits, int *exp10);

#ifdef __cplusplus
}
#endif

#endif
