/* Binary checkpoints as safetensors files (API.md "Binary checkpoints";
 * the format: an 8-byte little-endian header length N, N bytes of JSON
 * header, then the tensors' bytes, each tensor a [begin, end) range of them,
 * contiguous, no holes). A session's file holds tensor "params" and one per
 * used state buffer, in the session's dtype, laid out as the session's blob
 * (so the data is the blob itself, streamed without a copy); the rest of the
 * checkpoint is __metadata__: each member of the JSON checkpoint as a
 * string, strings as they are and other values as JSON text. A shaped
 * session's file holds each tensor under its own name and shape instead:
 * params/<tensor> and <buffer>/<tensor>, and its step count step/<tensor>
 * (I64, a scalar) and scalar state (mu_product/<tensor>, F64), in the same
 * order as the blob, so the data is still the blob. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http/httpInt.h"

#define ST_HEADER_MAX ((uint64_t)16 << 20)

static const char *st_dtype(optim_dtype d) { return d == OPTIM_F64 ? "F64" : "F32"; }

/* The members whose metadata value is a plain string, not JSON text. */
static int string_member(const char *k)
{
    return strcmp(k, "name") == 0 || strcmp(k, "optimizer") == 0 || strcmp(k, "dtype") == 0;
}

/* One header entry: ,"<prefix>/<tensor>":{"dtype", "shape", "data_offsets"}. */
static void entry(sbuf *h, const char *prefix, const engine_tensor *t, const char *dtype, int scalar, size_t begin,
                  size_t end)
{
    sbuf_put(h, ",", 1);
    sbuf b = {0};
    sbuf_printf(&b, "%s/%s", prefix, t->name);
    sbuf_json_str(h, b.p ? b.p : "");
    h->oom |= b.oom;
    sbuf_free(&b);
    sbuf_printf(h, ":{\"dtype\":\"%s\",\"shape\":[", dtype);
    for (uint32_t k = 0; !scalar && k < t->ndim; k++)
        sbuf_printf(h, "%s%llu", k ? "," : "", (unsigned long long)t->dims[k]);
    sbuf_printf(h, "],\"data_offsets\":[%zu,%zu]}", begin, end);
}

/* The entries of a shaped session, in blob order. */
static void shaped_entries(sbuf *h, const sess *s)
{
    const engine_shape *sh = s->shape;
    size_t es = optim_elem_size(s->dtype), vec = s->n * es, base = vec, T = sh->n_tensors;
    for (size_t t = 0; t < T; t++)
        entry(h, "params", &sh->tensors[t], st_dtype(s->dtype), 0, sh->tensors[t].off * es,
              (sh->tensors[t].off + sh->tensors[t].n) * es);
    for (size_t i = 0; i < s->info->n_buffers; i++) {
        if (!s->st.buf[i])
            continue;
        for (size_t t = 0; t < T; t++)
            entry(h, s->info->buffers[i], &sh->tensors[t], st_dtype(s->dtype), 0, base + sh->tensors[t].off * es,
                  base + (sh->tensors[t].off + sh->tensors[t].n) * es);
        base += vec;
    }
    for (size_t t = 0; t < T; t++)
        entry(h, "step", &sh->tensors[t], "I64", 1, base + 8 * t, base + 8 * t + 8);
    base += 8 * T;
    for (size_t t = 0; s->info->scalar && t < T; t++)
        entry(h, s->info->scalar, &sh->tensors[t], "F64", 1, base + 8 * t, base + 8 * t + 8);
}

