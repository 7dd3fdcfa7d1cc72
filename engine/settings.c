/* A change of a session's settings applied onto its current values: the
 * hyperparameters in the order the client gave them (driven by optim's
 * description table), the lr schedule, clipping and the round settings,
 * validated as a whole. The transport decodes the text; this file decides
 * what a value means for a given optimizer, so one function validates a
 * create, a PATCH, a fork and a stored configuration alike. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/names.h"
#include "engine/engineInt.h"

#define HP_NAMES_MAX 16 /* more than any optimizer has */

const char *const engine_training_fields[ENGINE_TRAINING_N_FIELDS] = {"workers", "min_workers", "round_timeout"};

void engine_settings_clear(engine_settings *d)
{
    free(d->items);
    d->items = NULL;
    d->n_items = 0;
}

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
    for (size_t k = 0; k < ENGINE_TRAINING_N_FIELDS; k++) {
        if (strcmp(name, engine_training_fields[k]) == 0) {
            snprintf(msg, msglen,
                     "\"%s\" is a session field, not a hyperparameter: put it beside \"hyperparams\", "
                     "at the top level of the body",
                     name);
            return OPTD_E_UNKNOWN_FIELD;
        }
    }
    char where[64];
    snprintf(where, sizeof where, "the hyperparams of %s", info->name);
    optd_unknown_name_msg(msg, msglen, "hyperparameter", name, where, names, n);
    return OPTD_E_UNKNOWN_FIELD;
}

static const char *type_words(optim_hp_type t)
{
    return t == OPTIM_HP_BOOL ? "true or false" : t == OPTIM_HP_PAIR ? "an array of two numbers" : "a number";
}

static optd_err deferred(const engine_settings *d, char *msg, size_t msglen)
{
    snprintf(msg, msglen, "%s", d->err_msg);
    return d->err_rc;
}

/* Sets the hyperparameter of item it onto hp, as info types it. */
static optd_err apply_item(const optim_info *info, const engine_settings *d, const engine_hp_item *it,
                           optim_hparams *hp, char *msg, size_t msglen)
{
    const optim_hp_desc *hd = it->name ? optim_hp_find(info, it->name) : NULL;
    if (!hd)
        return unknown_hparam(info, it->name ? it->name : d->unknown, msg, msglen);
    engine_val want = hd->type == OPTIM_HP_BOOL   ? ENGINE_VAL_BOOL
                      : hd->type == OPTIM_HP_PAIR ? ENGINE_VAL_PAIR
                                                  : ENGINE_VAL_NUMBER;
    if (it->type != want) {
        snprintf(msg, msglen, "hyperparameter '%s' must be %s", hd->name, type_words(hd->type));
        return OPTD_E_BAD_REQUEST;
    }
    optim_hp_set(hp, hd, 0, it->v[0]);
    if (want == ENGINE_VAL_PAIR)
        optim_hp_set(hp, hd, 1, it->v[1]);
    return OPTD_OK;
}

/* The hyperparameter items of d onto hp, in order, up to a deferred parse
 * error among them (it is reported where it stood, after the items before
 * it): the session's settings and a group's are read alike. */
static optd_err apply_items(const optim_info *info, const engine_settings *d, optim_hparams *hp, char *msg,
                            size_t msglen)
{
    size_t stop = d->err_phase == ENGINE_ERR_ITEMS && d->err_at < d->n_items ? d->err_at : d->n_items;
    for (size_t i = 0; i < stop; i++) {
        optd_err rc = apply_item(info, d, &d->items[i], hp, msg, msglen);
        if (rc)
            return rc;
    }
    if (d->err_phase == ENGINE_ERR_ITEMS)
        return deferred(d, msg, msglen);
    return OPTD_OK;
}

/* The session fields of d onto *tr, checked against the values they keep. */
static optd_err apply_fields(const engine_settings *d, training *tr, char *msg, size_t msglen)
{
    training t = *tr;
    if (d->set & ENGINE_SET_WORKERS)
        t.workers = d->workers;
    if (d->set & ENGINE_SET_MIN_WORKERS) {
        t.min_workers = d->min_workers;
        t.min_workers_follows = false;
    }
    if (d->set & ENGINE_SET_ROUND_TIMEOUT)
        t.round_timeout = d->round_timeout;
    if (d->set & ENGINE_SET_MIN_AUTO)
        t.min_workers_follows = true;
    if (t.min_workers_follows)
        t.min_workers = t.workers;
    if (t.min_workers > t.workers) {
        snprintf(msg, msglen, "min_workers (%u) cannot exceed workers (%u)", t.min_workers, t.workers);
        return OPTD_E_INVALID;
    }
    *tr = t;
    return OPTD_OK;
}

optd_err engine_settings_apply(const optim_info *info, const engine_settings *d, optim_hparams *hp, training *tr,
                               char *msg, size_t msglen)
{
    optd_err rc = apply_items(info, d, hp, msg, msglen);
    if (rc)
        return rc;
    if (d->set & ENGINE_SET_SCHED) {
        if (d->sched.type == SCHED_NONE)
            tr->sched.type = SCHED_NONE; /* null: the rest is kept, unused */
        else
            tr->sched = d->sched;
    }
    if (d->set & ENGINE_SET_CLIP) {
        tr->clip = d->clip;
        if (d->clip)
            tr->max_grad_norm = d->max_grad_norm;
    }
    if (optim_validate(info, hp, msg, msglen) != OPTIM_OK)
        return OPTD_E_BAD_HYPERPARAM;
    if (d->err_phase == ENGINE_ERR_FIELDS)
        return deferred(d, msg, msglen);
    return apply_fields(d, tr, msg, msglen);
}

optd_err engine_group_settings_apply(const optim_info *info, const engine_settings *d, int from_session,
                                     optim_hparams *hp, char *msg, size_t msglen)
{
    optd_err rc = apply_items(info, d, hp, msg, msglen);
    if (rc)
        return rc;
    if (!from_session && (d->set & (ENGINE_SET_SCHED | ENGINE_SET_CLIP))) {
        snprintf(msg, msglen,
                 "%s is session-wide, not a group's: put it in the session's \"hyperparams\" (the schedule's "
                 "factor multiplies each group's lr; clipping uses the norm of the whole gradient)",
                 d->set & ENGINE_SET_SCHED ? "lr_schedule" : "max_grad_norm");
        return OPTD_E_INVALID;
    }
    if (optim_validate(info, hp, msg, msglen) != OPTIM_OK)
        return OPTD_E_BAD_HYPERPARAM;
    return OPTD_OK;
}

optd_err engine_group_check(const optim_info *info, const optim_hparams *session, const optim_hparams *group,
                            char *msg, size_t msglen)
{
    if (info->kind == OPTIM_ADAGRAD && group->initial_accumulator_value != session->initial_accumulator_value) {
        snprintf(msg, msglen,
                 "initial_accumulator_value is the session's, not a group's: torch.optim.Adagrad takes it from its "
                 "constructor only and ignores a param group's; set it in the session's hyperparams");
        return OPTD_E_INVALID;
    }
    return OPTD_OK;
}
