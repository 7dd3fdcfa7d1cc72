/* A session in memory: the state blob layout (params, used buffers, each
 * tensor's step and scalar for a shaped session, scalar), made fresh,
 * adopted from a decoded vector, shaped, copied for a fork, loaded from a
 * stored row and re-laid when its hyperparameters change. The stored
 * configuration text is written and read through the session's codec. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "engine/engineInt.h"

const char *engine_dtype_name(optim_dtype d) { return d == OPTIM_F64 ? "float64" : "float32"; }

void engine_accumulator_msg(char *msg, size_t msglen, optim_dtype dtype)
{
    snprintf(msg, msglen, "initial_accumulator_value is not a finite %s", engine_dtype_name(dtype));
}

/* Whether s has buffer i: its hyperparameters use it, or for a shaped
 * session those of any of its groups. */
static bool buf_used(const sess *s, size_t i)
{
    if (!s->shape)
        return optim_buffer_used(s->info, &s->hp, i);
    for (size_t g = 0; g < s->shape->n_groups; g++)
        if (optim_buffer_used(s->info, &s->shape->groups[g].hp, i))
            return true;
    return false;
}

size_t engine_sess_tstate_bytes(const sess *s)
{
    return s->shape ? s->shape->n_tensors * (sizeof(uint64_t) + (s->info->scalar ? sizeof(double) : 0)) : 0;
}

/* Points st's params and used buffers (and tstate) into blob. Returns the
 * blob size the layout needs. */
static size_t layout(sess *s, unsigned char *blob)
{
    size_t vec = s->n * optim_elem_size(s->dtype), off = vec;
    s->st.params = blob;
    for (size_t i = 0; i < OPTIM_MAX_BUFFERS; i++) {
        s->st.buf[i] = NULL;
        if (buf_used(s, i)) {
            s->st.buf[i] = blob ? blob + off : NULL;
            off += vec;
        }
    }
    s->tstate = blob && s->shape ? blob + off : NULL;
    off += engine_sess_tstate_bytes(s);
    return off + sizeof(double);
}

size_t engine_shape_state_bytes(const optim_info *info, const optim_hparams *hp, const engine_shape *sh,
                                optim_dtype dtype, size_t n)
{
    sess probe = {.info = info, .hp = *hp, .dtype = dtype, .n = n, .shape = (engine_shape *)sh};
    return layout(&probe, NULL);
}

size_t engine_sess_state_bytes(const optim_info *info, const optim_hparams *hp, optim_dtype dtype, size_t n)
{
    return engine_shape_state_bytes(info, hp, NULL, dtype, n);
}

optd_err engine_sess_check_size(const optim_info *info, const optim_hparams *hp, optim_dtype dtype, size_t n,
                                size_t limit, char *msg, size_t msglen)
{
    return engine_shape_check_size(info, hp, NULL, dtype, n, limit, msg, msglen);
}

optd_err engine_shape_check_size(const optim_info *info, const optim_hparams *hp, const engine_shape *sh,
                                 optim_dtype dtype, size_t n, size_t limit, char *msg, size_t msglen)
{
    size_t bytes = engine_shape_state_bytes(info, hp, sh, dtype, n);
    if (bytes <= limit)
        return OPTD_OK;
    size_t vectors = (bytes - sizeof(double)) / (n * optim_elem_size(dtype));
    snprintf(msg, msglen,
             "the session's state would take %zu bytes (%zu %s elements x %zu vectors: params and %s's buffers), "
             "over the %zu of --max-session-bytes; use fewer elements, float32 or fewer buffers",
             bytes, n, engine_dtype_name(dtype), vectors, info->name, limit);
    return OPTD_E_SESSION_TOO_LARGE;
}

void engine_sess_pack(sess *s) { memcpy(s->blob + s->blob_len - sizeof(double), &s->st.scalar, sizeof(double)); }

void engine_sess_free(sess *s)
{
    if (!s)
        return;
    free(s->config);
    free(s->blob);
    engine_shape_free(s->shape);
    engine_idem_free(s->keys);
    free(s);
}

uint64_t engine_sess_tensor_step(const sess *s, size_t t)
{
    uint64_t v;
    if (!s->shape)
        return s->st.step;
    memcpy(&v, s->tstate + t * sizeof v, sizeof v); /* the blob has no alignment to offer */
    return v;
}

