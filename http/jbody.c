/* A JSON request body decoded as it arrives, in bounded memory: the numeric
 * arrays the contract names (params, grad, the buffers under state) are read
 * straight into typed vectors, and only the rest of the body (its
 * "skeleton", each such array left as []) is kept as text and parsed with
 * cJSON. A cJSON tree of a vector costs about 43 times its text; this costs
 * its elements (4 or 8 bytes each) and, for the body's other fields, their
 * text. The body is fed in pieces of any size (a number may straddle two). */
#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http/httpInt.h"

enum { PH_KEY, PH_COLON, PH_VALUE, PH_COMMA };  /* where an object is */
enum { V_ELEM_OR_END, V_ELEM, V_COMMA_OR_END }; /* where a vector is */

static int fail(jbody *jb, optd_err rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(jbody *jb, optd_err rc, const char *fmt, ...)
{
    if (jb->rc)
        return -1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(jb->msg, sizeof jb->msg, fmt, ap);
    va_end(ap);
    jb->rc = rc;
    return -1;
}

void jbody_init(jbody *jb, unsigned paths, size_t skel_max, size_t bytes_max)
{
    memset(jb, 0, sizeof *jb);
    jb->paths = paths;
    jb->skel_max = skel_max;
    jb->bytes_max = bytes_max;
}

void jbody_set_dtype(jbody *jb, optim_dtype dtype, void *dest, size_t dest_n)
{
    jb->dtype_known = 1;
    jb->dtype = dtype;
    jb->dest = dest;
    jb->dest_n = dest_n;
}

static void vec_clear(jvec *v)
{
    if (!v->borrowed)
        free(v->data);
    sbuf_free(&v->text);
    memset(v, 0, sizeof *v);
}

void jbody_free(jbody *jb)
{
    if (!jb)
        return;
    for (size_t i = 0; i < jb->nvecs; i++)
        vec_clear(&jb->vecs[i]);
    sbuf_free(&jb->skel);
    memset(jb, 0, sizeof *jb);
}

jvec *jbody_vec(jbody *jb, const char *key, int in_state)
{
    for (size_t i = 0; jb && i < jb->nvecs; i++)
        if (jb->vecs[i].in_state == in_state && strcmp(jb->vecs[i].key, key) == 0)
            return &jb->vecs[i];
    return NULL;
}

void jvec_release(jvec *v) { vec_clear(v); }

/* The name a vector has in messages: "params" or "state.exp_avg". */
static void vec_label(const jvec *v, char *out, size_t len)
{
    snprintf(out, len, "%s%s", v->in_state ? "state." : "", v->key);
}

/* Stores one number (the text at s, len bytes, already a JSON number) into v. */
static int put_number(jbody *jb, jvec *v, const char *s, size_t len)
{
    char label[80];
    size_t es = optim_elem_size(v->dtype);
    if (v->n >= jb->max_elems) {
        vec_label(v, label, sizeof label);
        return fail(jb, OPTD_E_INVALID, "%s has more than %zu elements", label, jb->max_elems);
    }
    if (v->raw) {
        sbuf_put(&v->text, s, len);
        sbuf_put(&v->text, ",", 1);
        if (v->text.oom)
            return fail(jb, OPTD_E_NOMEM, "out of memory; safe to retry");
        v->n++;
        return 0;
    }
    double d;
    const char *end = scan_number(s, s + len, v->dtype, &d);
    if (end != s + len)
        return fail(jb, OPTD_E_BAD_JSON, "the body is not valid JSON (a number is malformed)");
    if (!isfinite(v->dtype == OPTIM_F64 ? d : (double)(float)d)) {
        vec_label(v, label, sizeof label);
        return fail(jb, OPTD_E_NON_FINITE, "%s element %zu is not a finite %s", label, v->n,
                    engine_dtype_name(v->dtype));
    }
    if (v->borrowed) {
        if (v->n < v->cap) {
            if (v->dtype == OPTIM_F64)
                ((double *)v->data)[v->n] = d;
            else
                ((float *)v->data)[v->n] = (float)d;
        }
        v->n++; /* counted past the end, for the size message */
        return 0;
    }
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 1024;
        if (cap > jb->max_elems)
            cap = jb->max_elems;
        /* Grown up to what the limit leaves, not past it: a vector that fits
         * must not be refused for the slack of a doubling. bytes_max is
         * --max-session-bytes, so past it the session is too large (422). */
        if (jb->bytes + (cap - v->cap) * es > jb->bytes_max)
            cap = v->cap + (jb->bytes_max > jb->bytes ? (jb->bytes_max - jb->bytes) / es : 0);
        if (cap <= v->cap)
            return fail(jb, OPTD_E_SESSION_TOO_LARGE,
                        "the body's vectors are over %zu bytes (--max-session-bytes): the session would be too "
                        "large; use fewer elements, float32 or fewer buffers",
                        jb->bytes_max);
        void *p = realloc(v->data, cap * es);
        if (!p)
            return fail(jb, OPTD_E_NOMEM, "out of memory; safe to retry");
        jb->bytes += (cap - v->cap) * es;
        v->data = p;
        v->cap = cap;
    }
    if (v->dtype == OPTIM_F64)
        ((double *)v->data)[v->n++] = d;
    else
        ((float *)v->data)[v->n++] = (float)d;
    return 0;
}

