/* A session in memory and its conversions: hyperparameters from and to JSON
 * (driven by optim's description table), the state blob layout (params, used
 * buffers, scalar), the public session object and the checkpoint format. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/internal.h"

static const char *dtype_name(optim_dtype d) { return d == OPTIM_F64 ? "float64" : "float32"; }

/* Points st's params and used buffers into blob and reads the scalar from
 * its last 8 bytes. Returns the blob size the layout needs. */
static size_t layout(sess *s, unsigned char *blob)
{
    size_t vec = s->n * optim_elem_size(s->dtype), off = vec;
    s->st.params = blob;
    for (size_t i = 0; i < OPTIM_MAX_BUFFERS; i++) {
        s->st.buf[i] = NULL;
        if (optim_buffer_used(s->info, &s->hp, i)) {
            s->st.buf[i] = blob ? blob + off : NULL;
            off += vec;
        }
    }
    return off + sizeof(double);
}

size_t sess_state_bytes(const optim_info *info, const optim_hparams *hp, optim_dtype dtype, size_t n)
{
    sess probe = {.info = info, .hp = *hp, .dtype = dtype, .n = n};
    return layout(&probe, NULL);
}

optd_err sess_check_size(const optim_info *info, const optim_hparams *hp, optim_dtype dtype, size_t n,
                         size_t limit, char *msg, size_t msglen)
{
    size_t bytes = sess_state_bytes(info, hp, dtype, n);
    if (bytes <= limit)
        return OPTD_OK;
    size_t vectors = (bytes - sizeof(double)) / (n * optim_elem_size(dtype));
    snprintf(msg, msglen,
             "the session's state would take %zu bytes (%zu %s elements x %zu vectors: params and %s's buffers), "
             "over the %zu of --max-session-bytes; use fewer elements, float32 or fewer buffers",
             bytes, n, dtype_name(dtype), vectors, info->name, limit);
    return OPTD_E_SESSION_TOO_LARGE;
}

void sess_pack(sess *s) { memcpy(s->blob + s->blob_len - sizeof(double), &s->st.scalar, sizeof(double)); }

void sess_free(sess *s)
{
    if (!s)
        return;
    store_session_clear(&s->row);
    free(s->blob);
    free(s);
}

#define HP_NAMES_MAX 16 /* more than any optimizer has */

/* The 422 for a name in "hyperparams" that info does not take: the nearest
 * of its names, or where a session field goes. */
static optd_err unknown_hparam(const optim_info *info, const char *name, char *msg, size_t msglen)
{
    const char *names[HP_NAMES_MAX + 2];
    size_t n = 0;
    for (size_t i = 0; i < info->n_hps && n < HP_NAMES_MAX; i++)
        names[n++] = info->hps[i].name;
    names[n++] = "lr_schedule";
    names[n++] = "max_grad_norm";
    for (size_t k = 0; k < TRAINING_N_FIELDS; k++) {
        if (strcmp(name, training_fields[k]) == 0) {
            snprintf(msg, msglen, "\"%s\" is a session field, not a hyperparameter: put it beside \"hyperparams\", "
                     "at the top level of the body", name);
            return OPTD_E_UNKNOWN_FIELD;
        }
    }
    char where[64];
    snprintf(where, sizeof where, "the hyperparams of %s", info->name);
    unknown_name_msg(msg, msglen, "hyperparameter", name, where, names, n);
    return OPTD_E_UNKNOWN_FIELD;
}

