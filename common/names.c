/* Names a client got wrong: the nearest valid one (a typo away, case
 * ignored) and the message that lists them, shared by the request decoders
 * (http/) and the settings the engine validates against a session. */
#include <ctype.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "common/names.h"

/* Damerau-Levenshtein distance (adjacent swaps count one), case ignored,
 * over at most 63 bytes of each string; longer names are never near. */
static size_t distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > 63 || lb > 63)
        return (size_t)-1;
    size_t d[64][64];
    for (size_t i = 0; i <= la; i++)
        d[i][0] = i;
    for (size_t j = 0; j <= lb; j++)
        d[0][j] = j;
    for (size_t i = 1; i <= la; i++) {
        for (size_t j = 1; j <= lb; j++) {
            int same = tolower((unsigned char)a[i - 1]) == tolower((unsigned char)b[j - 1]);
            size_t v = d[i - 1][j - 1] + !same;
            if (d[i - 1][j] + 1 < v)
                v = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < v)
                v = d[i][j - 1] + 1;
            if (i > 1 && j > 1 && tolower((unsigned char)a[i - 1]) == tolower((unsigned char)b[j - 2]) &&
                tolower((unsigned char)a[i - 2]) == tolower((unsigned char)b[j - 1]) && d[i - 2][j - 2] + 1 < v)
                v = d[i - 2][j - 2] + 1;
            d[i][j] = v;
        }
    }
    return d[la][lb];
}

const char *optd_name_nearest(const char *s, const char *const *names, size_t n)
{
    const char *best = NULL;
    size_t best_d = (size_t)-1, len = strlen(s);
    for (size_t i = 0; i < n; i++) {
        size_t d = distance(s, names[i]);
        /* A prefix of a name ("lr_sched") or a name with more after it
         * ("gradient") is near whatever its distance. */
        size_t ln = strlen(names[i]);
        if ((len >= 3 && len < ln && strncasecmp(s, names[i], len) == 0) ||
            (ln >= 4 && ln < len && strncasecmp(s, names[i], ln) == 0))
            d = d < 1 ? d : 1;
        if (d < best_d) {
            best_d = d;
            best = names[i];
        }
    }
    /* One edit in a short name, two in a longer one, a third of a long one. */
    size_t limit = len <= 3 ? 1 : len <= 8 ? 2 : len / 3;
    return best && best_d <= limit ? best : NULL;
}

void optd_names_join(char *out, size_t outlen, const char *const *names, size_t n)
{
    size_t used = 0;
    if (outlen)
        out[0] = '\0';
    for (size_t i = 0; i < n && used < outlen; i++) {
        int w = snprintf(out + used, outlen - used, "%s%s", i ? ", " : "", names[i]);
        if (w < 0)
            break;
        used += (size_t)w;
    }
}

void optd_unknown_name_msg(char *msg, size_t msglen, const char *what, const char *name, const char *where,
                           const char *const *names, size_t n)
{
    char list[512], near[96] = "";
    const char *best = optd_name_nearest(name, names, n);
    optd_names_join(list, sizeof list, names, n);
    if (best)
        snprintf(near, sizeof near, "; did you mean \"%s\"?", best);
    snprintf(msg, msglen, "unknown %s \"%.64s\" in %s%s (valid: %s)", what, name, where, near, list);
}
