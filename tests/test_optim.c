/* Tests of optim/: every reference trajectory in tests/data/ (torch.optim 1.13,
 * written by tests/gen_reference.py) is replayed through optim_step and
 * compared element by element after every step; then the description table:
 * defaults, one test per validation rule, buffer usage and state init.
 * Runs from tests/ (the Makefile does `cd tests`), so data/ is relative. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "optim/optim.h"

#define DATA_DIR "data/"
#define INDEX_FILE DATA_DIR "index.txt"

/* Tolerances. A value passes when |got - want| <= TOL * max(|want|, floor),
 * where floor = ULP_ALLOWANCE * u * M / TOL, M is the largest |want| in the
 * vector at that step and u the unit roundoff of the dtype (2^-24, 2^-53).
 * In other words: TOL relative, or within ULP_ALLOWANCE rounding units of
 * the vector's largest element, whichever is looser.
 *
 * Why that floor: an element that cancels (a param crossing zero, 0.5 - 0.4999)
 * keeps the absolute rounding error of its operands, which is a few units of
 * M, not of itself. Measured: torch 1.13 against itself, once with its AVX2
 * kernels (which fuse multiply-adds) and once with the portable ones that
 * made the data, differs by up to 3.5 u*M in float32 and 2.0 u*M in float64
 * over these cases (momentum_long, 1200 steps). A plain floor of 1e-6 * M
 * would fail torch's own FMA build by 10x in float64 and 600x in float32;
 * 16 units leaves a 4-8x margin over that noise. It makes floor = 0.095 M in
 * float32 (a small element must agree to 1e-6 M absolute) and 1.8e-3 M in
 * float64 (3.6e-15 M absolute). */
#define TOL_F32 1e-5
#define TOL_F64 1e-12
#define ULP_ALLOWANCE 16.0

static double tol_of(optim_dtype dtype) { return dtype == OPTIM_F64 ? TOL_F64 : TOL_F32; }
static double unit_roundoff(optim_dtype dtype) { return dtype == OPTIM_F64 ? 0x1p-53 : 0x1p-24; }

/* ---- Reading a case file (format in tests/gen_reference.py) ---------------- */

#define NAME_LEN 32
#define MAX_HPS 16

typedef struct ref_hp {
    char name[NAME_LEN + 1];
    uint32_t count; /* 1, or 2 for a pair */
    uint32_t is_bool;
    double value[2];
} ref_hp;

/* One reference case, decoded and owned by the test that loaded it. Arrays
 * of the case's dtype are stored in host order; reference values as double
 * (every float32 value is exact in a double). */
typedef struct ref_case {
    char name[128];
    char opt[17];
    optim_dtype dtype;
    size_t n, steps;
    ref_hp hps[MAX_HPS];
    size_t n_hps;
    char buf_names[OPTIM_MAX_BUFFERS][NAME_LEN + 1];
    size_t n_bufs;
    int has_scalar;
    char scalar_name[NAME_LEN + 1];
    double scalar;
    void *p0;     /* n elements of dtype */
    void *grads;  /* steps * n elements of dtype */
    double *want; /* steps * n: params after each step */
    double *bufs; /* n_bufs * n: buffers after the last step */
    /* The working state of the replay, freed by case_free. */
    void *params;
    void *state_buf[OPTIM_MAX_BUFFERS];
    void *grad_copy;
} ref_case;

typedef struct reader {
    const unsigned char *p, *end;
    int bad;
} reader;

static const unsigned char *take(reader *r, size_t len)
{
    if (r->bad || (size_t)(r->end - r->p) < len) {
        r->bad = 1;
        return NULL;
    }
    const unsigned char *at = r->p;
    r->p += len;
    return at;
}

static uint64_t get_le(reader *r, size_t len)
{
    const unsigned char *b = take(r, len);
    uint64_t v = 0;
    for (size_t i = 0; b && i < len; i++)
        v |= (uint64_t)b[i] << (8 * i);
    return v;
}

static uint32_t get_u32(reader *r) { return (uint32_t)get_le(r, 4); }