void engine_sess_set_tensor_step(sess *s, size_t t, uint64_t v)
{
    if (!s->shape)
        s->st.step = v;
    else
        memcpy(s->tstate + t * sizeof v, &v, sizeof v);
}

double engine_sess_tensor_scalar(const sess *s, size_t t)
{
    double v = 1;
    if (!s->shape)
        return s->st.scalar;
    if (s->info->scalar)
        memcpy(&v, s->tstate + s->shape->n_tensors * sizeof(uint64_t) + t * sizeof v, sizeof v);
    return v;
}

void engine_sess_set_tensor_scalar(sess *s, size_t t, double v)
{
    if (!s->shape)
        s->st.scalar = v;
    else if (s->info->scalar)
        memcpy(s->tstate + s->shape->n_tensors * sizeof(uint64_t) + t * sizeof v, &v, sizeof v);
}

optd_err engine_sess_write_config(sess *s)
{
    char *text = NULL;
    optd_err rc = s->codec->encode_shaped
                      ? s->codec->encode_shaped(s->codec->ctx, s->info, &s->hp, &s->tr, s->shape, &text)
                      : s->codec->encode(s->codec->ctx, s->info, &s->hp, &s->tr, &text);
    if (rc)
        return rc;
    free(s->config);
    s->config = text;
    return OPTD_OK;
}

/* Whether the values hp puts into a fresh state (adagrad's
 * initial_accumulator_value) are finite in dtype: 1e39 is a fine double but
 * not a float32. */
static int fits_dtype(const optim_info *info, const optim_hparams *hp, optim_dtype dtype)
{
    return info->kind != OPTIM_ADAGRAD || dtype == OPTIM_F64 || isfinite((float)hp->initial_accumulator_value);
}

static optd_err make(const engine_codec *codec, const char *name, const optim_info *info, const optim_hparams *hp,
                     const training *tr, optim_dtype dtype, size_t n, void **take, const void *init, double fill,
                     sess **out);

optd_err engine_sess_new(const engine_codec *codec, const char *name, const optim_info *info, const optim_hparams *hp,
                         const training *tr, optim_dtype dtype, size_t n, const void *init, double fill, sess **out)
{
    return make(codec, name, info, hp, tr, dtype, n, NULL, init, fill, out);
}

optd_err engine_sess_adopt(const engine_codec *codec, const char *name, const optim_info *info, const optim_hparams *hp,
                           const training *tr, optim_dtype dtype, size_t n, void **params, sess **out)
{
    return make(codec, name, info, hp, tr, dtype, n, params, NULL, 0, out);
}

/* engine_sess_new, or with take (a malloc'd vector of n params) engine_sess_adopt: the
 * blob grows out of that vector (params come first in it), so a large
 * session is never held twice. */
static optd_err make(const engine_codec *codec, const char *name, const optim_info *info, const optim_hparams *hp,
                     const training *tr, optim_dtype dtype, size_t n, void **take, const void *init, double fill,
                     sess **out)
{
    optd_err rc = OPTD_E_BAD_HYPERPARAM;
    sess *s = NULL;
    if (!fits_dtype(info, hp, dtype))
        goto done;
    rc = OPTD_E_NOMEM;
    s = calloc(1, sizeof *s);
    if (!s)
        goto done;
    s->codec = codec;
    s->info = info;
    s->hp = *hp;
    s->tr = *tr;
    s->dtype = dtype;
    s->n = n;
    s->blob_len = layout(s, NULL);
    s->blob = take ? realloc(*take, s->blob_len) : malloc(s->blob_len);
    if (!s->blob)
        goto done;
    if (take)
        *take = NULL;
    layout(s, s->blob);
    optim_state_init(info, hp, dtype, n, &s->st);
    if (take) {
        /* the params are in place already */
    } else if (init) {
        memcpy(s->st.params, init, n * optim_elem_size(dtype));
    } else {
        for (size_t i = 0; i < n; i++) {
            if (dtype == OPTIM_F64)
                ((double *)s->st.params)[i] = fill;
            else
                ((float *)s->st.params)[i] = (float)fill;
        }
    }
    engine_sess_pack(s);
    snprintf(s->name, sizeof s->name, "%s", name);
    s->created_ms = s->updated_ms = optd_now_ms();
    rc = engine_sess_write_config(s);
done:
    if (rc) {
        engine_sess_free(s);
        s = NULL;
    }
    *out = s;
    return rc;
}