optd_err st_header(const sess *s, sbuf *out)
{
    optd_err rc = OPTD_E_NOMEM;
    sbuf head = {0}, h = {0};
    cJSON *obj = NULL;
    /* The checkpoint's fields, from the one writer of them. */
    sess_head_to_json(&head, s);
    if (head.oom || !(obj = cJSON_Parse(head.p)))
        goto done;
    sbuf_puts(&h, "{\"__metadata__\":{");
    const char *sep = "";
    for (const cJSON *e = obj->child; e; e = e->next) {
        sbuf_puts(&h, sep);
        sbuf_json_str(&h, e->string);
        sbuf_put(&h, ":", 1);
        if (cJSON_IsString(e)) {
            sbuf_json_str(&h, e->valuestring);
        } else {
            char *txt = cJSON_PrintUnformatted(e);
            if (!txt)
                goto done;
            sbuf_json_str(&h, txt);
            cJSON_free(txt);
        }
        sep = ",";
    }
    if (s->info->scalar && !s->shape) {
        sbuf_puts(&h, ",\"state\":");
        sbuf b = {0};
        sbuf_printf(&b, "{\"%s\":", s->info->scalar);
        sbuf_num(&b, s->st.scalar, 0);
        sbuf_puts(&b, "}");
        sbuf_json_str(&h, b.p ? b.p : "{}");
        int oom = b.oom;
        sbuf_free(&b);
        if (oom)
            goto done;
    }
    sbuf_puts(&h, "}");
    size_t vec = s->n * optim_elem_size(s->dtype), off = 0;
    if (s->shape) {
        shaped_entries(&h, s);
    } else {
        sbuf_printf(&h, ",\"params\":{\"dtype\":\"%s\",\"shape\":[%zu],\"data_offsets\":[0,%zu]}", st_dtype(s->dtype),
                    s->n, vec);
        off = vec;
        for (size_t i = 0; i < s->info->n_buffers; i++) {
            if (!s->st.buf[i])
                continue;
            sbuf_printf(&h, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%zu],\"data_offsets\":[%zu,%zu]}",
                        s->info->buffers[i], st_dtype(s->dtype), s->n, off, off + vec);
            off += vec;
        }
    }
    sbuf_puts(&h, "}");
    /* Padded with spaces so the tensors start 8-byte aligned, as the
     * reference writer does. */
    while ((h.len + 8) % 8)
        sbuf_put(&h, " ", 1);
    if (h.oom)
        goto done;
    unsigned char len8[8];
    uint64_t n = h.len;
    for (int i = 0; i < 8; i++)
        len8[i] = (unsigned char)(n >> (8 * i));
    sbuf_put(out, (const char *)len8, 8);
    sbuf_put(out, h.p, h.len);
    rc = out->oom ? OPTD_E_NOMEM : OPTD_OK;
done:
    cJSON_Delete(obj);
    sbuf_free(&head);
    sbuf_free(&h);
    return rc;
}

size_t st_data_len(const sess *s) { return s->blob_len - sizeof(double); }

/* ---- Reading --------------------------------------------------------- */

typedef struct st_tensor {
    char name[JB_KEY_MAX];
    void *dst;
    uint64_t begin, end;
    size_t count; /* elements of the session's dtype to check finite; 0 for a step or scalar */
} st_tensor;

/* What a shaped session's tensor name may start with, besides buffers. */
enum { K_PARAMS = OPTIM_MAX_BUFFERS, K_STEP, K_SCALAR, K_COUNT };

struct st_reader {
    char name[STORE_NAME_MAX + 1]; /* of the session to make */
    size_t max_bytes;              /* --max-session-bytes */
    unsigned char len8[8];
    size_t have8;
    uint64_t hlen;
    sbuf header;
    sess *s; /* made once the header is read */
    st_tensor *t;
    size_t nt;
    unsigned present;
    uint64_t data_len, pos, total;
    optd_err rc;
    char msg[256];
};

static void rfail(st_reader *r, optd_err rc, const char *fmt, const char *a, const char *b)
{
    if (r->rc)
        return;
    r->rc = rc;
    snprintf(r->msg, sizeof r->msg, fmt, a, b);
}

st_reader *st_reader_new(const char *name, size_t max_bytes)
{
    st_reader *r = calloc(1, sizeof *r);
    if (r) {
        snprintf(r->name, sizeof r->name, "%s", name);
        r->max_bytes = max_bytes;
    }
    return r;
}

void st_reader_free(st_reader *r)
{
    if (!r)
        return;
    engine_sess_free(r->s);
    sbuf_free(&r->header);
    free(r->t);
    free(r);
}

/* The checkpoint object that __metadata__ stands for, with "params": [] so
 * that it reads like a JSON checkpoint. */
static optd_err meta_to_checkpoint(const cJSON *meta, cJSON **out, char *msg, size_t msglen)
{
    cJSON *o = cJSON_CreateObject();
    if (!o)
        return OPTD_E_NOMEM;
    *out = o;
    if (meta && !cJSON_IsObject(meta))
        return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "__metadata__ must be an object of strings");
    for (const cJSON *e = meta ? meta->child : NULL; e; e = e->next) {
        if (!cJSON_IsString(e))
            return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST,
                             "__metadata__.%.64s must be a string (safetensors metadata is strings)", e->string);
        if (strcmp(e->string, "format") == 0)
            continue; /* "pt", "np": what writers note of themselves */
        cJSON *v = NULL;
        if (string_member(e->string) && e->valuestring[0] != '"')
            v = cJSON_CreateString(e->valuestring);
        else if (!(v = cJSON_Parse(e->valuestring)))
            return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "__metadata__.%.64s is not JSON text", e->string);
        if (!v || !cJSON_AddItemToObject(o, e->string, v)) {
            cJSON_Delete(v);
            return OPTD_E_NOMEM;
        }
    }
    if (!cJSON_AddItemToObject(o, "params", cJSON_CreateArray()))
        return OPTD_E_NOMEM;
    return OPTD_OK;
}