static double get_f64(reader *r)
{
    uint64_t bits = get_le(r, 8);
    double v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

static double get_elem(reader *r, optim_dtype dtype)
{
    if (dtype == OPTIM_F64)
        return get_f64(r);
    uint32_t bits = get_u32(r);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void get_name(reader *r, char *out, size_t width)
{
    const unsigned char *b = take(r, width);
    memset(out, 0, width + 1);
    if (b)
        memcpy(out, b, width);
}

static void store_elem(void *arr, optim_dtype dtype, size_t i, double v)
{
    if (dtype == OPTIM_F64)
        ((double *)arr)[i] = v;
    else
        ((float *)arr)[i] = (float)v;
}

static double load_elem(const void *arr, optim_dtype dtype, size_t i)
{
    return dtype == OPTIM_F64 ? ((const double *)arr)[i] : ((const float *)arr)[i];
}

static void case_free(ref_case *c)
{
    if (!c)
        return;
    free(c->p0);
    free(c->grads);
    free(c->want);
    free(c->bufs);
    free(c->params);
    for (size_t i = 0; i < OPTIM_MAX_BUFFERS; i++)
        free(c->state_buf[i]);
    free(c->grad_copy);
    free(c);
}

/* Reads data/<file> into a new case; on failure returns NULL and writes the
 * reason into err. The caller frees the case with case_free. */
static ref_case *case_load(const char *file, char *err, size_t errlen)
{
    char path[256];
    unsigned char *raw = NULL;
    ref_case *c = NULL;
    FILE *f = NULL;
    long size;

    snprintf(path, sizeof path, DATA_DIR "%s", file);
    f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "cannot open %s (run from tests/?)", path);
        goto fail;
    }
    if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        snprintf(err, errlen, "cannot size %s", path);
        goto fail;
    }
    raw = malloc((size_t)size + 1);
    if (!raw || fread(raw, 1, (size_t)size, f) != (size_t)size) {
        snprintf(err, errlen, "cannot read %s", path);
        goto fail;
    }
    c = calloc(1, sizeof *c);
    if (!c)
        goto fail;
    snprintf(c->name, sizeof c->name, "%.*s", (int)strcspn(file, "."), file);

    reader r = {raw, raw + size, 0};
    const unsigned char *magic = take(&r, 8);
    if (!magic || memcmp(magic, "OPTDREF\0", 8) != 0 || get_u32(&r) != 1) {
        snprintf(err, errlen, "%s: not a version 1 reference file", path);
        goto fail;
    }
    uint32_t code = get_u32(&r);
    c->dtype = code == 1 ? OPTIM_F64 : OPTIM_F32;
    c->n = get_u32(&r);
    c->steps = get_u32(&r);
    get_name(&r, c->opt, 16);
    c->n_hps = get_u32(&r);
    if (code > 1 || c->n == 0 || c->n_hps > MAX_HPS) {
        snprintf(err, errlen, "%s: bad header", path);
        goto fail;
    }
    for (size_t i = 0; i < c->n_hps; i++) {
        get_name(&r, c->hps[i].name, NAME_LEN);
        c->hps[i].count = get_u32(&r);
        c->hps[i].is_bool = get_u32(&r);
        c->hps[i].value[0] = get_f64(&r);
        c->hps[i].value[1] = get_f64(&r);
    }
    c->n_bufs = get_u32(&r);
    if (c->n_bufs > OPTIM_MAX_BUFFERS) {
        snprintf(err, errlen, "%s: %zu buffers", path, c->n_bufs);
        goto fail;
    }
    for (size_t i = 0; i < c->n_bufs; i++)
        get_name(&r, c->buf_names[i], NAME_LEN);
    c->has_scalar = get_u32(&r) != 0;
    get_name(&r, c->scalar_name, NAME_LEN);
    c->scalar = get_f64(&r);

    size_t es = optim_elem_size(c->dtype), n = c->n;
    c->p0 = malloc(n * es);
    c->grads = malloc(c->steps * n * es);
    c->want = malloc(c->steps * n * sizeof(double));
    c->bufs = malloc((c->n_bufs ? c->n_bufs : 1) * n * sizeof(double));
    if (!c->p0 || !c->grads || !c->want || !c->bufs)
        goto fail;
    for (size_t i = 0; i < n; i++)
        store_elem(c->p0, c->dtype, i, get_elem(&r, c->dtype));
    for (size_t t = 0; t < c->steps; t++) {
        for (size_t i = 0; i < n; i++)
            store_elem(c->grads, c->dtype, t * n + i, get_elem(&r, c->dtype));
        for (size_t i = 0; i < n; i++)
            c->want[t * n + i] = get_elem(&r, c->dtype);
    }
    for (size_t b = 0; b < c->n_bufs; b++)
        for (size_t i = 0; i < n; i++)
            c->bufs[b * n + i] = get_elem(&r, c->dtype);
    if (r.bad || r.p != r.end) {
        snprintf(err, errlen, "%s: size does not match its header", path);
        goto fail;
    }
    free(raw);
    fclose(f);
    return c;

fail:
    if (!err[0])
        snprintf(err, errlen, "out of memory loading %s", path);
    case_free(c);
    free(raw);
    if (f)
        fclose(f);
    return NULL;
}

/* ---- Replaying a case ------------------------------------------------------ */

/* The largest deviation seen per dtype, in the test's metric (|got - want| /
 * max(|want|, floor)) and in absolute units of u * M, with where it was. */
typedef struct deviation {
    double rel, ulps;
    char where[192];
    size_t checked;
} deviation;
static deviation worst[2];

/* Compares n values against want (M = max |want|); returns the index of the
 * first failure or n. what names the vector in messages. */
static size_t compare(const ref_case *c, const char *what, size_t step, const void *got_arr, const double *want,
                      size_t n)
{
    double tol = tol_of(c->dtype), u = unit_roundoff(c->dtype), m = 0;
    deviation *w = &worst[c->dtype];
    for (size_t i = 0; i < n; i++)
        m = fmax(m, fabs(want[i]));
    double floor_ = ULP_ALLOWANCE * u * m / tol;
    for (size_t i = 0; i < n; i++) {
        double got = load_elem(got_arr, c->dtype, i), err = fabs(got - want[i]);
        double scale = fmax(fabs(want[i]), floor_);
        double rel = err == 0 ? 0 : err / scale;
        w->checked++;
        if (!(err <= tol * scale)) {
            print_error("%s: %s differs at step %zu, index %zu: got %.17g, want %.17g "
                        "(relative deviation %.3g, tolerance %g, floor %.3g)\n",
                        c->name, what, step, i, got, want[i], rel, tol, floor_);
            return i;
        }
        if (rel > w->rel) {
            w->rel = rel;
            snprintf(w->where, sizeof w->where, "%s %s step %zu index %zu", c->name, what, step, i);
        }
        if (m > 0 && err / (u * m) > w->ulps)
            w->ulps = err / (u * m);
    }
    return n;
}

static int buffer_index(const optim_info *info, const char *name)
{
    for (size_t i = 0; i < info->n_buffers; i++)
        if (strcmp(info->buffers[i], name) == 0)
            return (int)i;
    return -1;
}

static int setup_case(void **state)
{
    char err[640] = "";
    ref_case *c = case_load((const char *)*state, err, sizeof err);
    if (!c) {
        print_error("%s\n", err);
        return -1;
    }
    *state = c;
    return 0;
}

static int teardown_case(void **state)
{
    case_free(*state);
    return 0;
}

