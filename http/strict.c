/* Strict request bodies (API.md Conventions): every member of a request
 * object must be a field the contract defines there, else 422 unknown_field
 * naming it, with the nearest valid name when one is near (an edit distance
 * that tolerates a typo, case ignored) and the list of valid ones. */
#include <ctype.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "http/httpInt.h"

optd_err fields_known(const cJSON *o, const char *where, const char *const *names, size_t n, const cJSON **bad,
                      char *msg, size_t msglen)
{
    for (const cJSON *e = o ? o->child : NULL; e; e = e->next) {
        size_t k = 0;
        while (k < n && strcmp(e->string, names[k]) != 0)
            k++;
        if (k < n)
            continue;
        if (bad)
            *bad = e;
        optd_unknown_name_msg(msg, msglen, "field", e->string, where, names, n);
        return OPTD_E_UNKNOWN_FIELD;
    }
    return OPTD_OK;
}

int hparam_name_anywhere(const char *name)
{
    if (strcmp(name, "lr_schedule") == 0 || strcmp(name, "max_grad_norm") == 0)
        return 1;
    for (size_t k = 0; k < OPTIM_KIND_COUNT; k++)
        if (optim_hp_find(optim_at(k), name))
            return 1;
    return 0;
}

optd_err body_fields_known(const cJSON *o, const char *where, const char *const *names, size_t n, int hp_hint,
                           char *msg, size_t msglen)
{
    const cJSON *bad = NULL;
    optd_err rc = fields_known(o, where, names, n, &bad, msg, msglen);
    if (rc == OPTD_OK || !hparam_name_anywhere(bad->string) || optd_name_nearest(bad->string, names, n))
        return rc;
    if (hp_hint == HINT_PATCH)
        snprintf(msg, msglen,
                 "\"%.64s\" is a hyperparameter, not a field of %s: change it with PATCH "
                 "/v1/sessions/{name} and the body {\"hyperparams\": {\"%.64s\": ...}}",
                 bad->string, where, bad->string);
    else
        snprintf(msg, msglen,
                 "\"%.64s\" is a hyperparameter, not a field of %s: put it inside \"hyperparams\", "
                 "as {\"hyperparams\": {\"%.64s\": ...}}",
                 bad->string, where, bad->string);
    return rc;
}
