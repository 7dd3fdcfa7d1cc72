/* fuzz_decode: libFuzzer target for the request decoders of http/, without the
 * HTTP server. The first byte of an input picks what the rest feeds (its low
 * two bits, so seeds can start with an ASCII digit):
 *   0, 1  a request body: utf8_valid, cJSON, then hparams_from_json for every
 *         optimizer, training_fields_from_json, json_to_vec on
 *         "grad"/"params", and the streaming checkpoint decoder (jbody,
 *         sess_from_checkpoint, safetensors)
 *   2     a URL path: url_unescape, route_parse, name_valid
 *   3     a header value: parse_if_match, parse_number
 * Beyond "does not crash" (ASan, UBSan) it checks properties that must hold
 * for every input, and abort()s when one does not:
 *   - hyperparameters that decode re-encode (hparams_to_json) to JSON that
 *     decodes to the same encoding;
 *   - a checkpoint body decodes the same whole or fed in pieces, and one that
 *     decodes re-encodes (sess_state_to_json, and as safetensors) to one that
 *     decodes to the same blob bit for bit, at the same step;
 *   - every message written is NUL-terminated within its buffer;
 *   - a route's session name obeys the name rule when name_valid says so.
 * Built with clang -fsanitize=fuzzer by `make fuzz`; tests/fuzz/replay.c
 * links the same function into a plain program that replays the corpus and
 * the regression inputs in `make test`. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http/httpInt.h"

#define MAX_ELEMENTS ((size_t)1 << 20)

static void fail(const char *what, const char *detail)
{
    fprintf(stderr, "fuzz_decode: property broken: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    abort();
}

static void check_msg(const char *msg, size_t cap)
{
    if (!memchr(msg, '\0', cap))
        fail("message not terminated", NULL);
}

/* hparams_to_json of (info, hp, tr) as a malloc'd string; NULL when out of memory. */
static char *hp_text(const optim_info *info, const optim_hparams *hp, const training *tr)
{
    sbuf b = {0};
    hparams_to_json(&b, info, hp, tr);
    if (b.oom) {
        sbuf_free(&b);
        return NULL;
    }
    return b.p;
}

/* The hyperparameters object hps (and the session fields of body) decoded
 * as http/ does and applied as the engine does. */
static optd_err hparams_from_json(const optim_info *info, const cJSON *hps, const cJSON *body, optim_hparams *hp,
                                  training *tr, char *msg, size_t msglen)
{
    engine_settings d;
    optd_err rc = http_settings_from_json(hps, body, &d);
    if (rc == OPTD_OK)
        rc = engine_settings_apply(info, &d, hp, tr, msg, msglen);
    engine_settings_clear(&d);
    return rc;
}

static void fuzz_hparams(const cJSON *obj)
{
    const cJSON *hps = cJSON_GetObjectItemCaseSensitive(obj, "hyperparams");
    if (!hps)
        hps = obj;
    for (size_t k = 0; k < OPTIM_KIND_COUNT; k++) {
        const optim_info *info = optim_at(k);
        optim_hparams hp;
        training tr;
        char msg[256];
        memset(msg, 'x', sizeof msg);
        optim_defaults(info, &hp);
        engine_training_defaults(&tr);
        optd_err rc = hparams_from_json(info, hps, NULL, &hp, &tr, msg, sizeof msg);
        if (rc) {
            check_msg(msg, sizeof msg);
            continue;
        }
        /* Round trip: what decoded encodes to text that decodes the same. */
        char *t1 = hp_text(info, &hp, &tr);
        if (!t1)
            continue;
        cJSON *again = cJSON_Parse(t1);
        if (!again)
            fail("hparams_to_json wrote JSON that does not parse", t1);
        optim_hparams hp2;
        training tr2;
        optim_defaults(info, &hp2);
        engine_training_defaults(&tr2);
        if (hparams_from_json(info, again, NULL, &hp2, &tr2, msg, sizeof msg) != OPTD_OK)
            fail("hyperparameters that decoded do not decode again after hparams_to_json", msg);
        char *t2 = hp_text(info, &hp2, &tr2);
        if (t2 && strcmp(t1, t2) != 0) {
            fprintf(stderr, "%s\n%s\n", t1, t2);
            fail("hyperparameters change over a round trip", info->name);
        }
        free(t2);
        free(t1);
        cJSON_Delete(again);
    }
    training tr;
    optim_hparams hp;
    char msg[256];
    optim_defaults(optim_at(0), &hp);
    engine_training_defaults(&tr);
    if (hparams_from_json(optim_at(0), NULL, obj, &hp, &tr, msg, sizeof msg) != OPTD_OK)
        check_msg(msg, sizeof msg);
}