static void test_reference_case(void **state)
{
    ref_case *c = *state;
    const optim_info *info = optim_find(c->opt);
    if (!info)
        fail_msg("%s: optd has no optimizer \"%s\"", c->name, c->opt);

    optim_hparams hp;
    optim_defaults(info, &hp);
    for (size_t k = 0; k < c->n_hps; k++) {
        const ref_hp *h = &c->hps[k];
        const optim_hp_desc *d = optim_hp_find(info, h->name);
        if (!d)
            fail_msg("%s: %s has no hyperparameter \"%s\"", c->name, c->opt, h->name);
        optim_hp_type want_type = h->count == 2 ? OPTIM_HP_PAIR : h->is_bool ? OPTIM_HP_BOOL : OPTIM_HP_NUMBER;
        if (d->type != want_type)
            fail_msg("%s: %s.%s has type %d, torch's is %d", c->name, c->opt, h->name, d->type, want_type);
        for (uint32_t j = 0; j < h->count; j++)
            optim_hp_set(&hp, d, (int)j, h->value[j]);
    }
    char msg[256];
    if (optim_validate(info, &hp, msg, sizeof msg) != OPTIM_OK)
        fail_msg("%s: torch accepted these hyperparameters, optim_validate says: %s", c->name, msg);

    size_t n = c->n, es = optim_elem_size(c->dtype);
    optim_state st;
    memset(&st, 0, sizeof st);
    c->params = malloc(n * es);
    c->grad_copy = malloc(n * es);
    assert_non_null(c->params);
    assert_non_null(c->grad_copy);
    for (size_t i = 0; i < info->n_buffers; i++) {
        if (!optim_buffer_used(info, &hp, i))
            continue;
        c->state_buf[i] = malloc(n * es);
        assert_non_null(c->state_buf[i]);
    }
    st.params = c->params;
    memcpy(st.buf, c->state_buf, sizeof st.buf);
    optim_state_init(info, &hp, c->dtype, n, &st);
    memcpy(c->params, c->p0, n * es);

    /* Every other step gathers statistics, which runs the kernels block by
     * block: both paths must give torch's params, and the statistics must
     * match sums computed here from the step's before and after. */
    double *before = malloc(n * sizeof(double));
    assert_non_null(before);
    for (size_t t = 0; t < c->steps; t++) {
        const unsigned char *g = (const unsigned char *)c->grads + t * n * es;
        memcpy(c->grad_copy, g, n * es);
        optim_stats stats = {-1, -1, -1, false};
        for (size_t i = 0; i < n; i++)
            before[i] = c->dtype == OPTIM_F64 ? ((double *)c->params)[i] : ((float *)c->params)[i];
        optim_step(info, &hp, c->dtype, n, &st, c->grad_copy, t % 2 ? &stats : NULL);
        if (t % 2) {
            double gq = 0, uq = 0, pq = 0;
            for (size_t i = 0; i < n; i++) {
                double gv = c->dtype == OPTIM_F64 ? ((double *)g)[i] : ((float *)g)[i];
                double pv = c->dtype == OPTIM_F64 ? ((double *)c->params)[i] : ((float *)c->params)[i];
                gq += gv * gv;
                uq += (pv - before[i]) * (pv - before[i]);
                pq += pv * pv;
            }
            if (!stats.finite)
                fail_msg("%s: step %zu says its finite result is not finite", c->name, t + 1);
            if (fabs(stats.grad_sq - gq) > 1e-12 * gq || fabs(stats.update_sq - uq) > 1e-12 * uq ||
                fabs(stats.param_sq - pq) > 1e-12 * pq)
                fail_msg("%s: step %zu stats (%g, %g, %g), want (%g, %g, %g)", c->name, t + 1, stats.grad_sq,
                         stats.update_sq, stats.param_sq, gq, uq, pq);
        }
        if (memcmp(c->grad_copy, g, n * es) != 0)
            fail_msg("%s: optim_step modified the gradient at step %zu", c->name, t + 1);
        if (compare(c, "params", t + 1, c->params, c->want + t * n, n) < n)
            fail_msg("%s: params first differ at step %zu", c->name, t + 1);
    }
    free(before);
    if (st.step != c->steps)
        fail_msg("%s: state step is %llu after %zu steps", c->name, (unsigned long long)st.step, c->steps);

    /* The buffers torch has after the last step are exactly the ones optd
     * says this configuration uses, with the same values. */
    for (size_t b = 0; b < c->n_bufs; b++) {
        int i = buffer_index(info, c->buf_names[b]);
        if (i < 0 || !c->state_buf[i])
            fail_msg("%s: torch has state \"%s\", which optd %s", c->name, c->buf_names[b],
                     i < 0 ? "does not know" : "says is unused");
        if (compare(c, c->buf_names[b], c->steps, c->state_buf[i], c->bufs + b * n, n) < n)
            fail_msg("%s: state \"%s\" differs after the last step", c->name, c->buf_names[b]);
    }
    for (size_t i = 0; i < info->n_buffers; i++) {
        int found = 0;
        for (size_t b = 0; b < c->n_bufs; b++)
            found |= strcmp(info->buffers[i], c->buf_names[b]) == 0;
        if (c->state_buf[i] && !found)
            fail_msg("%s: optd uses buffer \"%s\", torch has no such state", c->name, info->buffers[i]);
    }

    /* The scalar state (nadam's mu_product) only enters as 1 - mu_product,
     * so below one rounding unit its value no longer matters. */
    if (c->has_scalar != (info->scalar != NULL) || (c->has_scalar && strcmp(info->scalar, c->scalar_name) != 0))
        fail_msg("%s: torch scalar state \"%s\", optd's \"%s\"", c->name, c->has_scalar ? c->scalar_name : "",
                 info->scalar ? info->scalar : "");
    if (c->has_scalar) {
        double tol = tol_of(c->dtype), err = fabs(st.scalar - c->scalar);
        if (!(err <= tol * fmax(fabs(c->scalar), unit_roundoff(c->dtype))))
            fail_msg("%s: %s is %.17g after the last step, want %.17g", c->name, c->scalar_name, st.scalar, c->scalar);
    }
}

/* ---- Helpers for the table tests ------------------------------------------ */

static const char *const ALL[] = {"sgd",     "momentum", "nag",    "adagrad", "adadelta",
                                  "rmsprop", "adam",     "adamax", "adamw",   "nadam"};
static const char *const ADAM_FAMILY[] = {"adam", "adamax", "adamw", "nadam"};
static const char *const SGD_FAMILY[] = {"sgd", "momentum", "nag"};
#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

static const optim_info *must_find(const char *name)
{
    const optim_info *info = optim_find(name);
    if (!info)
        fail_msg("optim_find(\"%s\") is NULL", name);
    return info;
}

