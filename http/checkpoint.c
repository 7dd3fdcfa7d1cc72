/* Sessions as JSON: the public session object, the checkpoint (GET and PUT
 * .../state, streamed in pieces) and how a create body or a checkpoint
 * names what a session is made of (optimizer, dtype, settings). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http/httpInt.h"

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
                engine_dtype_name((optim_dtype)row->dtype), (unsigned long long)row->size,
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
    store_session row;
    engine_sess_row(s, &row);
    head_to_json(b, &row);
    sbuf_put(b, "}", 1);
}

void sess_state_to_json(sbuf *b, const sess *s)
{
    store_session row;
    engine_sess_row(s, &row);
    head_to_json(b, &row);
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
    if (s->info->scalar && !s->shape) { /* a shaped session's are per tensor */
        sbuf_printf(b, "%s\"%s\":", sep, s->info->scalar);
        sbuf_num(b, s->st.scalar, 0);
    }
    sbuf_puts(b, "}");
    tensor_state_to_json(b, s);
    sbuf_puts(b, "}");
}

optd_err sess_config_from_json(const cJSON *o, const optim_info **info, optim_dtype *dtype, optim_hparams *hp,
                               training *tr, char *msg, size_t msglen)
{
    const cJSON *opt = cJSON_GetObjectItemCaseSensitive(o, "optimizer");
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(o, "dtype");
    if (!opt)
        return optd_fail(msg, msglen, OPTD_E_INVALID, "optimizer is required");
    if (!cJSON_IsString(opt))
        return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "optimizer must be a string");
    if (!(*info = optim_find(opt->valuestring))) {
        const char *names[OPTIM_KIND_COUNT];
        for (size_t k = 0; k < OPTIM_KIND_COUNT; k++)
            names[k] = optim_at(k)->name;
        optd_unknown_name_msg(msg, msglen, "optimizer", opt->valuestring, "\"optimizer\"", names, OPTIM_KIND_COUNT);
        return OPTD_E_UNKNOWN_OPTIMIZER;
    }
    if (dt && !cJSON_IsString(dt))
        return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "dtype must be a string");
    *dtype = dt && strcmp(dt->valuestring, "float64") == 0 ? OPTIM_F64 : OPTIM_F32;
    if (dt && *dtype == OPTIM_F32 && strcmp(dt->valuestring, "float32") != 0)
        return optd_fail(msg, msglen, OPTD_E_INVALID,
                         "dtype \"%.32s\" is not a session dtype: use \"float32\" (the default) or "
                         "\"float64\"",
                         dt->valuestring);
    optim_defaults(*info, hp);
    engine_training_defaults(tr);
    return http_settings_apply_json(*info, o, hp, tr, msg, msglen);
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
static optd_err state_check(sess *s, char *msg, size_t msglen)
{
    for (size_t i = 0; i < s->info->n_buffers; i++) {
        if (!s->st.buf[i] || !optim_buffer_nonneg(s->info, i))
            continue;
        for (size_t k = 0; k < s->n; k++) {
            double v = s->dtype == OPTIM_F64 ? ((const double *)s->st.buf[i])[k] : ((const float *)s->st.buf[i])[k];
            if (v < 0 || !isfinite(v)) {
                snprintf(msg, msglen,
                         "state.%s element %zu is %g: %s is never negative (it is a sum or average "
                         "of squares, or a maximum of absolute values)",
                         s->info->buffers[i], k, v, s->info->buffers[i]);
                return OPTD_E_INVALID;
            }
        }
    }
    if (!optim_scalar_valid(s->info, s->st.scalar)) {
        snprintf(msg, msglen, "state.%s is %g: it must be in [0, 1]", s->info->scalar, s->st.scalar);
        return OPTD_E_INVALID;
    }
    /* Each tensor's step and scalar (a scalar not given is NaN here). */
    for (size_t t = 0; s->shape && t < s->shape->n_tensors; t++) {
        const char *tn = s->shape->tensors[t].name;
        uint64_t step = engine_sess_tensor_step(s, t);
        double v = engine_sess_tensor_scalar(s, t);
        if (step > s->st.step) {
            snprintf(msg, msglen, "tensor %.200s is at step %llu, past the session's %llu", tn,
                     (unsigned long long)step, (unsigned long long)s->st.step);
            return OPTD_E_INVALID;
        }
        if (isnan(v) && step > 0) {
            snprintf(msg, msglen, "the %s of tensor %.200s is missing (the tensor is past step 0)", s->info->scalar,
                     tn);
            return OPTD_E_INVALID;
        }
        if (isnan(v))
            engine_sess_set_tensor_scalar(s, t, 1);
        else if (!optim_scalar_valid(s->info, v)) {
            snprintf(msg, msglen, "the %s of tensor %.200s is %g: it must be in [0, 1]", s->info->scalar, tn, v);
            return OPTD_E_INVALID;
        }
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
    static const char *const fields[] = {"name",          "optimizer",        "dtype",  "size",        "step",
                                         "hyperparams",   "params",           "state",  "workers",     "min_workers",
                                         "round_timeout", "min_workers_auto", "groups", "tensor_state"};
    const cJSON *groups = cJSON_GetObjectItemCaseSensitive(obj, "groups");
    engine_shape *sh = NULL;
    rc = body_fields_known(obj, "a checkpoint", fields, sizeof fields / sizeof *fields, HINT_INSIDE, msg, msglen);
    if (rc)
        goto done;
    rc = sess_config_from_json(obj, &info, &dtype, &hp, &tr, msg, msglen);
    if (rc)
        goto done;
    if (groups && (rc = groups_from_json(groups, info, &hp, &sh, msg, msglen)) != OPTD_OK)
        goto done;
    if (sh && n == SIZE_MAX) /* a safetensors file without a flat "params": the groups say */
        n = sh->n;
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
    if (n < 1 || n > ENGINE_MAX_ELEMENTS) {
        snprintf(msg, msglen, "params must have 1 to %zu elements", ENGINE_MAX_ELEMENTS);
        goto done;
    }
    if (size && size->valuedouble != (double)n) {
        snprintf(msg, msglen, "size is %g but params has %zu elements", size->valuedouble, n);
        rc = OPTD_E_SIZE_MISMATCH;
        goto done;
    }
    if (sh && sh->n != n) {
        snprintf(msg, msglen, "params has %zu elements but the groups' tensors have %zu", n, sh->n);
        rc = OPTD_E_SIZE_MISMATCH;
        goto done;
    }
    rc = engine_shape_check_size(info, &hp, sh, dtype, n, max_bytes, msg, msglen);
    if (rc)
        goto done;
    rc = take ? engine_sess_adopt(&http_config_codec, name, info, &hp, &tr, dtype, n, take, &s)
              : engine_sess_new(&http_config_codec, name, info, &hp, &tr, dtype, n, NULL, 0, &s);
    if (rc == OPTD_OK && sh && (rc = engine_sess_set_shape(s, sh)) == OPTD_OK)
        sh = NULL;
    if (rc == OPTD_E_BAD_HYPERPARAM)
        engine_accumulator_msg(msg, msglen, dtype);
    if (rc)
        goto done;
    s->st.step = step ? (uint64_t)step->valuedouble : 0;
    if (s->shape) {
        /* A tensor the checkpoint does not name stepped with the session;
         * a scalar not given is NaN until ckpt_finish decides. */
        for (size_t t = 0; t < s->shape->n_tensors; t++) {
            engine_sess_set_tensor_step(s, t, s->st.step);
            engine_sess_set_tensor_scalar(s, t, NAN);
        }
    }
    if ((rc = tensor_state_from_json(s, cJSON_GetObjectItemCaseSensitive(obj, "tensor_state"), msg, msglen)))
        goto done;
    /* The scalar state, and every name under state a known buffer or scalar. */
    for (const cJSON *e = state ? state->child : NULL; e; e = e->next) {
        if (info->scalar && strcmp(e->string, info->scalar) == 0 && s->shape) {
            snprintf(msg, msglen,
                     "a session with groups keeps %s per tensor: give it in tensor_state "
                     "({\"<tensor>\": {\"step\": n, \"%s\": x}}), not in state",
                     info->scalar, info->scalar);
            rc = OPTD_E_INVALID;
            goto done;
        }
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
    engine_shape_free(sh);
    if (rc) {
        engine_sess_free(s);
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
        optd_unknown_name_msg(msg, msglen, "state buffer", key, where, names, k);
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
    for (size_t i = 0; i < s->info->n_buffers && s->st.step > 0; i++) {
        if (s->st.buf[i] && !(present & (1u << i))) {
            snprintf(msg, msglen, "state.%s is missing (the checkpoint is past step 0)", s->info->buffers[i]);
            return OPTD_E_INVALID;
        }
    }
    optd_err rc = state_check(s, msg, msglen);
    if (rc == OPTD_OK)
        engine_sess_pack(s);
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
        engine_sess_free(s);
        s = NULL;
    }
    *out = s;
    return rc;
}