static optd_err replay(sess *s, const store_log_entry *e);

optd_err engine_sess_from_store(const engine_codec *codec, store_session *row, void *blob, size_t blob_len, sess **out)
{
    optd_err rc = OPTD_E_NOMEM;
    sess *s = calloc(1, sizeof *s);
    if (!s)
        goto done;
    rc = OPTD_E_INTERNAL;
    s->info = optim_find(row->optimizer);
    if (!s->info || (row->dtype != OPTIM_F32 && row->dtype != OPTIM_F64))
        goto done;
    s->dtype = (optim_dtype)row->dtype;
    s->n = (size_t)row->size;
    optim_defaults(s->info, &s->hp);
    engine_training_defaults(&s->tr);
    s->codec = codec;
    const char *text = row->config ? row->config : "{}";
    if (codec->decode_shaped ? codec->decode_shaped(codec->ctx, s->info, text, &s->hp, &s->tr, &s->shape)
                             : codec->decode(codec->ctx, s->info, text, &s->hp, &s->tr))
        goto done;
    if ((s->shape && s->shape->n != s->n) || layout(s, NULL) != blob_len)
        goto done;
    s->st.step = row->step;
    s->id = row->id;
    snprintf(s->name, sizeof s->name, "%s", row->name);
    s->created_ms = row->created_ms;
    s->updated_ms = row->updated_ms;
    s->config = row->config;
    row->config = NULL;
    s->blob = blob;
    s->blob_len = blob_len;
    layout(s, s->blob);
    memcpy(&s->st.scalar, s->blob + blob_len - sizeof(double), sizeof(double));
    rc = OPTD_OK;
    if (row->nlog) {
        /* The blob is at state_step: redo the logged steps after it. */
        s->st.step = row->state_step;
        for (size_t i = 0; i < row->nlog && rc == OPTD_OK; i++)
            rc = replay(s, &row->log[i]);
        if (rc == OPTD_OK && s->st.step != row->step)
            rc = OPTD_E_INTERNAL;
        if (rc == OPTD_OK)
            engine_sess_pack(s);
        s->logged = (uint32_t)row->nlog;
    }
    if (rc) {
        /* Not taken after all: row and blob go back to the caller. */
        row->config = s->config;
        s->config = NULL;
        goto done;
    }
    store_session_clear(row);
done:
    if (rc && s) {
        engine_shape_free(s->shape);
        free(s);
        s = NULL;
    }
    *out = s;
    return rc;
}

uint32_t engine_sess_log_slots(const sess *s)
{
    size_t es = optim_elem_size(s->dtype), groups = s->shape ? s->shape->n_groups : 1;
    size_t entry = s->n * es + groups * sizeof(double) + (s->shape ? s->shape->n_tensors : 0);
    if (s->blob_len < ENGINE_LOG_MIN_STATE || !entry)
        return 0;
    size_t k = ENGINE_LOG_STATE_RATIO * s->blob_len / entry;
    /* Fewer than 4 slots (SGD without momentum, whose state is its params)
     * would save too little for the load to redo the steps. */
    return k < 4 ? 0 : k > ENGINE_LOG_MAX_SLOTS ? ENGINE_LOG_MAX_SLOTS : (uint32_t)k;
}

void engine_sess_log_parts(const sess *s, const void *grad, const unsigned char *skip, const double *lrs,
                           store_part parts[3])
{
    /* The gradient first, so that a loaded entry's copy of it is as aligned
     * as malloc makes it. A shaped session's skip flags take a byte per
     * tensor, zeros (a NULL part) when none was skipped. */
    parts[0] = (store_part){grad, s->n * optim_elem_size(s->dtype)};
    parts[1] = (store_part){lrs, (s->shape ? s->shape->n_groups : 1) * sizeof(double)};
    parts[2] = (store_part){skip, s->shape ? s->shape->n_tensors : 0};
}

