/* The paged KV cache's bookkeeping: a pool of fixed-size blocks (16 tokens of K and V for
 * every layer) with reference counts, the prefix cache over published full blocks (a key
 * table and an LRU list of the idle ones), and per-sequence block tables. The storage
 * itself lives in the backend (zse_kv); the tables built here are what its attention reads. */
#include "engine/engine.h"

#include <stdlib.h>
#include <string.h>

/* ---- the LRU list of idle published blocks ---------------------------------------------- */

static void lru_push(zse_block_pool *p, int32_t b)
{
    p->lru_prev[b] = p->lru_tail;
    p->lru_next[b] = -1;
    if (p->lru_tail >= 0)
        p->lru_next[p->lru_tail] = b;
    else
        p->lru_head = b;
    p->lru_tail = b;
    p->n_idle++;
}

static void lru_remove(zse_block_pool *p, int32_t b)
{
    if (p->lru_prev[b] >= 0)
        p->lru_next[p->lru_prev[b]] = p->lru_next[b];
    else
        p->lru_head = p->lru_next[b];
    if (p->lru_next[b] >= 0)
        p->lru_prev[p->lru_next[b]] = p->lru_prev[b];
    else
        p->lru_tail = p->lru_prev[b];
    p->n_idle--;
}

/* ---- the key table: open addressing, linear probing, tombstones --------------------------- */

enum { SLOT_EMPTY = -1, SLOT_DELETED = -2 };

static size_t table_home(const zse_block_pool *p, uint64_t key) { return (size_t)(key & (p->table_cap - 1)); }

static bool is_published(const zse_block_pool *p, int32_t b) { return p->key && p->key[b] != 0; }

static void table_remove(zse_block_pool *p, int32_t b)
{
    for (size_t i = table_home(p, p->key[b]), k = 0; k < p->table_cap; i = (i + 1) & (p->table_cap - 1), k++) {
        if (p->slot_of[i] == SLOT_EMPTY)
            break;
        if (p->slot_of[i] == b) {
            p->slot_of[i] = SLOT_DELETED;
            p->n_tombs++;
            break;
        }
    }
    p->key[b] = 0;
    p->n_published--;
}

int32_t zse_block_find(const zse_block_pool *p, uint64_t key, uint64_t parent, const int32_t *tokens)
{
    if (!p->key || key == 0)
        return -1;
    for (size_t i = table_home(p, key), k = 0; k < p->table_cap; i = (i + 1) & (p->table_cap - 1), k++) {
        int32_t b = p->slot_of[i];
        if (b == SLOT_EMPTY)
            return -1;
        /* a hit must match the prefix's key and the block's own tokens: a 64-bit collision
         * would have to hit both */
        if (b >= 0 && p->key[b] == key && p->parent[b] == parent &&
            memcmp(p->tokens + (size_t)b * ZSE_KV_BLOCK, tokens, ZSE_KV_BLOCK * sizeof *tokens) == 0)
            return b;
    }
    return -1;
}

/* the table rebuilt without tombstones */
static void table_compact(zse_block_pool *p)
{
    p->n_tombs = 0;
    for (size_t i = 0; i < p->table_cap; i++)
        p->slot_of[i] = SLOT_EMPTY;
    for (int32_t b = 0; b < p->n_blocks; b++) {
        if (!p->key[b])
            continue;
        size_t i = table_home(p, p->key[b]);
        while (p->slot_of[i] != SLOT_EMPTY)
            i = (i + 1) & (p->table_cap - 1);
        p->slot_of[i] = b;
    }
}

void zse_block_publish(zse_block_pool *p, int32_t block, uint64_t key, uint64_t parent, const int32_t *tokens)
{
    if (!p->key || key == 0 || block < 0 || block >= p->n_blocks || p->ref[block] == 0 || p->key[block] != 0 ||
        zse_block_find(p, key, parent, tokens) >= 0)
        return;
    if (p->n_tombs > p->table_cap / 4) /* probes stay short: live keys fill at most half */
        table_compact(p);
    size_t i = table_home(p, key);
    while (p->slot_of[i] >= 0)
        i = (i + 1) & (p->table_cap - 1);
    if (p->slot_of[i] == SLOT_DELETED)
        p->n_tombs--;
    p->slot_of[i] = block;
    p->key[block] = key;
    p->parent[block] = parent;
    memcpy(p->tokens + (size_t)block * ZSE_KV_BLOCK, tokens, ZSE_KV_BLOCK * sizeof *tokens);
    p->n_published++;
}

