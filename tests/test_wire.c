/* Tests of http/wire.c: every conversion between the wire types bit for
 * bit against torch 1.13's Tensor.to() (tests/data/wire_reference.bin, from
 * tests/gen_wire_reference.py: ties, subnormals, overflow, NaN and
 * infinities, double rounding through float32, and every bfloat16 and
 * float16 pattern), the vector loops against the same conversion one
 * element at a time (any length, any alignment), and the parsing of the
 * dtype media type parameter. Runs from tests/. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "http/httpInt.h"

#define REF "data/wire_reference.bin"

typedef struct ref {
    uint32_t n32, n64;
    float *in32;
    uint16_t *bf16_of_32, *f16_of_32;
    double *in64;
    uint16_t *bf16_of_64, *f16_of_64;
    float *f32_of_64;
    float *f32_of_bf16, *f32_of_f16; /* 65536 each */
    unsigned char *raw;
} ref;

static ref R;

static int load(void **state)
{
    (void)state;
    FILE *f = fopen(REF, "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s (run from tests/; regenerate with tests/gen_wire_reference.py)\n", REF);
        return -1;
    }
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    R.raw = malloc((size_t)len);
    if (!R.raw || fread(R.raw, 1, (size_t)len, f) != (size_t)len) {
        fclose(f);
        return -1;
    }
    fclose(f);
    if (memcmp(R.raw, "OPTDWIRE", 8) != 0)
        return -1;
    memcpy(&R.n32, R.raw + 8, 4);
    memcpy(&R.n64, R.raw + 12, 4);
    /* Copied out so each array is aligned for its type. */
    size_t off = 16;
#define TAKE(field, type, count)                                                                                       \
    do {                                                                                                               \
        R.field = malloc((count) * sizeof(type));                                                                      \
        memcpy(R.field, R.raw + off, (count) * sizeof(type));                                                          \
        off += (count) * sizeof(type);                                                                                 \
    } while (0)
    TAKE(in32, float, R.n32);
    TAKE(bf16_of_32, uint16_t, R.n32);
    TAKE(f16_of_32, uint16_t, R.n32);
    TAKE(in64, double, R.n64);
    TAKE(bf16_of_64, uint16_t, R.n64);
    TAKE(f16_of_64, uint16_t, R.n64);
    TAKE(f32_of_64, float, R.n64);
    TAKE(f32_of_bf16, float, 65536);
    TAKE(f32_of_f16, float, 65536);
#undef TAKE
    return off == (size_t)len ? 0 : -1;
}

static int unload(void **state)
{
    (void)state;
    free(R.in32);
    free(R.bf16_of_32);
    free(R.f16_of_32);
    free(R.in64);
    free(R.bf16_of_64);
    free(R.f16_of_64);
    free(R.f32_of_64);
    free(R.f32_of_bf16);
    free(R.f32_of_f16);
    free(R.raw);
    return 0;
}

static uint32_t bits32(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static uint64_t bits64(double d)
{
    uint64_t u;
    memcpy(&u, &d, 8);
    return u;
}

/* Encodes src (n of dtype) to w and compares every element with want. */
static void check_encode(optim_dtype dtype, const void *src, size_t n, wire_type w, const uint16_t *want,
                         const char *what)
{
    uint16_t *out = malloc(n * 2);
    wire_encode(dtype, src, n, w, out);
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        if (out[i] == want[i])
            continue;
        if (bad++ < 5) {
            double x = dtype == OPTIM_F64 ? ((const double *)src)[i] : ((const float *)src)[i];
            print_error("%s: element %zu (%a): 0x%04x, torch 0x%04x\n", what, i, x, out[i], want[i]);
        }
    }
    free(out);
    if (bad)
        fail_msg("%s: %zu of %zu elements differ from torch", what, bad, n);
}

static void test_float32_to_bfloat16_is_torchs_bit_for_bit(void **state)
{
    (void)state;
    check_encode(OPTIM_F32, R.in32, R.n32, WIRE_BF16, R.bf16_of_32, "float32 -> bfloat16");
}

static void test_float32_to_float16_is_torchs_bit_for_bit(void **state)
{
    (void)state;
    check_encode(OPTIM_F32, R.in32, R.n32, WIRE_F16, R.f16_of_32, "float32 -> float16");
}

