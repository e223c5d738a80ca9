/* common.h: status reporting shared by the whole C core.
 * The core never touches Python: every function that can fail takes a
 * pf_status* and returns 0 on success or a PF_E* code, with a message written
 * into status->msg. module.c turns it into a Python exception after the GIL
 * is re-taken. No global state. */
#ifndef PF_COMMON_H
#define PF_COMMON_H
#include <stddef.h>
#include <stdint.h>

enum {
    PF_OK = 0,
    PF_ENOMEM = 1,        /* -> MemoryError */
    PF_EINVAL = 2,        /* -> ValueError (bad shapes, ids, sizes, corrupt data) */
    PF_ENONFINITE = 3,    /* -> FloatingPointError (NaN/inf in loss or gradient) */
    PF_EUNSUPPORTED = 4,  /* -> ValueError naming the unsupported thing */
};

typedef struct {
    int code;
    char msg[512];
} pf_status;

/* Sets status (code + printf-style message) and returns code. */
int pf_fail(pf_status *st, int code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* malloc/calloc that record PF_ENOMEM with the size and what it was for. */
void *pf_malloc(size_t nbytes, const char *what, pf_status *st);
void *pf_calloc(size_t n, size_t size, const char *what, pf_status *st);

#endif