/* Reads one tensor's entry: dtype, a shape of one dimension n, offsets. */
/* The two kinds of entry (a flat session's, a shaped one's) are read by
 * these two steps, around the check of the shape, which differs: first the
 * members and the dtype (is names what dtype must be, for the message)... */
static optd_err entry_head(const cJSON *e, const char *dtype, const char *is, const cJSON **shape, char *msg,
                           size_t msglen)
{
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *off = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    *shape = cJSON_GetObjectItemCaseSensitive(e, "shape");
    if (!cJSON_IsObject(e) || !cJSON_IsString(dt) || !cJSON_IsArray(*shape) || !cJSON_IsArray(off) ||
        cJSON_GetArraySize(off) != 2 || !cJSON_IsNumber(off->child) || !cJSON_IsNumber(off->child->next))
        return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "tensor %.64s needs dtype, shape and data_offsets",
                         e->string);
    if (strcmp(dt->valuestring, dtype) != 0)
        return optd_fail(msg, msglen, OPTD_E_INVALID, "tensor %.64s is %.8s; %s %s", e->string, dt->valuestring, is,
                         dtype);
    return OPTD_OK;
}

/* ... then the data_offsets (entry_head checked they are two numbers). */
static optd_err entry_offsets(const cJSON *e, uint64_t *begin, uint64_t *end, char *msg, size_t msglen)
{
    const cJSON *off = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    double b = off->child->valuedouble, d = off->child->next->valuedouble;
    if (b < 0 || d < b || d > 9007199254740992.0)
        return optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "tensor %.64s has bad data_offsets", e->string);
    *begin = (uint64_t)b;
    *end = (uint64_t)d;
    return OPTD_OK;
}

static optd_err tensor_entry(const cJSON *e, const char *dtype, uint64_t *n, uint64_t *begin, uint64_t *end, char *msg,
                             size_t msglen)
{
    const cJSON *shape;
    optd_err rc = entry_head(e, dtype, "the session's tensors are", &shape, msg, msglen);
    if (rc)
        return rc;
    if (cJSON_GetArraySize(shape) != 1 || !cJSON_IsNumber(shape->child) || shape->child->valuedouble < 0)
        return optd_fail(msg, msglen, OPTD_E_INVALID,
                         "tensor %.64s must have one dimension (the session is a flat vector)", e->string);
    if ((rc = entry_offsets(e, begin, end, msg, msglen)))
        return rc;
    *n = (uint64_t)shape->child->valuedouble;
    return OPTD_OK;
}

static int by_begin(const void *a, const void *b)
{
    const st_tensor *x = a, *y = b;
    return x->begin < y->begin ? -1 : x->begin > y->begin;
}

/* The byte buffer is indexed whole, without holes or overlaps. */
static optd_err check_cover(st_reader *r)
{
    qsort(r->t, r->nt, sizeof r->t[0], by_begin);
    uint64_t at = 0;
    for (size_t i = 0; i < r->nt; i++) {
        if (r->t[i].begin != at) {
            snprintf(r->msg, sizeof r->msg,
                     "tensor %.64s starts at byte %llu of the data, not %llu: the tensors must cover it "
                     "without holes or overlaps",
                     r->t[i].name, (unsigned long long)r->t[i].begin, (unsigned long long)at);
            return OPTD_E_BAD_REQUEST;
        }
        at = r->t[i].end;
    }
    r->data_len = at;
    return OPTD_OK;
}

/* Reads a shaped session's entry e (dtype, shape, offsets): of dtype, and
 * of t's shape (or a scalar, shape []). */