/* The bytes of one element's token: a number, or a word (true, nan, ...). */
static int is_num_char(char c) { return isalnum((unsigned char)c) || c == '-' || c == '+' || c == '.'; }

/* One whole element token: a number, else the error for what it is. */
static int put_token(jbody *jb, jvec *v, const char *s, size_t len)
{
    if (isdigit((unsigned char)s[0]) || s[0] == '-')
        return put_number(jb, v, s, len);
    char label[80];
    vec_label(v, label, sizeof label);
    if ((len == 4 && (memcmp(s, "true", 4) == 0 || memcmp(s, "null", 4) == 0)) ||
        (len == 5 && memcmp(s, "false", 5) == 0))
        return fail(jb, OPTD_E_BAD_REQUEST, "%s must be an array of numbers; element %zu is not a number", label, v->n);
    return fail(jb, OPTD_E_BAD_JSON, "the body is not valid JSON (in %s)", label);
}

/* Starts a vector for member key (in_state: under "state"). */
static int vec_open(jbody *jb, const char *key, int in_state)
{
    if (jbody_vec(jb, key, in_state))
        return fail(jb, OPTD_E_BAD_REQUEST, "%s%s appears twice in the body", in_state ? "state." : "", key);
    if (jb->nvecs == JB_MAX_VECS)
        return fail(jb, OPTD_E_BAD_REQUEST, "the body has more vectors than any request takes");
    jvec *v = &jb->vecs[jb->nvecs++];
    memset(v, 0, sizeof *v);
    snprintf(v->key, sizeof v->key, "%s", key);
    v->in_state = in_state;
    v->dtype = jb->dtype;
    v->raw = !jb->dtype_known;
    if (jb->dest && !in_state) {
        v->data = jb->dest;
        v->cap = jb->dest_n;
        v->borrowed = 1;
    } else if (!v->raw && jb->size_hint > 0 && jb->size_hint <= jb->max_elems) {
        size_t es = optim_elem_size(v->dtype);
        if (jb->bytes + jb->size_hint * es <= jb->bytes_max && (v->data = malloc(jb->size_hint * es))) {
            v->cap = jb->size_hint;
            jb->bytes += v->cap * es;
        }
    }
    jb->cur = v;
    jb->vstate = V_ELEM_OR_END;
    return 0;
}

/* Decodes numbers of the open vector from p; returns where it stopped (the
 * byte after its ']' when it closed, or end when it needs more). */