static void test_float64_to_bfloat16_and_float16_round_through_float32_as_torch(void **state)
{
    (void)state;
    check_encode(OPTIM_F64, R.in64, R.n64, WIRE_BF16, R.bf16_of_64, "float64 -> bfloat16");
    check_encode(OPTIM_F64, R.in64, R.n64, WIRE_F16, R.f16_of_64, "float64 -> float16");
    /* The data holds doubles where rounding once, straight to bfloat16,
     * would differ from torch's two roundings: this test would catch a
     * conversion that did not go through float32. */
    size_t differ = 0;
    for (uint32_t i = 0; i < R.n64; i++) {
        double x = R.in64[i];
        if (!isfinite(x) || fabs(x) < 0x1p-126 || fabs(x) > 0x1p127)
            continue;
        uint64_t u = bits64(x); /* a normal bfloat16: keep 7 of the 52 mantissa bits, to nearest even */
        u = (u + ((UINT64_C(1) << 44) - 1) + ((u >> 45) & 1)) >> 45 << 45;
        double once;
        memcpy(&once, &u, 8);
        if ((uint16_t)(bits32((float)once) >> 16) != R.bf16_of_64[i])
            differ++;
    }
    assert_true(differ > 0);
}

static void test_float64_to_float32_is_torchs_bit_for_bit(void **state)
{
    (void)state;
    float *out = malloc(R.n64 * 4);
    wire_encode(OPTIM_F64, R.in64, R.n64, WIRE_F32, out);
    for (uint32_t i = 0; i < R.n64; i++)
        if (bits32(out[i]) != bits32(R.f32_of_64[i]) && !(isnan(out[i]) && isnan(R.f32_of_64[i])))
            fail_msg("float64 -> float32: element %u (%a): %a, torch %a", i, R.in64[i], (double)out[i],
                     (double)R.f32_of_64[i]);
    free(out);
}

/* Decodes every pattern of w into float32 and float64 and compares with
 * torch; the finite check refuses exactly the infinities and NaNs. */
static void check_decode_all(wire_type w, const float *want, const char *what)
{
    uint16_t *in = malloc(65536 * 2);
    float *o32 = malloc(65536 * 4);
    double *o64 = malloc(65536 * 8);
    size_t bad = 0;
    for (uint32_t i = 0; i < 65536; i++)
        in[i] = (uint16_t)i;
    /* In runs of finite values (all must decode and pass), then one at a time. */
    uint32_t first_bad = w == WIRE_BF16 ? 0x7f80 : 0x7c00;
    assert_true(wire_decode(w, in, first_bad, OPTIM_F32, o32, &bad));
    assert_true(wire_decode(w, in, first_bad, OPTIM_F64, o64, &bad));
    assert_false(wire_decode(w, in, 65536, OPTIM_F32, o32, &bad));
    assert_int_equal(bad, first_bad);
    assert_false(wire_decode(w, in, 65536, OPTIM_F64, o64, &bad));
    assert_int_equal(bad, first_bad);
    for (uint32_t i = 0; i < 65536; i++) {
        if (bits32(o32[i]) != bits32(want[i]))
            fail_msg("%s -> float32: 0x%04x gives %a, torch %a", what, i, (double)o32[i], (double)want[i]);
        if (bits64(o64[i]) != bits64((double)want[i]) && !(isnan(o64[i]) && isnan(want[i])))
            fail_msg("%s -> float64: 0x%04x gives %a, torch %a", what, i, o64[i], (double)want[i]);
        int finite = wire_decode(w, &in[i], 1, OPTIM_F32, o32 + i, &bad);
        if (finite != (isfinite(want[i]) != 0))
            fail_msg("%s: 0x%04x is %s but the check says %d", what, i, isfinite(want[i]) ? "finite" : "not",
                     finite);
    }
    free(in);
    free(o32);
    free(o64);
}

static void test_every_bfloat16_widens_as_torch_and_only_finite_ones_pass(void **state)
{
    (void)state;
    check_decode_all(WIRE_BF16, R.f32_of_bf16, "bfloat16");
}

static void test_every_float16_widens_as_torch_and_only_finite_ones_pass(void **state)
{
    (void)state;
    check_decode_all(WIRE_F16, R.f32_of_f16, "float16");
}