static optd_err shaped_entry(const cJSON *e, const char *dtype, const engine_tensor *t, int scalar, uint64_t *begin,
                             uint64_t *end, char *msg, size_t msglen)
{
    const cJSON *shape;
    optd_err rc = entry_head(e, dtype, "it must be", &shape, msg, msglen);
    if (rc)
        return rc;
    uint32_t nd = scalar ? 0 : t->ndim, k = 0;
    int same = cJSON_GetArraySize(shape) == (int)nd;
    for (const cJSON *d = shape->child; d && same; d = d->next, k++)
        same = cJSON_IsNumber(d) && d->valuedouble == (double)t->dims[k];
    if (!same)
        return optd_fail(msg, msglen, OPTD_E_INVALID, "tensor %.64s must have the shape of %.64s in the groups%s",
                         e->string, t->name, scalar ? " ([]: one number per tensor)" : "");
    return entry_offsets(e, begin, end, msg, msglen);
}

/* Maps the entries of a shaped session's file (params/<tensor>,
 * <buffer>/<tensor>, step/<tensor>, <scalar>/<tensor>) into r->s. Every
 * params/<tensor> must be there; a buffer is there for every tensor or
 * for none (present); a step not given is the session's, a scalar not
 * given is decided by ckpt_finish. */
static optd_err read_shaped(st_reader *r, const cJSON *hdr, const char *dtype)
{
    char *msg = r->msg;
    size_t msglen = sizeof r->msg;
    sess *s = r->s;
    const engine_shape *sh = s->shape;
    const size_t T = sh->n_tensors, es = optim_elem_size(s->dtype);
    size_t count[K_COUNT] = {0}, entries = 0;
    unsigned char *seen = calloc(K_COUNT * T, 1);
    optd_err rc = OPTD_E_NOMEM;
    for (const cJSON *t = hdr->child; t; t = t->next)
        entries++;
    if (!seen || !(r->t = calloc(entries ? entries : 1, sizeof *r->t)))
        goto done;
    for (const cJSON *e = hdr->child; e; e = e->next) {
        if (strcmp(e->string, "__metadata__") == 0)
            continue;
        const char *slash = strchr(e->string, '/');
        size_t plen = slash ? (size_t)(slash - e->string) : 0;
        int kind = -1;
        if (slash && plen == 6 && strncmp(e->string, "params", 6) == 0)
            kind = K_PARAMS;
        else if (slash && plen == 4 && strncmp(e->string, "step", 4) == 0)
            kind = K_STEP;
        else if (slash && s->info->scalar && plen == strlen(s->info->scalar) &&
                 strncmp(e->string, s->info->scalar, plen) == 0)
            kind = K_SCALAR;
        for (size_t i = 0; slash && kind < 0 && i < s->info->n_buffers; i++)
            if (plen == strlen(s->info->buffers[i]) && strncmp(e->string, s->info->buffers[i], plen) == 0)
                kind = (int)i;
        if (kind < 0) {
            rc = optd_fail(msg, msglen, OPTD_E_UNKNOWN_FIELD,
                           "tensor \"%.64s\" is not one of a checkpoint with groups: params/<tensor>, "
                           "<buffer>/<tensor> (the buffers of %s), step/<tensor>%s%s",
                           e->string, s->info->name, s->info->scalar ? ", " : "",
                           s->info->scalar ? "mu_product/<tensor>" : "");
            goto done;
        }
        long ti = engine_shape_find(sh, slash + 1);
        if (ti < 0) {
            engine_shape_unknown_msg(sh, slash + 1, "the safetensors file", msg, msglen);
            rc = OPTD_E_INVALID;
            goto done;
        }
        if (kind < OPTIM_MAX_BUFFERS && !s->st.buf[kind]) {
            rc = optd_fail(msg, msglen, OPTD_E_INVALID, "%.64s is not a buffer of this %s configuration",
                           s->info->buffers[kind], s->info->name);
            goto done;
        }
        if (seen[kind * T + (size_t)ti]++) {
            rc = optd_fail(msg, msglen, OPTD_E_BAD_REQUEST, "tensor %.64s appears twice", e->string);
            goto done;
        }
        const engine_tensor *x = &sh->tensors[ti];
        st_tensor *st = &r->t[r->nt];
        int scalar = kind == K_STEP || kind == K_SCALAR;
        rc = shaped_entry(e, kind == K_STEP ? "I64" : kind == K_SCALAR ? "F64" : dtype, x, scalar, &st->begin,
                          &st->end, msg, msglen);
        if (rc)
            goto done;
        size_t bytes = scalar ? 8 : x->n * es;
        if (st->end - st->begin != bytes) {
            rc = optd_fail(msg, msglen, OPTD_E_SIZE_MISMATCH, "tensor %.64s has %llu bytes; it needs %zu", e->string,
                           (unsigned long long)(st->end - st->begin), bytes);
            goto done;
        }
        unsigned char *tail = s->tstate;
        if (kind == K_PARAMS)
            st->dst = (unsigned char *)s->st.params + x->off * es;
        else if (kind == K_STEP)
            st->dst = tail + 8 * (size_t)ti;
        else if (kind == K_SCALAR)
            st->dst = tail + 8 * T + 8 * (size_t)ti;
        else
            st->dst = (unsigned char *)s->st.buf[kind] + x->off * es;
        st->count = scalar ? 0 : x->n;
        snprintf(st->name, sizeof st->name, "%s", e->string);
        count[kind]++;
        r->nt++;
    }
    rc = OPTD_E_INVALID;
    for (size_t t = 0; t < T; t++)
        if (!seen[K_PARAMS * T + t]) {
            snprintf(msg, msglen, "tensor params/%.200s is missing", sh->tensors[t].name);
            goto done;
        }
    for (size_t i = 0; i < OPTIM_MAX_BUFFERS; i++) {
        if (count[i] == T) {
            r->present |= 1u << i;
        } else if (count[i]) {
            for (size_t t = 0; t < T; t++)
                if (!seen[i * T + t]) {
                    snprintf(msg, msglen, "tensor %s/%.160s is missing (a buffer is given for every tensor or none)",
                             s->info->buffers[i], sh->tensors[t].name);
                    goto done;
                }
        }
    }
    rc = check_cover(r);
done:
    free(seen);
    return rc;
}

