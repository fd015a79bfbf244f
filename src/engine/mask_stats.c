/* Constrained decoding's cost per token: how long each token's mask took to compute (the
 * grammar's matcher filling the allowed-token bitmask; applying it to the logits is not
 * counted), over every sequence of the model, in a histogram of log-spaced buckets that
 * any thread adds to with relaxed atomics (zse.h: zse_model_get_mask_stats). Both places
 * that fill masks — the host sampler (seq.c) and the batch's device mask rows (step.c) —
 * call zse_mask_fill_timed. */
#include "engine/engine.h"

#include <math.h>
#include <string.h>

/* bucket i holds times up to 100 ns × 2^(i/4): four buckets an octave (±9%), the last
 * everything slower than ~0.5 s */
#define BUCKET_BASE_S 1e-7

double zse_mask_bucket_le(int i)
{
    return i >= ZSE_MASK_BUCKETS - 1 ? INFINITY : BUCKET_BASE_S * exp2((double)i / 4.0);
}

static int bucket_of(double s)
{
    if (!(s > BUCKET_BASE_S))
        return 0;
    int i = (int)ceil(4.0 * log2(s / BUCKET_BASE_S));
    return i < ZSE_MASK_BUCKETS - 1 ? i : ZSE_MASK_BUCKETS - 1;
}

int zse_mask_fill_timed(const zse_model *m, zse_matcher *matcher, uint32_t *mask)
{
    double t0 = zse_now();
    int allowed = zse_matcher_fill_mask(matcher, mask);
    double dt = zse_now() - t0;
    zse_mask_timing *mt = m->mask_timing;
    atomic_fetch_add_explicit(&mt->count[bucket_of(dt)], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&mt->total_ns, (uint64_t)(dt * 1e9), memory_order_relaxed);
    return allowed;
}

void zse_model_get_mask_stats(const zse_model *m, zse_mask_stats *out)
{
    memset(out, 0, sizeof *out);
    for (int i = 0; i < ZSE_MASK_BUCKETS; i++) {
        out->count[i] = atomic_load_explicit(&m->mask_timing->count[i], memory_order_relaxed);
        out->n += out->count[i];
    }
    out->total_s = (double)atomic_load_explicit(&m->mask_timing->total_ns, memory_order_relaxed) * 1e-9;
}

double zse_mask_stats_quantile(const zse_mask_stats *s, double q)
{
    if (s->n == 0)
        return 0;
    uint64_t rank = (uint64_t)ceil(q * (double)s->n), seen = 0;
    if (rank == 0)
        rank = 1;
    for (int i = 0; i < ZSE_MASK_BUCKETS; i++) {
        seen += s->count[i];
        if (seen >= rank)
            return i == ZSE_MASK_BUCKETS - 1 ? zse_mask_bucket_le(i - 1) : zse_mask_bucket_le(i);
    }
    return zse_mask_bucket_le(ZSE_MASK_BUCKETS - 2);
}

void zse_mask_stats_sub(zse_mask_stats *s, const zse_mask_stats *before)
{
    s->n = 0;
    for (int i = 0; i < ZSE_MASK_BUCKETS; i++) {
        s->count[i] -= before->count[i];
        s->n += s->count[i];
    }
    s->total_s -= before->total_s;
}
