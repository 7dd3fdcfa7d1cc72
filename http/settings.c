/* The JSON forms of a session's settings: "hyperparams" (driven by optim's
 * description table), lr_schedule, max_grad_norm and the session fields
 * (workers, min_workers, round_timeout), read into the engine's plain
 * settings delta and written back; and the stored configuration's text
 * (store_session.config), whose format existing databases hold. */
#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http/httpInt.h"

static const char *const sched_names[] = {
    [SCHED_NONE] = "none",           [SCHED_STEP] = "step",
    [SCHED_MULTISTEP] = "multistep", [SCHED_EXPONENTIAL] = "exponential",
    [SCHED_COSINE] = "cosine",       [SCHED_LINEAR] = "linear",
};

/* Reads member name of o as a number into *out when present; checks it lies
 * in [lo, hi] (integral when whole). Returns OPTD_OK, OPTD_E_BAD_REQUEST
 * (not a number) or OPTD_E_BAD_HYPERPARAM. */
static optd_err num(const cJSON *o, const char *name, double *out, double lo, double hi, int whole, int required,
                    char *msg, size_t msglen)
{
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(o, name);
    if (!e) {
        if (!required)
            return OPTD_OK;
        snprintf(msg, msglen, "lr_schedule needs %s", name);
        return OPTD_E_BAD_HYPERPARAM;
    }
    if (!cJSON_IsNumber(e)) {
        snprintf(msg, msglen, "lr_schedule.%s must be a number", name);
        return OPTD_E_BAD_REQUEST;
    }
    double v = e->valuedouble;
    if (!isfinite(v) || v < lo || v > hi || (whole && v != floor(v))) {
        snprintf(msg, msglen, "lr_schedule.%s = %g is invalid: it must be %s in [%g, %g]", name, v,
                 whole ? "an integer" : "a number", lo, hi);
        return OPTD_E_BAD_HYPERPARAM;
    }
    *out = v;
    return OPTD_OK;
}

#define BIG 9007199254740992.0 /* 2^53: every integer below is exact */

/* The parameters each schedule type takes (besides type and the optional
 * warmup_steps), in the order replies and /v1/optimizers list them: the one
 * table that validates, prints and describes a schedule. A parameter lies in
 * [lo, hi], integral when whole; def is its value when absent. milestones is
 * a list (field NULL), read by milestones_from_json. */
typedef struct sched_arg {
    const char *name;
    size_t off; /* of the double in schedule */
    double lo, hi, def;
    bool whole, required, list;
} sched_arg;

#define SCHED_MAX_PARAMS 3
#define SP(field) #field, offsetof(schedule, field)
static const sched_arg sched_params[][SCHED_MAX_PARAMS] = {
    [SCHED_STEP] = {{SP(step_size), 1, BIG, 0, true, true, false}, {SP(gamma), 0, INFINITY, 0.1, false, false, false}},
    [SCHED_MULTISTEP] = {{SP(milestones), 0, BIG, 0, true, true, true},
                         {SP(gamma), 0, INFINITY, 0.1, false, false, false}},
    [SCHED_EXPONENTIAL] = {{SP(gamma), 0, INFINITY, 0.1, false, true, false}},
    [SCHED_COSINE] = {{SP(T_max), 1, BIG, 0, false, true, false}, {SP(eta_min), 0, INFINITY, 0, false, false, false}},
    [SCHED_LINEAR] = {{SP(start_factor), 0, 1, 1.0 / 3, false, false, false},
                      {SP(end_factor), 0, 1, 1.0, false, false, false},
                      {SP(total_iters), 1, BIG, 5, true, false, false}},
};
#undef SP

static double *sched_field(schedule *s, const sched_arg *p) { return (double *)((char *)s + p->off); }
static double sched_get(const schedule *s, const sched_arg *p) { return *(const double *)((const char *)s + p->off); }

/* The session fields' rules: what validates them and what /v1/optimizers
 * says of them. round_timeout is seconds, at most a week. */
