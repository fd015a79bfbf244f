/* Embeddings (zse.h: zse_embed): a throwaway sequence runs the tokens in chunks, every
 * position of a chunk an out row, and the final hidden states are summed (mean pooling) or
 * the last one kept, then scaled to unit length. The run lock is taken a chunk at a time,
 * so a running engine steps between chunks. Nothing goes to or comes from the prefix cache:
 * every position's state is wanted, and a throwaway's blocks are not worth publishing. */
#include "engine/engine.h"

#include "model/model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int zse_embed(zse_model *m, const int32_t *ids, size_t n, zse_pooling pooling, float *out)
{
    if (n == 0)
        return zse_fail("nothing to embed: the input has no tokens");
    if (n > (size_t)m->ctx_size)
        return zse_fail("the input has %zu tokens, more than the context of %d", n, m->ctx_size);
    if (pooling != ZSE_POOL_MEAN && pooling != ZSE_POOL_LAST)
        return zse_fail("unknown pooling %d (mean or last)", (int)pooling);
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= m->vocab)
            return zse_fail("token id %d at %zu is outside the vocabulary (0..%d)", ids[i], i, m->vocab - 1);
    const int dim = zse_llm_config(m->llm)->hidden_size;
    zse_sequence q;
    zse_batcher batcher = {0};
    double *sum = calloc((size_t)dim, sizeof *sum);
    float *rows = NULL;
    int rc = sum && zse_sequence_init(&q, m, NULL) == 0 ? 0 : -1;
    if (rc != 0) {
        free(sum);
        return -1;
    }
    rc = zse_sequence_append(&q, ids, n);
    int cap = 0; /* rows holds this many hidden states */
    for (size_t done = 0; rc == 0 && done < n;) {
        pthread_mutex_lock(&m->run_lock);
        if (!cap) {
            cap = zse_llm_max_out(m->llm);
            if (!(rows = malloc((size_t)cap * (size_t)dim * sizeof *rows)))
                rc = -1;
        }
        int chunk = cap < zse_llm_max_out(m->llm) ? cap : zse_llm_max_out(m->llm);
        if ((size_t)chunk > n - done)
            chunk = (int)(n - done);
        bool last = done + (size_t)chunk == n;
        /* mean pooling reads every row; last pooling only the final chunk's last row */
        int n_out = pooling == ZSE_POOL_MEAN ? chunk : last ? 1 : 0;
        zse_step_seq e = {.q = &q, .take = chunk, .n_out = n_out, .out = -1};
        zse_batch b;
        if (rc == 0)
            rc = zse_sequence_reserve(&q, m, done + (size_t)chunk);
        if (rc == 0)
            rc = zse_batcher_pack(&batcher, &e, 1, &b);
        if (rc == 0)
            rc = n_out ? zse_llm_forward_hidden(m->llm, m->kv, &b, rows) : zse_llm_forward(m->llm, m->kv, &b, NULL);
        pthread_mutex_unlock(&m->run_lock);
        for (int k = 0; rc == 0 && k < n_out; k++)
            for (int i = 0; i < dim; i++)
                sum[i] += rows[(size_t)k * (size_t)dim + (size_t)i];
        q.n_cached += (size_t)chunk;
        done += (size_t)chunk;
    }
    if (rc == 0) {
        double norm = 0, count = pooling == ZSE_POOL_MEAN ? (double)n : 1.0;
        for (int i = 0; i < dim; i++)
            norm += (sum[i] / count) * (sum[i] / count);
        norm = sqrt(norm);
        for (int i = 0; i < dim; i++)
            out[i] = norm > 0 ? (float)(sum[i] / count / norm) : 0.f;
    }
    zse_sequence_free(&q, m);
    zse_batcher_free(&batcher);
    free(rows);
    free(sum);
    return rc;
}
