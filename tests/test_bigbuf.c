/* common/bigbuf: freed big blocks come back to the next request of their
 * size, the pool keeps the largest BIGBUF_KEEP, and what it cannot keep is
 * freed (make asan sees a leak otherwise). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "common/bigbuf.h"

static void test_a_freed_block_is_reused_by_the_next_alloc_it_fits(void **state)
{
    (void)state;
    size_t cap = 0, cap2 = 0;
    unsigned char *p = bigbuf_alloc(3 << 20, &cap);
    assert_non_null(p);
    assert_true(cap >= (size_t)3 << 20);
    assert_int_equal(cap % ((size_t)1 << 20), 0);
    memset(p, 7, cap);
    bigbuf_free(p, cap);
    unsigned char *q = bigbuf_alloc((3 << 20) - 5, &cap2);
    assert_ptr_equal(q, p);
    assert_int_equal(cap2, cap);
    /* One bigger than any kept is a new block. */
    size_t cap3 = 0;
    unsigned char *r = bigbuf_alloc(cap + 1, &cap3);
    assert_non_null(r);
    assert_ptr_not_equal(r, q);
    assert_true(cap3 > cap);
    bigbuf_free(q, cap2);
    bigbuf_free(r, cap3);
}

static void test_the_pool_keeps_the_largest_blocks(void **state)
{
    (void)state;
    void *p[BIGBUF_KEEP + 2];
    size_t cap[BIGBUF_KEEP + 2];
    for (int i = 0; i < BIGBUF_KEEP + 2; i++)
        assert_non_null(p[i] = bigbuf_alloc((size_t)(64 + i) << 20, &cap[i])); /* past what others left */
    for (int i = 0; i < BIGBUF_KEEP + 2; i++)
        bigbuf_free(p[i], cap[i]);
    /* The smallest two were freed (untouched, so never resident): a 1 MiB
     * request gets the smallest kept, and the biggest is still there. */
    size_t c1 = 0, c2 = 0;
    void *a = bigbuf_alloc(1 << 20, &c1);
    assert_int_equal(c1, (size_t)66 << 20);
    void *b = bigbuf_alloc((size_t)(64 + BIGBUF_KEEP + 1) << 20, &c2);
    assert_ptr_equal(b, p[BIGBUF_KEEP + 1]);
    bigbuf_free(a, c1);
    bigbuf_free(b, c2);
    bigbuf_free(NULL, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_a_freed_block_is_reused_by_the_next_alloc_it_fits),
        cmocka_unit_test(test_the_pool_keeps_the_largest_blocks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