static const char *vec_feed(jbody *jb, const char *p, const char *end)
{
    jvec *v = jb->cur;
    while (p < end && !jb->rc) {
        if (jb->numlen) { /* finish a number cut at the end of the last piece */
            while (p < end && is_num_char(*p) && jb->numlen < sizeof jb->num - 1)
                jb->num[jb->numlen++] = *p++;
            if (p == end)
                return p;
            if (jb->numlen >= sizeof jb->num - 1) {
                fail(jb, OPTD_E_BAD_JSON, "the body is not valid JSON (a number is too long)");
                return end;
            }
            jb->num[jb->numlen] = '\0';
            put_token(jb, v, jb->num, jb->numlen);
            jb->numlen = 0;
            jb->vstate = V_COMMA_OR_END;
            continue;
        }
        char c = *p;
        if (c == ' ' || c == '\n' || c == '\r' || c == '\t') {
            p++;
            continue;
        }
        if (jb->vstate == V_COMMA_OR_END) {
            if (c == ',') {
                jb->vstate = V_ELEM;
                p++;
                continue;
            }
            if (c != ']') {
                fail(jb, OPTD_E_BAD_JSON, "the body is not valid JSON (expected , or ] in an array)");
                return end;
            }
        }
        if (c == ']' && jb->vstate != V_ELEM) {
            jb->cur = NULL;
            return p + 1;
        }
        if (is_num_char(c)) {
            const char *q = p;
            while (q < end && is_num_char(*q))
                q++;
            if (q == end) { /* may go on in the next piece */
                if ((size_t)(q - p) >= sizeof jb->num - 1) {
                    fail(jb, OPTD_E_BAD_JSON, "the body is not valid JSON (a number is too long)");
                    return end;
                }
                memcpy(jb->num, p, (size_t)(q - p));
                jb->numlen = (size_t)(q - p);
                return end;
            }
            put_token(jb, v, p, (size_t)(q - p));
            jb->vstate = V_COMMA_OR_END;
            p = q;
            continue;
        }
        char label[80];
        vec_label(v, label, sizeof label);
        if (strchr("\"[{", c))
            fail(jb, OPTD_E_BAD_REQUEST, "%s must be an array of numbers; element %zu is not a number", label, v->n);
        else
            fail(jb, OPTD_E_BAD_JSON, "the body is not valid JSON (in %s)", label);
        return end;
    }
    return p;
}

/* Whether the value about to start at depth (1: a member of the body, 2: of
 * a member object) under key is a vector the caller asked for. */
static int is_vector_key(const jbody *jb, int *in_state)
{
    *in_state = 0;
    if (jb->depth == 1 && !jb->key1_bad) {
        if ((jb->paths & JB_PARAMS) && strcmp(jb->key1, "params") == 0)
            return 1;
        if ((jb->paths & JB_GRAD) && strcmp(jb->key1, "grad") == 0)
            return 1;
    }
    if (jb->depth == 2 && (jb->paths & JB_STATE) && strcmp(jb->key1, "state") == 0 && !jb->key2_bad &&
        jb->stack[1] == '{') {
        *in_state = 1;
        return 1;
    }
    return 0;
}

/* A member of the body ended: learn the dtype and size that shape the
 * vectors still to come. */
static void member_done(jbody *jb)
{
    if (jb->key1_bad || !jb->skel.p || jb->skel.oom || jb->val_start >= jb->skel.len)
        return;
    const char *s = jb->skel.p + jb->val_start, *e = jb->skel.p + jb->skel.len - 1;
    while (s < e && isspace((unsigned char)*s))
        s++;
    while (e > s && isspace((unsigned char)e[-1]))
        e--;
    size_t n = (size_t)(e - s);
    if (strcmp(jb->key1, "dtype") == 0 && !jb->dtype_known && !jb->dtype_seen) {
        jb->dtype_seen = 1;
        if (n == 9 && memcmp(s, "\"float32\"", 9) == 0)
            jb->dtype_known = 1, jb->dtype = OPTIM_F32;
        else if (n == 9 && memcmp(s, "\"float64\"", 9) == 0)
            jb->dtype_known = 1, jb->dtype = OPTIM_F64;
    } else if (strcmp(jb->key1, "size") == 0 && n > 0 && n < 24 && isdigit((unsigned char)*s)) {
        char tmp[24];
        memcpy(tmp, s, n);
        tmp[n] = '\0';
        double d = strtod(tmp, NULL);
        if (d >= 1 && d <= (double)jb->max_elems)
            jb->size_hint = (size_t)d;
    }
}

