/* What the files of engine/ share and nothing else may call. */
#ifndef OPTD_ENGINE_INT_H
#define OPTD_ENGINE_INT_H

#include "engine/engine.h"

/* Writes row.config from s's settings through its codec. */
optd_err engine_sess_write_config(sess *s);
/* Counts one group of the writer that wrote about bytes of state. */
void engine_stats_group_bytes(engine_stats *m, uint64_t bytes);

/* A cached session's Idempotency-Keys of the window (engine/idem.c):
 * which step each was applied at, by a fingerprint of the key. */
typedef struct engine_idem_map engine_idem_map;
/* The map of session_id's keys of steps after floor, from the store. */
optd_err engine_idem_load(store *st, int64_t session_id, uint64_t floor, engine_idem_map **out);
/* Records key at step; entries of steps <= floor may go. OPTD_E_NOMEM. */
optd_err engine_idem_add(engine_idem_map *m, const char *key, uint64_t step, uint64_t floor);
/* Fills steps (up to max) with the steps after floor a key of key's
 * fingerprint was recorded at, to be confirmed with store_idem_get. */
size_t engine_idem_candidates(const engine_idem_map *m, const char *key, uint64_t floor, uint64_t *steps,
                              size_t max);
/* The bytes m holds, 0 for NULL. */
size_t engine_idem_bytes(const engine_idem_map *m);
void engine_idem_free(engine_idem_map *m);

#endif