/* The header has arrived: make the session it describes and map each
 * tensor's byte range into it. */
static optd_err read_header(st_reader *r)
{
    cJSON *hdr = NULL, *ck = NULL;
    char *msg = r->msg;
    size_t msglen = sizeof r->msg;
    optd_err rc = json_parse_object(r->header.p ? r->header.p : "", r->header.len, "", &hdr, msg, msglen);
    if (rc == OPTD_E_BAD_JSON)
        snprintf(msg, msglen, "the safetensors header is not valid JSON");
    if (rc)
        goto done;
    const cJSON *params = cJSON_GetObjectItemCaseSensitive(hdr, "params");
    if ((rc = meta_to_checkpoint(cJSON_GetObjectItemCaseSensitive(hdr, "__metadata__"), &ck, msg, msglen)))
        goto done;
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(ck, "dtype");
    const char *dtype = cJSON_IsString(dt) && strcmp(dt->valuestring, "float64") == 0 ? "F64" : "F32";
    rc = OPTD_E_INVALID;
    if (!params && cJSON_GetObjectItemCaseSensitive(ck, "groups")) {
        /* Shaped: the groups in the metadata give the size. */
        if ((rc = ckpt_begin(r->name, ck, SIZE_MAX, r->max_bytes, NULL, &r->s, msg, msglen)))
            goto done;
        rc = read_shaped(r, hdr, dtype);
        goto done;
    }
    if (!params) {
        snprintf(msg, msglen, "the file has no tensor \"params\"");
        goto done;
    }
    uint64_t n, b, e;
    if ((rc = tensor_entry(params, dtype, &n, &b, &e, msg, msglen)))
        goto done;
    if ((rc = ckpt_begin(r->name, ck, (size_t)n, r->max_bytes, NULL, &r->s, msg, msglen)))
        goto done;
    if (r->s->shape) {
        snprintf(msg, msglen,
                 "a checkpoint with groups stores each tensor as params/<tensor> (and <buffer>/<tensor>), not one "
                 "flat \"params\"");
        rc = OPTD_E_INVALID;
        goto done;
    }
    if (!(r->t = calloc(OPTIM_MAX_BUFFERS + 1, sizeof *r->t))) {
        rc = OPTD_E_NOMEM;
        goto done;
    }
    size_t es = optim_elem_size(r->s->dtype);
    for (const cJSON *t = hdr->child; t; t = t->next) {
        if (strcmp(t->string, "__metadata__") == 0)
            continue;
        rc = OPTD_E_BAD_REQUEST;
        if (r->nt == OPTIM_MAX_BUFFERS + 1) {
            snprintf(msg, msglen, "the file has more tensors than params and %s's buffers", r->s->info->name);
            goto done;
        }
        for (size_t i = 0; i < r->nt; i++)
            if (strcmp(r->t[i].name, t->string) == 0) {
                snprintf(msg, msglen, "tensor %.64s appears twice", t->string);
                goto done;
            }
        uint64_t tn;
        st_tensor *x = &r->t[r->nt];
        if ((rc = ckpt_target(r->s, t->string, &x->dst, msg, msglen)))
            goto done;
        if ((rc = tensor_entry(t, dtype, &tn, &x->begin, &x->end, msg, msglen)))
            goto done;
        if (tn != n || x->end - x->begin != n * es) {
            snprintf(msg, msglen, "tensor %.64s has %llu elements in %llu bytes; the session has %zu of %zu bytes",
                     t->string, (unsigned long long)tn, (unsigned long long)(x->end - x->begin), (size_t)n, es);
            rc = OPTD_E_SIZE_MISMATCH;
            goto done;
        }
        snprintf(x->name, sizeof x->name, "%s", t->string);
        x->count = (size_t)n;
        r->present |= ckpt_buffer_bit(r->s, t->string);
        r->nt++;
    }
    rc = check_cover(r);
done:
    cJSON_Delete(hdr);
    cJSON_Delete(ck);
    return rc;
}

