/* model — the decoder forward pass over backend ops. One family today (llama, mistral,
 * qwen2 share the block: pre-norm attention with RoPE and GQA, SwiGLU MLP), with flags for
 * the variants: q/k/v biases (qwen2), q/k norm (qwen3), tied embeddings, sliding window. */
#ifndef ZSE_MODEL_H
#define ZSE_MODEL_H

#include "backend/backend.h"
#include "format/format.h"

typedef struct zse_llm zse_llm;

/* weights from the file onto the backend; activations sized for max_tokens rows per step
 * of which at most max_out get logits */
zse_llm *zse_llm_load(const zse_file *f, zse_backend *be, int max_tokens, int max_out);
void zse_llm_free(zse_llm *m);
/* grows the activations to at least these sizes (never shrinks); on failure the old
 * sizes stay usable */
int zse_llm_reserve(zse_llm *m, int max_tokens, int max_out);
const zse_config *zse_llm_config(const zse_llm *m);
int zse_llm_max_tokens(const zse_llm *m);
int zse_llm_max_out(const zse_llm *m);

/* runs the batch (its K/V are stored into kv at the batch's slots) and writes
 * logits [b->n_out][vocab] for the batch's out_rows */
int zse_llm_forward(zse_llm *m, zse_kv *kv, const zse_batch *b, float *logits);
/* the same, but writes only the argmax of each out row's logits (ids [b->n_out]), computed
 * where the logits are (on a GPU they never cross to the host); masks (may be NULL) first
 * rule out the tokens constrained rows may not take (zse_llm_can_mask) */
int zse_llm_forward_argmax(zse_llm *m, zse_kv *kv, const zse_batch *b, const zse_row_masks *masks, int32_t *ids);
/* whether the backend masks logit rows where they are (masks for forward_argmax/sample) */
bool zse_llm_can_mask(const zse_llm *m);

/* the same, but writes the out rows' final hidden states (after the last norm, what the head
 * reads: [b->n_out][hidden_size]) instead of their logits (embeddings) */
int zse_llm_forward_hidden(zse_llm *m, zse_kv *kv, const zse_batch *b, float *hidden);
/* whether the backend samples where the logits are (zse_llm_forward_sample) */
bool zse_llm_can_sample(const zse_llm *m);
/* the same, but draws each out row's token by p[row] on the backend (ids [b->n_out]); the
 * logits are not kept */
int zse_llm_forward_sample(zse_llm *m, zse_kv *kv, const zse_batch *b, const zse_row_masks *masks,
                           const zse_sample_row *p, int32_t *ids);

/* the adapter slots a batch's adapter_of_seq indexes (the engine's LoRA cache owns them) */
void zse_llm_set_lora(zse_llm *m, zse_lora_pool *pool);

/* forward passes started so far (a caller tells from it whether the logits buffer still
 * holds its step's rows) */
uint64_t zse_llm_steps(const zse_llm *m);
/* the first `rows` logit rows of the last forward pass, to the host ([rows][vocab]) */
int zse_llm_read_logits(zse_llm *m, int rows, float *logits);

/* RoPE inverse frequencies for the config's scaling (head_dim / 2 values) and the
 * attention magnitude factor (YaRN; 1 otherwise) — exposed for tests */
void zse_rope_frequencies(const zse_config *c, float *inv_freq, float *mscale);

#endif
