/* The paged KV cache's bookkeeping: a pool of fixed-size blocks (16 tokens of K and V for
 * every layer) and per-sequence block tables. The storage itself lives in the backend
 * (zse_kv); the tables built here are what its attention reads. */
#include "engine/engine.h"

#include <stdlib.h>
#include <string.h>

int zse_block_pool_init(zse_block_pool *p, int n_blocks)
{
    memset(p, 0, sizeof *p);
    if (n_blocks < 1)
        return zse_fail("a KV block pool needs at least one block (got %d)", n_blocks);
    p->free_list = zse_malloc((size_t)n_blocks * sizeof *p->free_list);
    p->in_use = zse_calloc((size_t)n_blocks, 1);
    if (!p->free_list || !p->in_use) {
        zse_block_pool_free(p);
        return -1;
    }
    for (int i = 0; i < n_blocks; i++)
        p->free_list[i] = n_blocks - 1 - i; /* pop order 0, 1, 2, ... */
    p->n_free = p->n_blocks = n_blocks;
    return 0;
}

void zse_block_pool_free(zse_block_pool *p)
{
    free(p->free_list);
    free(p->in_use);
    memset(p, 0, sizeof *p);
}

int32_t zse_block_alloc(zse_block_pool *p)
{
    if (p->n_free == 0)
        return -1;
    int32_t b = p->free_list[--p->n_free];
    p->in_use[b] = 1;
    return b;
}

int zse_block_release(zse_block_pool *p, int32_t block)
{
    if (block < 0 || block >= p->n_blocks || !p->in_use[block])
        return zse_fail("KV block %d is not in use (pool of %d blocks)", block, p->n_blocks);
    p->in_use[block] = 0;
    p->free_list[p->n_free++] = block;
    return 0;
}

int zse_block_pool_used(const zse_block_pool *p) { return p->n_blocks - p->n_free; }

int zse_kv_table_init(zse_kv_table *t, int max_blocks)
{
    memset(t, 0, sizeof *t);
    t->blocks = zse_calloc((size_t)(max_blocks > 0 ? max_blocks : 1), sizeof *t->blocks);
    if (!t->blocks)
        return -1;
    t->max_blocks = max_blocks;
    return 0;
}

void zse_kv_table_free(zse_kv_table *t, zse_block_pool *p)
{
    if (t->blocks && p)
        zse_kv_table_truncate(t, p, 0);
    free(t->blocks);
    memset(t, 0, sizeof *t);
}

static int blocks_for(size_t n_tokens) { return (int)((n_tokens + ZSE_KV_BLOCK - 1) / ZSE_KV_BLOCK); }

int zse_kv_table_blocks_needed(const zse_kv_table *t, size_t n_tokens)
{
    int need = blocks_for(n_tokens) - t->n_blocks;
    return need > 0 ? need : 0;
}

int zse_kv_table_reserve(zse_kv_table *t, zse_block_pool *p, size_t n_tokens)
{
    if (n_tokens > (size_t)t->max_blocks * ZSE_KV_BLOCK)
        return zse_fail("a sequence of %zu tokens does not fit its block table (%d tokens)", n_tokens,
                        t->max_blocks * ZSE_KV_BLOCK);
    int need = zse_kv_table_blocks_needed(t, n_tokens);
    if (need > p->n_free)
        return zse_fail("the KV cache is full: %d more blocks of %d tokens needed, %d of %d free; use a "
                        "larger --kv-cache budget or fewer sequences",
                        need, ZSE_KV_BLOCK, p->n_free, p->n_blocks);
    for (int i = 0; i < need; i++)
        t->blocks[t->n_blocks++] = zse_block_alloc(p);
    return 0;
}

void zse_kv_table_truncate(zse_kv_table *t, zse_block_pool *p, size_t n_tokens)
{
    int keep = blocks_for(n_tokens);
    while (t->n_blocks > keep)
        zse_block_release(p, t->blocks[--t->n_blocks]);
}
