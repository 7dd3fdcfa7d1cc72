/* bigbuf: a few big buffers kept warm between requests. On this kind of VM
 * a page never touched costs ~15-20 us to fault in: a 40 MB request body
 * copied into fresh memory took 150-230 ms, fifty times the copy itself,
 * and glibc maps every block past 32 MB afresh and unmaps it on free.
 * Blocks taken here go back here and the next request of that size reuses
 * their pages. Thread-safe. */
#ifndef OPTD_BIGBUF_H
#define OPTD_BIGBUF_H

#include <stddef.h>

/* Below this a body grows by realloc, cheaply, in memory malloc reuses. */
#define BIGBUF_MIN ((size_t)1 << 20)
/* How many freed blocks the pool keeps (the largest ones). */
#define BIGBUF_KEEP 4

/* A block of at least n bytes (malloc'd, so aligned for any type); its
 * capacity in *cap. NULL when out of memory. Free it with bigbuf_free. */
void *bigbuf_alloc(size_t n, size_t *cap);
/* Gives p (cap bytes, from bigbuf_alloc) back; bigbuf_free(NULL, 0) does
 * nothing. */
void bigbuf_free(void *p, size_t cap);

#endif
