/* A session shaped like a model (API.md "Tensors and parameter groups"):
 * named tensors with shapes, laid out in order in the flat vector, and the
 * parameter groups they belong to, each with its own hyperparameters. Plain
 * data, built tensor by tensor and checked as a whole; names are found by
 * binary search over a sorted index. */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/names.h"
#include "engine/engineInt.h"

void engine_shape_free(engine_shape *sh)
{
    if (!sh)
        return;
    for (size_t t = 0; t < sh->n_tensors; t++) {
        free(sh->tensors[t].name);
        free(sh->tensors[t].dims);
    }
    free(sh->tensors);
    free(sh->groups);
    free(sh->by_name);
    free(sh);
}

optd_err engine_shape_new(engine_shape **out)
{
    *out = calloc(1, sizeof **out);
    return *out ? OPTD_OK : OPTD_E_NOMEM;
}

/* The array arr (n elements of elem bytes, room for *cap) with room for one
 * more: arr itself, or moved into twice the room (first, the first time).
 * NULL when there is no memory, arr and *cap then as they were. The groups
 * and the tensors grow alike. */
static void *room(void *arr, size_t n, size_t *cap, size_t elem, size_t first)
{
    if (n < *cap)
        return arr;
    size_t c = *cap ? 2 * *cap : first;
    void *p = realloc(arr, c * elem);
    if (p)
        *cap = c;
    return p;
}

optd_err engine_shape_add_group(engine_shape *sh, const optim_hparams *hp, char *msg, size_t msglen)
{
    if (sh->n_groups == ENGINE_MAX_GROUPS)
        return optd_fail(msg, msglen, OPTD_E_INVALID, "a session has at most %d groups", ENGINE_MAX_GROUPS);
    engine_group *groups = room(sh->groups, sh->n_groups, &sh->cap_groups, sizeof *groups, 4);
    if (!groups)
        return OPTD_E_NOMEM;
    sh->groups = groups;
    engine_group *g = &sh->groups[sh->n_groups++];
    g->hp = *hp;
    g->first = sh->n_tensors;
    g->count = 0;
    return OPTD_OK;
}

int engine_tensor_name_valid(const char *s)
{
    size_t n = strlen(s);
    if (n < 1 || n > ENGINE_TENSOR_NAME_MAX)
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!isalnum(c) && c != '.' && c != '_' && c != '/' && c != '-')
            return 0;
    }
    return 1;
}

optd_err engine_shape_add_tensor(engine_shape *sh, const char *name, const uint64_t *dims, uint32_t ndim, char *msg,
                                 size_t msglen)
{
    if (!sh->n_groups)
        return OPTD_E_INTERNAL;
    if (sh->n_tensors == ENGINE_MAX_TENSORS)
        return optd_fail(msg, msglen, OPTD_E_INVALID, "a session has at most %d tensors", ENGINE_MAX_TENSORS);
    if (!engine_tensor_name_valid(name))
        return optd_fail(msg, msglen, OPTD_E_INVALID,
                         "tensor name \"%.64s\" is invalid: a tensor name matches [A-Za-z0-9._/-]{1,%d} "
                         "(as model.named_parameters() gives them, e.g. \"fc1.weight\")",
                         name, ENGINE_TENSOR_NAME_MAX);
    if (ndim > ENGINE_MAX_DIMS)
        return optd_fail(msg, msglen, OPTD_E_INVALID, "tensor \"%.64s\" has %u dimensions; at most %d", name, ndim,
                         ENGINE_MAX_DIMS);
    uint64_t n = 1;
    for (uint32_t k = 0; k < ndim; k++) {
        if (dims[k] < 1)
            return optd_fail(msg, msglen, OPTD_E_INVALID,
                             "tensor \"%.64s\": dimension %u is %llu; each dimension is a positive integer "
                             "([] is a scalar of one element)",
                             name, k, (unsigned long long)dims[k]);
        if (dims[k] > ENGINE_MAX_ELEMENTS || n * dims[k] > ENGINE_MAX_ELEMENTS)
            return optd_fail(msg, msglen, OPTD_E_INVALID, "tensor \"%.64s\" has more than %zu elements", name,
                             ENGINE_MAX_ELEMENTS);
        n *= dims[k];
    }
    if (sh->n + n > ENGINE_MAX_ELEMENTS)
        return optd_fail(msg, msglen, OPTD_E_INVALID, "the tensors have more than %zu elements in all",
                         ENGINE_MAX_ELEMENTS);
    engine_tensor *tensors = room(sh->tensors, sh->n_tensors, &sh->cap_tensors, sizeof *tensors, 8);
    if (!tensors)
        return OPTD_E_NOMEM;
    sh->tensors = tensors;
    engine_tensor *t = &sh->tensors[sh->n_tensors];
    memset(t, 0, sizeof *t);
    t->name = strdup(name);
    t->dims = malloc((ndim ? ndim : 1) * sizeof *t->dims);
    if (!t->name || !t->dims) {
        free(t->name);
        free(t->dims);
        return OPTD_E_NOMEM;
    }
    memcpy(t->dims, dims, ndim * sizeof *dims);
    t->ndim = ndim;
    t->off = sh->n;
    t->n = (size_t)n;
    t->group = (uint32_t)(sh->n_groups - 1);
    sh->n_tensors++;
    sh->groups[sh->n_groups - 1].count++;
    sh->n += (size_t)n;
    return OPTD_OK;
}