optd_err hparams_from_json(const optim_info *info, const cJSON *obj, optim_hparams *hp, training *tr, char *msg,
                           size_t msglen)
{
    if (obj && !cJSON_IsObject(obj)) {
        snprintf(msg, msglen, "hyperparams must be an object");
        return OPTD_E_BAD_REQUEST;
    }
    for (const cJSON *e = obj ? obj->child : NULL; e; e = e->next) {
        int handled;
        optd_err rc = training_hparam_from_json(e, tr, &handled, msg, msglen);
        if (handled) {
            if (rc)
                return rc;
            continue;
        }
        const optim_hp_desc *d = optim_hp_find(info, e->string);
        if (!d)
            return unknown_hparam(info, e->string, msg, msglen);
        switch (d->type) {
        case OPTIM_HP_BOOL:
            if (!cJSON_IsBool(e))
                goto type;
            optim_hp_set(hp, d, 0, cJSON_IsTrue(e));
            break;
        case OPTIM_HP_NUMBER:
            if (!cJSON_IsNumber(e))
                goto type;
            optim_hp_set(hp, d, 0, e->valuedouble);
            break;
        case OPTIM_HP_PAIR:
            if (!cJSON_IsArray(e) || cJSON_GetArraySize(e) != 2 || !cJSON_IsNumber(e->child) ||
                !cJSON_IsNumber(e->child->next))
                goto type;
            optim_hp_set(hp, d, 0, e->child->valuedouble);
            optim_hp_set(hp, d, 1, e->child->next->valuedouble);
            break;
        }
        continue;
    type:
        snprintf(msg, msglen, "hyperparameter '%s' must be %s", d->name,
                 d->type == OPTIM_HP_BOOL ? "true or false"
                 : d->type == OPTIM_HP_PAIR ? "an array of two numbers"
                                            : "a number");
        return OPTD_E_BAD_REQUEST;
    }
    if (optim_validate(info, hp, msg, msglen) != OPTIM_OK)
        return OPTD_E_BAD_HYPERPARAM;
    return OPTD_OK;
}

void hparams_to_json(sbuf *b, const optim_info *info, const optim_hparams *hp, const training *tr)
{
    sbuf_put(b, "{", 1);
    for (size_t i = 0; i < info->n_hps; i++) {
        const optim_hp_desc *d = &info->hps[i];
        sbuf_printf(b, "%s\"%s\":", i ? "," : "", d->name);
        if (d->type == OPTIM_HP_BOOL) {
            sbuf_puts(b, optim_hp_get(hp, d, 0) != 0 ? "true" : "false");
        } else if (d->type == OPTIM_HP_PAIR) {
            sbuf_put(b, "[", 1);
            sbuf_num(b, optim_hp_get(hp, d, 0), 0);
            sbuf_put(b, ",", 1);
            sbuf_num(b, optim_hp_get(hp, d, 1), 0);
            sbuf_put(b, "]", 1);
        } else {
            sbuf_num(b, optim_hp_get(hp, d, 0), 0);
        }
    }
    training_hparams_to_json(b, tr);
    sbuf_put(b, "}", 1);
}

optd_err sess_write_config(sess *s)
{
    sbuf b = {0};
    sbuf_puts(&b, "{\"hyperparams\":");
    hparams_to_json(&b, s->info, &s->hp, &s->tr);
    training_fields_to_json(&b, &s->tr);
    sbuf_puts(&b, "}");
    if (b.oom) {
        sbuf_free(&b);
        return OPTD_E_NOMEM;
    }
    free(s->row.config);
    s->row.config = b.p;
    return OPTD_OK;
}

/* Whether the values hp puts into a fresh state (adagrad's
 * initial_accumulator_value) are finite in dtype: 1e39 is a fine double but
 * not a float32. */
static int fits_dtype(const optim_info *info, const optim_hparams *hp, optim_dtype dtype)
{
    return info->kind != OPTIM_ADAGRAD || dtype == OPTIM_F64 || isfinite((float)hp->initial_accumulator_value);
}

static optd_err make(const char *name, const optim_info *info, const optim_hparams *hp, const training *tr,
                     optim_dtype dtype, size_t n, void **take, const void *init, double fill, sess **out);

optd_err sess_new(const char *name, const optim_info *info, const optim_hparams *hp, const training *tr,
                  optim_dtype dtype, size_t n, const void *init, double fill, sess **out)
{
    return make(name, info, hp, tr, dtype, n, NULL, init, fill, out);
}

optd_err sess_adopt(const char *name, const optim_info *info, const optim_hparams *hp, const training *tr,
                    optim_dtype dtype, size_t n, void **params, sess **out)
{
    return make(name, info, hp, tr, dtype, n, params, NULL, 0, out);
}

/* sess_new, or with take (a malloc'd vector of n params) sess_adopt: the
 * blob grows out of that vector (params come first in it), so a large
 * session is never held twice. */
