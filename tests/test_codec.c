/* Tests of api/codec.c: the float printer reads back exactly (and is the
 * shortest form), the fast step decoder agrees bit for bit with strtof and
 * strtod, and bodies it does not take are left to the cJSON path. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include <cmocka.h>

#include "api/internal.h"

static uint64_t rng = 88172645463325252u;
static uint64_t next(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static float random_float(void)
{
    uint32_t bits = (uint32_t)next();
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Digits of the shortest %.*g that reads back as f. */
static int shortest_digits(float f)
{
    char t[40];
    for (int p = 1; p <= 9; p++) {
        snprintf(t, sizeof t, "%.*g", p, (double)f);
        if (strtof(t, NULL) == f)
            return p;
    }
    return 9;
}

static int significant_digits(const char *s)
{
    const char *start = s;
    int n = 0, leading = 1;
    for (; *s && *s != 'e'; s++) {
        if (*s < '0' || *s > '9')
            continue;
        if (leading && *s == '0')
            continue;
        leading = 0;
        n++;
    }
    /* trailing zeros of an integer like 44620 are not significant */
    if (!strchr(start, '.'))
        for (const char *t = start + strcspn(start, "e") - 1; t > start && *t == '0'; t--)
            n--;
    return n;
}

static void test_float32_printing_reads_back_exactly_for_a_million_random_bit_patterns(void **unused)
{
    (void)unused;
    sbuf b = {0};
    for (int i = 0; i < 1000000; i++) {
        float f = random_float();
        if (!isfinite(f))
            continue;
        b.len = 0;
        sbuf_num(&b, f, 1);
        float back = strtof(b.p, NULL);
        if (memcmp(&back, &f, 4) != 0)
            fail_msg("%a printed as %s reads back as %a", (double)f, b.p, (double)back);
    }
    sbuf_free(&b);
}

static void test_float32_printing_is_the_shortest_for_typical_values(void **unused)
{
    (void)unused;
    sbuf b = {0};
    for (int i = 0; i < 200000; i++) {
        float f = (float)(((double)next() / 18446744073709551616.0 - 0.5) * pow(10, (int)(next() % 12) - 6));
        b.len = 0;
        sbuf_num(&b, f, 1);
        if (strtof(b.p, NULL) != f)
            fail_msg("%a printed as %s does not read back", (double)f, b.p);
        if (f != 0 && significant_digits(b.p) > shortest_digits(f) && !strchr(b.p, 'e') &&
            fabsf(f) < 1e16f)
            fail_msg("%a printed as %s; %d digits suffice", (double)f, b.p, shortest_digits(f));
    }
    sbuf_free(&b);
}

static void test_special_float32_values_print_as_json_numbers(void **unused)
{
    (void)unused;
    const float cases[] = {0.0f, -0.0f, 1.0f, -1.0f, 0.1f, 1e-45f, 1.17549435e-38f, 3.40282347e38f, 1e16f, 123456789.0f,
                           1e-5f, 1e-6f, 0.5f, 100.0f};
    sbuf b = {0};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        b.len = 0;
        sbuf_num(&b, cases[i], 1);
        cJSON *j = cJSON_Parse(b.p);
        if (!j || !cJSON_IsNumber(j))
            fail_msg("%a printed as %s, which is not a JSON number", (double)cases[i], b.p);
        assert_true((float)j->valuedouble == cases[i]);
        assert_int_equal(!signbit(strtod(b.p, NULL)), !signbit(cases[i]));
        cJSON_Delete(j);
    }
    sbuf_free(&b);
}

static void test_float64_printing_reads_back_exactly(void **unused)
{
    (void)unused;
    sbuf b = {0};
    for (int i = 0; i < 200000; i++) {
        uint64_t bits = next();
        double d;
        memcpy(&d, &bits, 8);
        if (!isfinite(d))
            continue;
        b.len = 0;
        sbuf_num(&b, d, 0);
        if (strtod(b.p, NULL) != d)
            fail_msg("%a printed as %s does not read back", d, b.p);
    }
    sbuf_free(&b);
}

/* Decodes {"grad":[text]} of one element through the fast path. */
static int fast_one(const char *text, optim_dtype dtype, double *out)
{
    char body[128];
    float f;
    double d;
    step_fields sf;
    snprintf(body, sizeof body, "{\"grad\":[%s]}", text);
    if (!step_body_fast(body, strlen(body), dtype, 1, dtype == OPTIM_F64 ? (void *)&d : (void *)&f, &sf))
        return 0;
    *out = dtype == OPTIM_F64 ? d : f;
    return 1;
}

