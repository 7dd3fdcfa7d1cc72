/* bigbuf: see bigbuf.h. A handful of blocks under one mutex: taken and
 * given back once per big request, so contention is not a concern. */
#include "common/bigbuf.h"

#include <pthread.h>
#include <stdlib.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct {
    void *p;
    size_t cap;
} pool[BIGBUF_KEEP]; /* guarded by mu; p NULL: an empty slot */

void *bigbuf_alloc(size_t n, size_t *cap)
{
    int best = -1;
    pthread_mutex_lock(&mu);
    for (int i = 0; i < BIGBUF_KEEP; i++)
        if (pool[i].p && pool[i].cap >= n && (best < 0 || pool[i].cap < pool[best].cap))
            best = i;
    void *p = NULL;
    if (best >= 0) {
        p = pool[best].p;
        *cap = pool[best].cap;
        pool[best].p = NULL;
    }
    pthread_mutex_unlock(&mu);
    if (p)
        return p;
    /* Rounded up to a MiB so that sizes a little apart share blocks. */
    size_t want = (n + ((size_t)1 << 20) - 1) & ~(((size_t)1 << 20) - 1);
    if (want < n || !(p = malloc(want)))
        return NULL;
    *cap = want;
    return p;
}

void bigbuf_free(void *p, size_t cap)
{
    if (!p)
        return;
    pthread_mutex_lock(&mu);
    /* Into an empty slot, else in place of the smallest block kept when p
     * is bigger; the one left out is freed. */
    int at = 0;
    for (int i = 1; i < BIGBUF_KEEP; i++)
        if (!pool[at].p ? 0 : !pool[i].p || pool[i].cap < pool[at].cap)
            at = i;
    void *out = p;
    if (!pool[at].p || pool[at].cap < cap) {
        out = pool[at].p;
        pool[at].p = p;
        pool[at].cap = cap;
    }
    pthread_mutex_unlock(&mu);
    free(out);
}