uint64_t zse_block_key(uint64_t parent, const int32_t *tokens, uint64_t salt)
{
    uint64_t in[2 + ZSE_KV_BLOCK / 2];
    in[0] = parent;
    in[1] = salt;
    memcpy(in + 2, tokens, ZSE_KV_BLOCK * sizeof *tokens);
    uint64_t k = zse_hash64(in, sizeof in);
    return k ? k : 1; /* 0 means "not published" */
}

/* ---- the pool ------------------------------------------------------------------------------- */

int zse_block_pool_init(zse_block_pool *p, int n_blocks, bool cache)
{
    memset(p, 0, sizeof *p);
    p->lru_head = p->lru_tail = -1;
    if (n_blocks < 1)
        return zse_fail("a KV block pool needs at least one block (got %d)", n_blocks);
    p->free_list = zse_malloc((size_t)n_blocks * sizeof *p->free_list);
    p->ref = zse_calloc((size_t)n_blocks, sizeof *p->ref);
    if (!p->free_list || !p->ref) {
        zse_block_pool_free(p);
        return -1;
    }
    if (cache) {
        p->table_cap = 16;
        while (p->table_cap < (size_t)n_blocks * 2)
            p->table_cap *= 2;
        p->key = zse_calloc((size_t)n_blocks, sizeof *p->key);
        p->parent = zse_calloc((size_t)n_blocks, sizeof *p->parent);
        p->tokens = zse_malloc((size_t)n_blocks * ZSE_KV_BLOCK * sizeof *p->tokens);
        p->slot_of = zse_malloc(p->table_cap * sizeof *p->slot_of);
        p->lru_prev = zse_malloc((size_t)n_blocks * sizeof *p->lru_prev);
        p->lru_next = zse_malloc((size_t)n_blocks * sizeof *p->lru_next);
        if (!p->key || !p->parent || !p->tokens || !p->slot_of || !p->lru_prev || !p->lru_next) {
            zse_block_pool_free(p);
            return -1;
        }
        for (size_t i = 0; i < p->table_cap; i++)
            p->slot_of[i] = SLOT_EMPTY;
    }
    for (int i = 0; i < n_blocks; i++)
        p->free_list[i] = n_blocks - 1 - i; /* pop order 0, 1, 2, ... */
    p->n_free = p->n_blocks = n_blocks;
    return 0;
}

void zse_block_pool_free(zse_block_pool *p)
{
    free(p->free_list);
    free(p->ref);
    free(p->key);
    free(p->parent);
    free(p->tokens);
    free(p->slot_of);
    free(p->lru_prev);
    free(p->lru_next);
    memset(p, 0, sizeof *p);
    p->lru_head = p->lru_tail = -1;
}

int32_t zse_block_alloc(zse_block_pool *p)
{
    int32_t b;
    if (p->n_free > 0) {
        b = p->free_list[--p->n_free];
    } else if (p->n_idle > 0) { /* evict the least recently used idle cached block */
        b = p->lru_head;
        lru_remove(p, b);
        table_remove(p, b);
        p->evictions++;
    } else {
        return -1;
    }
    p->ref[b] = 1;
    return b;
}

int zse_block_release(zse_block_pool *p, int32_t block)
{
    if (block < 0 || block >= p->n_blocks || p->ref[block] <= 0)
        return zse_fail("KV block %d is not in use (pool of %d blocks)", block, p->n_blocks);
    if (--p->ref[block] > 0)
        return 0;
    if (is_published(p, block))
        lru_push(p, block);
    else
        p->free_list[p->n_free++] = block;
    return 0;
}

void zse_block_acquire(zse_block_pool *p, int32_t block)
{
    if (p->ref[block]++ == 0)
        lru_remove(p, block);
}

int zse_block_pool_used(const zse_block_pool *p) { return p->n_blocks - p->n_free - p->n_idle; }

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
    if (need > zse_block_pool_available(p))
        return zse_fail("the KV cache is full: %d more blocks of %d tokens needed, %d of %d free; use a "
                        "larger --kv-cache budget or fewer sequences",
                        need, ZSE_KV_BLOCK, zse_block_pool_available(p), p->n_blocks);
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