static optd_err make(const char *name, const optim_info *info, const optim_hparams *hp, const training *tr,
                     optim_dtype dtype, size_t n, void **take, const void *init, double fill, sess **out)
{
    optd_err rc = OPTD_E_BAD_HYPERPARAM;
    sess *s = NULL;
    if (!fits_dtype(info, hp, dtype))
        goto done;
    rc = OPTD_E_NOMEM;
    s = calloc(1, sizeof *s);
    if (!s)
        goto done;
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
    sess_pack(s);
    snprintf(s->row.name, sizeof s->row.name, "%s", name);
    snprintf(s->row.optimizer, sizeof s->row.optimizer, "%s", info->name);
    s->row.dtype = dtype;
    s->row.size = n;
    s->row.created_ms = s->row.updated_ms = now_ms();
    rc = sess_write_config(s);
done:
    if (rc) {
        sess_free(s);
        s = NULL;
    }
    *out = s;
    return rc;
}

optd_err sess_from_store(store_session *row, void *blob, size_t blob_len, sess **out)
{
    char msg[256];
    optd_err rc = OPTD_E_NOMEM;
    cJSON *cfg = NULL;
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
    training_defaults(&s->tr);
    cfg = cJSON_Parse(row->config ? row->config : "{}");
    if (!cfg ||
        hparams_from_json(s->info, cJSON_GetObjectItemCaseSensitive(cfg, "hyperparams"), &s->hp, &s->tr, msg,
                          sizeof msg) ||
        training_fields_from_json(cfg, &s->tr, msg, sizeof msg))
        goto done;
    if (layout(s, NULL) != blob_len)
        goto done;
    s->row = *row;
    memset(row, 0, sizeof *row);
    s->blob = blob;
    s->blob_len = blob_len;
    layout(s, s->blob);
    memcpy(&s->st.scalar, s->blob + blob_len - sizeof(double), sizeof(double));
    s->st.step = s->row.step;
    rc = OPTD_OK;
done:
    cJSON_Delete(cfg);
    if (rc) {
        free(s);
        s = NULL;
    }
    *out = s;
    return rc;
}

optd_err sess_copy(const sess *src, const char *name, sess **out)
{
    optd_err rc = OPTD_E_NOMEM;
    sess *s = calloc(1, sizeof *s);
    if (!s || !(s->blob = malloc(src->blob_len)))
        goto done;
    memcpy(s->blob, src->blob, src->blob_len);
    s->blob_len = src->blob_len;
    s->info = src->info;
    s->hp = src->hp;
    s->tr = src->tr;
    s->dtype = src->dtype;
    s->n = src->n;
    layout(s, s->blob);
    s->st.scalar = src->st.scalar;
    s->st.step = src->st.step;
    s->row = src->row;
    s->row.id = 0;
    s->row.config = NULL;
    snprintf(s->row.name, sizeof s->row.name, "%s", name);
    s->row.created_ms = s->row.updated_ms = now_ms();
    rc = sess_write_config(s);
done:
    if (rc && s) {
        free(s->blob);
        free(s);
        s = NULL;
    }
    *out = s;
    return rc;
}

optd_err sess_set_hparams(sess *s, const optim_hparams *hp)
{
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
    s->st.scalar = old.st.scalar;
    s->st.step = old.st.step;
    free(old.blob);
    s->blob = blob;
    s->blob_len = len;
    sess_pack(s);
    optd_err rc = sess_write_config(s);
    return rc;
}

/* Appends the members of the JSON object text obj (without its braces),
 * preceded by a comma when it has any. */
static void splice_members(sbuf *b, const char *obj)
{
    if (!obj)
        return;
    const char *open = strchr(obj, '{'), *close = strrchr(obj, '}');
    if (!open || !close || close <= open + 1)
        return;
    sbuf_put(b, ",", 1);
    sbuf_put(b, open + 1, (size_t)(close - open - 1));
}

static void head_to_json(sbuf *b, const store_session *row)
{
    sbuf_puts(b, "{\"name\":");
    sbuf_json_str(b, row->name);
    sbuf_printf(b, ",\"optimizer\":\"%s\",\"dtype\":\"%s\",\"size\":%llu,\"step\":%llu", row->optimizer,
                dtype_name((optim_dtype)row->dtype), (unsigned long long)row->size,
                (unsigned long long)row->step);
    splice_members(b, row->config);
}

void sess_to_json(sbuf *b, const store_session *row)
{
    char c[32], u[32];
    rfc3339(row->created_ms, 0, c);
    rfc3339(row->updated_ms, 0, u);
    head_to_json(b, row);
    sbuf_printf(b, ",\"created_at\":\"%s\",\"updated_at\":\"%s\"}", c, u);
}