void jbody_feed(jbody *jb, const char *p, size_t n)
{
    const char *end = p + n;
    if (!jb->max_elems)
        jb->max_elems = ENGINE_MAX_ELEMENTS;
    while (p < end && !jb->rc) {
        if (jb->cur) {
            p = vec_feed(jb, p, end);
            if (!jb->cur && !jb->rc) {
                sbuf_put(&jb->skel, "]", 1);
                jb->phase = PH_COMMA;
            }
            continue;
        }
        /* The skeleton, a byte at a time: copy it and follow the structure
         * enough to know each member's key and where a vector starts. */
        const char *start = p;
        for (; p < end && !jb->cur; p++) {
            char c = *p;
            if (jb->in_str) {
                if (jb->esc) {
                    jb->esc = 0;
                    *jb->keybad = 1; /* an escaped key names no vector */
                } else if (c == '\\') {
                    jb->esc = 1;
                } else if (c == '"') {
                    jb->in_str = 0;
                    if (jb->capturing) {
                        jb->capturing = 0;
                        jb->phase = PH_COLON;
                    }
                } else if (jb->capturing) {
                    if (*jb->keylen < JB_KEY_MAX - 1)
                        jb->keybuf[(*jb->keylen)++] = c, jb->keybuf[*jb->keylen] = '\0';
                    else
                        *jb->keybad = 1;
                }
                continue;
            }
            char top = jb->depth ? jb->stack[jb->depth - 1] : 0;
            switch (c) {
            case '"':
                jb->in_str = 1;
                jb->esc = 0;
                if (top == '{' && jb->phase == PH_KEY) {
                    /* Keys at depth 1 and 2 are kept; deeper ones only skipped. */
                    jb->capturing = 1;
                    if (jb->depth == 1)
                        jb->keybuf = jb->key1, jb->keylen = &jb->key1_len, jb->keybad = &jb->key1_bad;
                    else if (jb->depth == 2)
                        jb->keybuf = jb->key2, jb->keylen = &jb->key2_len, jb->keybad = &jb->key2_bad;
                    else
                        jb->keybuf = jb->keyx, jb->keylen = &jb->keyx_len, jb->keybad = &jb->keyx_bad;
                    *jb->keylen = 0;
                    *jb->keybad = 0;
                    jb->keybuf[0] = '\0';
                } else {
                    jb->keybad = &jb->keyx_bad; /* escapes in values mark nothing that matters */
                }
                break;
            case ':':
                if (top == '{' && jb->phase == PH_COLON) {
                    jb->phase = PH_VALUE;
                    if (jb->depth == 1)
                        jb->val_start = jb->skel.len + (size_t)(p - start) + 1;
                }
                break;
            case '[':
            case '{': {
                int in_state;
                if (c == '[' && top == '{' && jb->phase == PH_VALUE && is_vector_key(jb, &in_state)) {
                    sbuf_put(&jb->skel, start, (size_t)(p - start) + 1);
                    vec_open(jb, in_state ? jb->key2 : jb->key1, in_state);
                    start = p + 1;
                    break; /* the loop ends: jb->cur is set */
                }
                if (jb->depth == JB_DEPTH) {
                    fail(jb, OPTD_E_BAD_JSON, "the body is nested more than %d deep", JB_DEPTH);
                    return;
                }
                jb->stack[jb->depth++] = c;
                jb->phase = c == '{' ? PH_KEY : PH_VALUE;
                break;
            }
            case ']':
            case '}':
                if (jb->depth == 0) {
                    fail(jb, OPTD_E_BAD_JSON, "the body is not valid JSON");
                    return;
                }
                jb->depth--;
                if (jb->depth == 0) {
                    if (c == '}') { /* the body's last member ended */
                        sbuf_put(&jb->skel, start, (size_t)(p - start) + 1);
                        start = p + 1;
                        member_done(jb);
                    }
                } else {
                    jb->phase = jb->stack[jb->depth - 1] == '{' ? PH_COMMA : PH_VALUE;
                }
                break;
            case ',':
                if (top == '{') {
                    if (jb->depth == 1) {
                        sbuf_put(&jb->skel, start, (size_t)(p - start) + 1);
                        start = p + 1;
                        member_done(jb);
                    }
                    jb->phase = PH_KEY;
                }
                break;
            default:
                break;
            }
        }
        if (p > start && !jb->cur)
            sbuf_put(&jb->skel, start, (size_t)(p - start));
        if (jb->skel.oom)
            fail(jb, OPTD_E_NOMEM, "out of memory; safe to retry");
        else if (jb->skel.len > jb->skel_max)
            fail(jb, OPTD_E_TOO_LARGE, "the body's fields other than its vectors are over %zu bytes", jb->skel_max);
    }
}

