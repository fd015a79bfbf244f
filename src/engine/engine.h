/* engine — models, sequences, the paged KV cache and the sampler behind include/zse.h. */
#ifndef ZSE_ENGINE_H
#define ZSE_ENGINE_H

#include "zse.h"

#include <stdbool.h>
#include <stdint.h>

/* ---- paged KV block allocator: fixed-size blocks handed out from a free list ---- */
#define ZSE_KV_BLOCK 16

typedef struct {
    int32_t *free_list;
    int n_free;
    int n_blocks;
} zse_block_pool;

int zse_block_pool_init(zse_block_pool *p, int n_blocks);
void zse_block_pool_free(zse_block_pool *p);
int32_t zse_block_alloc(zse_block_pool *p);          /* -1 when exhausted */
void zse_block_release(zse_block_pool *p, int32_t block);

/* ---- sampler ---- */
typedef struct {
    uint64_t s[4];
} zse_rng;

void zse_rng_seed(zse_rng *r, uint64_t seed);
double zse_rng_uniform(zse_rng *r);                   /* [0, 1) */

/* Picks the next token from logits (modified in place): logit bias, repetition /
 * presence / frequency penalties over `history` (the generated tokens for presence and
 * frequency, prompt and generated for repetition), then greedy or temperature + top-k +
 * top-p + min-p sampling. `work` holds vocab floats and vocab ints of scratch. */
typedef struct {
    const int32_t *prompt;
    size_t n_prompt;
    const int32_t *generated;
    size_t n_generated;
} zse_history;

int32_t zse_sample(const zse_sampling *s, float *logits, int vocab, const zse_history *h, zse_rng *rng,
                   float *work_p, int32_t *work_i);

/* the longest suffix of text[0..n) that is a proper prefix of some stop string: text that
 * must be held back because a stop string might complete with the next token */
size_t zse_stop_holdback(const char *text, size_t n, const char *const *stop, int n_stop);

#endif
