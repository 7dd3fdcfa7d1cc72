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
#include "tests/decimal_check.h"

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

/* ---- The printer against the one it replaced, and shortness proved ---------- */

/* The printer before Dragonbox, as its definition: the first "%.*g" that
 * reads back exactly (%g drops trailing zeros). Slow: a reference only. */
static void reference_print(char *out, size_t len, double v, int f32)
{
    for (int p = 1; p <= (f32 ? 9 : 17); p++) {
        snprintf(out, len, "%.*g", p, f32 ? (double)(float)v : v);
        if (f32 ? strtof(out, NULL) == (float)v : strtod(out, NULL) == v)
            return;
    }
}

/* How many values printed with fewer digits than the old printer's. */
static size_t shorter_than_before;

/* Prints v, checks that it reads back bit for bit (sign of zero included)
 * and that no shorter decimal does; with against_reference, also that the
 * old printer's digits and exponent are the same. */
static void check_printed(sbuf *b, double v, int f32, int against_reference)
{
    b->len = 0;
    sbuf_num(b, v, f32);
    if (f32) {
        float f = (float)v, back = strtof(b->p, NULL);
        if (memcmp(&back, &f, 4) != 0)
            fail_msg("%a printed as %s reads back as %a", (double)f, b->p, (double)back);
    } else {
        double back = strtod(b->p, NULL);
        if (memcmp(&back, &v, 8) != 0)
            fail_msg("%a printed as %s reads back as %a", v, b->p, back);
    }
    if (v == 0)
        return;
    uint64_t digits, rdigits;
    int e, re;
    int n = decimal_parts(b->p, &digits, &e);
    if (shorter_exists(digits, e, n, v, f32))
        fail_msg("%a printed as %s: a decimal of %d digits reads back too", v, b->p, n - 1);
    if (against_reference) {
        char ref[48];
        reference_print(ref, sizeof ref, v, f32);
        int rn = decimal_parts(ref, &rdigits, &re);
        /* Below a power of two the decimals that read back reach only half
         * as far down: there the old printer's correctly rounded "%.*g"
         * could miss a shorter one that Dragonbox finds. */
        if (rn < n || (rn == n && (rdigits != digits || re != e)))
            fail_msg("%a printed as %s, the old printer's %s", v, b->p, ref);
        shorter_than_before += rn > n;
    }
}

static double bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static double bits_f64(uint64_t u)
{
    double d;
    memcpy(&d, &u, 8);
    return d;
}

/* Two million random float32 bit patterns and every float32 around each
 * power of two (where the gap below is half the gap above) and the
 * subnormals' edges: each reads back, and none has a shorter decimal; one
 * in ten also against the old printer (value and digits). `make
 * floats-exhaustive` does the first two checks for all 2^32 patterns. */
static void test_float32_printing_is_exact_and_shortest(void **unused)
{
    (void)unused;
    sbuf b = {0};
    for (int i = 0; i < 2000000; i++) {
        double f = bits_f32((uint32_t)next());
        if (isfinite(f))
            check_printed(&b, f, 1, i % 10 == 0);
    }
    for (uint32_t ex = 0; ex < 255; ex++)
        for (int32_t d = -3; d <= 3; d++) {
            uint32_t u = (ex << 23) + (uint32_t)d;
            for (int neg = 0; neg < 2; neg++) {
                double f = bits_f32(u | (uint32_t)neg << 31);
                if (isfinite(f) && (ex << 23) + (uint32_t)d < 0x7f800000u)
                    check_printed(&b, f, 1, 1);
            }
        }
    print_message("float32: %zu values shorter than the old printer's\n", shorter_than_before);
    shorter_than_before = 0;
    sbuf_free(&b);
}

/* Random float64 bit patterns, powers of two and values of every decade:
 * each reads back, none has a shorter decimal, and one in twenty prints
 * what the old printer did. */
static void test_float64_printing_is_exact_and_shortest(void **unused)
{
    (void)unused;
    sbuf b = {0};
    for (int i = 0; i < 500000; i++) {
        double d = bits_f64(next());
        if (isfinite(d))
            check_printed(&b, d, 0, i % 20 == 0);
    }
    for (uint64_t ex = 0; ex < 2047; ex++)
        for (int d = -2; d <= 2; d++) {
            double v = bits_f64((ex << 52) + (uint64_t)(int64_t)d);
            if (isfinite(v) && v > 0)
                check_printed(&b, v, 0, 1);
        }
    for (int k = -320; k <= 308; k++)
        check_printed(&b, pow(10, k) * ((double)next() / 18446744073709551616.0 + 0.5), 0, 1);
    print_message("float64: %zu values shorter than the old printer's\n", shorter_than_before);
    shorter_than_before = 0;
    sbuf_free(&b);
}