void sess_head_to_json(sbuf *b, const sess *s)
{
    head_to_json(b, &s->row);
    sbuf_put(b, "}", 1);
}

void sess_state_to_json(sbuf *b, const sess *s)
{
    head_to_json(b, &s->row);
    sbuf_puts(b, ",\"params\":");
    sbuf_vec(b, s->st.params, s->n, s->dtype);
    sbuf_puts(b, ",\"state\":{");
    const char *sep = "";
    for (size_t i = 0; i < s->info->n_buffers; i++) {
        if (!s->st.buf[i])
            continue;
        sbuf_printf(b, "%s\"%s\":", sep, s->info->buffers[i]);
        sbuf_vec(b, s->st.buf[i], s->n, s->dtype);
        sep = ",";
    }
    if (s->info->scalar) {
        sbuf_printf(b, "%s\"%s\":", sep, s->info->scalar);
        sbuf_num(b, s->st.scalar, 0);
    }
    sbuf_puts(b, "}}");
}

optd_err sess_config_from_json(const cJSON *o, const optim_info **info, optim_dtype *dtype, optim_hparams *hp,
                               training *tr, char *msg, size_t msglen)
{
    const cJSON *opt = cJSON_GetObjectItemCaseSensitive(o, "optimizer");
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(o, "dtype");
    optd_err rc;
    if (!opt)
        return snprintf(msg, msglen, "optimizer is required"), OPTD_E_INVALID;
    if (!cJSON_IsString(opt))
        return snprintf(msg, msglen, "optimizer must be a string"), OPTD_E_BAD_REQUEST;
    if (!(*info = optim_find(opt->valuestring))) {
        const char *names[OPTIM_KIND_COUNT];
        for (size_t k = 0; k < OPTIM_KIND_COUNT; k++)
            names[k] = optim_at(k)->name;
        unknown_name_msg(msg, msglen, "optimizer", opt->valuestring, "\"optimizer\"", names, OPTIM_KIND_COUNT);
        return OPTD_E_UNKNOWN_OPTIMIZER;
    }
    if (dt && !cJSON_IsString(dt))
        return snprintf(msg, msglen, "dtype must be a string"), OPTD_E_BAD_REQUEST;
    *dtype = dt && strcmp(dt->valuestring, "float64") == 0 ? OPTIM_F64 : OPTIM_F32;
    if (dt && *dtype == OPTIM_F32 && strcmp(dt->valuestring, "float32") != 0)
        return snprintf(msg, msglen, "dtype \"%.32s\" is not a session dtype: use \"float32\" (the default) or "
                        "\"float64\"", dt->valuestring), OPTD_E_INVALID;
    optim_defaults(*info, hp);
    training_defaults(tr);
    rc = hparams_from_json(*info, cJSON_GetObjectItemCaseSensitive(o, "hyperparams"), hp, tr, msg, msglen);
    return rc ? rc : training_fields_from_json(o, tr, msg, msglen);
}

size_t checkpoint_max_bytes(size_t session_bytes)
{
    /* A float32 prints in at most 15 characters ("-1.17549435e-38") and a
     * float64 in 24, each with a comma and maybe a space after it: at most
     * 17 bytes per 4 of state. The rest (names, hyperparameters) and a
     * safetensors header fit in a mebibyte. */
    size_t per4 = 17, head = (size_t)1 << 20;
    if (session_bytes > (SIZE_MAX - head) / per4 * 4)
        return SIZE_MAX;
    return session_bytes / 4 * per4 + per4 + head;
}

/* Checks what a checkpoint's state must be for later steps to be finite:
 * every used buffer finite (the decoder checked) and in its domain, the
 * scalar in its range. */
static optd_err state_check(const sess *s, char *msg, size_t msglen)
{
    for (size_t i = 0; i < s->info->n_buffers; i++) {
        if (!s->st.buf[i] || !optim_buffer_nonneg(s->info, i))
            continue;
        for (size_t k = 0; k < s->n; k++) {
            double v = s->dtype == OPTIM_F64 ? ((const double *)s->st.buf[i])[k] : ((const float *)s->st.buf[i])[k];
            if (v < 0 || !isfinite(v)) {
                snprintf(msg, msglen, "state.%s element %zu is %g: %s is never negative (it is a sum or average "
                         "of squares, or a maximum of absolute values)", s->info->buffers[i], k, v,
                         s->info->buffers[i]);
                return OPTD_E_INVALID;
            }
        }
    }
    if (!optim_scalar_valid(s->info, s->st.scalar)) {
        snprintf(msg, msglen, "state.%s is %g: it must be in [0, 1]", s->info->scalar, s->st.scalar);
        return OPTD_E_INVALID;
    }
    return OPTD_OK;
}