static void test_the_fast_decoder_agrees_with_strtof_and_strtod_bit_for_bit(void **unused)
{
    (void)unused;
    char text[64];
    for (int i = 0; i < 300000; i++) {
        /* Random mantissas of 1..20 digits and exponents, plus float
         * midpoints printed exactly (the double-rounding trap). */
        int digits = 1 + (int)(next() % 20), e = (int)(next() % 80) - 40;
        int len = 0;
        if (next() % 2)
            text[len++] = '-';
        text[len++] = (char)('1' + next() % 9);
        for (int k = 1; k < digits; k++) {
            if (k == 1 && next() % 2)
                text[len++] = '.';
            text[len++] = (char)('0' + next() % 10);
        }
        if (next() % 3)
            len += sprintf(text + len, "e%d", e);
        text[len] = '\0';
        if (!strchr(text, '.') && strchr(text, 'e') == NULL && digits > 1 && text[0] == '0')
            continue;
        double got;
        float want32 = strtof(text, NULL);
        double want64 = strtod(text, NULL);
        if (isfinite(want32)) {
            assert_true(fast_one(text, OPTIM_F32, &got));
            if ((float)got != want32 || !signbit(got) != !signbit(want32))
                fail_msg("%s: fast float32 %a, strtof %a", text, got, (double)want32);
        }
        if (isfinite(want64)) {
            assert_true(fast_one(text, OPTIM_F64, &got));
            if (memcmp(&got, &want64, 8) != 0)
                fail_msg("%s: fast float64 %a, strtod %a", text, got, want64);
        }
    }
    /* Exact float midpoints: 1 + 2^-24 and neighbours, written in full. */
    const char *mid[] = {"1.000000059604644775390625", "1.0000000596046447753906250001", "16777217",
                         "0.500000029802322387695312500", "3.4028235677973366e38"};
    for (size_t k = 0; k < sizeof mid / sizeof mid[0]; k++) {
        double got;
        float want = strtof(mid[k], NULL);
        if (!isfinite(want))
            continue;
        assert_true(fast_one(mid[k], OPTIM_F32, &got));
        if ((float)got != want)
            fail_msg("%s: fast %a, strtof %a", mid[k], got, (double)want);
    }
}

static void test_the_fast_decoder_leaves_other_bodies_to_cjson(void **unused)
{
    (void)unused;
    const char *bodies[] = {
        "{\"grad\":[1,2]",           "{\"grad\":[1,2],}",        "{\"grad\":[1,2]} x",     "{\"grad\":[01,2]}",
        "{\"grad\":[1.,2]}",         "{\"grad\":[.5,2]}",        "{\"grad\":[+1,2]}",      "{\"grad\":[NaN,2]}",
        "{\"grad\":[1,2,3]}",        "{\"grad\":[1]}",           "{\"grad\":[1e39,2]}",    "{\"grad\":[1,2],\"x\":1}",
        "{\"grad\":[1,2],\"grad\":[1,2]}", "{\"gr\\u0061d\":[1,2]}", "[1,2]",               "{\"grad\":[1,2],\"weight\":0}",
        "{\"grad\":[\"1\",2]}",      "{\"grad\":[1,2],\"loss\":\"x\"}",
    };
    float g[2];
    step_fields f;
    for (size_t i = 0; i < sizeof bodies / sizeof bodies[0]; i++)
        if (step_body_fast(bodies[i], strlen(bodies[i]), OPTIM_F32, 2, g, &f))
            fail_msg("the fast path took %s", bodies[i]);
    const char *ok = " { \"loss\" : null , \"grad\" : [ -0 , 2.5e-3 ] , \"weight\" : 3 } ";
    assert_true(step_body_fast(ok, strlen(ok), OPTIM_F32, 2, g, &f));
    assert_true(signbit(g[0]) && g[1] == 2.5e-3f);
    assert_false(f.has_loss);
    assert_true(f.weight == 3);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_float32_printing_reads_back_exactly_for_a_million_random_bit_patterns),
        cmocka_unit_test(test_float32_printing_is_the_shortest_for_typical_values),
        cmocka_unit_test(test_special_float32_values_print_as_json_numbers),
        cmocka_unit_test(test_float64_printing_reads_back_exactly),
        cmocka_unit_test(test_the_fast_decoder_agrees_with_strtof_and_strtod_bit_for_bit),
        cmocka_unit_test(test_the_fast_decoder_leaves_other_bodies_to_cjson),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