void engine_sess_apply(sess *s, const void *grad, const unsigned char *skip, const double *lrs, optim_stats *stats)
{
    if (!s->shape) {
        optim_hparams hp = s->hp;
        hp.lr = lrs[0];
        optim_step(s->info, &hp, s->dtype, s->n, &s->st, grad, stats);
        return;
    }
    const engine_shape *sh = s->shape;
    const size_t es = optim_elem_size(s->dtype), T = sh->n_tensors;
    const unsigned char *g = grad;
    unsigned char *p = s->st.params;
    memset(stats, 0, sizeof *stats);
    stats->finite = true;
    for (size_t t = 0; t < T;) {
        const engine_tensor *a = &sh->tensors[t];
        if (skip && skip[t]) {
            stats->param_sq += optim_sq_norm(s->dtype, a->n, p + a->off * es);
            t++;
            continue;
        }
        uint64_t step = engine_sess_tensor_step(s, t);
        double scalar = engine_sess_tensor_scalar(s, t);
        size_t u = t + 1;
        while (u < T && !(skip && skip[u]) && sh->tensors[u].group == a->group &&
               engine_sess_tensor_step(s, u) == step && engine_sess_tensor_scalar(s, u) == scalar)
            u++;
        const engine_tensor *z = &sh->tensors[u - 1];
        size_t off = a->off, len = z->off + z->n - a->off;
        optim_hparams hp = sh->groups[a->group].hp;
        hp.lr = lrs[a->group];
        optim_state st = {.params = p + off * es, .scalar = scalar, .step = step};
        for (size_t i = 0; i < OPTIM_MAX_BUFFERS; i++)
            st.buf[i] = s->st.buf[i] ? (unsigned char *)s->st.buf[i] + off * es : NULL;
        optim_stats one;
        optim_step(s->info, &hp, s->dtype, len, &st, g + off * es, &one);
        stats->grad_sq += one.grad_sq;
        stats->update_sq += one.update_sq;
        stats->param_sq += one.param_sq;
        stats->finite = stats->finite && one.finite;
        for (; t < u; t++) {
            engine_sess_set_tensor_step(s, t, st.step);
            engine_sess_set_tensor_scalar(s, t, st.scalar);
        }
    }
    s->st.step++;
}

/* Redoes the logged step e on s (at the step before it). OPTD_E_INTERNAL
 * when the entry does not fit s or its step spoils the state, which only a
 * file changed behind our back can cause. */
static optd_err replay(sess *s, const store_log_entry *e)
{
    store_part parts[3];
    engine_sess_log_parts(s, NULL, NULL, NULL, parts);
    size_t G = parts[1].len / sizeof(double), T = parts[2].len;
    if (e->step != s->st.step + 1 || e->len != parts[0].len + parts[1].len + T)
        return OPTD_E_INTERNAL;
    double *lrs = malloc(parts[1].len);
    if (!lrs)
        return OPTD_E_NOMEM;
    const unsigned char *d = e->data, *skip = T ? d + parts[0].len + parts[1].len : NULL;
    memcpy(lrs, d + parts[0].len, parts[1].len);
    optd_err rc = OPTD_OK;
    for (size_t g = 0; g < G; g++)
        if (!isfinite(lrs[g]))
            rc = OPTD_E_INTERNAL;
    optim_stats stats;
    if (rc == OPTD_OK)
        engine_sess_apply(s, d, skip, lrs, &stats);
    if (rc == OPTD_OK && !stats.finite)
        rc = OPTD_E_INTERNAL;
    free(lrs);
    return rc;
}

optd_err engine_sess_copy(const sess *src, const char *name, sess **out)
{
    optd_err rc = OPTD_E_NOMEM;
    sess *s = calloc(1, sizeof *s);
    if (!s || !(s->blob = malloc(src->blob_len)))
        goto done;
    if (src->shape && engine_shape_copy(src->shape, &s->shape))
        goto done;
    memcpy(s->blob, src->blob, src->blob_len);
    s->blob_len = src->blob_len;
    s->codec = src->codec;
    s->info = src->info;
    s->hp = src->hp;
    s->tr = src->tr;
    s->dtype = src->dtype;
    s->n = src->n;
    layout(s, s->blob);
    s->st.scalar = src->st.scalar;
    s->st.step = src->st.step;
    snprintf(s->name, sizeof s->name, "%s", name);
    s->created_ms = s->updated_ms = optd_now_ms();
    rc = engine_sess_write_config(s);
done:
    if (rc && s) {
        free(s->blob);
        engine_shape_free(s->shape);
        free(s);
        s = NULL;
    }
    *out = s;
    return rc;
}

