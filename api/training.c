/* The training features beyond torch.optim that a session carries: the
 * learning-rate schedule (closed forms of torch.optim.lr_scheduler, with
 * optional warmup), gradient clipping (clip_grad_norm_) and the worker-round
 * settings; their JSON forms and validation. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "api/internal.h"

static const char *const sched_names[] = {
    [SCHED_NONE] = "none",          [SCHED_STEP] = "step",     [SCHED_MULTISTEP] = "multistep",
    [SCHED_EXPONENTIAL] = "exponential", [SCHED_COSINE] = "cosine", [SCHED_LINEAR] = "linear",
};

const char *const training_fields[TRAINING_N_FIELDS] = {"workers", "min_workers", "round_timeout"};

void training_defaults(training *tr)
{
    memset(tr, 0, sizeof *tr);
    tr->workers = 1;
    tr->round_timeout = 60;
}

uint32_t training_min_workers(const training *tr) { return tr->min_workers ? tr->min_workers : tr->workers; }

double training_lr(const training *tr, double lr, uint64_t steps_done)
{
    const schedule *s = &tr->sched;
    double t = (double)steps_done;
    if (s->type == SCHED_NONE)
        return lr;
    if (steps_done < s->warmup_steps)
        return lr * ((t + 1) / (double)s->warmup_steps);
    t -= (double)s->warmup_steps;
    switch (s->type) {
    case SCHED_STEP:
        return lr * pow(s->gamma, floor(t / s->step_size));
    case SCHED_MULTISTEP: {
        size_t k = 0; /* bisect_right: milestones <= t */
        while (k < s->n_milestones && s->milestones[k] <= t)
            k++;
        return lr * pow(s->gamma, (double)k);
    }
    case SCHED_EXPONENTIAL:
        return lr * pow(s->gamma, t);
    case SCHED_COSINE:
        return s->eta_min + (lr - s->eta_min) * (1 + cos(M_PI * t / s->T_max)) / 2;
    case SCHED_LINEAR:
        return lr * (s->start_factor +
                     (s->end_factor - s->start_factor) * fmin(s->total_iters, t) / s->total_iters);
    default:
        return lr;
    }
}

/* Reads member name of o as a number into *out when present; checks it lies
 * in [lo, hi] (integral when whole). Returns OPTD_OK, OPTD_E_BAD_REQUEST
 * (not a number) or OPTD_E_BAD_HYPERPARAM. */
static optd_err num(const cJSON *o, const char *name, double *out, double lo, double hi, int whole,
                    int required, char *msg, size_t msglen)
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

