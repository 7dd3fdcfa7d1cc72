/* Clocks and a digest shared by the modules (common/util.c). */
#ifndef OPTD_UTIL_H
#define OPTD_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* Unix time in milliseconds (CLOCK_REALTIME): the rows' timestamps. */
int64_t optd_now_ms(void);
/* Microseconds of CLOCK_MONOTONIC: timeouts and latencies. */
uint64_t optd_mono_us(void);
/* A 64-bit digest of n bytes (not cryptographic: tells retries apart). */
uint64_t optd_digest64(const void *p, size_t n);

#endif