/* Copies data bytes [r->pos, r->pos + n) into the tensors they belong to. */
static void put_data(st_reader *r, const unsigned char *p, size_t n)
{
    if (r->pos + n > r->data_len) {
        rfail(r, OPTD_E_BAD_REQUEST, "the file has bytes after its last tensor%s%s", "", "");
        return;
    }
    for (size_t i = 0; i < r->nt && n; i++) {
        st_tensor *t = &r->t[i];
        if (r->pos >= t->end)
            continue;
        size_t k = (size_t)(t->end - r->pos) < n ? (size_t)(t->end - r->pos) : n;
        memcpy((unsigned char *)t->dst + (r->pos - t->begin), p, k);
        r->pos += k;
        p += k;
        n -= k;
    }
}

void st_reader_feed(st_reader *r, const void *data, size_t n)
{
    const unsigned char *p = data;
    r->total += n;
    while (n && !r->rc) {
        if (r->have8 < 8) {
            size_t k = 8 - r->have8 < n ? 8 - r->have8 : n;
            memcpy(r->len8 + r->have8, p, k);
            r->have8 += k, p += k, n -= k;
            if (r->have8 < 8)
                return;
            for (int i = 7; i >= 0; i--)
                r->hlen = (r->hlen << 8) | r->len8[i];
            if (r->hlen < 2 || r->hlen > ST_HEADER_MAX)
                rfail(r, OPTD_E_BAD_REQUEST, "this is not a safetensors file: its header length is %s%s",
                      r->hlen < 2 ? "too small" : "over 16 MiB", "");
            continue;
        }
        if (r->header.len < r->hlen) {
            size_t k = r->hlen - r->header.len < n ? (size_t)(r->hlen - r->header.len) : n;
            sbuf_put(&r->header, (const char *)p, k);
            p += k, n -= k;
            if (r->header.oom)
                rfail(r, OPTD_E_NOMEM, "out of memory; safe to retry%s%s", "", "");
            else if (r->header.len == r->hlen && (r->rc = read_header(r)) != OPTD_OK)
                return;
            continue;
        }
        put_data(r, p, n);
        return;
    }
}

optd_err st_reader_finish(st_reader *r, sess **out, char *msg, size_t msglen)
{
    *out = NULL;
    if (!r->rc && (r->have8 < 8 || r->header.len < r->hlen || !r->s))
        rfail(r, OPTD_E_BAD_REQUEST, "the body is %s: not a whole safetensors file%s", r->total ? "cut short" : "empty",
              "");
    if (!r->rc && r->pos != r->data_len)
        rfail(r, OPTD_E_BAD_REQUEST, "the file ends inside its tensors: it is cut short%s%s", "", "");
    for (size_t i = 0; i < r->nt && !r->rc; i++) {
        size_t bad;
        if (r->t[i].count && !vec_finite(r->t[i].dst, r->t[i].count, r->s->dtype, &bad)) {
            char idx[32];
            snprintf(idx, sizeof idx, "%zu", bad);
            rfail(r, OPTD_E_NON_FINITE, "tensor %s element %s is not finite", r->t[i].name, idx);
        }
    }
    if (!r->rc)
        r->rc = ckpt_finish(r->s, r->present, r->msg, sizeof r->msg);
    if (r->rc) {
        snprintf(msg, msglen, "%s", r->msg);
        return r->rc;
    }
    *out = r->s;
    r->s = NULL;
    return OPTD_OK;
}
