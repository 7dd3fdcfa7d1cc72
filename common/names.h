/* Helpers for the messages about a name a client got wrong (common/names.c). */
#ifndef OPTD_NAMES_H
#define OPTD_NAMES_H

#include <stddef.h>

/* The name of names[0..n) nearest to s (a typo away, case ignored), or NULL. */
const char *optd_name_nearest(const char *s, const char *const *names, size_t n);
/* Writes names[0..n) as "a, b, c" into out. */
void optd_names_join(char *out, size_t outlen, const char *const *names, size_t n);
/* Writes 'unknown <what> "<name>" in <where>; did you mean "x"? (valid: ...)'. */
void optd_unknown_name_msg(char *msg, size_t msglen, const char *what, const char *name, const char *where,
                           const char *const *names, size_t n);

#endif
