/* model/internal.h — what the files of src/model share (not part of model.h's API):
 *
 *   llama.c   loading, activations, the step driver, attention and the dense MLP
 *   moe.c     a mixture-of-experts layer's MLP: router, routed experts, shared expert
 *   xcache.c  the expert cache's planner (which experts hit, are fetched, run on the host)
 *   offload.c weights in host memory: the expert cache and the layer stream, issued
 *   fit.c     the placement for a device budget (arithmetic only) */
#ifndef ZSE_MODEL_INTERNAL_H
#define ZSE_MODEL_INTERNAL_H

#include "model/model.h"

typedef struct {
    zse_weight *attn_norm;  /* (hidden) */
    zse_weight *wq, *wk, *wv; /* (heads*hd, hidden), (kv*hd, hidden) x2 */
    zse_weight *bq, *bk, *bv; /* biases (attn_bias) */
    zse_weight *q_norm, *k_norm; /* (hd), qwen3 */
    zse_weight *wo;         /* (hidden, heads*hd) */
    zse_weight *bo;         /* (hidden), attn_out_bias */
    zse_weight *ffn_norm;   /* (hidden) */
    /* a dense layer's MLP */
    zse_weight *gate, *up;  /* (ffn, hidden) */
    zse_weight *down;       /* (hidden, ffn) */
    /* a MoE layer's (moe.c) */
    zse_weight *router;     /* (n_experts, hidden), f32 */
    zse_experts *experts;   /* the routed experts */
    zse_weight *sh_gate, *sh_up; /* the shared expert: (shared_ffn, hidden) */
    zse_weight *sh_down;    /* (hidden, shared_ffn) */
    zse_weight *sh_inp;     /* its sigmoid gate: (1, hidden) */
} layer_weights;

/* ---- the expert cache's planner (xcache.c) ---- */
enum {
    ZSE_HOST_TILE = 8,          /* pairs the host's kernels take at once: its cost per expert is per tile */
    ZSE_HOST_MAX_PAIRS = 32,    /* an expert with more pairs in a step is never run on the host */
    ZSE_XPLAN_HOST = -2,        /* zse_xplan.where: the expert runs on the host */
    ZSE_PREFETCH_PROBE = 16,    /* while prefetching does not pay, one layer's prefetch in this many */
};
/* prefetching pays while at least this share of prefetched experts is routed to before it is
 * evicted (xcache.c says why) */
#define ZSE_PREFETCH_MIN_HIT 0.5

typedef struct {
    uint64_t hits, fetched, prefetched, prefetch_hits, host, evicted;
    uint64_t prefetch_skipped;  /* layers whose prefetch was left out: too few of them hit */
    uint64_t prefetch_to_host;  /* guesses left for the host: it would finish them sooner */
} zse_xcache_stats;

typedef struct {
    int n_layers, n_experts, n_slots;
    int32_t *slot_of;           /* [n_layers * n_experts]: the slot holding expert (l, e), -1 */
    int32_t *key;               /* [n_slots]: l * n_experts + e, -1 empty */
    int32_t *prev, *next;       /* [n_slots] LRU list, least recently wanted at head */
    int32_t head, tail;
    uint64_t *used;             /* [n_slots] the tick that last wanted it (0: never) */
    uint8_t *prefetched;        /* [n_slots] filled by a prefetch and not yet routed to */
    int64_t *use_mark;          /* [n_slots] compute mark after its last use: a refill waits for it */
    int64_t *ready_mark;        /* [n_slots] copy mark after its fill: a use waits for it */
    uint64_t tick;              /* one per planned layer step */
    /* the cost model, in the caller's seconds */
    double copy_bps, host_bps;  /* measured bytes/s (0: unknown; nothing runs on an unmeasured host) */
    double copy_free, host_free;/* when each has done what it was given */
    zse_host_experts host_mode;
    int host_max_pairs;
    double prefetch_hit;        /* running share of prefetched experts routed to (starts at 1) */
    uint32_t prefetch_calls;    /* prefetches asked for, for the probes */
    zse_xcache_stats stats;
} zse_xcache;

/* one layer step's decisions; the caller provides the arrays ([n_experts] each) */
typedef struct {
    int32_t *where;             /* [n_active]: the expert's slot, or ZSE_XPLAN_HOST */
    int32_t *fetch_expert, *fetch_slot; /* the copies to issue, in order */
    int n_fetch, n_host;
} zse_xplan;

