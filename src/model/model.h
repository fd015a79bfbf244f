/* model — the decoder forward pass over backend ops. One family today (llama, mistral,
 * qwen2 share the block: pre-norm attention with RoPE and GQA, SwiGLU MLP), with flags for
 * the variants: q/k/v biases (qwen2), q/k norm (qwen3), tied embeddings, sliding window. */
#ifndef ZSE_MODEL_H
#define ZSE_MODEL_H

#include "backend/backend.h"
#include "format/format.h"

typedef struct zse_llm zse_llm;

/* ---- weights beyond the device (issue 18; src/model/offload.c, fit.c) --------------------
 * A model larger than its device runs with part of its weights in pinned host memory:
 *  - experts offloaded: a mixture-of-experts model keeps every non-expert weight on the
 *    device and its routed experts in host memory, with a device cache of `expert_slots`
 *    experts (least recently routed out first); a step fetches the routed experts it misses
 *    (prefetching the next layer's likely ones), or runs them on the host where that is
 *    cheaper;
 *  - zStream: a dense model keeps some layers resident and streams the others, one at a
 *    time, through `stream_buffers` device layer buffers: layer i+1 is copied while layer i
 *    computes.
 * The KV cache of every layer stays on the device either way. */
typedef enum {
    ZSE_HOST_EXPERTS_AUTO = 0,      /* a missing expert runs on the host when that finishes sooner */
    ZSE_HOST_EXPERTS_NEVER,         /* missing experts are always fetched */
    ZSE_HOST_EXPERTS_ALWAYS,        /* missing experts always run on the host (tests, comparisons) */
} zse_host_experts;

typedef struct {
    int expert_slots;               /* > 0: experts stay in host memory; the device caches this many */
    zse_host_experts host_experts;
    int host_threads;               /* threads of the host that runs experts (0: physical cores) */
    bool cold_cache;                /* no first fill of the expert cache (tests, cold-start benchmarks) */
    const uint8_t *streamed;        /* [n_layers], nonzero: the layer streams (NULL: none) */
    int stream_buffers;             /* device layer buffers the streamed layers pass through (>= 1) */
} zse_placement;

/* what the offloaded weights did, since load */
typedef struct {
    uint64_t steps;                 /* forward passes */
    uint64_t expert_hits;           /* routed experts found in the device cache */
    uint64_t expert_fetches;        /* routed experts copied to the device when the step needed them */
    uint64_t expert_prefetches;     /* experts copied ahead for the next layer's predicted routing */
    uint64_t expert_prefetch_hits;  /* of those, routed to before they were evicted */
    uint64_t expert_host;           /* routed experts computed on the host */
    uint64_t layers_streamed;       /* streamed layers computed */
    uint64_t bytes_to_device;       /* bytes copied from host memory: experts and streamed layers */
} zse_llm_offload_stats;

/* weights from the file onto the backend; activations sized for max_tokens rows per step
 * of which at most max_out get logits */
zse_llm *zse_llm_load(const zse_file *f, zse_backend *be, int max_tokens, int max_out);
/* the same with part of the weights in host memory (pl NULL: every weight on the backend);
 * the backend must have the host_pin ... act_write_rows ops */
zse_llm *zse_llm_load_placed(const zse_file *f, zse_backend *be, int max_tokens, int max_out,
                             const zse_placement *pl);
void zse_llm_offload_stats_get(const zse_llm *m, zse_llm_offload_stats *out);
/* bytes of the activations zse_llm_load allocates for these step sizes (the fit's figure) */
uint64_t zse_llm_act_bytes(const zse_config *c, int max_tokens, int max_out);

/* ---- what fits (fit.c): the placement for a device budget, before anything is loaded ------
 * The device holds, in order: the weights outside the layers, the activations, the KV cache
 * (kv_want, or down to kv_min when that is what fits) and a reserve of 5% of what is left
 * (at least 256 MiB, as the engine keeps); then every layer if it all fits (RESIDENT), else
 * for a mixture-of-experts model every non-expert weight and an expert cache of what is left
 * (EXPERTS), else for a dense model the layers that fit, the others streamed through
 * stream_buffers buffers (STREAM). Too small for even that: an error that states the
 * smallest budget that runs the model. */
typedef enum { ZSE_FIT_RESIDENT = 0, ZSE_FIT_EXPERTS, ZSE_FIT_STREAM } zse_fit_mode;

typedef struct {
    uint64_t budget;                /* device bytes for zse's allocations */
    const char *budget_what;        /* how an error names it: "--gpu-memory allows", "the GPU has free" */
    uint64_t kv_want, kv_min;       /* KV cache bytes asked for, and the least that runs (one context) */
    int max_tokens, max_out;        /* step sizes of the activations */
    bool embed_on_host;             /* an untied embedding table stays in host memory */
    int stream_buffers;             /* 0: 2 */
    int force_expert_slots;         /* > 0: experts offloaded with at most this many cached (ZSE_EXPERT_CACHE) */
    int force_streamed;             /* > 0: at least this many layers streamed (ZSE_STREAM_LAYERS) */
} zse_fit_in;

typedef struct {
    zse_fit_mode mode;
    uint64_t device_weights;        /* weights resident on the device */
    uint64_t slab_bytes;            /* the layer buffers or the expert cache */
    uint64_t host_weights;          /* weights left in host memory (pinned while the model runs) */
    uint64_t act_bytes, kv_bytes, reserve;
    uint64_t minimum;               /* the smallest budget that runs the model in this mode */
    int n_layers, layers_streamed, stream_buffers;
    uint64_t layer_buffer_bytes;    /* one layer buffer */
    int expert_slots, experts_total;
    uint64_t expert_slot_bytes;
    uint8_t *streamed;              /* [n_layers] (STREAM), owned: zse_fit_free */
} zse_fit;

/* 0 and the placement, or -1 with an error that says the minimum (out->minimum holds it too) */
int zse_llm_fit(const zse_file *f, const zse_fit_in *in, zse_fit *out);
void zse_fit_free(zse_fit *fit);
/* the placement a fit describes (valid while fit lives) */
void zse_fit_placement(const zse_fit *fit, zse_placement *pl);
/* "resident", "experts offloaded", "streamed" */
const char *zse_fit_mode_name(zse_fit_mode mode);
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
