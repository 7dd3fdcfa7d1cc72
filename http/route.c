/* Request-line and header parsing that needs no server: the router, the
 * session name rule, If-Match and the URL unescaping given to
 * libmicrohttpd. Kept apart from http.c so tests and fuzzers reach them. */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "http/httpInt.h"

int name_valid(const char *s)
{
    size_t n = 0;
    if (!isalnum((unsigned char)s[0]))
        return 0;
    for (; s[n]; n++)
        if (n >= STORE_NAME_MAX || !(isalnum((unsigned char)s[n]) || s[n] == '.' || s[n] == '_' || s[n] == '-'))
            return 0;
    return 1;
}

/* Whether url matches the template path: equal, or with the segment at
 * "{name}" copied into name (1 to STORE_NAME_MAX bytes). */
static int path_match(const char *path, const char *url, char name[STORE_NAME_MAX + 1])
{
    const char *hole = strstr(path, "{name}");
    if (!hole)
        return strcmp(path, url) == 0;
    size_t pre = (size_t)(hole - path);
    if (strncmp(url, path, pre) != 0)
        return 0;
    const char *s = url + pre, *slash = strchr(s, '/');
    size_t len = slash ? (size_t)(slash - s) : strlen(s);
    if (len == 0 || len > STORE_NAME_MAX || strcmp(s + len, hole + strlen("{name}")) != 0)
        return 0;
    memcpy(name, s, len);
    name[len] = '\0';
    return 1;
}

http_route route_parse(const char *url, char name[STORE_NAME_MAX + 1], int *name_ok)
{
    name[0] = '\0';
    *name_ok = 0;
    for (int r = HTTP_R_NONE + 1; r < HTTP_R_COUNT; r++) {
        if (path_match(http_routes[r].path, url, name)) {
            *name_ok = name[0] && name_valid(name);
            return (http_route)r;
        }
    }
    name[0] = '\0';
    return HTTP_R_NONE;
}

/* Parses If-Match: "N", W/"N" or N; -1 when absent or "*". */
int parse_if_match(const char *v, int64_t *out)
{
    *out = -1;
    if (!v)
        return 0;
    while (*v == ' ')
        v++;
    if (strcmp(v, "*") == 0)
        return 0;
    if (strncmp(v, "W/", 2) == 0)
        v += 2;
    int quoted = *v == '"';
    v += quoted;
    if (!isdigit((unsigned char)*v))
        return -1;
    char *end;
    errno = 0;
    unsigned long long n = strtoull(v, &end, 10);
    if (errno || n > INT64_MAX)
        return -1;
    if (quoted && *end++ != '"')
        return -1;
    while (*end == ' ')
        end++;
    if (*end)
        return -1;
    *out = (int64_t)n;
    return 0;
}

/* Percent-decodes in place, except that a string with an encoded NUL or a
 * bad escape stays as it came (so it matches no valid name). */
size_t url_unescape(char *s)
{
    size_t n = strlen(s);
    for (size_t i = 0; i < n; i++)
        if (s[i] == '%' && (i + 2 >= n || !isxdigit((unsigned char)s[i + 1]) || !isxdigit((unsigned char)s[i + 2]) ||
                            (s[i + 1] == '0' && s[i + 2] == '0')))
            return n;
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '%') {
            char hex[3] = {s[i + 1], s[i + 2], 0};
            s[o++] = (char)strtol(hex, NULL, 16);
            i += 2;
        } else {
            s[o++] = s[i];
        }
    }
    s[o] = '\0';
    return o;
}

char *http_list_next(char **cur)
{
    char *p = *cur;
    if (!p)
        return NULL;
    char *next = strchr(p, ',');
    if (next)
        *next++ = '\0';
    *cur = next;
    while (*p == ' ' || *p == '\t')
        p++;
    char *end = p + strlen(p);
    while (end > p && (end[-1] == ' ' || end[-1] == '\t'))
        *--end = '\0';
    return p;
}

int http_parse_number(const char *v, double *out)
{
    char *end;
    errno = 0;
    double d = strtod(v, &end);
    if (end == v || *end || errno == ERANGE || !isfinite(d))
        return -1;
    *out = d;
    return 0;
}

int parse_uint(const char *v, uint64_t max, uint64_t *out)
{
    uint64_t n = 0;
    if (!*v)
        return -1;
    for (; *v; v++) {
        if (*v < '0' || *v > '9' || n > (max - (uint64_t)(*v - '0')) / 10)
            return -1;
        n = n * 10 + (uint64_t)(*v - '0');
    }
    *out = n;
    return 0;
}