/* n_slots >= n_experts (a layer's step may route to every expert) */
int zse_xcache_init(zse_xcache *c, int n_layers, int n_experts, int n_slots);
void zse_xcache_free(zse_xcache *c);
int zse_xcache_slot(const zse_xcache *c, int layer, int e);
/* a warm start: slot holds expert (layer, e), wanted by no routing yet */
void zse_xcache_fill(zse_xcache *c, int slot, int layer, int e);
/* layer's routed experts active[n_active] (ascending) with pairs[a] pairs each, each expert
 * expert_bytes: hits, the misses' slots and fetches, the host's share; a new tick */
void zse_xcache_plan(zse_xcache *c, int layer, const int32_t *active, const int32_t *pairs, int n_active,
                     uint64_t expert_bytes, double now, zse_xplan *out);
/* experts predicted for `layer` (its next step), each expected to take `pairs` of its rows:
 * fetches into slots this tick does not use, most wanted first; returns how many */
int zse_xcache_prefetch(zse_xcache *c, int layer, const int32_t *experts, int n, int pairs, uint64_t expert_bytes,
                        double now, zse_xplan *out);
/* a measurement: bytes moved (copy) or weight bytes read (host, per tile) in secs */
void zse_xcache_measured(zse_xcache *c, bool host, uint64_t bytes, double secs);
/* weight bytes the host reads to run one expert's pairs */
uint64_t zse_xcache_host_bytes(uint64_t expert_bytes, int pairs);

/* ---- weights in host memory (offload.c) ---- */
enum { ZSE_STREAM_MATS = 7 };   /* a dense layer's matrices: q, k, v, o, gate, up, down */

typedef struct {
    bool experts, stream;       /* which of the two runs */
    zse_placement pl;           /* a copy (streamed points into this struct's own array) */
    zse_llm_offload_stats stats;
    bool failed;                /* a host-side failure in a step (error below) */
    char error[ZSE_ERROR_MAX];

    /* experts from host memory */
    zse_xcache xc;
    zse_slab *cache;            /* the device expert cache, one expert a slot */
    const zse_expert_bank **bank; /* [n_layers] each MoE layer's bank in the file (NULL for dense layers) */
    zse_pinned **bank_pin;      /* [n_layers] the bank, pinned */
    uint64_t slot_bytes, expert_bytes;
    int32_t *slot_of;           /* [n_experts] experts_map's table */
    int32_t *seg, *token_of;    /* the route as read back: [n_experts + 1], [max_tokens * k] */
    int32_t *active, *pairs, *pred; /* [n_experts]: this step's routed experts and pairs; the predicted */
    int n_pred;
    int32_t *fetch_e, *fetch_s, *where, *where_pf;
    int *next_moe;              /* [n_layers] the next MoE layer after l (-1: none) */
    zse_act *pred_logits;       /* the next MoE layer's router over this layer's hidden state */
    zse_moe_route *pred_route;
    /* experts run on the host: a CPU backend over the mapped experts */
    zse_backend *host;
    zse_weight **host_w;        /* [n_layers * n_experts * 3], made on first use */
    zse_act *hx, *hg, *hu, *hy; /* [ZSE_HOST_MAX_PAIRS] rows on the host backend */
    float *xb_host, *out_host;  /* the step's normalized rows; the host's results */
    int32_t *out_rows;
    size_t cap_xb, cap_out;
    int64_t xb_rows;            /* rows of xb_host read this layer step (0: none) */
    zse_xplan plan;             /* this layer step's */
    int n_active;

    /* zStream */
    zse_slab *ring;             /* stream_buffers layer buffers */
    int n_streamed, buffers;
    int32_t *stream_of;         /* [n_layers] index among the streamed layers, -1 resident */
    int32_t *streamed_layer;    /* [n_streamed] the streamed layers, ascending */
    zse_pinned **layer_pin;     /* [n_streamed] each streamed layer's span of the file, pinned */
    uint64_t *span_len;         /* [n_streamed] */
    zse_weight **views;         /* [n_streamed][buffers][ZSE_STREAM_MATS]: its matrices in each buffer */
    int32_t *buf_layer;         /* [buffers] the streamed index a buffer holds or is being filled with */
    int64_t *buf_ready, *buf_used; /* [buffers] copy mark of its fill, compute mark of its last use */
    uint64_t ring_pos;          /* streamed layers computed so far: layer uses buffer ring_pos % buffers */
    uint8_t *streamed_copy;     /* [n_layers] pl.streamed's copy */
} zse_offload;