/* qsort has no context argument: the tensors being sorted, set for the
 * call (the writer and request threads each sort their own shapes, so it
 * is thread-local). */
static _Thread_local const engine_tensor *sorting;

static int by_name(const void *a, const void *b)
{
    return strcmp(sorting[*(const uint32_t *)a].name, sorting[*(const uint32_t *)b].name);
}

optd_err engine_shape_finish(engine_shape *sh, char *msg, size_t msglen)
{
    if (!sh->n_groups)
        return optd_fail(msg, msglen, OPTD_E_INVALID,
                         "groups must hold at least one group: [{\"tensors\": [{\"name\": ..., \"shape\": [...]}]}]");
    for (size_t g = 0; g < sh->n_groups; g++)
        if (!sh->groups[g].count)
            return optd_fail(msg, msglen, OPTD_E_INVALID,
                             "group %zu has no tensors: each group lists at least one {\"name\", \"shape\"}", g);
    free(sh->by_name);
    sh->by_name = malloc(sh->n_tensors * sizeof *sh->by_name);
    if (!sh->by_name)
        return OPTD_E_NOMEM;
    for (size_t t = 0; t < sh->n_tensors; t++)
        sh->by_name[t] = (uint32_t)t;
    sorting = sh->tensors;
    qsort(sh->by_name, sh->n_tensors, sizeof *sh->by_name, by_name);
    sorting = NULL;
    for (size_t k = 1; k < sh->n_tensors; k++) {
        const engine_tensor *a = &sh->tensors[sh->by_name[k - 1]], *b = &sh->tensors[sh->by_name[k]];
        if (strcmp(a->name, b->name) == 0) {
            uint32_t i = sh->by_name[k - 1] < sh->by_name[k] ? sh->by_name[k - 1] : sh->by_name[k];
            uint32_t j = sh->by_name[k - 1] ^ sh->by_name[k] ^ i;
            return optd_fail(msg, msglen, OPTD_E_INVALID,
                             "tensor name \"%.64s\" is given twice (tensors %u and %u, counting across groups); "
                             "tensor names are unique",
                             a->name, i, j);
        }
    }
    return OPTD_OK;
}

long engine_shape_find(const engine_shape *sh, const char *name)
{
    size_t lo = 0, hi = sh->n_tensors;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(sh->tensors[sh->by_name[mid]].name, name);
        if (c == 0)
            return (long)sh->by_name[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return -1;
}

void engine_shape_unknown_msg(const engine_shape *sh, const char *name, const char *where, char *msg, size_t msglen)
{
    /* The valid names, in order, as far as the message has room. */
    const char *names[64];
    size_t n = sh->n_tensors < 64 ? sh->n_tensors : 64;
    for (size_t t = 0; t < n; t++)
        names[t] = sh->tensors[t].name;
    const char *near = NULL;
    for (size_t t = 0; t < sh->n_tensors && !near; t += 64) {
        size_t k = sh->n_tensors - t < 64 ? sh->n_tensors - t : 64;
        const char *chunk[64];
        for (size_t i = 0; i < k; i++)
            chunk[i] = sh->tensors[t + i].name;
        near = optd_name_nearest(name, chunk, k);
    }
    if (near && sh->n_tensors > 64) {
        snprintf(msg, msglen, "unknown tensor \"%.64s\" in %s; did you mean \"%.64s\"? (the session has %zu tensors)",
                 name, where, near, sh->n_tensors);
        return;
    }
    optd_unknown_name_msg(msg, msglen, "tensor", name, where, names, n);
}

optd_err engine_shape_copy(const engine_shape *src, engine_shape **out)
{
    char msg[256];
    engine_shape *sh = NULL;
    optd_err rc = engine_shape_new(&sh);
    for (size_t g = 0; g < src->n_groups && !rc; g++) {
        rc = engine_shape_add_group(sh, &src->groups[g].hp, msg, sizeof msg);
        for (size_t t = src->groups[g].first; t < src->groups[g].first + src->groups[g].count && !rc; t++)
            rc = engine_shape_add_tensor(sh, src->tensors[t].name, src->tensors[t].dims, src->tensors[t].ndim, msg,
                                         sizeof msg);
    }
    if (!rc)
        rc = engine_shape_finish(sh, msg, sizeof msg);
    if (rc) {
        engine_shape_free(sh);
        sh = NULL;
    }
    *out = sh;
    return rc;
}