/* Starts the buffers in mask of group g's tensors as torch does at their
 * first step (zeros, or adagrad's initial_accumulator_value, as the
 * group's hyperparameters use them; a buffer the group does not use stays
 * zero). */
static void group_init(sess *s, size_t g, unsigned mask)
{
    const engine_group *gr = &s->shape->groups[g];
    const engine_tensor *a = &s->shape->tensors[gr->first], *z = &s->shape->tensors[gr->first + gr->count - 1];
    size_t es = optim_elem_size(s->dtype), off = a->off, len = z->off + z->n - a->off;
    optim_state st = {0};
    for (size_t i = 0; i < OPTIM_MAX_BUFFERS; i++) {
        if (!s->st.buf[i] || !(mask & (1u << i)))
            continue;
        st.buf[i] = (unsigned char *)s->st.buf[i] + off * es;
        memset(st.buf[i], 0, len * es);
    }
    optim_state_init(s->info, &gr->hp, s->dtype, len, &st);
}

optd_err engine_sess_set_shape(sess *s, engine_shape *sh)
{
    for (size_t g = 0; g < sh->n_groups; g++)
        if (!fits_dtype(s->info, &sh->groups[g].hp, s->dtype))
            return OPTD_E_BAD_HYPERPARAM;
    if (sh->n != s->n || s->shape)
        return OPTD_E_INTERNAL;
    s->shape = sh;
    size_t len = layout(s, NULL);
    unsigned char *blob = realloc(s->blob, len);
    if (!blob) {
        s->shape = NULL;
        layout(s, s->blob);
        return OPTD_E_NOMEM;
    }
    s->blob = blob;
    s->blob_len = len;
    layout(s, blob);
    for (size_t g = 0; g < sh->n_groups; g++)
        group_init(s, g, ~0u);
    for (size_t t = 0; t < sh->n_tensors; t++) {
        engine_sess_set_tensor_step(s, t, 0);
        engine_sess_set_tensor_scalar(s, t, 1);
    }
    s->st.scalar = 1;
    engine_sess_pack(s);
    optd_err rc = engine_sess_write_config(s);
    if (rc)
        s->shape = NULL; /* not taken: s is only fit to be freed now */
    return rc;
}

/* The end of a change of hyperparameters, with groups or without: s, as
 * old was before, takes blob (len bytes, laid out for the new settings and
 * filled) in place of old's, keeps old's step and scalar, and writes its
 * config. */
static optd_err adopt_blob(sess *s, const sess *old, unsigned char *blob, size_t len)
{
    s->st.scalar = old->st.scalar;
    s->st.step = old->st.step;
    free(old->blob);
    s->blob = blob;
    s->blob_len = len;
    engine_sess_pack(s);
    return engine_sess_write_config(s);
}