struct zse_llm {
    zse_config c;
    zse_backend *be;
    zse_weight *tok_embd;   /* (vocab, hidden) */
    zse_weight *out_norm;   /* (hidden) */
    zse_weight *output;     /* (vocab, hidden); tok_embd when tied */
    layer_weights *layers;
    int max_tokens;         /* rows per step */
    int max_out;            /* rows per step that get logits */
    /* activations, [max_tokens][width]; xo, xo2 and logits [max_out][width] */
    zse_act *x, *xb, *xb2, *q, *k, *v, *att, *hb, *hb2, *xo, *xo2, *logits;
    /* MoE layers: router logits [max_tokens][n_experts], the shared expert's gate
     * [max_tokens][1], and the (token, expert) pairs' rows [max_tokens * k][width]: xs the
     * inputs, then the outputs (the down projection writes over them), hs and hs2 the
     * experts' hidden rows; one routing reused by every layer */
    zse_act *router_logits, *shared_gate, *xs, *hs, *hs2;
    zse_moe_route *route;
    uint64_t steps;         /* forward passes run (zse_llm_steps) */
    zse_offload off;        /* weights in host memory (offload.c); all zero when resident */
    zse_lora_pool *lora;    /* the adapter slots (zse_llm_set_lora), or NULL */
    uint32_t step_lora;     /* the projections this step's adapters adapt (0: none) */
    /* the calibration tap (zse_llm_set_tap; NULL: none, the only cost a NULL check per
     * tap point) and the host rows it is handed */
    zse_tap_fn tap_fn;
    void *tap_ctx;
    float *tap_buf;
    size_t tap_cap;
    /* a small step padded to the backend's recording size (pad_step) */
    int32_t pad_tokens[ZSE_STEP_PAD_MAX], pad_pos[ZSE_STEP_PAD_MAX], pad_seq[ZSE_STEP_PAD_MAX],
        pad_slots[ZSE_STEP_PAD_MAX], pad_rows[ZSE_STEP_PAD_MAX];
};

static inline const zse_backend_ops *ops(const zse_llm *m) { return m->be->ops; }

/* llama.c: tensor blk.l.what onto the backend; NULL when absent (and *rc = -1 with an
 * error when required) or when loading fails (*rc = -1) */
zse_weight *zse_model_load_layer(zse_llm *m, const zse_file *f, int l, const char *what, bool required, int *rc);

/* offload.c */
/* after the resident weights: pins, slabs, views, the host backend; the first fills (0 / -1) */
int zse_offload_init(zse_llm *m, const zse_file *f, const zse_placement *pl);
/* after the activations exist: the expert cache's first fill, the host's measured speed */
int zse_offload_start(zse_llm *m);
/* before zse_llm_free's own loop: drops the views it bound into streamed layers */
void zse_offload_free(zse_llm *m);
/* the offload's per-step buffers for max_tokens rows (with the MoE activations) */
int zse_offload_alloc_acts(zse_llm *m, int64_t max_tokens);
void zse_offload_free_acts(zse_llm *m);
/* a streamed layer's weights ready (before its ops) and its buffer refilled (after) */
void zse_offload_layer_begin(zse_llm *m, int l);
void zse_offload_layer_end(zse_llm *m, int l);
/* a MoE layer with its experts in host memory, around moe.c's grouped ops: after the
 * routing (and the next layer's predicted routing) is queued, places the step's experts;
 * after the device experts are queued, prefetches and runs the host's share; after the
 * combine, marks the slots used */
void zse_offload_experts_place(zse_llm *m, int l, int64_t n);
void zse_offload_experts_rest(zse_llm *m, int l, int64_t n);
void zse_offload_experts_done(zse_llm *m, int l);
/* a host-side failure during a step (reported by the step's end) */
void zse_offload_fail(zse_llm *m, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* a streamed layer's matrices are loaded by offload.c, not by zse_llm_load */
bool zse_offload_streams(const zse_placement *pl, int l);

/* moe.c: load and free a MoE layer's weights (0 / -1) */
int zse_moe_layer_load(zse_llm *m, const zse_file *f, int l);
void zse_moe_layer_free(zse_llm *m, layer_weights *L);
/* x += MoE-MLP(RMSNorm(x)) for layer l over n tokens */
void zse_moe_block(zse_llm *m, int l, int64_t n);
/* the MoE activations and routing for max_tokens rows (0 / -1); freed by the second */
int zse_moe_alloc_acts(zse_llm *m, int64_t max_tokens);
void zse_moe_free_acts(zse_llm *m);

#endif