optd_err ckpt_begin(const char *name, const cJSON *obj, size_t n, size_t max_bytes, void **take, sess **out, char *msg,
                    size_t msglen)
{
    optd_err rc;
    sess *s = NULL;
    const cJSON *step = cJSON_GetObjectItemCaseSensitive(obj, "step");
    const cJSON *size = cJSON_GetObjectItemCaseSensitive(obj, "size");
    const cJSON *state = cJSON_GetObjectItemCaseSensitive(obj, "state");
    const optim_info *info;
    optim_dtype dtype;
    optim_hparams hp;
    training tr;

    /* Every field GET .../state writes, and nothing else. */
    static const char *const fields[] = {"name", "optimizer", "dtype", "size", "step", "hyperparams", "params",
                                         "state", "workers", "min_workers", "round_timeout", "min_workers_auto"};
    rc = body_fields_known(obj, "a checkpoint", fields, sizeof fields / sizeof *fields, HINT_INSIDE, msg, msglen);
    if (rc)
        goto done;
    rc = sess_config_from_json(obj, &info, &dtype, &hp, &tr, msg, msglen);
    if (rc)
        goto done;
    rc = OPTD_E_BAD_REQUEST;
    if (step && (!cJSON_IsNumber(step) || step->valuedouble < 0 || step->valuedouble > 9007199254740992.0 ||
                 step->valuedouble != floor(step->valuedouble))) {
        snprintf(msg, msglen, "step must be a non-negative integer");
        goto done;
    }
    if (size && !cJSON_IsNumber(size)) {
        snprintf(msg, msglen, "size must be an integer");
        goto done;
    }
    if (state && !cJSON_IsObject(state)) {
        snprintf(msg, msglen, "state must be an object");
        goto done;
    }
    rc = OPTD_E_INVALID;
    if (n < 1 || n > API_MAX_ELEMENTS) {
        snprintf(msg, msglen, "params must have 1 to %zu elements", API_MAX_ELEMENTS);
        goto done;
    }
    if (size && size->valuedouble != (double)n) {
        snprintf(msg, msglen, "size is %g but params has %zu elements", size->valuedouble, n);
        rc = OPTD_E_SIZE_MISMATCH;
        goto done;
    }
    rc = sess_check_size(info, &hp, dtype, n, max_bytes, msg, msglen);
    if (rc)
        goto done;
    rc = take ? sess_adopt(name, info, &hp, &tr, dtype, n, take, &s) : sess_new(name, info, &hp, &tr, dtype, n, NULL, 0, &s);
    if (rc == OPTD_E_BAD_HYPERPARAM)
        snprintf(msg, msglen, "initial_accumulator_value is not a finite %s", dtype_name(dtype));
    if (rc)
        goto done;
    s->st.step = s->row.step = step ? (uint64_t)step->valuedouble : 0;
    /* The scalar state, and every name under state a known buffer or scalar. */
    for (const cJSON *e = state ? state->child : NULL; e; e = e->next) {
        if (info->scalar && strcmp(e->string, info->scalar) == 0) {
            if (!cJSON_IsNumber(e) || !isfinite(e->valuedouble)) {
                snprintf(msg, msglen, "state.%s must be a number", info->scalar);
                rc = OPTD_E_BAD_REQUEST;
                goto done;
            }
            s->st.scalar = e->valuedouble;
            continue;
        }
        void *dst;
        if (strcmp(e->string, "params") == 0) {
            snprintf(msg, msglen, "\"params\" is not a state buffer: the params go at the top of the checkpoint");
            rc = OPTD_E_UNKNOWN_FIELD;
            goto done;
        }
        if ((rc = ckpt_target(s, e->string, &dst, msg, msglen)) != OPTD_OK)
            goto done;
        if (!cJSON_IsArray(e)) {
            snprintf(msg, msglen, "state.%s must be an array of numbers", e->string);
            rc = OPTD_E_BAD_REQUEST;
            goto done;
        }
    }
    rc = OPTD_OK;
done:
    if (rc) {
        sess_free(s);
        s = NULL;
    }
    *out = s;
    return rc;
}