static const optim_hp_desc *must_hp(const optim_info *info, const char *name)
{
    const optim_hp_desc *d = optim_hp_find(info, name);
    if (!d)
        fail_msg("%s has no hyperparameter \"%s\"", info->name, name);
    return d;
}

static double hp_value(const char *opt, const char *name, int index)
{
    const optim_info *info = must_find(opt);
    optim_hparams hp;
    optim_defaults(info, &hp);
    return optim_hp_get(&hp, must_hp(info, name), index);
}

/* Sets hyperparameters on top of opt's defaults: pairs of (name, value),
 * "betas0"/"betas1" for one element of betas, ended by NULL. Returns the
 * validation result; the message goes into msg. */
static int validate_with(const char *opt, char *msg, size_t msglen, ...)
{
    const optim_info *info = must_find(opt);
    optim_hparams hp;
    optim_defaults(info, &hp);
    va_list ap;
    va_start(ap, msglen);
    const char *name;
    while ((name = va_arg(ap, const char *)) != NULL) {
        double v = va_arg(ap, double);
        int index = 0;
        char base[NAME_LEN];
        snprintf(base, sizeof base, "%s", name);
        if (strcmp(name, "betas0") == 0 || strcmp(name, "betas1") == 0) {
            index = name[5] - '0';
            base[5] = '\0';
        }
        optim_hp_set(&hp, must_hp(info, base), index, v);
    }
    va_end(ap);
    msg[0] = '\0';
    return optim_validate(info, &hp, msg, msglen);
}

/* Asserts that opt with (name, v) is rejected with a message naming field. */
static void expect_rejected(const char *opt, const char *name, double v, const char *field)
{
    char msg[256];
    if (validate_with(opt, msg, sizeof msg, name, v, (const char *)NULL) != OPTIM_EINVAL)
        fail_msg("%s accepted %s = %g", opt, name, v);
    if (!strstr(msg, field))
        fail_msg("%s rejected %s = %g with a message not naming \"%s\": %s", opt, name, v, field, msg);
}

static void expect_accepted(const char *opt, const char *name, double v)
{
    char msg[256];
    if (validate_with(opt, msg, sizeof msg, name, v, (const char *)NULL) != OPTIM_OK)
        fail_msg("%s rejected %s = %g: %s", opt, name, v, msg);
}

/* ---- Lookup and defaults --------------------------------------------------- */

static void test_every_optimizer_is_found_by_name_in_kind_order(void **state)
{
    (void)state;
    for (size_t i = 0; i < OPTIM_KIND_COUNT; i++) {
        const optim_info *info = optim_at(i);
        assert_non_null(info);
        assert_int_equal(info->kind, i);
        assert_string_equal(info->name, ALL[i]);
        assert_ptr_equal(optim_find(ALL[i]), info);
        assert_true(info->n_buffers <= OPTIM_MAX_BUFFERS);
    }
}

static void test_an_unknown_optimizer_name_is_not_found(void **state)
{
    (void)state;
    assert_null(optim_find("nope"));
    assert_null(optim_find(""));
    assert_null(optim_find("Adam"));
}

static void test_an_unknown_hyperparameter_name_is_not_found(void **state)
{
    (void)state;
    assert_null(optim_hp_find(must_find("adam"), "nope"));
    assert_null(optim_hp_find(must_find("sgd"), "betas"));
    assert_null(optim_hp_find(must_find("adagrad"), "momentum"));
}

/* The defaults of API.md's hyperparameter table: (optimizer, name, element,
 * value). The momentum preset is SGD with momentum 0.9 and no Nesterov; nag
 * the same with Nesterov. */
static const struct {
    const char *opt, *name;
    int index;
    double value;
} api_defaults[] = {
    {"sgd", "lr", 0, 0.01},
    {"sgd", "momentum", 0, 0},
    {"sgd", "dampening", 0, 0},
    {"sgd", "weight_decay", 0, 0},
    {"sgd", "nesterov", 0, 0},
    {"sgd", "maximize", 0, 0},
    {"momentum", "lr", 0, 0.01},
    {"momentum", "momentum", 0, 0.9},
    {"momentum", "dampening", 0, 0},
    {"momentum", "nesterov", 0, 0},
    {"nag", "lr", 0, 0.01},
    {"nag", "momentum", 0, 0.9},
    {"nag", "dampening", 0, 0},
    {"nag", "nesterov", 0, 1},
    {"adagrad", "lr", 0, 0.01},
    {"adagrad", "eps", 0, 1e-10},
    {"adagrad", "lr_decay", 0, 0},
    {"adagrad", "initial_accumulator_value", 0, 0},
    {"adagrad", "weight_decay", 0, 0},
    {"adadelta", "lr", 0, 1.0},
    {"adadelta", "rho", 0, 0.9},
    {"adadelta", "eps", 0, 1e-6},
    {"adadelta", "weight_decay", 0, 0},
    {"rmsprop", "lr", 0, 0.01},
    {"rmsprop", "alpha", 0, 0.99},
    {"rmsprop", "eps", 0, 1e-8},
    {"rmsprop", "momentum", 0, 0},
    {"rmsprop", "centered", 0, 0},
    {"adam", "lr", 0, 1e-3},
    {"adam", "betas", 0, 0.9},
    {"adam", "betas", 1, 0.999},
    {"adam", "eps", 0, 1e-8},
    {"adam", "amsgrad", 0, 0},
    {"adam", "weight_decay", 0, 0},
    {"adamw", "lr", 0, 1e-3},
    {"adamw", "betas", 0, 0.9},
    {"adamw", "betas", 1, 0.999},
    {"adamw", "eps", 0, 1e-8},
    {"adamw", "amsgrad", 0, 0},
    {"adamw", "weight_decay", 0, 0.01},
    {"adamax", "lr", 0, 2e-3},
    {"adamax", "betas", 0, 0.9},
    {"adamax", "betas", 1, 0.999},
    {"adamax", "eps", 0, 1e-8},
    {"adamax", "weight_decay", 0, 0},
    {"nadam", "lr", 0, 2e-3},
    {"nadam", "betas", 0, 0.9},
    {"nadam", "betas", 1, 0.999},
    {"nadam", "eps", 0, 1e-8},
    {"nadam", "weight_decay", 0, 0},
    {"nadam", "momentum_decay", 0, 4e-3},
};

