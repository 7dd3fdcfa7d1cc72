/* A cached session's Idempotency-Keys: key -> the step it was applied at.
 *
 * The store keeps the keys in step order (store_idem_put), so that
 * recording one appends to the page the previous step dirtied instead of
 * inserting at a random page of an index by key: every keyed step asks
 * whether its key is known, and almost always it is not. This map answers
 * that in memory. It holds a 32-bit fingerprint of each key of the window
 * and its step; a match is a candidate, confirmed by the store from the
 * step (store_idem_get), so a collision costs a lookup, never a wrong
 * replay. Open addressing with linear probing; entries are never removed
 * one by one: a rehash drops those the window has left.
 *
 * 8 bytes a slot; a rehash leaves at most 5/8 of the slots full and the
 * next comes at 3/4 (a miss then probes 2-8 slots on average): a full
 * window of 10,000 keys takes 128 KiB, counted in the session cache. */
#include <stdlib.h>
#include <string.h>

#include "engine/engineInt.h"

struct engine_idem_map {
    uint32_t *fp;  /* fingerprint, 0 for an empty slot */
    uint32_t *off; /* step - base */
    uint64_t base; /* steps of the entries are > base - 1 and < base + 2^32 */
    size_t cap;    /* a power of two */
    size_t n;      /* slots in use */
};

static uint32_t fingerprint(const char *key)
{
    uint64_t h = 14695981039346656037u; /* FNV-1a, then a 64-bit finalizer */
    for (const unsigned char *p = (const unsigned char *)key; *p; p++)
        h = (h ^ *p) * 1099511628211u;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdu;
    h ^= h >> 33;
    uint32_t f = (uint32_t)(h >> 32);
    return f ? f : 1;
}

static void place(engine_idem_map *m, uint32_t f, uint32_t off)
{
    size_t i = f & (m->cap - 1);
    while (m->fp[i])
        i = (i + 1) & (m->cap - 1);
    m->fp[i] = f;
    m->off[i] = off;
    m->n++;
}

/* Rebuilds m with room for need more entries, keeping those past floor,
 * counted from a base that lets step (the newest) fit. */
static optd_err rehash(engine_idem_map *m, uint64_t floor, uint64_t step, size_t need)
{
    size_t live = 0;
    for (size_t i = 0; i < m->cap; i++)
        if (m->fp[i] && m->base + m->off[i] > floor)
            live++;
    size_t cap = 16;
    while (5 * cap < 8 * (live + need))
        cap *= 2;
    engine_idem_map t = {calloc(cap, sizeof(uint32_t)), malloc(cap * sizeof(uint32_t)), floor + 1, cap, 0};
    if (!t.fp || !t.off) {
        free(t.fp);
        free(t.off);
        return OPTD_E_NOMEM;
    }
    /* Entries past floor are within 2^32 of the newest step: the window is
     * far smaller. */
    if (step - t.base >= ((uint64_t)1 << 32))
        t.base = step - (((uint64_t)1 << 32) - 1);
    for (size_t i = 0; i < m->cap; i++) {
        uint64_t s = m->base + m->off[i];
        if (m->fp[i] && s > floor && s >= t.base)
            place(&t, m->fp[i], (uint32_t)(s - t.base));
    }
    free(m->fp);
    free(m->off);
    *m = t;
    return OPTD_OK;
}

optd_err engine_idem_add(engine_idem_map *m, const char *key, uint64_t step, uint64_t floor)
{
    if (step <= floor)
        return OPTD_OK;
    if (4 * (m->n + 1) > 3 * m->cap || step < m->base || step - m->base >= ((uint64_t)1 << 32)) {
        optd_err rc = rehash(m, floor, step, 1);
        if (rc)
            return rc;
    }
    place(m, fingerprint(key), (uint32_t)(step - m->base));
    return OPTD_OK;
}

size_t engine_idem_candidates(const engine_idem_map *m, const char *key, uint64_t floor, uint64_t *steps, size_t max)
{
    uint32_t f = fingerprint(key);
    size_t k = 0;
    for (size_t i = f & (m->cap - 1); m->fp[i] && k < max; i = (i + 1) & (m->cap - 1))
        if (m->fp[i] == f && m->base + m->off[i] > floor)
            steps[k++] = m->base + m->off[i];
    return k;
}

struct load_ctx {
    engine_idem_map *m;
    uint64_t floor;
};

static optd_err load_one(void *ctx, uint64_t step, const char *key)
{
    struct load_ctx *c = ctx;
    return engine_idem_add(c->m, key, step, c->floor);
}

optd_err engine_idem_load(store *st, int64_t session_id, uint64_t floor, engine_idem_map **out)
{
    engine_idem_map *m = calloc(1, sizeof *m);
    optd_err rc = OPTD_E_NOMEM;
    if (m && (m->fp = calloc(16, sizeof(uint32_t))) && (m->off = malloc(16 * sizeof(uint32_t)))) {
        m->cap = 16;
        m->base = floor + 1;
        struct load_ctx c = {m, floor};
        rc = store_idem_keys(st, session_id, floor, load_one, &c);
    }
    if (rc) {
        engine_idem_free(m);
        return rc;
    }
    *out = m;
    return OPTD_OK;
}

size_t engine_idem_bytes(const engine_idem_map *m) { return m ? sizeof *m + m->cap * 2 * sizeof(uint32_t) : 0; }

void engine_idem_free(engine_idem_map *m)
{
    if (!m)
        return;
    free(m->fp);
    free(m->off);
    free(m);
}