optd_err ckpt_target(sess *s, const char *key, void **dst, char *msg, size_t msglen)
{
    const optim_info *info = s->info;
    if (strcmp(key, "params") == 0) {
        *dst = s->st.params;
        return OPTD_OK;
    }
    size_t i = 0;
    while (i < info->n_buffers && strcmp(info->buffers[i], key) != 0)
        i++;
    if (i == info->n_buffers) {
        const char *names[OPTIM_MAX_BUFFERS + 1];
        size_t k = 0;
        for (; k < info->n_buffers; k++)
            names[k] = info->buffers[k];
        if (info->scalar)
            names[k++] = info->scalar;
        char where[48];
        snprintf(where, sizeof where, "the state of %s", info->name);
        unknown_name_msg(msg, msglen, "state buffer", key, where, names, k);
        return OPTD_E_UNKNOWN_FIELD;
    }
    if (!s->st.buf[i]) {
        snprintf(msg, msglen, "state.%.64s is not a buffer of this %s configuration", key, info->name);
        return OPTD_E_INVALID;
    }
    *dst = s->st.buf[i];
    return OPTD_OK;
}

optd_err ckpt_finish(sess *s, unsigned present, char *msg, size_t msglen)
{
    /* A used buffer may be missing only before the first step (it then
     * starts as a fresh one would). */
    for (size_t i = 0; i < s->info->n_buffers && s->row.step > 0; i++) {
        if (s->st.buf[i] && !(present & (1u << i))) {
            snprintf(msg, msglen, "state.%s is missing (the checkpoint is past step 0)", s->info->buffers[i]);
            return OPTD_E_INVALID;
        }
    }
    optd_err rc = state_check(s, msg, msglen);
    if (rc == OPTD_OK)
        sess_pack(s);
    return rc;
}

unsigned ckpt_buffer_bit(const sess *s, const char *key)
{
    for (size_t i = 0; i < s->info->n_buffers; i++)
        if (strcmp(s->info->buffers[i], key) == 0)
            return 1u << i;
    return 0;
}

optd_err sess_from_checkpoint(const char *name, const cJSON *obj, jbody *jb, size_t max_bytes, sess **out, char *msg,
                              size_t msglen)
{
    const cJSON *params = cJSON_GetObjectItemCaseSensitive(obj, "params");
    jvec *pv = jbody_vec(jb, "params", 0);
    sess *s = NULL;
    unsigned present = 0;
    optd_err rc;
    *out = NULL;
    if (!cJSON_IsArray(params) || !pv) {
        snprintf(msg, msglen, "params must be a non-empty array of numbers");
        return params ? OPTD_E_BAD_REQUEST : OPTD_E_INVALID;
    }
    /* The params vector becomes the session's blob when it is of the
     * session's dtype (it is, unless the checkpoint's dtype is bad). */
    rc = ckpt_begin(name, obj, pv->n, max_bytes, pv->borrowed ? NULL : &pv->data, &s, msg, msglen);
    if (rc)
        return rc;
    if (!pv->data) /* adopted */
        jvec_release(pv);
    size_t vec = s->n * optim_elem_size(s->dtype);
    for (size_t i = 0; i < jb->nvecs; i++) {
        jvec *v = &jb->vecs[i];
        void *dst;
        char label[80];
        snprintf(label, sizeof label, "%s%s", v->in_state ? "state." : "", v->key);
        if (!v->data && !v->n && v->cap == 0 && v->key[0] == '\0')
            continue; /* the params, adopted above */
        if ((rc = ckpt_target(s, v->key, &dst, msg, msglen)) != OPTD_OK)
            break;
        if (v->n != s->n) {
            snprintf(msg, msglen, "%s has %zu elements; the session has %zu", label, v->n, s->n);
            rc = OPTD_E_SIZE_MISMATCH;
            break;
        }
        if (v->dtype != s->dtype) {
            rc = OPTD_E_INTERNAL;
            break;
        }
        memcpy(dst, v->data, vec);
        present |= ckpt_buffer_bit(s, v->key);
        jvec_release(v); /* one copy at a time */
    }
    if (rc == OPTD_OK)
        rc = ckpt_finish(s, present, msg, msglen);
    if (rc) {
        sess_free(s);
        s = NULL;
    }
    *out = s;
    return rc;
}