static void test_defaults_match_the_api_table(void **state)
{
    (void)state;
    for (size_t i = 0; i < COUNT(api_defaults); i++) {
        double got = hp_value(api_defaults[i].opt, api_defaults[i].name, api_defaults[i].index);
        if (got != api_defaults[i].value)
            fail_msg("%s %s[%d] defaults to %.17g; API.md says %.17g", api_defaults[i].opt, api_defaults[i].name,
                     api_defaults[i].index, got, api_defaults[i].value);
    }
}

static void test_a_bool_hyperparameter_reads_back_as_zero_or_one(void **state)
{
    (void)state;
    const optim_info *info = must_find("adam");
    const optim_hp_desc *d = must_hp(info, "amsgrad");
    optim_hparams hp;
    optim_defaults(info, &hp);
    assert_int_equal(d->type, OPTIM_HP_BOOL);
    optim_hp_set(&hp, d, 0, 7);
    assert_true(hp.amsgrad);
    assert_true(optim_hp_get(&hp, d, 0) == 1);
    optim_hp_set(&hp, d, 0, 0);
    assert_false(hp.amsgrad);
    assert_int_equal(must_hp(info, "betas")->type, OPTIM_HP_PAIR);
}

/* ---- Validation: one rule per test ------------------------------------------ */

static void test_every_optimizer_accepts_its_defaults(void **state)
{
    (void)state;
    for (size_t k = 0; k < COUNT(ALL); k++) {
        char msg[256];
        if (validate_with(ALL[k], msg, sizeof msg, (const char *)NULL) != OPTIM_OK)
            fail_msg("%s rejects its own defaults: %s", ALL[k], msg);
    }
}

static void test_every_optimizer_rejects_a_negative_lr(void **state)
{
    (void)state;
    for (size_t k = 0; k < COUNT(ALL); k++)
        expect_rejected(ALL[k], "lr", -1e-3, "lr");
}

static void test_every_optimizer_accepts_a_zero_lr(void **state)
{
    (void)state;
    for (size_t k = 0; k < COUNT(ALL); k++)
        expect_accepted(ALL[k], "lr", 0);
}

static void test_every_optimizer_rejects_a_negative_weight_decay(void **state)
{
    (void)state;
    for (size_t k = 0; k < COUNT(ALL); k++)
        expect_rejected(ALL[k], "weight_decay", -0.1, "weight_decay");
}

static void test_every_optimizer_with_eps_rejects_a_negative_eps(void **state)
{
    (void)state;
    for (size_t k = 0; k < COUNT(ALL); k++)
        if (optim_hp_find(must_find(ALL[k]), "eps"))
            expect_rejected(ALL[k], "eps", -1e-8, "eps");
}

static void test_sgd_family_rejects_a_negative_momentum(void **state)
{
    (void)state;
    for (size_t k = 0; k < COUNT(SGD_FAMILY); k++)
        expect_rejected(SGD_FAMILY[k], "momentum", -0.5, "momentum");
}

static void test_rmsprop_rejects_a_negative_momentum(void **state)
{
    (void)state;
    expect_rejected("rmsprop", "momentum", -0.5, "momentum");
}

static void test_sgd_rejects_nesterov_with_zero_momentum(void **state)
{
    (void)state;
    char msg[256];
    assert_int_equal(validate_with("sgd", msg, sizeof msg, "nesterov", 1.0, (const char *)NULL), OPTIM_EINVAL);
    assert_non_null(strstr(msg, "nesterov"));
}

static void test_nag_rejects_zero_momentum(void **state)
{
    (void)state;
    expect_rejected("nag", "momentum", 0, "nesterov");
}

static void test_sgd_rejects_nesterov_with_nonzero_dampening(void **state)
{
    (void)state;
    char msg[256];
    assert_int_equal(
        validate_with("sgd", msg, sizeof msg, "nesterov", 1.0, "momentum", 0.9, "dampening", 0.1, (const char *)NULL),
        OPTIM_EINVAL);
    assert_non_null(strstr(msg, "nesterov"));
}

static void test_nag_rejects_nonzero_dampening(void **state)
{
    (void)state;
    expect_rejected("nag", "dampening", 0.5, "nesterov");
}

static void test_sgd_accepts_any_dampening_without_nesterov(void **state)
{
    (void)state;
    char msg[256];
    assert_int_equal(validate_with("momentum", msg, sizeof msg, "dampening", 1.0, (const char *)NULL), OPTIM_OK);
    assert_int_equal(validate_with("sgd", msg, sizeof msg, "dampening", -2.0, (const char *)NULL), OPTIM_OK);
}

static void test_adagrad_rejects_a_negative_lr_decay(void **state)
{
    (void)state;
    expect_rejected("adagrad", "lr_decay", -0.1, "lr_decay");
}

static void test_adagrad_rejects_a_negative_initial_accumulator_value(void **state)
{
    (void)state;
    expect_rejected("adagrad", "initial_accumulator_value", -0.1, "initial_accumulator_value");
}

static void test_adagrad_rejects_a_negative_eps(void **state)
{
    (void)state;
    expect_rejected("adagrad", "eps", -1e-10, "eps");
}

static void test_adadelta_rejects_rho_above_one(void **state)
{
    (void)state;
    expect_rejected("adadelta", "rho", 1.0000001, "rho");
}

static void test_adadelta_rejects_a_negative_rho(void **state)
{
    (void)state;
    expect_rejected("adadelta", "rho", -0.1, "rho");
}

static void test_adadelta_accepts_rho_of_zero_and_of_one(void **state)
{
    (void)state;
    expect_accepted("adadelta", "rho", 0);
    expect_accepted("adadelta", "rho", 1);
}

static void test_rmsprop_rejects_a_negative_alpha(void **state)
{
    (void)state;
    expect_rejected("rmsprop", "alpha", -0.01, "alpha");
}