static void test_float32_widens_to_float64_exactly_and_refuses_non_finite(void **state)
{
    (void)state;
    double *o = malloc(R.n32 * 8);
    size_t bad = 0, first = SIZE_MAX;
    for (uint32_t i = 0; i < R.n32 && first == SIZE_MAX; i++)
        if (!isfinite(R.in32[i]))
            first = i;
    assert_false(wire_decode(WIRE_F32, R.in32, R.n32, OPTIM_F64, o, &bad));
    assert_int_equal(bad, first);
    for (uint32_t i = 0; i < R.n32; i++)
        if (isfinite(R.in32[i]) && o[i] != (double)R.in32[i])
            fail_msg("float32 -> float64: element %u", i);
    free(o);
}

/* The vector loops (peeled heads, vector bodies, scalar tails) give what
 * the one-element calls give, for every length and offset up to 67. */
static void test_vector_loops_equal_one_element_conversions_at_any_length_and_offset(void **state)
{
    (void)state;
    const wire_type ws[] = {WIRE_BF16, WIRE_F16, WIRE_F32};
    for (size_t k = 0; k < 3; k++) {
        for (size_t off = 0; off < 9; off++) {
            for (size_t n = 1; n <= 67; n++) {
                uint16_t v16[80], one16;
                float v32[80], one32;
                double v64[80];
                const double *src = R.in64 + 1000 + off;
                const float *src32 = R.in32 + 2000 + off;
                if (ws[k] != WIRE_F32) {
                    wire_encode(OPTIM_F32, src32, n, ws[k], v16 + off % 4);
                    for (size_t i = 0; i < n; i++) {
                        wire_encode(OPTIM_F32, src32 + i, 1, ws[k], &one16);
                        assert_int_equal(v16[off % 4 + i], one16);
                    }
                    wire_encode(OPTIM_F64, src, n, ws[k], v16 + off % 4);
                    for (size_t i = 0; i < n; i++) {
                        wire_encode(OPTIM_F64, src + i, 1, ws[k], &one16);
                        assert_int_equal(v16[off % 4 + i], one16);
                    }
                    size_t bad;
                    uint16_t in[80];
                    for (size_t i = 0; i < n; i++)
                        in[i] = (uint16_t)(i * 2654435761u >> 7) & 0x3fff; /* finite in both */
                    assert_true(wire_decode(ws[k], in, n, OPTIM_F32, v32 + off % 4, &bad));
                    assert_true(wire_decode(ws[k], in, n, OPTIM_F64, v64 + off % 2, &bad));
                    for (size_t i = 0; i < n; i++) {
                        wire_decode(ws[k], in + i, 1, OPTIM_F32, &one32, &bad);
                        assert_int_equal(bits32(v32[off % 4 + i]), bits32(one32));
                        assert_true(v64[off % 2 + i] == (double)one32);
                    }
                } else {
                    wire_encode(OPTIM_F64, src, n, WIRE_F32, v32 + off % 4);
                    for (size_t i = 0; i < n; i++)
                        assert_int_equal(bits32(v32[off % 4 + i]), bits32((float)src[i]));
                }
            }
        }
    }
}

