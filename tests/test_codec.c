/* Tests of http/codec.c: the float printer reads back exactly (and is the
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

#include "http/httpInt.h"

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
        if (f != 0 && significant_digits(b.p) > shortest_digits(f) && !strchr(b.p, 'e') && fabsf(f) < 1e16f)
            fail_msg("%a printed as %s; %d digits suffice", (double)f, b.p, shortest_digits(f));
    }
    sbuf_free(&b);
}

static void test_special_float32_values_print_as_json_numbers(void **unused)
{
    (void)unused;
    const float cases[] = {0.0f,           -0.0f, 1.0f,         -1.0f, 0.1f,  1e-45f, 1.17549435e-38f,
                           3.40282347e38f, 1e16f, 123456789.0f, 1e-5f, 1e-6f, 0.5f,   100.0f};
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
        "{\"grad\":[1,2]",
        "{\"grad\":[1,2],}",
        "{\"grad\":[1,2]} x",
        "{\"grad\":[01,2]}",
        "{\"grad\":[1.,2]}",
        "{\"grad\":[.5,2]}",
        "{\"grad\":[+1,2]}",
        "{\"grad\":[NaN,2]}",
        "{\"grad\":[1,2,3]}",
        "{\"grad\":[1]}",
        "{\"grad\":[1e39,2]}",
        "{\"grad\":[1,2],\"x\":1}",
        "{\"grad\":[1,2],\"grad\":[1,2]}",
        "{\"gr\\u0061d\":[1,2]}",
        "[1,2]",
        "{\"grad\":[1,2],\"weight\":0}",
        "{\"grad\":[\"1\",2]}",
        "{\"grad\":[1,2],\"loss\":\"x\"}",
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

/* Decodes body fed in pieces of `piece` bytes; returns the error code. */
static optd_err decode_in_pieces(const char *body, size_t piece, unsigned paths, jbody *jb, cJSON **tree)
{
    char msg[256];
    size_t len = strlen(body);
    jbody_init(jb, paths, 1 << 16, (size_t)1 << 30);
    for (size_t off = 0; off < len; off += piece)
        jbody_feed(jb, body + off, len - off < piece ? len - off : piece);
    return jbody_finish(jb, tree, msg, sizeof msg);
}

static void test_streamed_bodies_decode_the_same_whatever_the_pieces(void **unused)
{
    (void)unused;
    const char *body = "{ \"name\" : \"a\\\"b\", \"hyperparams\": {\"betas\": [0.9, 0.999], \"lr\": 1e-3},"
                       " \"dtype\":\"float64\", \"params\" : [ 0.1, -2.5e-3 ,3 , 1.7976931348623157e308,"
                       "4.9e-324 ], \"state\": {\"exp_avg\": [1,2,3,4,5], \"mu_product\": 0.5}}";
    const double want[] = {0.1, -2.5e-3, 3, 1.7976931348623157e308, 4.9e-324};
    for (size_t piece = 1; piece <= strlen(body); piece++) {
        jbody jb;
        cJSON *tree = NULL;
        assert_int_equal(decode_in_pieces(body, piece, JB_PARAMS | JB_STATE, &jb, &tree), OPTD_OK);
        jvec *p = jbody_vec(&jb, "params", 0), *e = jbody_vec(&jb, "exp_avg", 1);
        assert_non_null(p);
        assert_non_null(e);
        assert_int_equal(p->dtype, OPTIM_F64);
        assert_int_equal(p->n, 5);
        assert_int_equal(e->n, 5);
        assert_memory_equal(p->data, want, sizeof want);
        assert_true(((double *)e->data)[4] == 5.0);
        /* The rest is a tree with each vector left as []. */
        assert_string_equal(cJSON_GetObjectItem(tree, "name")->valuestring, "a\"b");
        assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(tree, "params")), 0);
        assert_true(cJSON_GetObjectItem(cJSON_GetObjectItem(tree, "state"), "mu_product")->valuedouble == 0.5);
        assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(cJSON_GetObjectItem(tree, "hyperparams"), "betas")), 2);
        cJSON_Delete(tree);
        jbody_free(&jb);
    }
}

static void test_a_dtype_after_the_vector_decodes_it_exactly_in_that_dtype(void **unused)
{
    (void)unused;
    /* 16777217 is not a float32: as float64 it must survive whole. */
    jbody jb;
    cJSON *tree = NULL;
    assert_int_equal(decode_in_pieces("{\"params\":[16777217, 0.1],\"dtype\":\"float64\"}", 3, JB_PARAMS, &jb, &tree),
                     OPTD_OK);
    jvec *p = jbody_vec(&jb, "params", 0);
    assert_int_equal(p->dtype, OPTIM_F64);
    assert_true(((double *)p->data)[0] == 16777217.0 && ((double *)p->data)[1] == 0.1);
    cJSON_Delete(tree);
    jbody_free(&jb);
    assert_int_equal(decode_in_pieces("{\"params\":[0.1]}", 2, JB_PARAMS, &jb, &tree), OPTD_OK);
    p = jbody_vec(&jb, "params", 0);
    assert_int_equal(p->dtype, OPTIM_F32);
    assert_true(((float *)p->data)[0] == 0.1f);
    cJSON_Delete(tree);
    jbody_free(&jb);
}

static void test_bad_streamed_bodies_are_refused_with_the_right_code(void **unused)
{
    (void)unused;
    static const struct {
        const char *body;
        optd_err rc;
    } cases[] = {
        {"{\"params\":[1,2", OPTD_E_BAD_JSON},
        {"{\"params\":[1,,2]}", OPTD_E_BAD_JSON},
        {"{\"params\":[01]}", OPTD_E_BAD_JSON},
        {"{\"params\":[1.]}", OPTD_E_BAD_JSON},
        {"{\"params\":[1,\"2\"]}", OPTD_E_BAD_REQUEST},
        {"{\"params\":[1,[2]]}", OPTD_E_BAD_REQUEST},
        {"{\"params\":[1,null]}", OPTD_E_BAD_REQUEST},
        {"{\"params\":[1e39],\"dtype\":\"float32\"}", OPTD_E_NON_FINITE},
        {"{\"params\":[1],\"params\":[2]}", OPTD_E_BAD_REQUEST},
        {"{\"params\":[1]} x", OPTD_E_BAD_JSON},
        {"[1,2]", OPTD_E_BAD_REQUEST},
        {"{\"params\":[1,nan]}", OPTD_E_BAD_JSON},
        {"{\"params\":[true]}", OPTD_E_BAD_REQUEST},
        {"{\"params\":[nulls]}", OPTD_E_BAD_JSON},
        {"{\"params\":[1e999],\"dtype\":\"float64\"}", OPTD_E_NON_FINITE},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        for (size_t piece = 1; piece <= 4; piece += 3) {
            jbody jb;
            cJSON *tree = NULL;
            optd_err rc = decode_in_pieces(cases[i].body, piece, JB_PARAMS, &jb, &tree);
            if (rc != cases[i].rc)
                fail_msg("%s in pieces of %zu: %d, wanted %d", cases[i].body, piece, rc, cases[i].rc);
            cJSON_Delete(tree);
            jbody_free(&jb);
        }
    }
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
        cmocka_unit_test(test_streamed_bodies_decode_the_same_whatever_the_pieces),
        cmocka_unit_test(test_a_dtype_after_the_vector_decodes_it_exactly_in_that_dtype),
        cmocka_unit_test(test_bad_streamed_bodies_are_refused_with_the_right_code),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