static void test_rmsprop_accepts_alpha_of_zero(void **state)
{
    (void)state;
    expect_accepted("rmsprop", "alpha", 0);
}

static void test_adam_family_rejects_beta1_equal_to_one(void **state)
{
    (void)state;
    for (size_t k = 0; k < COUNT(ADAM_FAMILY); k++)
        expect_rejected(ADAM_FAMILY[k], "betas0", 1.0, "betas");
}

static void test_adam_family_rejects_beta2_equal_to_one(void **state)
{
    (void)state;
    for (size_t k = 0; k < COUNT(ADAM_FAMILY); k++)
        expect_rejected(ADAM_FAMILY[k], "betas1", 1.0, "betas");
}

static void test_adam_family_rejects_betas_above_one(void **state)
{
    (void)state;
    for (size_t k = 0; k < COUNT(ADAM_FAMILY); k++) {
        expect_rejected(ADAM_FAMILY[k], "betas0", 1.5, "betas");
        expect_rejected(ADAM_FAMILY[k], "betas1", 1.5, "betas");
    }
}

static void test_adam_family_rejects_negative_betas(void **state)
{
    (void)state;
    for (size_t k = 0; k < COUNT(ADAM_FAMILY); k++) {
        expect_rejected(ADAM_FAMILY[k], "betas0", -0.1, "betas");
        expect_rejected(ADAM_FAMILY[k], "betas1", -0.1, "betas");
    }
}

static void test_adam_family_accepts_betas_of_zero_and_just_below_one(void **state)
{
    (void)state;
    for (size_t k = 0; k < COUNT(ADAM_FAMILY); k++) {
        char msg[256];
        if (validate_with(ADAM_FAMILY[k], msg, sizeof msg, "betas0", 0.0, "betas1", 0.0, (const char *)NULL))
            fail_msg("%s rejects betas (0, 0): %s", ADAM_FAMILY[k], msg);
        if (validate_with(ADAM_FAMILY[k], msg, sizeof msg, "betas0", 0.999, "betas1", 0.99999, (const char *)NULL))
            fail_msg("%s rejects betas (0.999, 0.99999): %s", ADAM_FAMILY[k], msg);
    }
}

static void test_nadam_rejects_a_negative_momentum_decay(void **state)
{
    (void)state;
    expect_rejected("nadam", "momentum_decay", -1e-3, "momentum_decay");
}

/* Every number of every optimizer, each element of a pair, including those
 * with an unbounded range (sgd's dampening). */
static void reject_everywhere(double v)
{
    for (size_t k = 0; k < OPTIM_KIND_COUNT; k++) {
        const optim_info *info = optim_at(k);
        for (size_t j = 0; j < info->n_hps; j++) {
            const optim_hp_desc *d = &info->hps[j];
            if (d->type == OPTIM_HP_BOOL)
                continue;
            for (int e = 0; e < (d->type == OPTIM_HP_PAIR ? 2 : 1); e++) {
                char name[NAME_LEN];
                snprintf(name, sizeof name, d->type == OPTIM_HP_PAIR ? "%s%d" : "%s", d->name, e);
                expect_rejected(info->name, name, v, d->name);
            }
        }
    }
}

static void test_every_number_rejects_nan(void **state)
{
    (void)state;
    reject_everywhere(NAN);
}

static void test_every_number_rejects_positive_infinity(void **state)
{
    (void)state;
    reject_everywhere(INFINITY);
}

static void test_every_number_rejects_negative_infinity(void **state)
{
    (void)state;
    reject_everywhere(-INFINITY);
}

static void test_a_validation_message_is_cut_to_msglen_and_terminated(void **state)
{
    (void)state;
    const optim_info *info = must_find("adam");
    optim_hparams hp;
    optim_defaults(info, &hp);
    hp.lr = -1;
    char msg[16];
    memset(msg, 'x', sizeof msg);
    assert_int_equal(optim_validate(info, &hp, msg, 8), OPTIM_EINVAL);
    assert_true(memchr(msg, '\0', 8) != NULL);
    assert_int_equal(msg[8], 'x');
}

/* ---- Buffers and state -------------------------------------------------- */

static bool used(const char *opt, const char *buffer, const char *name, double v)
{
    const optim_info *info = must_find(opt);
    optim_hparams hp;
    optim_defaults(info, &hp);
    if (name)
        optim_hp_set(&hp, must_hp(info, name), 0, v);
    int i = buffer_index(info, buffer);
    if (i < 0)
        fail_msg("%s has no buffer \"%s\"", opt, buffer);
    return optim_buffer_used(info, &hp, (size_t)i);
}

static void test_adam_and_adamw_use_max_exp_avg_sq_only_with_amsgrad(void **state)
{
    (void)state;
    static const char *const opts[] = {"adam", "adamw"};
    for (size_t k = 0; k < COUNT(opts); k++) {
        assert_false(used(opts[k], "max_exp_avg_sq", "amsgrad", 0));
        assert_true(used(opts[k], "max_exp_avg_sq", "amsgrad", 1));
        assert_true(used(opts[k], "exp_avg", NULL, 0));
        assert_true(used(opts[k], "exp_avg_sq", NULL, 0));
    }
}

static void test_rmsprop_uses_grad_avg_only_when_centered(void **state)
{
    (void)state;
    assert_false(used("rmsprop", "grad_avg", "centered", 0));
    assert_true(used("rmsprop", "grad_avg", "centered", 1));
    assert_true(used("rmsprop", "square_avg", NULL, 0));
}

static void test_momentum_buffer_is_used_only_with_nonzero_momentum(void **state)
{
    (void)state;
    static const char *const opts[] = {"sgd", "momentum", "nag", "rmsprop"};
    for (size_t k = 0; k < COUNT(opts); k++) {
        assert_false(used(opts[k], "momentum_buffer", "momentum", 0));
        assert_true(used(opts[k], "momentum_buffer", "momentum", 0.5));
    }
    assert_false(used("sgd", "momentum_buffer", NULL, 0));
    assert_true(used("momentum", "momentum_buffer", NULL, 0));
    assert_true(used("nag", "momentum_buffer", NULL, 0));
}

