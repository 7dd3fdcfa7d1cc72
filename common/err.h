/* Error codes shared by store/, engine/, http/ and daemon/: one X-macro table gives each
 * error its enum value, its API code string, its HTTP status and its default
 * message. Everything else (enum, lookups) derives from this one table.
 * optim/ has its own two codes and includes nothing of ours. */
#ifndef OPTD_ERR_H
#define OPTD_ERR_H

#include <stddef.h>

/* XX(enum suffix, api code, http status, default message) */
#define OPTD_ERR_MAP(XX)                                                                                               \
    XX(OK, "ok", 200, "ok")                                                                                            \
    XX(BAD_JSON, "bad_json", 400, "the body is not valid JSON")                                                        \
    XX(BAD_REQUEST, "bad_request", 400, "the request is malformed")                                                    \
    XX(UNAUTHORIZED, "unauthorized", 401, "a valid bearer token is required")                                          \
    XX(FORBIDDEN, "forbidden", 403, "without a token this daemon answers only Host localhost, 127.x.x.x or [::1]")     \
    XX(NOT_FOUND, "not_found", 404, "no such session or path")                                                         \
    XX(METHOD_NOT_ALLOWED, "method_not_allowed", 405, "method not allowed here")                                       \
    XX(ALREADY_EXISTS, "already_exists", 409, "a session with this name exists")                                       \
    XX(SUPERSEDED, "superseded", 409,                                                                                  \
       "a retry with the same Idempotency-Key took this contribution's place in the round")                            \
    XX(STEP_MISMATCH, "step_mismatch", 412, "If-Match names another step")                                             \
    XX(TOO_LARGE, "too_large", 413, "the body is over the configured limit")                                           \
    XX(HEAD_TOO_LARGE, "headers_too_large", 431, "the request's line and headers are over the limit")                \
    XX(UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", 415,                                                          \
       "Content-Type must be application/json or application/octet-stream")                                            \
    XX(INVALID, "invalid", 422, "the request is well-formed but meaningless")                                          \
    XX(SIZE_MISMATCH, "size_mismatch", 422, "the vector length is wrong")                                              \
    XX(NON_FINITE, "non_finite", 422, "a value is NaN, infinite or out of range")                                      \
    XX(UNKNOWN_OPTIMIZER, "unknown_optimizer", 422, "no such optimizer")                                               \
    XX(BAD_HYPERPARAM, "bad_hyperparam", 422, "a hyperparameter is out of range")                                      \
    XX(UNKNOWN_FIELD, "unknown_field", 422, "the body has a field this request does not take")                         \
    XX(IDEMPOTENCY_MISMATCH, "idempotency_mismatch", 422, "this Idempotency-Key was used with a different request")    \
    XX(SESSION_TOO_LARGE, "too_large", 422, "the session's state is too large to store (see --max-session-bytes)")     \
    XX(INTERNAL, "internal", 500, "internal error")                                                                    \
    XX(UNAVAILABLE, "unavailable", 503, "storage is unavailable; safe to retry")                                       \
    XX(ROUND_TIMEOUT, "round_timeout", 503,                                                                            \
       "the round did not gather min_workers contributions in time; nothing changed")                                  \
    XX(NOMEM, "unavailable", 503, "out of memory; safe to retry")                                                      \
    XX(BUSY, "unavailable", 503, "the database is held by another process")                                            \
    XX(ROUNDS_FULL, "unavailable", 503, "too many contributions wait in worker rounds; retry later")

typedef enum optd_err {
#define OPTD_ERR_ENUM(name, code, status, msg) OPTD_E_##name,
    OPTD_ERR_MAP(OPTD_ERR_ENUM)
#undef OPTD_ERR_ENUM
        OPTD_E_COUNT
} optd_err;

#define OPTD_OK OPTD_E_OK

/* The API code string ("bad_json"), the HTTP status and the default message
 * of an error. All return static storage. */
const char *optd_err_code(optd_err e);
int optd_err_status(optd_err e);
const char *optd_err_message(optd_err e);
/* Writes a sentence (printf format) into msg when there is room and
 * returns rc: `return optd_fail(msg, len, OPTD_E_INVALID, "...", ...);`. */
optd_err optd_fail(char *msg, size_t msglen, optd_err rc, const char *fmt, ...) __attribute__((format(printf, 4, 5)));

#endif