optd_err json_parse_object(const char *text, size_t len, const char *hint, cJSON **out, char *msg, size_t msglen)
{
    *out = NULL;
    if (!utf8_valid(text, len)) {
        snprintf(msg, msglen, "the body is not valid UTF-8%s", hint);
        return OPTD_E_BAD_JSON;
    }
    /* text is NUL-terminated; the parse must end at its last byte, bar
     * white space. */
    const char *end = NULL;
    cJSON *j = cJSON_ParseWithOpts(text, &end, 0);
    while (j && end < text + len && *end && strchr(" \t\r\n", *end))
        end++;
    if (!j || end != text + len || !json_numbers_strict(text, len)) {
        cJSON_Delete(j);
        snprintf(msg, msglen, "the body is not valid JSON%s", hint);
        return OPTD_E_BAD_JSON;
    }
    *out = j;
    /* cJSON cuts a string at an escaped NUL; no string of this API may hold one. */
    if (memmem(text, len, "\\u0000", 6)) {
        snprintf(msg, msglen, "strings must not contain NUL (\\u0000)");
        return OPTD_E_INVALID;
    }
    if (!cJSON_IsObject(j)) {
        snprintf(msg, msglen, "the body must be a JSON object");
        return OPTD_E_BAD_REQUEST;
    }
    return OPTD_OK;
}

/* Decodes a vector kept as text ("1,2.5,3,") now that its dtype is known. */
static optd_err decode_raw(jbody *jb, jvec *v, optim_dtype dtype)
{
    sbuf text = v->text;
    size_t n = v->n;
    memset(&v->text, 0, sizeof v->text);
    v->raw = 0;
    v->n = 0;
    v->dtype = dtype;
    if (n && (v->data = malloc(n * optim_elem_size(dtype))))
        v->cap = n;
    if (n && !v->data) {
        sbuf_free(&text);
        return fail(jb, OPTD_E_NOMEM, "out of memory; safe to retry"), jb->rc;
    }
    const char *p = text.p, *end = text.p + text.len;
    while (p < end && !jb->rc) {
        const char *q = memchr(p, ',', (size_t)(end - p));
        put_number(jb, v, p, (size_t)(q - p));
        p = q + 1;
    }
    sbuf_free(&text);
    return jb->rc;
}

optd_err jbody_finish(jbody *jb, cJSON **out, char *msg, size_t msglen)
{
    *out = NULL;
    if (!jb->rc && (jb->cur || jb->depth || jb->in_str))
        fail(jb, OPTD_E_BAD_JSON, "the body is not valid JSON (it ends early)");
    if (!jb->rc && !jb->skel.p)
        sbuf_puts(&jb->skel, "");
    if (jb->rc) {
        snprintf(msg, msglen, "%s", jb->msg);
        return jb->rc;
    }
    optd_err rc = json_parse_object(jb->skel.p, jb->skel.len, "", out, msg, msglen);
    if (rc)
        return rc;
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(*out, "dtype");
    optim_dtype dtype = cJSON_IsString(dt) && strcmp(dt->valuestring, "float64") == 0 ? OPTIM_F64 : OPTIM_F32;
    for (size_t i = 0; i < jb->nvecs && !rc; i++)
        if (jb->vecs[i].raw)
            rc = decode_raw(jb, &jb->vecs[i], jb->dtype_known ? jb->dtype : dtype);
    if (rc)
        snprintf(msg, msglen, "%s", jb->msg);
    return rc;
}