typedef struct field_rule {
    const char *name;
    int integer;
    double lo, hi;
    int lo_open;
} field_rule;

enum { F_WORKERS, F_MIN_WORKERS, F_ROUND_TIMEOUT };
static const field_rule field_rules[ENGINE_TRAINING_N_FIELDS] = {
    [F_WORKERS] = {"workers", 1, 1, 100000, 0},
    [F_MIN_WORKERS] = {"min_workers", 1, 1, 100000, 0},
    [F_ROUND_TIMEOUT] = {"round_timeout", 0, 0, 86400 * 7, 1},
};

/* lr_schedule.milestones of o into s: increasing step numbers. */
static optd_err milestones_from_json(const cJSON *o, schedule *s, char *msg, size_t msglen)
{
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(o, "milestones");
    if (!cJSON_IsArray(m)) {
        snprintf(msg, msglen, "lr_schedule.milestones must be an array of step numbers");
        return m ? OPTD_E_BAD_REQUEST : OPTD_E_BAD_HYPERPARAM;
    }
    for (const cJSON *e = m->child; e; e = e->next) {
        if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble > BIG ||
            e->valuedouble != floor(e->valuedouble) || s->n_milestones == SCHED_MAX_MILESTONES ||
            (s->n_milestones && e->valuedouble <= s->milestones[s->n_milestones - 1])) {
            snprintf(msg, msglen, "lr_schedule.milestones must be at most %d increasing non-negative integers",
                     SCHED_MAX_MILESTONES);
            return OPTD_E_BAD_HYPERPARAM;
        }
        s->milestones[s->n_milestones++] = e->valuedouble;
    }
    return OPTD_OK;
}

/* The schedule type named by o's "type" into s->type. */
static optd_err sched_type_from_json(const cJSON *o, schedule *s, char *msg, size_t msglen)
{
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(o, "type");
    if (!cJSON_IsString(type)) {
        snprintf(msg, msglen, "lr_schedule.type must be one of step, multistep, exponential, cosine, linear");
        return type ? OPTD_E_BAD_REQUEST : OPTD_E_BAD_HYPERPARAM;
    }
    for (int k = SCHED_STEP; k <= SCHED_LINEAR; k++)
        if (strcmp(type->valuestring, sched_names[k]) == 0)
            s->type = (sched_type)k;
    if (s->type != SCHED_NONE)
        return OPTD_OK;
    const char *near = optd_name_nearest(type->valuestring, sched_names + SCHED_STEP, SCHED_LINEAR);
    snprintf(msg, msglen, "lr_schedule.type \"%.32s\" is not one of step, multistep, exponential, cosine, linear%s%s%s",
             type->valuestring, near ? "; did you mean \"" : "", near ? near : "", near ? "\"?" : "");
    return OPTD_E_BAD_HYPERPARAM;
}