static void test_elem_size_is_four_for_f32_and_eight_for_f64(void **state)
{
    (void)state;
    assert_int_equal(optim_elem_size(OPTIM_F32), 4);
    assert_int_equal(optim_elem_size(OPTIM_F64), 8);
}

static void test_state_init_fills_adagrad_sum_and_leaves_params(void **state)
{
    (void)state;
    const optim_info *info = must_find("adagrad");
    optim_hparams hp;
    optim_defaults(info, &hp);
    hp.initial_accumulator_value = 0.25;
    double params[5] = {1, 2, 3, 4, 5}, sum[5] = {9, 9, 9, 9, 9};
    float params32[5] = {1, 2, 3, 4, 5}, sum32[5] = {9, 9, 9, 9, 9};
    optim_state st = {.params = params, .buf = {sum}, .scalar = 7, .step = 3};
    optim_state_init(info, &hp, OPTIM_F64, 5, &st);
    optim_state st32 = {.params = params32, .buf = {sum32}, .scalar = 7, .step = 3};
    optim_state_init(info, &hp, OPTIM_F32, 5, &st32);
    for (int i = 0; i < 5; i++) {
        assert_true(sum[i] == 0.25 && sum32[i] == 0.25f);
        assert_true(params[i] == i + 1 && params32[i] == i + 1);
    }
    assert_true(st.scalar == 1 && st32.scalar == 1);
    assert_int_equal(st.step, 0);
}

static void test_state_init_zeroes_every_used_buffer(void **state)
{
    (void)state;
    for (size_t k = 0; k < OPTIM_KIND_COUNT; k++) {
        const optim_info *info = optim_at(k);
        optim_hparams hp;
        optim_defaults(info, &hp);
        double bufs[OPTIM_MAX_BUFFERS][3], params[3] = {0};
        optim_state st = {.params = params};
        for (size_t i = 0; i < info->n_buffers; i++) {
            bufs[i][0] = bufs[i][1] = bufs[i][2] = 9;
            st.buf[i] = optim_buffer_used(info, &hp, i) ? bufs[i] : NULL;
        }
        optim_state_init(info, &hp, OPTIM_F64, 3, &st);
        for (size_t i = 0; i < info->n_buffers; i++)
            if (st.buf[i] && (bufs[i][0] != 0 || bufs[i][2] != 0))
                fail_msg("%s: buffer %s not zeroed", info->name, info->buffers[i]);
    }
}

/* ---- Main ------------------------------------------------------------------ */

/* Reads the case file names from data/index.txt into tests; returns the count
 * or -1. The names and the array are freed by free_cases. */
static int load_index(struct CMUnitTest **out)
{
    FILE *f = fopen(INDEX_FILE, "r");
    if (!f) {
        fprintf(stderr, "cannot open %s: run from tests/ (regenerate with tests/gen_reference.py)\n", INDEX_FILE);
        return -1;
    }
    struct CMUnitTest *tests = NULL;
    int count = 0, cap = 0;
    char line[256];
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = '\0';
        if (line[0] == '\0' || line[0] == '#')
            continue;
        if (count == cap) {
            cap = cap ? 2 * cap : 256;
            struct CMUnitTest *grown = realloc(tests, (size_t)cap * sizeof *tests);
            if (!grown)
                break;
            tests = grown;
        }
        char *name = strdup(line);
        if (!name)
            break;
        tests[count++] = (struct CMUnitTest){name, test_reference_case, setup_case, teardown_case, name};
    }
    fclose(f);
    *out = tests;
    return count;
}

static void free_cases(struct CMUnitTest *tests, int count)
{
    for (int i = 0; i < count; i++)
        free((void *)tests[i].initial_state);
    free(tests);
}

/* Gathering statistics runs the kernels block by block; on a vector of
 * several blocks and a ragged tail the params must be bit-identical to the
 * single pass, for every optimizer and dtype, over several steps. */
static void test_steps_with_statistics_equal_steps_without_over_many_blocks(void **unused)
{
    (void)unused;
    const size_t n = 5000;
    for (size_t k = 0; k < OPTIM_KIND_COUNT; k++) {
        for (int dt = 0; dt < 2; dt++) {
            const optim_info *info = optim_at(k);
            optim_dtype dtype = dt ? OPTIM_F64 : OPTIM_F32;
            size_t es = optim_elem_size(dtype);
            optim_hparams hp;
            optim_defaults(info, &hp);
            optim_state a, b;
            memset(&a, 0, sizeof a);
            memset(&b, 0, sizeof b);
            unsigned char *mem = calloc(2 * (1 + OPTIM_MAX_BUFFERS) * n + n, es);
            assert_non_null(mem);
            a.params = mem;
            b.params = mem + n * es;
            for (size_t i = 0; i < OPTIM_MAX_BUFFERS; i++) {
                if (!optim_buffer_used(info, &hp, i))
                    continue;
                a.buf[i] = mem + (2 + 2 * i) * n * es;
                b.buf[i] = mem + (3 + 2 * i) * n * es;
            }
            optim_state_init(info, &hp, dtype, n, &a);
            optim_state_init(info, &hp, dtype, n, &b);
            unsigned char *g = mem + 2 * (1 + OPTIM_MAX_BUFFERS) * n * es;
            for (size_t i = 0; i < n; i++) {
                double p = sin((double)i) * 3, gv = cos((double)i * 0.7) * 0.1;
                if (dtype == OPTIM_F64) {
                    ((double *)a.params)[i] = ((double *)b.params)[i] = p;
                    ((double *)g)[i] = gv;
                } else {
                    ((float *)a.params)[i] = ((float *)b.params)[i] = (float)p;
                    ((float *)g)[i] = (float)gv;
                }
            }
            for (int t = 0; t < 3; t++) {
                optim_stats stats;
                optim_step(info, &hp, dtype, n, &a, g, NULL);
                optim_step(info, &hp, dtype, n, &b, g, &stats);
                if (memcmp(a.params, b.params, n * es) != 0 || a.scalar != b.scalar)
                    fail_msg("%s %s: blocked step %d differs from the single pass", info->name,
                             dt ? "float64" : "float32", t + 1);
                assert_true(stats.grad_sq > 0 && stats.param_sq > 0);
            }
            free(mem);
        }
    }
}