optd_err engine_sess_set_all_hparams(sess *s, const optim_hparams *hp, const optim_hparams *ghp)
{
    if (!s->shape)
        return engine_sess_set_hparams(s, hp);
    engine_shape *sh = s->shape;
    for (size_t g = 0; g < sh->n_groups; g++)
        if (!fits_dtype(s->info, &ghp[g], s->dtype))
            return OPTD_E_BAD_HYPERPARAM;
    optim_hparams *old_ghp = malloc(sh->n_groups * sizeof *old_ghp);
    if (!old_ghp)
        return OPTD_E_NOMEM;
    for (size_t g = 0; g < sh->n_groups; g++)
        old_ghp[g] = sh->groups[g].hp;
    sess old = *s;
    s->hp = *hp;
    for (size_t g = 0; g < sh->n_groups; g++)
        sh->groups[g].hp = ghp[g];
    size_t len = layout(s, NULL);
    unsigned char *blob = malloc(len);
    if (!blob) {
        for (size_t g = 0; g < sh->n_groups; g++)
            sh->groups[g].hp = old_ghp[g];
        *s = old;
        free(old_ghp);
        return OPTD_E_NOMEM;
    }
    layout(s, blob);
    size_t vec = s->n * optim_elem_size(s->dtype);
    memcpy(s->st.params, old.st.params, vec);
    for (size_t i = 0; i < OPTIM_MAX_BUFFERS; i++) {
        if (s->st.buf[i] && old.st.buf[i])
            memcpy(s->st.buf[i], old.st.buf[i], vec);
        else if (s->st.buf[i])
            memset(s->st.buf[i], 0, vec);
    }
    memcpy(s->tstate, old.tstate, engine_sess_tstate_bytes(s));
    /* A buffer a group starts to use starts fresh for it, as in an
     * unshaped session (and as torch creates state lazily). */
    for (size_t g = 0; g < sh->n_groups; g++) {
        unsigned mask = 0;
        for (size_t i = 0; i < OPTIM_MAX_BUFFERS; i++)
            if (optim_buffer_used(s->info, &ghp[g], i) && !optim_buffer_used(s->info, &old_ghp[g], i))
                mask |= 1u << i;
        if (mask)
            group_init(s, g, mask);
    }
    free(old_ghp);
    return adopt_blob(s, &old, blob, len);
}

optd_err engine_sess_set_hparams(sess *s, const optim_hparams *hp)
{
    if (s->shape) { /* the session's own only: each group keeps its */
        size_t G = s->shape->n_groups;
        optim_hparams *ghp = malloc(G * sizeof *ghp);
        if (!ghp)
            return OPTD_E_NOMEM;
        for (size_t g = 0; g < G; g++)
            ghp[g] = s->shape->groups[g].hp;
        optd_err rc = engine_sess_set_all_hparams(s, hp, ghp);
        free(ghp);
        return rc;
    }
    if (!fits_dtype(s->info, hp, s->dtype))
        return OPTD_E_BAD_HYPERPARAM;
    sess old = *s;
    s->hp = *hp;
    size_t len = layout(s, NULL);
    unsigned char *blob = malloc(len);
    if (!blob) {
        *s = old;
        return OPTD_E_NOMEM;
    }
    layout(s, blob);
    size_t vec = s->n * optim_elem_size(s->dtype);
    memcpy(s->st.params, old.st.params, vec);
    /* Buffers kept keep their values; new ones start as at a fresh step 0
     * (torch creates state lazily, so a buffer switched on later starts the
     * same way). */
    optim_state fresh = {0};
    for (size_t i = 0; i < OPTIM_MAX_BUFFERS; i++) {
        if (s->st.buf[i] && old.st.buf[i])
            memcpy(s->st.buf[i], old.st.buf[i], vec);
        else if (s->st.buf[i])
            fresh.buf[i] = s->st.buf[i];
    }
    optim_state_init(s->info, hp, s->dtype, s->n, &fresh);
    return adopt_blob(s, &old, blob, len);
}

void engine_sess_row(const sess *s, store_session *row)
{
    memset(row, 0, sizeof *row);
    row->id = s->id;
    snprintf(row->name, sizeof row->name, "%s", s->name);
    snprintf(row->optimizer, sizeof row->optimizer, "%s", s->info->name);
    row->dtype = s->dtype;
    row->size = s->n;
    row->step = s->st.step;
    row->config = s->config;
    row->created_ms = s->created_ms;
    row->updated_ms = s->updated_ms;
}

optd_err engine_sess_row_copy(const sess *s, store_session *out)
{
    engine_sess_row(s, out);
    if (s->config && !(out->config = strdup(s->config))) {
        memset(out, 0, sizeof *out);
        return OPTD_E_NOMEM;
    }
    return OPTD_OK;
}

optd_err engine_sess_read(store *st, const engine_codec *codec, const char *name, sess **out)
{
    store_session row = {0};
    void *blob = NULL;
    size_t len = 0;
    *out = NULL;
    optd_err rc = store_read_session(st, name, &row, &blob, &len);
    if (rc == OPTD_OK)
        rc = engine_sess_from_store(codec, &row, blob, len, out);
    if (rc) {
        store_session_clear(&row);
        free(blob);
    }
    return rc;
}