static optd_err schedule_from_json(const cJSON *o, schedule *out, char *msg, size_t msglen)
{
    schedule s = {0};
    double warmup = 0;
    optd_err rc = sched_type_from_json(o, &s, msg, msglen);
    if (rc)
        return rc;
    const sched_arg *ps = sched_params[s.type];
    const char *valid[SCHED_MAX_PARAMS + 2] = {"type"};
    size_t nvalid = 1;
    for (int k = 0; k < SCHED_MAX_PARAMS && ps[k].name; k++)
        valid[nvalid++] = ps[k].name;
    valid[nvalid++] = "warmup_steps";
    char where[48];
    snprintf(where, sizeof where, "an lr_schedule of type %s", sched_names[s.type]);
    rc = fields_known(o, where, valid, nvalid, NULL, msg, msglen);
    /* The numbers first, then the list (multistep's gamma is checked before
     * its milestones). */
    for (int k = 0; !rc && k < SCHED_MAX_PARAMS && ps[k].name; k++) {
        if (ps[k].list)
            continue;
        *sched_field(&s, &ps[k]) = ps[k].def;
        rc = num(o, ps[k].name, sched_field(&s, &ps[k]), ps[k].lo, ps[k].hi, ps[k].whole, ps[k].required, msg, msglen);
    }
    if (!rc && s.type == SCHED_MULTISTEP)
        rc = milestones_from_json(o, &s, msg, msglen);
    if (!rc && s.type == SCHED_LINEAR && s.start_factor == 0) {
        snprintf(msg, msglen, "lr_schedule.start_factor must be > 0");
        rc = OPTD_E_BAD_HYPERPARAM;
    }
    if (!rc && (s.type == SCHED_STEP || s.type == SCHED_MULTISTEP || s.type == SCHED_EXPONENTIAL) && !(s.gamma > 0)) {
        snprintf(msg, msglen, "lr_schedule.gamma must be positive");
        rc = OPTD_E_BAD_HYPERPARAM;
    }
    if (!rc)
        rc = num(o, "warmup_steps", &warmup, 0, BIG, 1, 0, msg, msglen);
    if (rc)
        return rc;
    s.warmup_steps = (uint64_t)warmup;
    *out = s;
    return OPTD_OK;
}

/* The name as optim's tables spell it, when some optimizer takes it. */
static const char *hp_name_static(const char *name)
{
    for (size_t k = 0; k < OPTIM_KIND_COUNT; k++) {
        const optim_hp_desc *d = optim_hp_find(optim_at(k), name);
        if (d)
            return d->name;
    }
    return NULL;
}

/* Keeps the decode error rc/msg in d, reported by the engine where it
 * would have met it: in phase, before item err_at. */
static void defer(engine_settings *d, int phase, optd_err rc, const char *msg)
{
    d->err_phase = phase;
    d->err_at = d->n_items;
    d->err_rc = rc;
    snprintf(d->err_msg, sizeof d->err_msg, "%s", msg);
}

/* lr_schedule and max_grad_norm: they mean the same for every optimizer.
 * Sets *handled when e is one of them; an error goes into msg. */
static optd_err training_hparam_from_json(const cJSON *e, engine_settings *d, int *handled, char *msg, size_t msglen)
{
    *handled = 1;
    if (strcmp(e->string, "lr_schedule") == 0) {
        d->set |= ENGINE_SET_SCHED;
        if (cJSON_IsNull(e)) {
            d->sched.type = SCHED_NONE;
            return OPTD_OK;
        }
        if (!cJSON_IsObject(e)) {
            snprintf(msg, msglen, "lr_schedule must be an object or null");
            return OPTD_E_BAD_REQUEST;
        }
        return schedule_from_json(e, &d->sched, msg, msglen);
    }
    if (strcmp(e->string, "max_grad_norm") == 0) {
        if (cJSON_IsNull(e)) {
            d->set |= ENGINE_SET_CLIP;
            d->clip = false;
            return OPTD_OK;
        }
        if (!cJSON_IsNumber(e)) {
            snprintf(msg, msglen, "max_grad_norm must be a number or null");
            return OPTD_E_BAD_REQUEST;
        }
        if (!(e->valuedouble > 0) || !isfinite(e->valuedouble)) {
            snprintf(msg, msglen, "max_grad_norm = %g is invalid: it must be a finite number > 0", e->valuedouble);
            return OPTD_E_BAD_HYPERPARAM;
        }
        d->set |= ENGINE_SET_CLIP;
        d->clip = true;
        d->max_grad_norm = e->valuedouble;
        return OPTD_OK;
    }
    *handled = 0;
    return OPTD_OK;
}

/* The members of "hyperparams" as items, in order; stops at the first error
 * it can tell without the session (kept in d) or at the first name no
 * optimizer takes (the engine words that one). */
