/* What the files of engine/ share and nothing else may call. */
#ifndef OPTD_ENGINE_INT_H
#define OPTD_ENGINE_INT_H

#include "engine/engine.h"

/* Writes row.config from s's settings through its codec. */
optd_err engine_sess_write_config(sess *s);
/* Counts one group of the writer that wrote about bytes of state. */
void engine_stats_group_bytes(engine_stats *m, uint64_t bytes);

#endif
