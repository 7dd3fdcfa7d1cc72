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
        if (!d) {
            snprintf(msg, msglen, "%s has no hyperparameter '%.64s'", info->name, e->string);
            return OPTD_E_BAD_HYPERPARAM;
        }
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

optd_err sess_new(const char *name, const optim_info *info, const optim_hparams *hp, const training *tr,
                  optim_dtype dtype, size_t n, const void *init, double fill, sess **out)
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
    s->blob = malloc(s->blob_len);
    if (!s->blob)
        goto done;
    layout(s, s->blob);
    optim_state_init(info, hp, dtype, n, &s->st);
    if (init) {
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

/* Reads a JSON array of exactly n numbers of dtype into out. */
static optd_err read_vec(const cJSON *arr, const char *what, size_t n, optim_dtype dtype, void *out, char *msg,
                         size_t msglen)
{
    if (!cJSON_IsArray(arr)) {
        snprintf(msg, msglen, "%s must be an array of numbers", what);
        return OPTD_E_BAD_REQUEST;
    }
    size_t len = (size_t)cJSON_GetArraySize(arr);
    if (len != n) {
        snprintf(msg, msglen, "%s has %zu elements; the session has %zu", what, len, n);
        return OPTD_E_SIZE_MISMATCH;
    }
    return json_to_vec(arr, out, n, dtype, msg, msglen);
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
    if (!(*info = optim_find(opt->valuestring)))
        return snprintf(msg, msglen, "unknown optimizer '%.64s'", opt->valuestring), OPTD_E_UNKNOWN_OPTIMIZER;
    if (dt && !cJSON_IsString(dt))
        return snprintf(msg, msglen, "dtype must be a string"), OPTD_E_BAD_REQUEST;
    *dtype = dt && strcmp(dt->valuestring, "float64") == 0 ? OPTIM_F64 : OPTIM_F32;
    if (dt && *dtype == OPTIM_F32 && strcmp(dt->valuestring, "float32") != 0)
        return snprintf(msg, msglen, "dtype must be \"float32\" or \"float64\""), OPTD_E_INVALID;
    optim_defaults(*info, hp);
    training_defaults(tr);
    rc = hparams_from_json(*info, cJSON_GetObjectItemCaseSensitive(o, "hyperparams"), hp, tr, msg, msglen);
    return rc ? rc : training_fields_from_json(o, tr, msg, msglen);
}

optd_err sess_from_checkpoint(const char *name, const cJSON *obj, sess **out, char *msg, size_t msglen)
{
    optd_err rc;
    sess *s = NULL;
    const cJSON *params = cJSON_GetObjectItemCaseSensitive(obj, "params");
    const cJSON *state = cJSON_GetObjectItemCaseSensitive(obj, "state");
    const cJSON *step = cJSON_GetObjectItemCaseSensitive(obj, "step");
    const optim_info *info;
    optim_dtype dtype;
    optim_hparams hp;
    training tr;

    rc = sess_config_from_json(obj, &info, &dtype, &hp, &tr, msg, msglen);
    if (rc)
        goto done;
    rc = OPTD_E_BAD_REQUEST;
    if (step && (!cJSON_IsNumber(step) || step->valuedouble < 0 || step->valuedouble > 9007199254740992.0 ||
                 step->valuedouble != floor(step->valuedouble))) {
        snprintf(msg, msglen, "step must be a non-negative integer");
        goto done;
    }
    if (!cJSON_IsArray(params) || cJSON_GetArraySize(params) < 1) {
        snprintf(msg, msglen, "params must be a non-empty array of numbers");
        rc = cJSON_IsArray(params) ? OPTD_E_INVALID : OPTD_E_BAD_REQUEST;
        goto done;
    }
    if (state && !cJSON_IsObject(state)) {
        snprintf(msg, msglen, "state must be an object");
        goto done;
    }
    size_t n = (size_t)cJSON_GetArraySize(params);
    if (n > API_MAX_ELEMENTS) {
        snprintf(msg, msglen, "params has more than %zu elements", API_MAX_ELEMENTS);
        rc = OPTD_E_INVALID;
        goto done;
    }
    rc = sess_new(name, info, &hp, &tr, dtype, n, NULL, 0, &s);
    if (rc == OPTD_E_BAD_HYPERPARAM)
        snprintf(msg, msglen, "initial_accumulator_value is not a finite %s", dtype == OPTIM_F64 ? "float64" : "float32");
    if (rc)
        goto done;
    rc = read_vec(params, "params", n, dtype, s->st.params, msg, msglen);
    if (rc)
        goto done;
    s->st.step = s->row.step = step ? (uint64_t)step->valuedouble : 0;
    /* Every member of state must be a buffer this configuration uses (or the
     * scalar); a used buffer may be missing only before the first step. */
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
        size_t i = 0;
        while (i < info->n_buffers && strcmp(info->buffers[i], e->string) != 0)
            i++;
        if (i == info->n_buffers || !s->st.buf[i]) {
            snprintf(msg, msglen, "state.%.64s is not a buffer of this %s configuration", e->string, info->name);
            rc = OPTD_E_INVALID;
            goto done;
        }
        char what[80];
        snprintf(what, sizeof what, "state.%s", info->buffers[i]);
        rc = read_vec(e, what, n, dtype, s->st.buf[i], msg, msglen);
        if (rc)
            goto done;
    }
    for (size_t i = 0; i < info->n_buffers && s->row.step > 0; i++) {
        if (s->st.buf[i] && !cJSON_GetObjectItemCaseSensitive(state, info->buffers[i])) {
            snprintf(msg, msglen, "state.%s is missing (the checkpoint is past step 0)", info->buffers[i]);
            rc = OPTD_E_INVALID;
            goto done;
        }
    }
    sess_pack(s);
    rc = OPTD_OK;
done:
    if (rc) {
        sess_free(s);
        s = NULL;
    }
    *out = s;
    return rc;
}