static optd_err hparams_from_json(const cJSON *obj, engine_settings *d)
{
    char msg[256];
    if (obj && !cJSON_IsObject(obj)) {
        defer(d, ENGINE_ERR_ITEMS, OPTD_E_BAD_REQUEST, "hyperparams must be an object");
        return OPTD_OK;
    }
    size_t cap = 0;
    for (const cJSON *e = obj ? obj->child : NULL; e; e = e->next) {
        int handled;
        optd_err rc = training_hparam_from_json(e, d, &handled, msg, sizeof msg);
        if (handled) {
            if (rc) {
                defer(d, ENGINE_ERR_ITEMS, rc, msg);
                return OPTD_OK;
            }
            continue;
        }
        if (d->n_items == cap) {
            size_t ncap = cap ? cap * 2 : 8;
            engine_hp_item *items = realloc(d->items, ncap * sizeof *items);
            if (!items)
                return OPTD_E_NOMEM;
            d->items = items;
            cap = ncap;
        }
        engine_hp_item *it = &d->items[d->n_items++];
        memset(it, 0, sizeof *it);
        it->name = hp_name_static(e->string);
        it->type = ENGINE_VAL_OTHER;
        if (cJSON_IsBool(e)) {
            it->type = ENGINE_VAL_BOOL;
            it->v[0] = cJSON_IsTrue(e);
        } else if (cJSON_IsNumber(e)) {
            it->type = ENGINE_VAL_NUMBER;
            it->v[0] = e->valuedouble;
        } else if (cJSON_IsArray(e) && cJSON_GetArraySize(e) == 2 && cJSON_IsNumber(e->child) &&
                   cJSON_IsNumber(e->child->next)) {
            it->type = ENGINE_VAL_PAIR;
            it->v[0] = e->child->valuedouble;
            it->v[1] = e->child->next->valuedouble;
        }
        if (!it->name) { /* unknown to every optimizer: nothing after it counts */
            snprintf(d->unknown, sizeof d->unknown, "%s", e->string);
            return OPTD_OK;
        }
    }
    return OPTD_OK;
}

/* workers, min_workers and round_timeout of o; an error is kept in d. */
static void training_fields_from_json(const cJSON *o, engine_settings *d)
{
    char msg[256];
    const cJSON *w = cJSON_GetObjectItemCaseSensitive(o, "workers");
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(o, "min_workers");
    const cJSON *rt = cJSON_GetObjectItemCaseSensitive(o, "round_timeout");
    const cJSON *automin = cJSON_GetObjectItemCaseSensitive(o, "min_workers_auto");
    const cJSON *ints[2] = {w, m};
    for (int k = 0; k < 2; k++) {
        const cJSON *e = ints[k];
        if (!e)
            continue;
        if (!cJSON_IsNumber(e)) {
            snprintf(msg, sizeof msg, "%s must be an integer", k ? "min_workers" : "workers");
            defer(d, ENGINE_ERR_FIELDS, OPTD_E_BAD_REQUEST, msg);
            return;
        }
        const field_rule *fr = &field_rules[k ? F_MIN_WORKERS : F_WORKERS];
        if (e->valuedouble < fr->lo || e->valuedouble > fr->hi || e->valuedouble != floor(e->valuedouble)) {
            snprintf(msg, sizeof msg, "%s must be an integer from %g to %g", fr->name, fr->lo, fr->hi);
            defer(d, ENGINE_ERR_FIELDS, OPTD_E_INVALID, msg);
            return;
        }
        if (k) {
            d->set |= ENGINE_SET_MIN_WORKERS;
            d->min_workers = (uint32_t)e->valuedouble;
        } else {
            d->set |= ENGINE_SET_WORKERS;
            d->workers = (uint32_t)e->valuedouble;
        }
    }
    if (rt) {
        if (!cJSON_IsNumber(rt)) {
            defer(d, ENGINE_ERR_FIELDS, OPTD_E_BAD_REQUEST, "round_timeout must be a number of seconds");
            return;
        }
        const field_rule *fr = &field_rules[F_ROUND_TIMEOUT];
        if (!(rt->valuedouble > fr->lo) || rt->valuedouble > fr->hi) {
            defer(d, ENGINE_ERR_FIELDS, OPTD_E_INVALID, "round_timeout must be > 0 and at most a week (in seconds)");
            return;
        }
        d->set |= ENGINE_SET_ROUND_TIMEOUT;
        d->round_timeout = rt->valuedouble;
    }
    /* Stored configs mark a min_workers that follows workers (the default). */
    if (cJSON_IsTrue(automin) && m && w && m->valuedouble == w->valuedouble)
        d->set |= ENGINE_SET_MIN_AUTO;
}

