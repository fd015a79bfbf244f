/* bench_matmul — throughput of the CPU backend's matmul per weight scheme on the matrices
 * of one transformer layer of a given shape (default Qwen2.5-1.5B), against the memory
 * read bandwidth measured in the same run (the decode roofline).
 *
 *   build/bench_matmul [--threads N] [--tokens T[,T...]] [--schemes s,s] [--shape NAME]
 *                      [--path auto|portable|avx2|avx512] [--seconds S] [--cpu-time on]
 *
 * For each scheme it packs one layer (q, k, v, o, gate, up, down) with src/quant, copies
 * it until the copies outgrow the last-level cache (so every call streams its weight from
 * memory, as decode does), and times backend matmuls over the copies in turn. Decode
 * (T = 1) reports GB/s of packed weight read and its share of the read roofline; batches
 * (T > 1) report tokens/s through the layer's matmuls and GFLOP/s.
 * Not a test: figures go to docs/BENCHMARKS.md with the command that made them. */
#include "backend/cpu/cpu.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    const char *name;
    int64_t hidden, inter, q_out, kv_out;
} layer_shape;

static const layer_shape shapes[] = {
    {"qwen2.5-1.5b", 1536, 8960, 1536, 256},
    {"qwen2.5-0.5b", 896, 4864, 896, 128},
    {"qwen2.5-7b", 3584, 18944, 3584, 512},
    {"llama-3.2-1b", 2048, 8192, 2048, 512},
};

enum { N_MATS = 7 };

typedef struct {
    zse_qshape q[N_MATS];
    uint8_t *packed[N_MATS];
    size_t bytes;               /* one layer's packed bytes */
} layer;

static uint64_t rng = 0x2545F4914F6CDD1Dull;

static float gauss(void)
{
    double u[2];
    for (int i = 0; i < 2; i++) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        u[i] = ((double)(rng >> 11) + 0.5) / 9007199254740992.0;
    }
    return (float)(sqrt(-2 * log(u[0])) * cos(6.283185307179586 * u[1]));
}

static int pack_layer(layer *L, const layer_shape *s, zse_scheme scheme, int group)
{
    const int64_t dims[N_MATS][2] = {{s->q_out, s->hidden}, {s->kv_out, s->hidden}, {s->kv_out, s->hidden},
                                     {s->hidden, s->q_out},  {s->inter, s->hidden},  {s->inter, s->hidden},
                                     {s->hidden, s->inter}};
    L->bytes = 0;
    for (int m = 0; m < N_MATS; m++) {
        zse_qshape q = {scheme, dims[m][0], dims[m][1], zse_scheme_is_grouped(scheme) ? group : 0};
        size_t bytes = zse_qshape_bytes(&q), n = (size_t)(q.rows * q.cols);
        float *w = zse_malloc(n * sizeof *w);
        L->packed[m] = zse_aligned_alloc(4096, bytes);
        if (!w || !L->packed[m]) {
            free(w);
            return -1;
        }
        memset(L->packed[m], 0, bytes);
        for (size_t i = 0; i < n; i++)
            w[i] = gauss() * 0.02f;
        zse_quantize_rows(&q, w, L->packed[m], 0, q.rows);
        free(w);
        L->q[m] = q;
        L->bytes += bytes;
    }
    return 0;
}

static int copy_layer(layer *dst, const layer *src)
{
    *dst = *src;
    for (int m = 0; m < N_MATS; m++) {
        size_t bytes = zse_qshape_bytes(&src->q[m]);
        dst->packed[m] = zse_aligned_alloc(4096, bytes);
        if (!dst->packed[m])
            return -1;
        memcpy(dst->packed[m], src->packed[m], bytes);
    }
    return 0;
}

static void free_layer(layer *L)
{
    for (int m = 0; m < N_MATS; m++)
        free(L->packed[m]);
}

static double now(void);

/* ---- the read roofline: every thread sums its share of a buffer larger than the LLC ---- */
typedef struct {
    const uint64_t *p;
    size_t n;
    uint64_t sink[64];
} bw_job;

