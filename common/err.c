/* Lookups into the error table of err.h. */
#include <stdarg.h>
#include <stdio.h>

#include "err.h"

static const struct {
    const char *code;
    int status;
    const char *msg;
} table[] = {
#define OPTD_ERR_ROW(name, code, status, msg) {code, status, msg},
    OPTD_ERR_MAP(OPTD_ERR_ROW)
#undef OPTD_ERR_ROW
};

const char *optd_err_code(optd_err e) { return (unsigned)e < OPTD_E_COUNT ? table[e].code : "internal"; }
int optd_err_status(optd_err e) { return (unsigned)e < OPTD_E_COUNT ? table[e].status : 500; }
const char *optd_err_message(optd_err e) { return (unsigned)e < OPTD_E_COUNT ? table[e].msg : "internal error"; }

optd_err optd_fail(char *msg, size_t msglen, optd_err rc, const char *fmt, ...)
{
    if (msg && msglen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, msglen, fmt, ap);
        va_end(ap);
    }
    return rc;
}
