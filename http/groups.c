/* The JSON forms of a shaped session (API.md "Tensors and parameter
 * groups"): "groups" in a create body, a checkpoint and the stored
 * configuration (each group's hyperparams over the session's, and its
 * tensors with their shapes), read strictly with messages that say how to
 * fix the request; a PATCH's per-group "groups"; a checkpoint's
 * "tensor_state" (each tensor's step count and scalar state); a step's
 * "skip" list and Optd-Skip header. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http/httpInt.h"

static const char *const group_fields[] = {"hyperparams", "tensors"};
static const char *const tensor_fields[] = {"name", "shape"};

#define SHAPE_EXAMPLE "{\"name\": \"fc1.weight\", \"shape\": [64, 32]}"

/* A group's member that is the session's to say, with its own sentence. */
static optd_err session_member(const cJSON *g, size_t k, char *msg, size_t msglen)
{
    static const char *const whole[] = {"optimizer", "dtype", "name", "size", "params", "fill", "from"};
    for (size_t i = 0; i < sizeof whole / sizeof *whole; i++)
        if (cJSON_GetObjectItemCaseSensitive(g, whole[i]))
            return optd_fail(msg, msglen, OPTD_E_INVALID,
                             "groups[%zu] has \"%s\": a group may not change the session's %s; a group holds "
                             "\"hyperparams\" (its own, over the session's) and \"tensors\" (" SHAPE_EXAMPLE ", ...)",
                             k, whole[i], i < 2 ? "optimizer or dtype" : "name, size or params");
    return OPTD_OK;
}

/* One tensor {"name": ..., "shape": [...]} of group k onto sh. */
static optd_err tensor_from_json(const cJSON *t, size_t k, size_t i, engine_shape *sh, char *msg, size_t msglen)
{
    char where[64];
    snprintf(where, sizeof where, "groups[%zu].tensors[%zu]", k, i);
    if (!cJSON_IsObject(t))
        return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "%s must be an object, e.g. " SHAPE_EXAMPLE, where);
    optd_err rc = fields_known(t, where, tensor_fields, 2, NULL, msg, msglen);
    if (rc)
        return rc;
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(t, "name");
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(t, "shape");
    if (!name || !shape)
        return optd_fail(msg, msglen, OPTD_E_INVALID, "%s needs \"name\" and \"shape\", e.g. " SHAPE_EXAMPLE, where);
    if (!cJSON_IsString(name))
        return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "%s.name must be a string", where);
    if (!cJSON_IsArray(shape))
        return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST,
                         "%s.shape must be an array of positive integers ([] for a scalar)", where);
    uint64_t dims[ENGINE_MAX_DIMS];
    uint32_t nd = 0;
    for (const cJSON *d = shape->child; d; d = d->next) {
        if (!cJSON_IsNumber(d))
            return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "%s.shape must be an array of positive integers", where);
        if (nd == ENGINE_MAX_DIMS)
            return optd_fail(msg, msglen, OPTD_E_INVALID, "%s.shape has more than %d dimensions", where,
                             ENGINE_MAX_DIMS);
        double v = d->valuedouble;
        if (!(v >= 1) || v > (double)ENGINE_MAX_ELEMENTS || v != floor(v))
            return optd_fail(msg, msglen, OPTD_E_INVALID,
                             "%s.shape[%u] is %g: each dimension is a positive integer ([] is a scalar)", where, nd,
                             v);
        dims[nd++] = (uint64_t)v;
    }
    char m[256];
    rc = engine_shape_add_tensor(sh, name->valuestring, dims, nd, m, sizeof m);
    if (rc == OPTD_E_INVALID)
        snprintf(msg, msglen, "%s: %s", where, m);
    return rc;
}

/* Names entry k of a groups array into where (for messages) and checks it
 * is an object, hint saying what one holds: the groups of a create and of
 * a PATCH are walked alike. */
