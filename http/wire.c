/* Narrow binary vectors (API.md "Binary vectors"): a gradient received and
 * params returned as bfloat16, float16 or float32 beside the session's own
 * dtype, converted exactly as torch 1.13's Tensor.to() does: round to
 * nearest even, a float64 through float32 first (c10's BFloat16 and Half
 * are made from a float), overflow to infinity. Widening (a gradient) is
 * exact. The loops are branch-free so gcc vectorizes them (wire.o is built
 * with -O3, with an AVX2 clone); a clone computes the same bits as the
 * plain loop, since no FMA is enabled and ISO C mode does not contract. */
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "http/httpInt.h"

#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif
#define LOOP static CLONES

static const char *const wire_names[] = {"", "bfloat16", "float16", "float32", "float64"};
/* The values a dtype parameter may name, for messages. */
static const char *const wire_choices[] = {"bfloat16", "float16", "float32", "float64"};

const char *wire_name(wire_type w) { return w > WIRE_NATIVE && w <= WIRE_F64 ? wire_names[w] : "native"; }

size_t wire_size(wire_type w) { return w == WIRE_F64 ? 8 : w == WIRE_F32 ? 4 : 2; }

static inline uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float f32_from(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- one element (the definitions the loops vectorize) ---------------- */

/* float -> bfloat16 as c10's round_to_nearest_even (torch 1.13): add 0x7fff
 * plus the lowest kept bit; NaN is 0x7fc0. (torch's AVX2 kernels write NaN
 * as 0xffff instead; the wire never carries a NaN, which is refused in a
 * gradient and cannot be a param.) */
static inline uint16_t bf16_from_f32(float f)
{
    uint32_t u = f32_bits(f);
    uint16_t r = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0u : r;
}

/* float -> IEEE half as c10's fp16_ieee_from_fp32_value (and F16C's
 * vcvtps2ph with round to nearest even): the float adds do the rounding,
 * subnormals included; NaN keeps its sign and becomes 0x7e00. */
static inline uint16_t f16_from_f32(float f)
{
    const float scale_to_inf = 0x1.0p+112f, scale_to_zero = 0x1.0p-110f;
    float base = (fabsf(f) * scale_to_inf) * scale_to_zero;
    uint32_t w = f32_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xff000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = f32_from((bias >> 1) + 0x07800000u) + base;
    uint32_t bits = f32_bits(base);
    uint32_t nonsign = ((bits >> 13) & 0x00007c00u) + (bits & 0x00000fffu);
    /* Selects by mask, not ?:, which gcc would turn into a branch around the
     * float adds and then not vectorize (they might trap). */
    uint32_t nan = 0u - (uint32_t)(shl1_w > 0xff000000u);
    return (uint16_t)((sign >> 16) | (0x7e00u & nan) | (nonsign & ~nan));
}

static inline float f32_from_bf16(uint16_t h) { return f32_from((uint32_t)h << 16); }

/* IEEE half -> float as c10's fp16_ieee_to_fp32_value: exact. */
static inline float f32_from_f16(uint16_t h)
{
    uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    float normalized = f32_from((two_w >> 4) + (0xe0u << 23)) * 0x1.0p-112f;
    float denormalized = f32_from((two_w >> 17) | (126u << 23)) - 0.5f;
    uint32_t den = 0u - (uint32_t)(two_w < (1u << 27)); /* a mask, as in f16_from_f32 */
    return f32_from(sign | (f32_bits(denormalized) & den) | (f32_bits(normalized) & ~den));
}

/* Whether a wire element is not finite: its exponent bits all ones. */
static inline uint32_t bf16_not_finite(uint16_t h) { return (h & 0x7f80u) == 0x7f80u; }
static inline uint32_t f16_not_finite(uint16_t h) { return (h & 0x7c00u) == 0x7c00u; }
static inline uint32_t f32_not_finite(float f) { return (f32_bits(f) & 0x7f800000u) == 0x7f800000u; }

/* Plain conversions, named so that each loop below is an instance of one
 * of the two definitions. */
static inline float f32_from_f64(double d) { return (float)d; }
static inline double f64_from_f32(float f) { return f; }

/* ---- loops ------------------------------------------------------------ */

/* One definition of each loop, stamped out per pair of element types: the
 * types differ, so C needs a function each, and an element function passed
 * by pointer would stop gcc inlining it and so vectorizing the loop. The
 * element function's argument converts implicitly (a double to the float
 * the narrowing functions take, as torch goes through float first). */
#define ENCODER(name, in_t, out_t, narrow)                                                                            \
    LOOP void name(const void *restrict src, void *restrict dst, size_t n)                                            \
    {                                                                                                                 \
        const in_t *restrict x = src;                                                                                 \
        out_t *restrict y = dst;                                                                                      \
        for (size_t i = 0; i < n; i++)                                                                                \
            y[i] = narrow(x[i]);                                                                                      \
    }

/* The decoders also count the elements that are not finite, in the same
 * pass. */
#define DECODER(name, in_t, out_t, not_finite, widen)                                                                 \
    LOOP uint32_t name(const void *restrict src, void *restrict dst, size_t n)                                        \
    {                                                                                                                 \
        const in_t *restrict x = src;                                                                                 \
        out_t *restrict y = dst;                                                                                      \
        uint32_t bad = 0;                                                                                             \
        for (size_t i = 0; i < n; i++) {                                                                              \
            bad |= not_finite(x[i]);                                                                                  \
            y[i] = widen(x[i]);                                                                                       \
        }                                                                                                             \
        return bad;                                                                                                   \
    }

/* A narrow wire type, to and from either session dtype. */
#define NARROW(w, narrow, not_finite, widen)                                                                          \
    ENCODER(enc_f32_##w, float, uint16_t, narrow)                                                                     \
    ENCODER(enc_f64_##w, double, uint16_t, narrow)                                                                    \
    DECODER(dec_##w##_f32, uint16_t, float, not_finite, widen)                                                        \
    DECODER(dec_##w##_f64, uint16_t, double, not_finite, widen)

NARROW(bf16, bf16_from_f32, bf16_not_finite, f32_from_bf16)
NARROW(f16, f16_from_f32, f16_not_finite, f32_from_f16)
/* float32 on the wire, a float64 session. */
ENCODER(enc_f64_f32, double, float, f32_from_f64)
DECODER(dec_f32_f64, float, double, f32_not_finite, f64_from_f32)

/* ---- the module's interface ------------------------------------------- */

/* The loop for each wire type and session dtype ([0] float32, [1] float64);
 * none where the wire carries the session's own bytes. The loops take void
 * pointers so that one table (and one call below) serves them all. */
typedef void wire_enc_fn(const void *restrict, void *restrict, size_t);
typedef uint32_t wire_dec_fn(const void *restrict, void *restrict, size_t);
static const struct {
    wire_enc_fn *enc[2];
    wire_dec_fn *dec[2];
} wire_loops[] = {
    [WIRE_BF16] = {{enc_f32_bf16, enc_f64_bf16}, {dec_bf16_f32, dec_bf16_f64}},
    [WIRE_F16] = {{enc_f32_f16, enc_f64_f16}, {dec_f16_f32, dec_f16_f64}},
    [WIRE_F32] = {{NULL, enc_f64_f32}, {NULL, dec_f32_f64}},
    [WIRE_F64] = {{NULL, NULL}, {NULL, NULL}},
};

void wire_encode(optim_dtype dtype, const void *src, size_t n, wire_type w, void *dst)
{
    wire_enc_fn *enc = w > WIRE_NATIVE && w <= WIRE_F64 ? wire_loops[w].enc[dtype == OPTIM_F64] : NULL;
    if (enc)
        enc(src, dst, n);
    else
        memcpy(dst, src, n * optim_elem_size(dtype));
}

bool wire_decode(wire_type w, const void *src, size_t n, optim_dtype dtype, void *dst, size_t *bad)
{
    wire_dec_fn *dec = w > WIRE_NATIVE && w <= WIRE_F64 ? wire_loops[w].dec[dtype == OPTIM_F64] : NULL;
    if (!dec) { /* the session's own type */
        memcpy(dst, src, n * optim_elem_size(dtype));
        return vec_finite(dst, n, dtype, bad);
    }
    if (!dec(src, dst, n))
        return true;
    /* Rare: find the first element that is not finite, for the message. */
    return vec_finite(dst, n, dtype, bad);
}

/* Skips spaces and tabs (OWS in RFC 9110). */
static const char *ows(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t'))
        p++;
    return p;
}

/* Reads the dtype parameter among the parameters of one media type, the
 * text [p, end) after the type itself (";a=b; dtype=x"). Other parameters
 * (q in an Accept, charset) are ignored. header names the header, for
 * messages. */
static optd_err dtype_param(const char *p, const char *end, const char *header, wire_type *out, char *msg,
                            size_t msglen)
{
    *out = WIRE_NATIVE;
    int seen = 0;
    while (p < end) {
        p = ows(p, end);
        if (p < end && *p == ';') {
            p++;
            continue;
        }
        const char *name = p;
        while (p < end && *p != '=' && *p != ';' && *p != ' ' && *p != '\t')
            p++;
        size_t name_len = (size_t)(p - name);
        p = ows(p, end);
        const char *val = p, *val_end = p;
        if (p < end && *p == '=') {
            p = ows(p + 1, end);
            val = p;
            if (p < end && *p == '"') {
                val = ++p;
                while (p < end && *p != '"')
                    p++;
                val_end = p;
                if (p < end)
                    p++;
            } else {
                while (p < end && *p != ';' && *p != ' ' && *p != '\t')
                    p++;
                val_end = p;
            }
        }
        while (p < end && *p != ';')
            p++;
        if (name_len != 5 || strncasecmp(name, "dtype", 5) != 0)
            continue;
        char v[32];
        size_t vn = (size_t)(val_end - val);
        snprintf(v, sizeof v, "%.*s", (int)(vn < sizeof v - 1 ? vn : sizeof v - 1), val);
        wire_type w = WIRE_NATIVE;
        for (int k = WIRE_BF16; k <= WIRE_F64; k++)
            if (vn == strlen(wire_names[k]) && strncasecmp(val, wire_names[k], vn) == 0)
                w = (wire_type)k;
        if (w == WIRE_NATIVE) {
            char valid[96];
            const char *near = optd_name_nearest(v, wire_choices, 4);
            optd_names_join(valid, sizeof valid, wire_choices, 4);
            return optd_fail(msg, msglen, OPTD_E_UNSUPPORTED_MEDIA_TYPE,
                             "%s: application/octet-stream; dtype=%s is not a type optd sends vectors in%s%s%s; "
                             "dtype is one of %s (the session's own dtype when omitted)",
                             header, v, near ? " (did you mean dtype=" : "", near ? near : "", near ? "?)" : "",
                             valid);
        }
        if (seen && w != *out)
            return optd_fail(msg, msglen, OPTD_E_UNSUPPORTED_MEDIA_TYPE,
                             "%s names two dtypes (%s and %s); give dtype once", header, wire_names[*out],
                             wire_names[w]);
        seen = 1;
        *out = w;
    }
    return OPTD_OK;
}

optd_err wire_content_type(const char *ct, wire_type *out, char *msg, size_t msglen)
{
    const char *semi = strchr(ct, ';');
    *out = WIRE_NATIVE;
    if (!semi)
        return OPTD_OK;
    return dtype_param(semi, semi + strlen(semi), "Content-Type", out, msg, msglen);
}

optd_err wire_accept(const char *accept, int *binary, wire_type *out, char *msg, size_t msglen)
{
    static const char octet[] = "application/octet-stream";
    *binary = 0;
    *out = WIRE_NATIVE;
    if (!accept)
        return OPTD_OK;
    /* Each media range of the list: the binary one decides (as before this
     * parser, any mention of it asks for a binary reply). */
    for (const char *p = accept; *p;) {
        const char *end = strchr(p, ',');
        if (!end)
            end = p + strlen(p);
        const char *t = ows(p, end);
        size_t n = sizeof octet - 1;
        if ((size_t)(end - t) >= n && strncasecmp(t, octet, n) == 0 &&
            (t + n == end || t[n] == ';' || t[n] == ' ' || t[n] == '\t')) {
            *binary = 1;
            return dtype_param(t + n, end, "Accept", out, msg, msglen);
        }
        p = *end ? end + 1 : end;
    }
    /* Not a range of its own ("application/octet-stream" inside another
     * one's parameters): still binary, as strstr found it before. */
    *binary = strstr(accept, octet) != NULL;
    return OPTD_OK;
}

optd_err wire_for(wire_type w, optim_dtype dtype, const char *header, wire_type *out, char *msg, size_t msglen)
{
    wire_type own = dtype == OPTIM_F64 ? WIRE_F64 : WIRE_F32;
    if (w == WIRE_NATIVE)
        w = own;
    if (w == WIRE_F64 && own == WIRE_F32)
        return optd_fail(msg, msglen, OPTD_E_INVALID,
                         "%s: dtype=float64 is wider than this float32 session; a binary vector travels in "
                         "the session's dtype or a narrower one (float32, float16, bfloat16)",
                         header);
    *out = w;
    return OPTD_OK;
}

/* Whether any of n elements at x (of dtype) has an all-ones exponent, an
 * infinity or NaN: the bits tested with no branch per element, so the loop
 * vectorizes (a 1e7 gradient: ~60 -> ~3 ms). */
static bool block_finite(const void *x, size_t n, optim_dtype dtype)
{
    if (dtype == OPTIM_F64) {
        const unsigned char *p = x;
        uint64_t any = 0, e = UINT64_C(0x7ff0000000000000);
        for (size_t i = 0; i < n; i++) {
            uint64_t v;
            memcpy(&v, p + i * 8, 8);
            any |= (v & e) == e;
        }
        return !any;
    }
    const unsigned char *p = x;
    uint32_t any = 0, e = 0x7f800000u;
    for (size_t i = 0; i < n; i++) {
        uint32_t v;
        memcpy(&v, p + i * 4, 4);
        any |= (v & e) == e;
    }
    return !any;
}

bool vec_finite(const void *x, size_t n, optim_dtype dtype, size_t *bad)
{
    const size_t block = 4096, es = dtype == OPTIM_F64 ? 8 : 4;
    for (size_t at = 0; at < n; at += block) {
        size_t m = n - at < block ? n - at : block;
        if (block_finite((const unsigned char *)x + at * es, m, dtype))
            continue;
        for (size_t i = at; i < at + m; i++) { /* which one: only on the way to a 422 */
            double v = dtype == OPTIM_F64 ? ((const double *)x)[i] : ((const float *)x)[i];
            if (!isfinite(v)) {
                *bad = i;
                return false;
            }
        }
    }
    return true;
}