/* A checkpoint body through the streaming decoder (fed in pieces of
 * `piece` bytes) and sess_from_checkpoint, as PUT .../state does. */
static optd_err decode_checkpoint(const char *text, size_t len, size_t piece, sess **out, char *msg, size_t msglen)
{
    jbody jb;
    cJSON *tree = NULL;
    jbody_init(&jb, JB_PARAMS | JB_STATE, (size_t)1 << 20, (size_t)1 << 28);
    for (size_t off = 0; off < len; off += piece)
        jbody_feed(&jb, text + off, len - off < piece ? len - off : piece);
    optd_err rc = jbody_finish(&jb, &tree, msg, msglen);
    if (rc == OPTD_OK)
        rc = sess_from_checkpoint("fz", tree, &jb, (size_t)1 << 30, out, msg, msglen);
    cJSON_Delete(tree);
    jbody_free(&jb);
    return rc;
}

static void same_session(const sess *a, const sess *b, const char *what, const char *text)
{
    if (b->blob_len != a->blob_len || memcmp(b->blob, a->blob, a->blob_len) != 0)
        fail(what, text);
    if (b->st.step != a->st.step || b->n != a->n || b->dtype != a->dtype || b->info != a->info)
        fail(what, text);
}

static void fuzz_checkpoint(const char *body, size_t size)
{
    sess *s = NULL, *s2 = NULL, *s3 = NULL;
    char msg[256];
    memset(msg, 'x', sizeof msg);
    optd_err rc = decode_checkpoint(body, size, size ? size : 1, &s, msg, sizeof msg);
    /* However the body is cut into pieces, the outcome is the same. */
    optd_err rc1 = decode_checkpoint(body, size, 1 + size % 5, &s2, msg, sizeof msg);
    if (rc1 != rc)
        fail("a checkpoint decodes differently when fed in pieces", body);
    if (rc) {
        check_msg(msg, sizeof msg);
        if (s || s2)
            fail("sess_from_checkpoint failed but returned a session", NULL);
        return;
    }
    same_session(s, s2, "a checkpoint decodes to another state when fed in pieces", body);
    engine_sess_free(s2);
    s2 = NULL;
    sbuf b = {0};
    sess_state_to_json(&b, s);
    if (!b.oom) {
        if (decode_checkpoint(b.p, b.len, 7, &s2, msg, sizeof msg) != OPTD_OK)
            fail("a checkpoint that decoded does not decode again after sess_state_to_json", msg);
        same_session(s, s2, "a checkpoint's state, step, size, dtype or optimizer changes over a round trip", b.p);
    }
    sbuf_free(&b);
    /* And through its safetensors form. */
    sbuf h = {0};
    if (st_header(s, &h) == OPTD_OK) {
        st_reader *r = st_reader_new("fz", (size_t)1 << 30);
        if (r) {
            st_reader_feed(r, h.p, h.len);
            st_reader_feed(r, s->blob, st_data_len(s));
            if (st_reader_finish(r, &s3, msg, sizeof msg) != OPTD_OK)
                fail("a checkpoint's safetensors form does not decode", msg);
            same_session(s, s3, "a checkpoint changes over a safetensors round trip", h.p + 8);
            st_reader_free(r);
        }
    }
    sbuf_free(&h);
    engine_sess_free(s3);
    engine_sess_free(s2);
    engine_sess_free(s);
}