static optd_err group_entry(const cJSON *g, size_t k, const char *hint, char *where, size_t wlen, char *msg,
                            size_t msglen)
{
    snprintf(where, wlen, "groups[%zu]", k);
    if (!cJSON_IsObject(g))
        return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "%s must be an object%s", where, hint);
    return OPTD_OK;
}

optd_err groups_from_json(const cJSON *groups, const optim_info *info, const optim_hparams *base, engine_shape **out,
                          char *msg, size_t msglen)
{
    engine_shape *sh = NULL;
    engine_settings d = {0};
    char m[256];
    optd_err rc;
    *out = NULL;
    if (!cJSON_IsArray(groups))
        return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST,
                         "groups must be an array: [{\"hyperparams\": {...}, \"tensors\": [" SHAPE_EXAMPLE "]}, ...]");
    if ((rc = engine_shape_new(&sh)))
        return rc;
    size_t k = 0;
    for (const cJSON *g = groups->child; g && !rc; g = g->next, k++) {
        char where[32];
        if ((rc = group_entry(g, k, ": {\"hyperparams\": {...}, \"tensors\": [...]}", where, sizeof where, msg,
                              msglen)))
            break;
        if ((rc = session_member(g, k, msg, msglen)))
            break;
        /* A torch habit ({"params": ..., "lr": 0.1}) is told where lr goes. */
        if ((rc = body_fields_known(g, where, group_fields, 2, HINT_INSIDE, msg, msglen)))
            break;
        const cJSON *hp = cJSON_GetObjectItemCaseSensitive(g, "hyperparams");
        const cJSON *ts = cJSON_GetObjectItemCaseSensitive(g, "tensors");
        if (hp && !cJSON_IsObject(hp)) {
            rc = optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "%s.hyperparams must be an object", where);
            break;
        }
        if (!ts) {
            rc = optd_fail(msg, msglen, OPTD_E_INVALID, "%s needs \"tensors\": [" SHAPE_EXAMPLE ", ...]", where);
            break;
        }
        if (!cJSON_IsArray(ts)) {
            rc = optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "%s.tensors must be an array of {\"name\", \"shape\"}",
                           where);
            break;
        }
        optim_hparams ghp = *base;
        rc = http_settings_from_json(hp, NULL, &d);
        if (!rc)
            rc = engine_group_settings_apply(info, &d, 0, &ghp, m, sizeof m);
        if (!rc)
            rc = engine_group_check(info, base, &ghp, m, sizeof m);
        engine_settings_clear(&d);
        if (rc) {
            if (rc != OPTD_E_NOMEM)
                snprintf(msg, msglen, "%s.hyperparams: %s", where, m);
            break;
        }
        if ((rc = engine_shape_add_group(sh, &ghp, msg, msglen)))
            break;
        size_t i = 0;
        for (const cJSON *t = ts->child; t && !rc; t = t->next, i++)
            rc = tensor_from_json(t, k, i, sh, msg, msglen);
    }
    if (!rc)
        rc = engine_shape_finish(sh, msg, msglen);
    if (rc) {
        engine_shape_free(sh);
        return rc;
    }
    *out = sh;
    return OPTD_OK;
}

void groups_to_json(sbuf *b, const optim_info *info, const engine_shape *sh)
{
    sbuf_puts(b, ",\"groups\":[");
    for (size_t g = 0; g < sh->n_groups; g++) {
        const engine_group *gr = &sh->groups[g];
        sbuf_puts(b, g ? ",{\"hyperparams\":" : "{\"hyperparams\":");
        hparams_to_json(b, info, &gr->hp, NULL);
        sbuf_puts(b, ",\"tensors\":[");
        for (size_t t = gr->first; t < gr->first + gr->count; t++) {
            const engine_tensor *x = &sh->tensors[t];
            sbuf_puts(b, t > gr->first ? ",{\"name\":" : "{\"name\":");
            sbuf_json_str(b, x->name);
            sbuf_puts(b, ",\"shape\":[");
            for (uint32_t k = 0; k < x->ndim; k++)
                sbuf_printf(b, "%s%llu", k ? "," : "", (unsigned long long)x->dims[k]);
            sbuf_puts(b, "]}");
        }
        sbuf_puts(b, "]}");
    }
    sbuf_puts(b, "]");
}

