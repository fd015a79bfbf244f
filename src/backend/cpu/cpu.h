/* backend/cpu — internal header shared by the CPU backend's files. */
#ifndef ZSE_BACKEND_CPU_H
#define ZSE_BACKEND_CPU_H

#include "backend/backend.h"

struct zse_act {
    float *data;
    int64_t rows, cols;
};

struct zse_weight {
    zse_qshape q;
    zse_qplanes p;
    const uint8_t *data;
};

/* fn(ctx, i0, i1) over [0, n) split across the backend's threads */
typedef void (*zse_cpu_range_fn)(void *ctx, int64_t i0, int64_t i1);
void zse_cpu_parallel_for(zse_backend *be, int64_t n, zse_cpu_range_fn fn, void *ctx);

/* y[t][0:w.rows] = W · x[t][0:w.cols] for t < rows (matmul.c) */
void zse_cpu_matmul(zse_backend *be, const zse_weight *w, const zse_act *x, int64_t rows, zse_act *y);

/* ops return nothing: a kernel that cannot finish (out of memory) records it here and
 * the next sync() reports it, so a step never silently yields garbage */
void zse_cpu_note_failure(zse_backend *be, const char *what);

/* tests: force the portable f32 kernels even where AVX2 is present */
void zse_cpu_set_portable(bool portable);

#endif