static void bw_thread(void *arg, int ith, int nth)
{
    bw_job *j = arg;
    size_t per = j->n / (size_t)nth, i0 = per * (size_t)ith;
    uint64_t a = 0, b = 0, c = 0, d = 0;
    for (size_t i = i0; i + 4 <= i0 + per; i += 4) {
        a += j->p[i];
        b ^= j->p[i + 1];
        c += j->p[i + 2];
        d ^= j->p[i + 3];
    }
    j->sink[ith % 64] = a + b + c + d;
}

static double read_bandwidth(int threads)
{
    size_t bytes = (size_t)512 << 20;
    uint64_t *buf = zse_aligned_alloc(4096, bytes);
    zse_pool *pool = zse_pool_create(threads);
    if (!buf || !pool) {
        free(buf);
        zse_pool_free(pool);
        return 0;
    }
    for (size_t i = 0; i < bytes / 8; i++)
        buf[i] = i * 0x9E3779B97F4A7C15ull;
    bw_job j = {.p = buf, .n = bytes / 8};
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = now();
        zse_pool_run(pool, bw_thread, &j);
        double dt = now() - t0;
        if (bytes / dt > best)
            best = (double)bytes / dt;
    }
    free(buf);
    zse_pool_free(pool);
    return best / 1e9;
}

/* ---- timing ------------------------------------------------------------------------------ */

/* This machine may be shared: --cpu-time times by the process's CPU time instead of the
 * wall clock, which with one thread leaves out the time other processes held the core
 * (the roofline is then measured the same way). */
static bool use_cpu_time;

