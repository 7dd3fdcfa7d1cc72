/* http: optd's HTTP service (../shared/API.md) on libmicrohttpd: routing,
 * JSON and binary codecs, auth and metrics, in front of the engine
 * (engine/engine.h), which applies and commits the writes. The daemon opens
 * the store, fills an http_config and calls http_start; http_stop finishes
 * the requests in flight. This is the only module that includes
 * <microhttpd.h> and cJSON. */
#ifndef OPTD_HTTP_H
#define OPTD_HTTP_H

#include <stddef.h>
#include <stdint.h>

#include "store/store.h"

typedef struct http_server http_server;

/* Bytes of libmicrohttpd's memory pool per connection: it holds a request's
 * head, the read buffer its body passes through and the reply's headers,
 * and libmicrohttpd zeroes all of it before every request on a kept-alive
 * connection. At 64 KiB that memset was 10-14 us of a small step's request
 * CPU; 32 KiB halves it, while a head still has room for what clients
 * send in headers (an Optd-Skip naming a few hundred frozen tensors). A big
 * body goes through in more, smaller reads: +0.8 ms of request CPU on a
 * 4 MB body, ~4% of a 1e6 step's CPU. bench/mhd_ceiling uses it too. */
#define HTTP_CONN_MEMORY (32 * 1024)
/* The longest request head (its line and headers) served: a longer one is
 * 431 headers_too_large before anything of it runs. The rest of the pool
 * is for the reply's headers, which libmicrohttpd builds in it: were they
 * not to fit, it would close the connection without a reply, after the
 * request had run. Past the pool, libmicrohttpd answers 431 (or 414 for a
 * request line that long) itself, without a JSON body. */
#define HTTP_HEAD_MAX (HTTP_CONN_MEMORY - 4096)

/* Called once per finished request with a complete log line (no newline). */
typedef void (*http_log_fn)(void *ctx, const char *line);

/* Every setting of the service; the daemon fills all of them (its config
 * table holds the defaults). */
typedef struct http_config {
    const char *listen_host;     /* "127.0.0.1", "0.0.0.0", "::1"; borrowed for http_start only */
    uint16_t listen_port;        /* 0 picks a free port (see http_port) */
    const char *token;           /* bearer token or NULL for none; copied */
    size_t max_body;             /* bytes */
    size_t max_session_bytes;    /* largest state (params and buffers) of one session */
    unsigned threads;            /* request threads */
    unsigned max_connections;    /* past it new connections are closed */
    unsigned connection_timeout; /* idle seconds before a connection is closed */
    unsigned header_timeout;     /* seconds a request head may take from its first byte */
    uint64_t idempotency_window; /* steps a key is remembered */
    uint64_t history_steps;      /* history rows kept per session */
    size_t cache_bytes;          /* bytes of session state the writer keeps in memory */
    http_log_fn log;             /* may be NULL */
    void *log_ctx;
    const char *backup_dir; /* where POST /v1/backups writes; NULL: backups are off; copied */
    const char *peers;      /* the other shards, comma-separated base URLs, or NULL; copied */
} http_config;

/* Starts serving with st (borrowed; the caller closes it after http_stop).
 * Returns OPTD_OK, or OPTD_E_UNAVAILABLE with a sentence in err when the
 * address cannot be bound. The caller stops *out with http_stop. */
optd_err http_start(const http_config *cfg, store *st, http_server **out, char *err, size_t errlen);

/* The port actually bound (useful with listen_port 0). */
uint16_t http_port(const http_server *srv);

/* Stops accepting connections, answers requests still arriving with 503,
 * lets the writer finish and commit the steps it holds, and frees srv.
 * http_stop(NULL) does nothing. */
void http_stop(http_server *srv);

#endif