/* The statistics' finiteness flag speaks of elements, not of sums: params
 * at FLT_MAX are finite (their squares overflow any float sum), and one
 * overflowing element among thousands is seen. */
static void test_statistics_call_huge_finite_values_finite_and_overflow_not(void **unused)
{
    (void)unused;
    enum { N = 3000 };
    const optim_info *info = optim_find("sgd");
    optim_hparams hp;
    optim_defaults(info, &hp);
    hp.lr = 1;
    static float p[N], g[N];
    for (size_t i = 0; i < N; i++) {
        p[i] = 3.4e38f;
        g[i] = 0;
    }
    optim_state st;
    memset(&st, 0, sizeof st);
    st.params = p;
    optim_state_init(info, &hp, OPTIM_F32, N, &st);
    optim_stats stats;
    optim_step(info, &hp, OPTIM_F32, N, &st, g, &stats);
    assert_true(stats.finite);
    g[2500] = -3.4e38f; /* p - lr * g overflows at one element */
    optim_step(info, &hp, OPTIM_F32, N, &st, g, &stats);
    assert_false(stats.finite);
}

int main(void)
{
    const struct CMUnitTest table_tests[] = {
        cmocka_unit_test(test_every_optimizer_is_found_by_name_in_kind_order),
        cmocka_unit_test(test_steps_with_statistics_equal_steps_without_over_many_blocks),
        cmocka_unit_test(test_statistics_call_huge_finite_values_finite_and_overflow_not),
        cmocka_unit_test(test_an_unknown_optimizer_name_is_not_found),
        cmocka_unit_test(test_an_unknown_hyperparameter_name_is_not_found),
        cmocka_unit_test(test_defaults_match_the_api_table),
        cmocka_unit_test(test_a_bool_hyperparameter_reads_back_as_zero_or_one),
        cmocka_unit_test(test_every_optimizer_accepts_its_defaults),
        cmocka_unit_test(test_every_optimizer_rejects_a_negative_lr),
        cmocka_unit_test(test_every_optimizer_accepts_a_zero_lr),
        cmocka_unit_test(test_every_optimizer_rejects_a_negative_weight_decay),
        cmocka_unit_test(test_every_optimizer_with_eps_rejects_a_negative_eps),
        cmocka_unit_test(test_sgd_family_rejects_a_negative_momentum),
        cmocka_unit_test(test_rmsprop_rejects_a_negative_momentum),
        cmocka_unit_test(test_sgd_rejects_nesterov_with_zero_momentum),
        cmocka_unit_test(test_nag_rejects_zero_momentum),
        cmocka_unit_test(test_sgd_rejects_nesterov_with_nonzero_dampening),
        cmocka_unit_test(test_nag_rejects_nonzero_dampening),
        cmocka_unit_test(test_sgd_accepts_any_dampening_without_nesterov),
        cmocka_unit_test(test_adagrad_rejects_a_negative_lr_decay),
        cmocka_unit_test(test_adagrad_rejects_a_negative_initial_accumulator_value),
        cmocka_unit_test(test_adagrad_rejects_a_negative_eps),
        cmocka_unit_test(test_adadelta_rejects_rho_above_one),
        cmocka_unit_test(test_adadelta_rejects_a_negative_rho),
        cmocka_unit_test(test_adadelta_accepts_rho_of_zero_and_of_one),
        cmocka_unit_test(test_rmsprop_rejects_a_negative_alpha),
        cmocka_unit_test(test_rmsprop_accepts_alpha_of_zero),
        cmocka_unit_test(test_adam_family_rejects_beta1_equal_to_one),
        cmocka_unit_test(test_adam_family_rejects_beta2_equal_to_one),
        cmocka_unit_test(test_adam_family_rejects_betas_above_one),
        cmocka_unit_test(test_adam_family_rejects_negative_betas),
        cmocka_unit_test(test_adam_family_accepts_betas_of_zero_and_just_below_one),
        cmocka_unit_test(test_nadam_rejects_a_negative_momentum_decay),
        cmocka_unit_test(test_every_number_rejects_nan),
        cmocka_unit_test(test_every_number_rejects_positive_infinity),
        cmocka_unit_test(test_every_number_rejects_negative_infinity),
        cmocka_unit_test(test_a_validation_message_is_cut_to_msglen_and_terminated),
        cmocka_unit_test(test_adam_and_adamw_use_max_exp_avg_sq_only_with_amsgrad),
        cmocka_unit_test(test_rmsprop_uses_grad_avg_only_when_centered),
        cmocka_unit_test(test_momentum_buffer_is_used_only_with_nonzero_momentum),
        cmocka_unit_test(test_elem_size_is_four_for_f32_and_eight_for_f64),
        cmocka_unit_test(test_state_init_fills_adagrad_sum_and_leaves_params),
        cmocka_unit_test(test_state_init_zeroes_every_used_buffer),
    };
    int failed = cmocka_run_group_tests_name("optim_table", table_tests, NULL, NULL);

    struct CMUnitTest *cases = NULL;
    int count = load_index(&cases);
    if (count <= 0) {
        fprintf(stderr, "no reference cases in %s\n", INDEX_FILE);
        free_cases(cases, count < 0 ? 0 : count);
        return 1;
    }
    failed += _cmocka_run_group_tests("optim_reference", cases, (size_t)count, NULL, NULL);
    free_cases(cases, count);

    static const char *const dtype_names[] = {"float32", "float64"};
    for (int d = 0; d < 2; d++)
        printf("largest deviation %s: %.3g relative (tolerance %g), %.3g u*M absolute, at %s; %zu values "
               "checked\n",
               dtype_names[d], worst[d].rel, tol_of((optim_dtype)d), worst[d].ulps,
               worst[d].where[0] ? worst[d].where : "-", worst[d].checked);
    return failed ? 1 : 0;
}
