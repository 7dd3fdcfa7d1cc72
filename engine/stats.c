/* The engine's counters: latency histograms and the bytes each group of
 * writes commits. Atomics, added to by the writer and read by any thread. */
#include "engine/engineInt.h"

const uint64_t engine_latency_bounds_us[ENGINE_LAT_BUCKETS - 1] = {
    100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 500000, 1000000, 2500000, 10000000,
};

const uint64_t engine_group_bounds_mib[ENGINE_GROUP_BYTES_BUCKETS - 1] = {1, 4, 16, 32, 64, 128, 256, 512, 1024, 4096};

void engine_histogram_observe(engine_histogram *h, uint64_t us)
{
    size_t i = 0;
    while (i < ENGINE_LAT_BUCKETS - 1 && us > engine_latency_bounds_us[i])
        i++;
    atomic_fetch_add(&h->bucket[i], 1);
    atomic_fetch_add(&h->count, 1);
    atomic_fetch_add(&h->sum_us, us);
}

void engine_stats_group_bytes(engine_stats *m, uint64_t bytes)
{
    size_t i = 0;
    while (i < ENGINE_GROUP_BYTES_BUCKETS - 1 && bytes > engine_group_bounds_mib[i] << 20)
        i++;
    atomic_fetch_add(&m->group_bytes_bucket[i], 1);
    atomic_fetch_add(&m->group_bytes_count, 1);
    atomic_fetch_add(&m->group_bytes_sum, bytes);
}
