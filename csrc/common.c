#include "common.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

int pf_fail(pf_status *st, int code, const char *fmt, ...) {
    if (st) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(st->msg, sizeof st->msg, fmt, ap);
        va_end(ap);
        st->code = code;
    }
    return code;
}

void *pf_malloc(size_t nbytes, const char *what, pf_status *st) {
    void *p = malloc(nbytes ? nbytes : 1);
    if (!p) pf_fail(st, PF_ENOMEM, "out of memory allocating %zu bytes for %s", nbytes, what);
    return p;
}

void *pf_calloc(size_t n, size_t size, const char *what, pf_status *st) {
    if (size && n > SIZE_MAX / size) {
        pf_fail(st, PF_ENOMEM, "size overflow allocating %zu x %zu bytes for %s", n, size, what);
        return NULL;
    }
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) pf_fail(st, PF_ENOMEM, "out of memory allocating %zu x %zu bytes for %s", n, size, what);
    return p;
}