void tensor_state_to_json(sbuf *b, const sess *s)
{
    if (!s->shape)
        return;
    sbuf_puts(b, ",\"tensor_state\":{");
    for (size_t t = 0; t < s->shape->n_tensors; t++) {
        if (t)
            sbuf_put(b, ",", 1);
        sbuf_json_str(b, s->shape->tensors[t].name);
        sbuf_printf(b, ":{\"step\":%llu", (unsigned long long)engine_sess_tensor_step(s, t));
        if (s->info->scalar) {
            sbuf_printf(b, ",\"%s\":", s->info->scalar);
            sbuf_num(b, engine_sess_tensor_scalar(s, t), 0);
        }
        sbuf_puts(b, "}");
    }
    sbuf_puts(b, "}");
}

optd_err tensor_state_from_json(sess *s, const cJSON *ts, char *msg, size_t msglen)
{
    if (!ts)
        return OPTD_OK;
    if (!s->shape)
        return optd_fail(msg, msglen, OPTD_E_INVALID,
                         "tensor_state goes with groups: a checkpoint without groups has one tensor, whose step "
                         "is the session's");
    if (!cJSON_IsObject(ts))
        return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST,
                         "tensor_state must be an object: {\"<tensor>\": {\"step\": n}, ...}");
    const char *fields[2] = {"step", s->info->scalar};
    size_t nf = s->info->scalar ? 2 : 1;
    for (const cJSON *e = ts->child; e; e = e->next) {
        long t = engine_shape_find(s->shape, e->string);
        char where[300];
        snprintf(where, sizeof where, "tensor_state.%.255s", e->string);
        if (t < 0) {
            engine_shape_unknown_msg(s->shape, e->string, "tensor_state", msg, msglen);
            return OPTD_E_INVALID;
        }
        if (!cJSON_IsObject(e))
            return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "%.280s must be an object {\"step\": n}", where);
        optd_err rc = fields_known(e, where, fields, nf, NULL, msg, msglen);
        if (rc)
            return rc;
        const cJSON *st = cJSON_GetObjectItemCaseSensitive(e, "step");
        if (st) {
            if (!cJSON_IsNumber(st))
                return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "%.280s.step must be an integer", where);
            double v = st->valuedouble;
            if (v < 0 || v != floor(v) || v > (double)s->st.step)
                return optd_fail(msg, msglen, OPTD_E_INVALID,
                                 "%.200s.step is %g: a tensor's step is an integer from 0 to the session's step "
                                 "(%llu)",
                                 where, v, (unsigned long long)s->st.step);
            engine_sess_set_tensor_step(s, (size_t)t, (uint64_t)v);
        }
        const cJSON *sc = s->info->scalar ? cJSON_GetObjectItemCaseSensitive(e, s->info->scalar) : NULL;
        if (sc) {
            if (!cJSON_IsNumber(sc))
                return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "%.200s.%s must be a number", where,
                                 s->info->scalar);
            if (!optim_scalar_valid(s->info, sc->valuedouble))
                return optd_fail(msg, msglen, OPTD_E_INVALID, "%.200s.%s is %g: it must be in [0, 1]", where,
                                 s->info->scalar, sc->valuedouble);
            engine_sess_set_tensor_scalar(s, (size_t)t, sc->valuedouble);
        }
    }
    return OPTD_OK;
}