static void test_dtype_parameters_parse_as_media_types_do(void **state)
{
    (void)state;
    char msg[256];
    wire_type w;
    int bin;
    assert_int_equal(wire_content_type("application/octet-stream", &w, msg, sizeof msg), OPTD_OK);
    assert_int_equal(w, WIRE_NATIVE);
    assert_int_equal(wire_content_type("application/octet-stream; dtype=bfloat16", &w, msg, sizeof msg), OPTD_OK);
    assert_int_equal(w, WIRE_BF16);
    assert_int_equal(wire_content_type("application/octet-stream;dtype=\"float16\"", &w, msg, sizeof msg), OPTD_OK);
    assert_int_equal(w, WIRE_F16);
    assert_int_equal(wire_content_type("application/octet-stream ; DType = Float32 ; x=y", &w, msg, sizeof msg),
                     OPTD_OK);
    assert_int_equal(w, WIRE_F32);
    assert_int_equal(wire_content_type("application/octet-stream; dtype=bf16", &w, msg, sizeof msg),
                     OPTD_E_UNSUPPORTED_MEDIA_TYPE);
    assert_non_null(strstr(msg, "bfloat16"));
    assert_int_equal(wire_content_type("application/octet-stream; dtype=flaot16", &w, msg, sizeof msg),
                     OPTD_E_UNSUPPORTED_MEDIA_TYPE);
    assert_non_null(strstr(msg, "did you mean dtype=float16?"));
    assert_int_equal(wire_content_type("application/octet-stream; dtype=float16; dtype=bfloat16", &w, msg, sizeof msg),
                     OPTD_E_UNSUPPORTED_MEDIA_TYPE);
    assert_int_equal(wire_content_type("application/octet-stream; dtype=", &w, msg, sizeof msg),
                     OPTD_E_UNSUPPORTED_MEDIA_TYPE);

    assert_int_equal(wire_accept(NULL, &bin, &w, msg, sizeof msg), OPTD_OK);
    assert_false(bin);
    assert_int_equal(wire_accept("application/json", &bin, &w, msg, sizeof msg), OPTD_OK);
    assert_false(bin);
    assert_int_equal(wire_accept("application/octet-stream", &bin, &w, msg, sizeof msg), OPTD_OK);
    assert_true(bin);
    assert_int_equal(w, WIRE_NATIVE);
    assert_int_equal(wire_accept("application/json;q=0.5, application/octet-stream; q=1; dtype=bfloat16", &bin, &w,
                                 msg, sizeof msg),
                     OPTD_OK);
    assert_true(bin);
    assert_int_equal(w, WIRE_BF16);
    assert_int_equal(wire_accept("application/octet-stream;dtype=float16,application/json", &bin, &w, msg, sizeof msg),
                     OPTD_OK);
    assert_int_equal(w, WIRE_F16);
    assert_int_equal(wire_accept("application/octet-stream; dtype=int8", &bin, &w, msg, sizeof msg),
                     OPTD_E_UNSUPPORTED_MEDIA_TYPE);
    assert_non_null(strstr(msg, "Accept"));
}

static void test_a_wire_type_resolves_against_the_sessions_dtype(void **state)
{
    (void)state;
    char msg[256];
    wire_type w;
    assert_int_equal(wire_for(WIRE_NATIVE, OPTIM_F32, "Accept", &w, msg, sizeof msg), OPTD_OK);
    assert_int_equal(w, WIRE_F32);
    assert_int_equal(wire_for(WIRE_NATIVE, OPTIM_F64, "Accept", &w, msg, sizeof msg), OPTD_OK);
    assert_int_equal(w, WIRE_F64);
    assert_int_equal(wire_for(WIRE_F32, OPTIM_F64, "Accept", &w, msg, sizeof msg), OPTD_OK);
    assert_int_equal(w, WIRE_F32);
    assert_int_equal(wire_for(WIRE_BF16, OPTIM_F32, "Accept", &w, msg, sizeof msg), OPTD_OK);
    assert_int_equal(w, WIRE_BF16);
    assert_int_equal(wire_for(WIRE_F64, OPTIM_F32, "Content-Type", &w, msg, sizeof msg), OPTD_E_INVALID);
    assert_non_null(strstr(msg, "wider"));
    assert_int_equal(wire_size(WIRE_BF16), 2);
    assert_int_equal(wire_size(WIRE_F16), 2);
    assert_int_equal(wire_size(WIRE_F32), 4);
    assert_int_equal(wire_size(WIRE_F64), 8);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_float32_to_bfloat16_is_torchs_bit_for_bit),
        cmocka_unit_test(test_float32_to_float16_is_torchs_bit_for_bit),
        cmocka_unit_test(test_float64_to_bfloat16_and_float16_round_through_float32_as_torch),
        cmocka_unit_test(test_float64_to_float32_is_torchs_bit_for_bit),
        cmocka_unit_test(test_every_bfloat16_widens_as_torch_and_only_finite_ones_pass),
        cmocka_unit_test(test_every_float16_widens_as_torch_and_only_finite_ones_pass),
        cmocka_unit_test(test_float32_widens_to_float64_exactly_and_refuses_non_finite),
        cmocka_unit_test(test_vector_loops_equal_one_element_conversions_at_any_length_and_offset),
        cmocka_unit_test(test_dtype_parameters_parse_as_media_types_do),
        cmocka_unit_test(test_a_wire_type_resolves_against_the_sessions_dtype),
    };
    return cmocka_run_group_tests(tests, load, unload);
}