/* Every layout of the printer: plain with leading zeros, plain integers,
 * plain with a point, and the exponent form at both ends of the range;
 * these are the strings a client sees. */
static void test_numbers_print_in_the_expected_layouts(void **unused)
{
    (void)unused;
    static const struct {
        double v;
        int f32;
        const char *want;
    } cases[] = {
        {0.0, 1, "0"},
        {-0.0, 0, "-0"},
        {1.0, 1, "1"},
        {0.1, 1, "0.1"},
        {0.1, 0, "0.1"},
        {-2.5, 0, "-2.5"},
        {1e-5, 0, "0.00001"},
        {1.5e-5, 1, "0.000015"},
        {1e-6, 0, "1e-6"},
        {-1.25e-7, 0, "-1.25e-7"},
        {123456789.0, 1, "123456790"},
        {0x1p-96, 1, "1.2621775e-29"}, /* the old printer: 1.26217745e-29 */
        {1e16, 0, "10000000000000000"},
        {1e17, 0, "1e17"},
        {1.5e300, 0, "1.5e300"},
        {4.9406564584124654e-324, 0, "5e-324"},
        {1.7976931348623157e308, 0, "1.7976931348623157e308"},
        {3.40282347e38, 1, "3.4028235e38"},
        {1e-45, 1, "1e-45"},
        {0.001, 1, "0.001"},
        {12.375, 0, "12.375"},
        {1234567.875, 0, "1234567.875"},
        {0.30000000000000004, 0, "0.30000000000000004"},
        {INFINITY, 0, "null"},
        {NAN, 1, "null"},
    };
    sbuf b = {0};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        b.len = 0;
        sbuf_num(&b, cases[i].v, cases[i].f32);
        if (strcmp(b.p, cases[i].want))
            fail_msg("%a (%s) printed as %s, want %s", cases[i].v, cases[i].f32 ? "float32" : "float64", b.p,
                     cases[i].want);
    }
    /* A vector prints the same numbers, comma-separated. */
    const float v[] = {0.5f, -3e-7f, 1e20f};
    b.len = 0;
    sbuf_vec(&b, v, 3, OPTIM_F32);
    assert_string_equal(b.p, "[0.5,-3e-7,1e20]");
    sbuf_free(&b);
}

/* The printer writes digits eight at a time, splitting them 4+4, then each
 * half into pairs (http/codec.c, write8): every value of either half, and
 * so of every pair, must come out as its digits. An integer ending in a
 * nonzero digit prints as itself, so 10^8 + k 10^4 + 4321 puts every k in
 * the first half of the last eight digits, and 10^15 + k 10^8 + 12345679
 * (below 2^53, exact) in the second half of the eight before. */
static void test_every_group_of_digits_prints_as_itself(void **unused)
{
    (void)unused;
    sbuf b = {0};
    char want[32];
    for (uint64_t k = 0; k < 10000; k++) {
        const uint64_t v[] = {100000000u + k * 10000u + 4321u, 1000000000000000u + k * 100000000u + 12345679u};
        for (size_t i = 0; i < 2; i++) {
            b.len = 0;
            sbuf_num(&b, (double)v[i], 0);
            snprintf(want, sizeof want, "%llu", (unsigned long long)v[i]);
            if (strcmp(b.p, want))
                fail_msg("%s printed as %s", want, b.p);
        }
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
        cmocka_unit_test(test_float32_printing_is_exact_and_shortest),
        cmocka_unit_test(test_float64_printing_is_exact_and_shortest),
        cmocka_unit_test(test_numbers_print_in_the_expected_layouts),
        cmocka_unit_test(test_every_group_of_digits_prints_as_itself),
        cmocka_unit_test(test_the_fast_decoder_agrees_with_strtof_and_strtod_bit_for_bit),
        cmocka_unit_test(test_the_fast_decoder_leaves_other_bodies_to_cjson),
        cmocka_unit_test(test_streamed_bodies_decode_the_same_whatever_the_pieces),
        cmocka_unit_test(test_a_dtype_after_the_vector_decodes_it_exactly_in_that_dtype),
        cmocka_unit_test(test_bad_streamed_bodies_are_refused_with_the_right_code),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