static double now(void)
{
    if (!use_cpu_time)
        return zse_now();
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double time_layers(zse_backend *be, layer *copies, int n_copies, int64_t tokens, double seconds,
                          const layer_shape *s)
{
    zse_weight *w[64][N_MATS];
    for (int c = 0; c < n_copies; c++)
        for (int m = 0; m < N_MATS; m++) {
            zse_tensor_info ti = {.name = "w", .q = copies[c].q[m], .layout = zse_scheme_layout(copies[c].q[m].scheme),
                                  .size = zse_qshape_bytes(&copies[c].q[m]), .data = copies[c].packed[m]};
            w[c][m] = be->ops->weight_load(be, &ti);
        }
    int64_t width = s->inter > s->hidden ? s->inter : s->hidden;
    zse_act *x = be->ops->act_new(be, tokens, width), *y = be->ops->act_new(be, tokens, width);
    zse_act *xs = be->ops->act_new(be, tokens, s->hidden);
    zse_act *xi = be->ops->act_new(be, tokens, s->inter);
    (void)x;
    for (int64_t i = 0; i < tokens * s->hidden; i++)
        xs->data[i] = gauss();
    for (int64_t i = 0; i < tokens * s->inter; i++)
        xi->data[i] = gauss();
    /* warm up once over every copy (page faults, pool start) */
    double best = 1e30, start = zse_now();
    int rounds = 0;
    for (;;) {
        double t0 = now();
        for (int c = 0; c < n_copies; c++)
            for (int m = 0; m < N_MATS; m++)
                be->ops->matmul(be, w[c][m], m == 6 ? xi : xs, tokens, y);
        double dt = (now() - t0) / n_copies;
        if (rounds++ > 0 && dt < best)
            best = dt;
        if (rounds >= 3 && zse_now() - start > seconds)
            break;
    }
    for (int c = 0; c < n_copies; c++)
        for (int m = 0; m < N_MATS; m++)
            be->ops->weight_free(be, w[c][m]);
    be->ops->act_free(be, x);
    be->ops->act_free(be, y);
    be->ops->act_free(be, xs);
    be->ops->act_free(be, xi);
    return best; /* seconds per layer */
}

static void usage(void)
{
    fprintf(stderr, "usage: bench_matmul [--threads N] [--tokens 1,16,64] [--schemes int4,int8,...] "
                    "[--group-size G] [--shape qwen2.5-1.5b|qwen2.5-0.5b|qwen2.5-7b|llama-3.2-1b] "
                    "[--path auto|portable|avx2|avx512] [--seconds S] [--cpu-time on]\n");
}

int main(int argc, char **argv)
{
    int threads = 0, group = 128;
    double seconds = 2.0;
    const char *token_list = "1,16,64", *scheme_list = "int4,int4s,nf4,int8,f16,bf16,f32", *path = "auto";
    const layer_shape *s = &shapes[0];
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            usage();
            return 2;
        }
        i++;
        if (strcmp(a, "--threads") == 0)
            threads = atoi(v);
        else if (strcmp(a, "--tokens") == 0)
            token_list = v;
        else if (strcmp(a, "--schemes") == 0)
            scheme_list = v;
        else if (strcmp(a, "--group-size") == 0)
            group = atoi(v);
        else if (strcmp(a, "--seconds") == 0)
            seconds = atof(v);
        else if (strcmp(a, "--cpu-time") == 0)
            use_cpu_time = strcmp(v, "1") == 0 || strcmp(v, "on") == 0;
        else if (strcmp(a, "--path") == 0)
            path = v;
        else if (strcmp(a, "--shape") == 0) {
            s = NULL;
            for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; k++)
                if (strcmp(shapes[k].name, v) == 0)
                    s = &shapes[k];
            if (!s) {
                usage();
                return 2;
            }
        } else {
            usage();
            return 2;
        }
    }
    if (threads <= 0)
        threads = zse_physical_cores();
    if (zse_cpu_set_path(path) != 0) {
        fprintf(stderr, "bench_matmul: %s\n", zse_error_message());
        return 1;
    }
    zse_backend *be = zse_cpu_backend_create(threads);
    if (!be) {
        fprintf(stderr, "bench_matmul: %s\n", zse_error_message());
        return 1;
    }
    if (use_cpu_time && threads != 1) {
        fprintf(stderr, "bench_matmul: --cpu-time needs --threads 1 (CPU time adds up over threads)\n");
        return 2;
    }
    double roof = read_bandwidth(threads);
    printf("shape %s, %d threads, kernels %s; memory read roofline %.1f GB/s\n", s->name, threads,
           zse_cpu_path_name(), roof);
    printf("%-6s %5s %10s %9s %10s %8s %9s %9s\n", "scheme", "T", "layer MB", "ms/layer", "GB/s", "of roof",
           "tok/s*", "GFLOP/s");

    char schemes[256];
    snprintf(schemes, sizeof schemes, "%s", scheme_list);
    for (char *save = NULL, *name = strtok_r(schemes, ",", &save); name; name = strtok_r(NULL, ",", &save)) {
        zse_scheme sc;
        if (zse_scheme_from_name(name, &sc) != 0) {
            fprintf(stderr, "bench_matmul: %s\n", zse_error_message());
            return 1;
        }
        layer copies[64];
        if (pack_layer(&copies[0], s, sc, group) != 0) {
            fprintf(stderr, "bench_matmul: %s\n", zse_error_message());
            return 1;
        }
        /* enough copies that one round reads ~256 MB: well past the 32 MB LLC */
        int n = (int)((((size_t)256 << 20) + copies[0].bytes - 1) / copies[0].bytes);
        n = n < 2 ? 2 : n > 64 ? 64 : n;
        for (int c = 1; c < n; c++)
            if (copy_layer(&copies[c], &copies[0]) != 0) {
                fprintf(stderr, "bench_matmul: %s\n", zse_error_message());
                return 1;
            }
        char tl[256];
        snprintf(tl, sizeof tl, "%s", token_list);
        for (char *s2 = NULL, *tk = strtok_r(tl, ",", &s2); tk; tk = strtok_r(NULL, ",", &s2)) {
            int64_t T = atoll(tk);
            if (T < 1)
                continue;
            double dt = time_layers(be, copies, n, T, seconds, s);
            double params = (double)(2 * s->q_out * s->hidden + 2 * s->kv_out * s->hidden + 3 * s->inter * s->hidden);
            printf("%-6s %5lld %10.1f %9.3f %10.1f %7.0f%% %9.1f %9.1f\n", name, (long long)T,
                   copies[0].bytes / 1e6, dt * 1e3, copies[0].bytes / dt / 1e9,
                   100 * copies[0].bytes / dt / 1e9 / roof, (double)T / dt, 2 * params * (double)T / dt / 1e9);
            fflush(stdout);
        }
        for (int c = 0; c < n; c++)
            free_layer(&copies[c]);
    }
    printf("* tok/s through one layer's seven matmuls (no attention or norms)\n");
    zse_backend_destroy(be);
    return 0;
}