optd_err patch_groups_from_json(const cJSON *groups, engine_settings **out, size_t *n, char *msg, size_t msglen)
{
    static const char *const fields[] = {"hyperparams"};
    *out = NULL;
    *n = 0;
    if (!groups)
        return OPTD_OK;
    if (!cJSON_IsArray(groups))
        return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST,
                         "groups must be an array with one entry per group, e.g. [{\"hyperparams\": {\"lr\": 0.01}}, "
                         "{}]");
    size_t count = (size_t)cJSON_GetArraySize(groups), k = 0;
    engine_settings *d = calloc(count ? count : 1, sizeof *d);
    if (!d)
        return OPTD_E_NOMEM;
    optd_err rc = OPTD_OK;
    for (const cJSON *g = groups->child; g && !rc; g = g->next, k++) {
        char where[32];
        if ((rc = group_entry(g, k, " ({} for a group that does not change)", where, sizeof where, msg, msglen)))
            break;
        if (cJSON_GetObjectItemCaseSensitive(g, "tensors")) {
            rc = optd_fail(msg, msglen, OPTD_E_INVALID,
                           "%s has \"tensors\": a session's tensors cannot change by PATCH (only each group's "
                           "hyperparams can)",
                           where);
            break;
        }
        if ((rc = body_fields_known(g, where, fields, 1, HINT_INSIDE, msg, msglen)))
            break;
        const cJSON *hp = cJSON_GetObjectItemCaseSensitive(g, "hyperparams");
        if (hp && !cJSON_IsObject(hp)) {
            rc = optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "%s.hyperparams must be an object", where);
            break;
        }
        rc = http_settings_from_json(hp, NULL, &d[k]);
    }
    if (rc) {
        for (size_t i = 0; i < count; i++)
            engine_settings_clear(&d[i]);
        free(d);
        return rc;
    }
    *out = d;
    *n = count;
    return OPTD_OK;
}

void patch_groups_free(engine_settings *d, size_t n)
{
    for (size_t i = 0; d && i < n; i++)
        engine_settings_clear(&d[i]);
    free(d);
}

optd_err skip_from_header(const char *h, char **buf, const char ***names, size_t *n, char *msg, size_t msglen)
{
    *buf = NULL;
    *names = NULL;
    *n = 0;
    if (!h)
        return OPTD_OK;
    size_t count = 1;
    for (const char *p = h; *p; p++)
        count += *p == ',';
    char *copy = strdup(h);
    const char **list = malloc(count * sizeof *list);
    if (!copy || !list) {
        free(copy);
        free(list);
        return OPTD_E_NOMEM;
    }
    size_t k = 0;
    for (char *cur = copy, *p; (p = http_list_next(&cur)) != NULL;) {
        if (!*p)
            continue; /* "a,,b" or a trailing comma */
        if (!engine_tensor_name_valid(p)) {
            optd_fail(msg, msglen, OPTD_E_BAD_REQUEST,
                      "Optd-Skip names tensors separated by commas (\"fc2.bias,fc1.bias\"); \"%.64s\" is not a "
                      "tensor name ([A-Za-z0-9._/-]{1,%d})",
                      p, ENGINE_TENSOR_NAME_MAX);
            free(copy);
            free(list);
            return OPTD_E_BAD_REQUEST;
        }
        list[k++] = p;
    }
    *buf = copy;
    *names = list;
    *n = k;
    return OPTD_OK;
}

optd_err skip_from_json(const cJSON *skip, const char ***names, size_t *n, char *msg, size_t msglen)
{
    *names = NULL;
    *n = 0;
    if (!skip)
        return OPTD_OK;
    if (!cJSON_IsArray(skip))
        return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST,
                         "skip must be an array of tensor names, e.g. [\"fc2.bias\"]");
    size_t count = (size_t)cJSON_GetArraySize(skip), k = 0;
    const char **list = malloc((count ? count : 1) * sizeof *list);
    if (!list)
        return OPTD_E_NOMEM;
    for (const cJSON *e = skip->child; e; e = e->next) {
        if (!cJSON_IsString(e)) {
            free(list);
            return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "skip[%zu] must be a tensor name (a string)", k);
        }
        list[k++] = e->valuestring;
    }
    *names = list;
    *n = k;
    return OPTD_OK;
}