static void training_hparams_to_json(sbuf *b, const training *tr);

optd_err http_settings_from_json(const cJSON *obj, const cJSON *body, engine_settings *out)
{
    memset(out, 0, sizeof *out);
    optd_err rc = hparams_from_json(obj, out);
    if (rc == OPTD_OK && out->err_phase == ENGINE_ERR_NONE)
        training_fields_from_json(body, out);
    return rc;
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
    if (tr)
        training_hparams_to_json(b, tr);
    sbuf_put(b, "}", 1);
}

static void training_hparams_to_json(sbuf *b, const training *tr)
{
    const schedule *s = &tr->sched;
    sbuf_puts(b, ",\"lr_schedule\":");
    if (s->type == SCHED_NONE) {
        sbuf_puts(b, "null");
    } else {
        sbuf_printf(b, "{\"type\":\"%s\"", sched_names[s->type]);
        const sched_arg *ps = sched_params[s->type];
        for (int k = 0; k < SCHED_MAX_PARAMS && ps[k].name; k++) {
            sbuf_printf(b, ",\"%s\":", ps[k].name);
            if (ps[k].list) {
                sbuf_puts(b, "[");
                for (size_t i = 0; i < s->n_milestones; i++)
                    sbuf_printf(b, "%s%.0f", i ? "," : "", s->milestones[i]);
                sbuf_puts(b, "]");
            } else if (ps[k].whole) {
                sbuf_printf(b, "%.0f", sched_get(s, &ps[k]));
            } else {
                sbuf_num(b, sched_get(s, &ps[k]), 0);
            }
        }
        sbuf_printf(b, ",\"warmup_steps\":%llu}", (unsigned long long)s->warmup_steps);
    }
    sbuf_puts(b, ",\"max_grad_norm\":");
    if (tr->clip)
        sbuf_num(b, tr->max_grad_norm, 0);
    else
        sbuf_puts(b, "null");
}

void training_fields_to_json(sbuf *b, const training *tr)
{
    sbuf_printf(b, ",\"workers\":%u,\"min_workers\":%u,\"round_timeout\":", tr->workers, tr->min_workers);
    sbuf_num(b, tr->round_timeout, 0);
    /* min_workers follows workers until set: say so, so a reload or a
     * checkpoint restored keeps following. */
    if (tr->min_workers_follows)
        sbuf_puts(b, ",\"min_workers_auto\":true");
}

static optd_err config_encode_shaped(void *ctx, const optim_info *info, const optim_hparams *hp, const training *tr,
                                     const engine_shape *shape, char **out)
{
    (void)ctx;
    sbuf b = {0};
    sbuf_puts(&b, "{\"hyperparams\":");
    hparams_to_json(&b, info, hp, tr);
    training_fields_to_json(&b, tr);
    /* Spliced into every reply that shows the session (checkpoint.c). */
    if (shape)
        groups_to_json(&b, info, shape);
    sbuf_puts(&b, "}");
    if (b.oom) {
        sbuf_free(&b);
        return OPTD_E_NOMEM;
    }
    *out = b.p;
    return OPTD_OK;
}

optd_err http_settings_apply_json(const optim_info *info, const cJSON *body, optim_hparams *hp, training *tr, char *msg,
                                  size_t msglen)
{
    engine_settings d;
    optd_err rc = http_settings_from_json(cJSON_GetObjectItemCaseSensitive(body, "hyperparams"), body, &d);
    if (!rc)
        rc = engine_settings_apply(info, &d, hp, tr, msg, msglen);
    engine_settings_clear(&d);
    return rc;
}