static void fuzz_vectors(const cJSON *obj)
{
    static const char *const keys[] = {"grad", "params"};
    for (size_t i = 0; i < 2; i++) {
        const cJSON *arr = cJSON_GetObjectItemCaseSensitive(obj, keys[i]);
        if (!cJSON_IsArray(arr))
            continue;
        size_t n = (size_t)cJSON_GetArraySize(arr);
        if (n > MAX_ELEMENTS)
            continue;
        for (int dt = 0; dt < 2; dt++) {
            optim_dtype dtype = dt ? OPTIM_F64 : OPTIM_F32;
            void *out = malloc(n * optim_elem_size(dtype) + 1);
            char msg[128];
            size_t bad;
            if (!out)
                return;
            memset(msg, 'x', sizeof msg);
            optd_err rc = json_to_vec(arr, out, n, dtype, msg, sizeof msg);
            if (rc)
                check_msg(msg, sizeof msg);
            else if (!vec_finite(out, n, dtype, &bad))
                fail("json_to_vec accepted a value that is not finite", keys[i]);
            free(out);
        }
    }
}

static void fuzz_body(const uint8_t *data, size_t size)
{
    utf8_valid((const char *)data, size);
    /* As http.c does: a NUL-terminated copy, parsed with its length. */
    char *body = malloc(size + 1);
    if (!body)
        return;
    memcpy(body, data, size);
    body[size] = '\0';
    cJSON *obj = cJSON_ParseWithLength(body, size);
    if (obj && cJSON_IsObject(obj)) {
        fuzz_hparams(obj);
        fuzz_vectors(obj);
    }
    fuzz_checkpoint(body, size);
    cJSON_Delete(obj);
    free(body);
}

static int name_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
           c == '-';
}

static void fuzz_route(const uint8_t *data, size_t size)
{
    char *url = malloc(size + 1);
    if (!url)
        return;
    memcpy(url, data, size);
    url[size] = '\0'; /* MHD hands over C strings: an embedded NUL ends it */
    size_t before = strlen(url);
    size_t after = url_unescape(url);
    if (after > before || after != strlen(url))
        fail("url_unescape grew the string or returned a wrong length", NULL);
    char name[STORE_NAME_MAX + 1];
    int ok = -1;
    memset(name, 'x', sizeof name);
    http_route r = route_parse(url, name, &ok);
    if (r >= HTTP_R_COUNT)
        fail("route_parse returned no route", url);
    if (!memchr(name, '\0', sizeof name))
        fail("route_parse left the name unterminated", url);
    if (ok) {
        size_t n = strlen(name);
        if (n == 0 || n > STORE_NAME_MAX || !name_char(name[0]) || name[0] == '.' || name[0] == '_' || name[0] == '-')
            fail("route_parse accepted a bad name", name);
        for (size_t i = 0; i < n; i++)
            if (!name_char(name[i]))
                fail("route_parse accepted a bad name", name);
    }
    if (name_valid(url) && (strchr(url, '/') || strlen(url) > STORE_NAME_MAX))
        fail("name_valid accepted a string with '/' or over 128 characters", url);
    free(url);
}

static void fuzz_header(const uint8_t *data, size_t size)
{
    char *v = malloc(size + 1);
    if (!v)
        return;
    memcpy(v, data, size);
    v[size] = '\0';
    int64_t step = -2;
    if (parse_if_match(v, &step) == 0 && step < -1)
        fail("parse_if_match succeeded with a negative step", v);
    double d = 0;
    if (http_parse_number(v, &d) == 0 && !isfinite(d))
        fail("parse_number accepted a value that is not finite", v);
    free(v);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    switch (data[0] & 3) {
    case 0:
    case 1:
        fuzz_body(data + 1, size - 1);
        break;
    case 2:
        fuzz_route(data + 1, size - 1);
        break;
    case 3:
        fuzz_header(data + 1, size - 1);
        break;
    }
    return 0;
}