static optd_err schedule_from_json(const cJSON *o, schedule *out, char *msg, size_t msglen)
{
    schedule s = {0};
    optd_err rc;
    double warmup = 0;
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(o, "type");
    if (!cJSON_IsString(type)) {
        snprintf(msg, msglen, "lr_schedule.type must be one of step, multistep, exponential, cosine, linear");
        return type ? OPTD_E_BAD_REQUEST : OPTD_E_BAD_HYPERPARAM;
    }
    for (int k = SCHED_STEP; k <= SCHED_LINEAR; k++)
        if (strcmp(type->valuestring, sched_names[k]) == 0)
            s.type = (sched_type)k;
    if (s.type == SCHED_NONE) {
        const char *near = name_nearest(type->valuestring, sched_names + SCHED_STEP, SCHED_LINEAR);
        snprintf(msg, msglen, "lr_schedule.type \"%.32s\" is not one of step, multistep, exponential, cosine, linear%s%s%s",
                 type->valuestring, near ? "; did you mean \"" : "", near ? near : "", near ? "\"?" : "");
        return OPTD_E_BAD_HYPERPARAM;
    }
    static const char *const allowed[][5] = {
        [SCHED_STEP] = {"step_size", "gamma"},
        [SCHED_MULTISTEP] = {"milestones", "gamma"},
        [SCHED_EXPONENTIAL] = {"gamma"},
        [SCHED_COSINE] = {"T_max", "eta_min"},
        [SCHED_LINEAR] = {"start_factor", "end_factor", "total_iters"},
    };
    const char *valid[7] = {"type"};
    size_t nvalid = 1;
    for (int k = 0; k < 5 && allowed[s.type][k]; k++)
        valid[nvalid++] = allowed[s.type][k];
    valid[nvalid++] = "warmup_steps";
    char where[48];
    snprintf(where, sizeof where, "an lr_schedule of type %s", sched_names[s.type]);
    rc = fields_known(o, where, valid, nvalid, NULL, msg, msglen);
    if (rc)
        return rc;
    s.gamma = 0.1;
    s.start_factor = 1.0 / 3;
    s.end_factor = 1.0;
    s.total_iters = 5;
    switch (s.type) {
    case SCHED_STEP:
        rc = num(o, "step_size", &s.step_size, 1, BIG, 1, 1, msg, msglen);
        if (!rc)
            rc = num(o, "gamma", &s.gamma, 0, INFINITY, 0, 0, msg, msglen);
        break;
    case SCHED_MULTISTEP: {
        const cJSON *m = cJSON_GetObjectItemCaseSensitive(o, "milestones");
        rc = num(o, "gamma", &s.gamma, 0, INFINITY, 0, 0, msg, msglen);
        if (rc)
            break;
        if (!cJSON_IsArray(m)) {
            snprintf(msg, msglen, "lr_schedule.milestones must be an array of step numbers");
            rc = m ? OPTD_E_BAD_REQUEST : OPTD_E_BAD_HYPERPARAM;
            break;
        }
        for (const cJSON *e = m->child; e; e = e->next) {
            if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble > BIG ||
                e->valuedouble != floor(e->valuedouble) || s.n_milestones == SCHED_MAX_MILESTONES ||
                (s.n_milestones && e->valuedouble <= s.milestones[s.n_milestones - 1])) {
                snprintf(msg, msglen, "lr_schedule.milestones must be at most %d increasing non-negative integers",
                         SCHED_MAX_MILESTONES);
                rc = OPTD_E_BAD_HYPERPARAM;
                break;
            }
            s.milestones[s.n_milestones++] = e->valuedouble;
        }
        break;
    }
    case SCHED_EXPONENTIAL:
        rc = num(o, "gamma", &s.gamma, 0, INFINITY, 0, 1, msg, msglen);
        break;
    case SCHED_COSINE:
        rc = num(o, "T_max", &s.T_max, 1, BIG, 0, 1, msg, msglen);
        if (!rc)
            rc = num(o, "eta_min", &s.eta_min, 0, INFINITY, 0, 0, msg, msglen);
        break;
    default: /* SCHED_LINEAR */
        rc = num(o, "start_factor", &s.start_factor, 0, 1, 0, 0, msg, msglen);
        if (!rc)
            rc = num(o, "end_factor", &s.end_factor, 0, 1, 0, 0, msg, msglen);
        if (!rc)
            rc = num(o, "total_iters", &s.total_iters, 1, BIG, 1, 0, msg, msglen);
        if (!rc && s.start_factor == 0) {
            snprintf(msg, msglen, "lr_schedule.start_factor must be > 0");
            rc = OPTD_E_BAD_HYPERPARAM;
        }
        break;
    }
    if (!rc && (s.type == SCHED_STEP || s.type == SCHED_MULTISTEP || s.type == SCHED_EXPONENTIAL) &&
        !(s.gamma > 0)) {
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

optd_err training_hparam_from_json(const cJSON *e, training *tr, int *handled, char *msg, size_t msglen)
{
    *handled = 1;
    if (strcmp(e->string, "lr_schedule") == 0) {
        if (cJSON_IsNull(e)) {
            tr->sched.type = SCHED_NONE;
            return OPTD_OK;
        }
        if (!cJSON_IsObject(e)) {
            snprintf(msg, msglen, "lr_schedule must be an object or null");
            return OPTD_E_BAD_REQUEST;
        }
        return schedule_from_json(e, &tr->sched, msg, msglen);
    }
    if (strcmp(e->string, "max_grad_norm") == 0) {
        if (cJSON_IsNull(e)) {
            tr->clip = false;
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
        tr->clip = true;
        tr->max_grad_norm = e->valuedouble;
        return OPTD_OK;
    }
    *handled = 0;
    return OPTD_OK;
}

void training_hparams_to_json(sbuf *b, const training *tr)
{
    const schedule *s = &tr->sched;
    sbuf_puts(b, ",\"lr_schedule\":");
    if (s->type == SCHED_NONE) {
        sbuf_puts(b, "null");
    } else {
        sbuf_printf(b, "{\"type\":\"%s\"", sched_names[s->type]);
        switch (s->type) {
        case SCHED_STEP:
            sbuf_printf(b, ",\"step_size\":%.0f,\"gamma\":", s->step_size);
            sbuf_num(b, s->gamma, 0);
            break;
        case SCHED_MULTISTEP:
            sbuf_puts(b, ",\"milestones\":[");
            for (size_t i = 0; i < s->n_milestones; i++)
                sbuf_printf(b, "%s%.0f", i ? "," : "", s->milestones[i]);
            sbuf_puts(b, "],\"gamma\":");
            sbuf_num(b, s->gamma, 0);
            break;
        case SCHED_EXPONENTIAL:
            sbuf_puts(b, ",\"gamma\":");
            sbuf_num(b, s->gamma, 0);
            break;
        case SCHED_COSINE:
            sbuf_puts(b, ",\"T_max\":");
            sbuf_num(b, s->T_max, 0);
            sbuf_puts(b, ",\"eta_min\":");
            sbuf_num(b, s->eta_min, 0);
            break;
        default:
            sbuf_puts(b, ",\"start_factor\":");
            sbuf_num(b, s->start_factor, 0);
            sbuf_puts(b, ",\"end_factor\":");
            sbuf_num(b, s->end_factor, 0);
            sbuf_printf(b, ",\"total_iters\":%.0f", s->total_iters);
            break;
        }
        sbuf_printf(b, ",\"warmup_steps\":%llu}", (unsigned long long)s->warmup_steps);
    }
    sbuf_puts(b, ",\"max_grad_norm\":");
    if (tr->clip)
        sbuf_num(b, tr->max_grad_norm, 0);
    else
        sbuf_puts(b, "null");
}

optd_err training_fields_from_json(const cJSON *o, training *tr, char *msg, size_t msglen)
{
    training t = *tr;
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
            snprintf(msg, msglen, "%s must be an integer", k ? "min_workers" : "workers");
            return OPTD_E_BAD_REQUEST;
        }
        if (e->valuedouble < 1 || e->valuedouble > 100000 || e->valuedouble != floor(e->valuedouble)) {
            snprintf(msg, msglen, "%s must be an integer from 1 to 100000", k ? "min_workers" : "workers");
            return OPTD_E_INVALID;
        }
        if (k)
            t.min_workers = (uint32_t)e->valuedouble;
        else
            t.workers = (uint32_t)e->valuedouble;
    }
    if (rt) {
        if (!cJSON_IsNumber(rt)) {
            snprintf(msg, msglen, "round_timeout must be a number of seconds");
            return OPTD_E_BAD_REQUEST;
        }
        if (!(rt->valuedouble > 0) || rt->valuedouble > 86400 * 7) {
            snprintf(msg, msglen, "round_timeout must be > 0 and at most a week (in seconds)");
            return OPTD_E_INVALID;
        }
        t.round_timeout = rt->valuedouble;
    }
    /* Stored configs mark a min_workers that follows workers (the default). */
    if (cJSON_IsTrue(automin) && m && w && m->valuedouble == w->valuedouble)
        t.min_workers = 0;
    if (t.min_workers > t.workers) {
        snprintf(msg, msglen, "min_workers (%u) cannot exceed workers (%u)", t.min_workers, t.workers);
        return OPTD_E_INVALID;
    }
    *tr = t;
    return OPTD_OK;
}

void training_fields_to_json(sbuf *b, const training *tr)
{
    sbuf_printf(b, ",\"workers\":%u,\"min_workers\":%u,\"round_timeout\":", tr->workers, training_min_workers(tr));
    sbuf_num(b, tr->round_timeout, 0);
    /* min_workers follows workers until set: say so, so it survives a reload. */
    if (!tr->min_workers)
        sbuf_puts(b, ",\"min_workers_auto\":true");
}