static optd_err config_encode(void *ctx, const optim_info *info, const optim_hparams *hp, const training *tr,
                              char **out)
{
    return config_encode_shaped(ctx, info, hp, tr, NULL, out);
}

static optd_err config_decode_shaped(void *ctx, const optim_info *info, const char *text, optim_hparams *hp,
                                     training *tr, engine_shape **shape)
{
    (void)ctx;
    char msg[256];
    *shape = NULL;
    /* The stored text holds the groups of every tensor: parsed whole. */
    cJSON *cfg = cJSON_ParseWithLength(text, strlen(text));
    optd_err rc = cfg ? http_settings_apply_json(info, cfg, hp, tr, msg, sizeof msg) : OPTD_E_INTERNAL;
    const cJSON *groups = cJSON_GetObjectItemCaseSensitive(cfg, "groups");
    if (rc == OPTD_OK && groups)
        rc = groups_from_json(groups, info, hp, shape, msg, sizeof msg) == OPTD_OK ? OPTD_OK : OPTD_E_INTERNAL;
    cJSON_Delete(cfg);
    return rc;
}

static optd_err config_decode(void *ctx, const optim_info *info, const char *text, optim_hparams *hp, training *tr)
{
    engine_shape *sh = NULL;
    optd_err rc = config_decode_shaped(ctx, info, text, hp, tr, &sh);
    engine_shape_free(sh);
    return rc;
}

const engine_codec http_config_codec = {config_encode, config_decode, NULL, config_encode_shaped,
                                        config_decode_shaped};

void http_training_describe(sbuf *b)
{
    sbuf_puts(b, ",{\"name\":\"lr_schedule\",\"type\":\"object\",\"default\":null,\"schedules\":{");
    for (int k = SCHED_STEP; k <= SCHED_LINEAR; k++) {
        sbuf_printf(b, "%s\"%s\":[", k > SCHED_STEP ? "," : "", sched_names[k]);
        for (int i = 0; i < SCHED_MAX_PARAMS && sched_params[k][i].name; i++)
            sbuf_printf(b, "%s\"%s\"", i ? "," : "", sched_params[k][i].name);
        sbuf_puts(b, "]");
    }
    /* max_grad_norm: training_hparam_from_json takes a finite number > 0. */
    sbuf_puts(b, "},\"optional\":[\"warmup_steps\"]},"
                 "{\"name\":\"max_grad_norm\",\"type\":\"number\",\"default\":null,\"min\":0,\"max\":null,"
                 "\"min_exclusive\":true,\"max_exclusive\":false}");
}

void http_session_fields_describe(sbuf *b)
{
    training def;
    engine_training_defaults(&def);
    sbuf_puts(b, "[");
    for (size_t k = 0; k < ENGINE_TRAINING_N_FIELDS; k++) {
        const field_rule *fr = &field_rules[k];
        sbuf_printf(b, "%s{\"name\":\"%s\",\"type\":\"%s\",\"default\":", k ? "," : "", fr->name,
                    fr->integer ? "integer" : "number");
        if (k == F_WORKERS)
            sbuf_printf(b, "%u", def.workers);
        else if (k == F_MIN_WORKERS)
            sbuf_puts(b, "\"workers\""); /* min_workers follows workers until set */
        else
            sbuf_num(b, def.round_timeout, 0);
        sbuf_puts(b, ",\"min\":");
        sbuf_num(b, fr->lo, 0);
        if (fr->lo_open)
            sbuf_puts(b, ",\"min_exclusive\":true");
        sbuf_puts(b, ",\"max\":");
        sbuf_num(b, fr->hi, 0);
        sbuf_puts(b, "}");
    }
    sbuf_puts(b, "]");
}
