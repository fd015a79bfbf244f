/* backend — the small op interface that model code runs on. Not a tensor library: the ops
 * a decoder-only transformer needs, each implemented by every backend (cpu/, cuda/) for
 * every weight scheme. A backend knows nothing of tokenizers, HTTP or the engine.
 *
 * Activations are f32 matrices [n_tokens][dim] in backend memory (zse_act). Weights are
 * the packed .zse tensors, used in place (CPU: the mmap) or copied once (CUDA: VRAM).
 * The KV cache is paged: the engine owns the block allocator and block tables (host);
 * the backend owns the storage and reads the tables during attention. */
#ifndef ZSE_BACKEND_H
#define ZSE_BACKEND_H

#include "format/format.h"
#include "quant/quant.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct zse_backend zse_backend;
typedef struct zse_act zse_act;         /* an f32 activation buffer */
typedef struct zse_weight zse_weight;   /* a packed weight the backend can multiply by */
typedef struct zse_kv zse_kv;           /* paged KV storage for all layers */
typedef struct zse_experts zse_experts; /* one MoE layer's routed experts (an expert bank) */
typedef struct zse_moe_route zse_moe_route; /* a step's routing of tokens to experts */
typedef struct zse_pinned zse_pinned;   /* host memory the device copies weights from */
typedef struct zse_slab zse_slab;       /* device memory weights are fetched into: slots of one size */

/* the two queues of a backend that moves weights while it computes (marks, wait_mark) */
enum { ZSE_QUEUE_COMPUTE = 0, ZSE_QUEUE_COPY = 1 };
typedef struct zse_lora_pool zse_lora_pool; /* LoRA adapter slots (in device memory on a GPU) */

typedef enum { ZSE_KV_STORE_F16 = 0, ZSE_KV_STORE_INT8 = 1 } zse_kv_store;

typedef struct {
    int n_layers;
    int n_blocks;           /* blocks in the pool */
    int block_size;         /* tokens per block (16) */
    int n_kv_heads;
    int head_dim;
    zse_kv_store store;     /* INT8: one f32 scale per (token, head) for K and for V */
} zse_kv_shape;

/* One step's tokens, flattened over the sequences in the batch (prefill chunks and
 * decode tokens alike). All arrays are host memory; begin_batch() makes the backend copy
 * what it needs, so they may be reused after it returns. */
typedef struct {
    int n_tokens;
    const int32_t *tokens;          /* [n_tokens] */
    const int32_t *positions;       /* [n_tokens] position in its sequence */
    const int32_t *seq_of;          /* [n_tokens] index into the per-sequence arrays */
    const int32_t *slots;           /* [n_tokens] KV slot: block * block_size + offset; -1: not stored */
    int n_seqs;
    const int32_t *seq_lens;        /* [n_seqs] tokens in the cache once this step is stored */
    const int32_t *block_table;     /* [n_seqs][max_blocks_per_seq], -1 where unused */
    int max_blocks_per_seq;
    int n_out;                      /* rows that need logits */
    const int32_t *out_rows;        /* [n_out] token indices, ascending */
    /* LoRA: each sequence's adapter slot in the model's pool (-1: the base model alone), and
     * the projections (bit m: ZSE_LORA_Q..DOWN) some sequence's adapter adapts. NULL / 0:
     * no sequence has an adapter (the step runs exactly as without adapters). */
    const int32_t *adapter_of_seq;  /* [n_seqs] */
    uint32_t lora_modules;
} zse_batch;

typedef struct {
    int n_heads;
    int n_kv_heads;
    int head_dim;
    float scale;                    /* usually 1/sqrt(head_dim) */
    int sliding_window;             /* 0 = full causal attention */
} zse_attn_params;

/* one row's sampling for sample_rows */
typedef struct {
    float temperature;              /* <= 0: greedy */
    float top_p;                    /* 1: off */
    float min_p;                    /* 0: off */
    float u;                        /* the caller's uniform draw in [0, 1) */
    int top_k;                      /* 0: off; 1: greedy */
} zse_sample_row;

/* token masks for some logit rows (constrained decoding): bits[i * words + w] bit b set
 * means token 32 w + b may come next in row rows[i]; rows ascending */
typedef struct {
    int n;
    const int32_t *rows;
    const uint32_t *bits;
    int64_t words;
} zse_row_masks;

/* one weight of matmul_multi */
typedef struct {
    const zse_weight *w;
    const zse_weight *bias;         /* NULL: none */
    zse_act *y;
} zse_matmul_out;

/* one part of a layer's experts through the grouped matmul, and where its rows go */
#define ZSE_MOE_OUTS_MAX 2
typedef struct {
    int part;       /* ZSE_EXPERT_GATE / UP / DOWN */
    zse_act *ys;
} zse_moe_out;

/* how a MoE layer routes (transformers' TopKRouter of Mixtral, Qwen2-MoE and Qwen3-MoE) */
typedef struct {
    int n_experts;
    int k;                          /* experts a token takes */
    bool renormalize;               /* the k weights are divided by their sum */
} zse_moe_params;

/* ---- LoRA adapter slots ----------------------------------------------------------------
 * A pool of n_slots slots of slot_bytes each, one adapter a slot. A slot image (built by the
 * engine, copied in whole by lora_slot_load) starts with a table of n_layers x
 * ZSE_LORA_MODULES entries, layer-major, then the f16 parts the entries point at. */
typedef struct {
    int32_t rank;                   /* 0: the adapter leaves this projection alone */
    float scale;
    int64_t a;                      /* byte offset in the slot of A, f16 [rank][in], 64-byte aligned */
    int64_t bt;                     /* byte offset of B transposed, f16 [rank][out], 64-byte aligned */
} zse_lora_entry;

typedef struct {
    int n_layers;
    int n_slots;
    uint64_t slot_bytes;            /* a multiple of 64 */
    int64_t in[ZSE_LORA_MODULES];   /* each projection's widths (every layer's are the same) */
    int64_t out[ZSE_LORA_MODULES];
} zse_lora_shape;

/* 0 when every entry of a slot image points inside it at parts of the pool's widths and a
 * rank of at most ZSE_LORA_MAX_RANK, and the image fits a slot; else an error (lora_image.c) */
int zse_lora_image_check(const zse_lora_shape *s, const void *image, size_t bytes);

/* one projection of lora_apply: y[t] += scale · B·(A·x[t]) */
typedef struct {
    int module;                     /* ZSE_LORA_Q .. ZSE_LORA_DOWN */
    zse_act *y;
} zse_lora_out;

/* Bytes a backend holds, by what they are for (zse bench and zse info print them). */
typedef struct {
    uint64_t weights;               /* copies of weights (CPU: 0, they are used from the mapping) */
    uint64_t adapters;              /* LoRA adapter slots */
    uint64_t kv_cache;
    uint64_t activations;
    uint64_t workspace;             /* scratch kept between steps (GEMM slabs, batch arrays, ...) */
    uint64_t slabs;                 /* slab slots weights are fetched into (layer buffers, the expert cache) */
    uint64_t host_pinned;           /* host memory pinned for copies to the device (host_pin) */
    bool on_device;                 /* the two below are filled */
    uint64_t device_used;           /* the whole device's memory in use, every process, as nvidia-smi counts */
    uint64_t device_total;
} zse_backend_memory;

typedef struct zse_backend_ops {
    const char *name;                                   /* "cpu", "cuda" */
    void (*destroy)(zse_backend *be);

    /* ---- memory ---- */
    zse_act *(*act_new)(zse_backend *be, int64_t rows, int64_t cols);
    void (*act_free)(zse_backend *be, zse_act *a);
    int (*act_write)(zse_backend *be, zse_act *a, const float *src, int64_t rows);  /* rows x cols */
    int (*act_read)(zse_backend *be, const zse_act *a, float *dst, int64_t rows);
    /* Weights stay valid while the zse_file stays open. */
    zse_weight *(*weight_load)(zse_backend *be, const zse_tensor_info *t);
    void (*weight_free)(zse_backend *be, zse_weight *w);
    zse_kv *(*kv_new)(zse_backend *be, const zse_kv_shape *shape);
    void (*kv_free)(zse_backend *be, zse_kv *kv);

    /* ---- per step ---- */
    int (*begin_batch)(zse_backend *be, const zse_batch *b);
    /* RoPE tables: inv_freq[head_dim/2] (scaling already applied) and the attention
     * magnitude factor (YaRN; 1 otherwise). Called once after load. */
    int (*rope_init)(zse_backend *be, const float *inv_freq, int n_freq, float mscale);

    /* ---- ops (all over the current batch's n_tokens rows unless said) ---- */
    /* out[t] = embedding row tokens[t] (any scheme; dequantized) */
    void (*embed)(zse_backend *be, const zse_weight *table, zse_act *out);
    /* out[r] = x[r] / rms(x[r]) * w, for `rows` rows of width dim (rows may be
     * n_tokens * n_heads for per-head q/k norm; w is an f32 vector of dim) */
    void (*rmsnorm)(zse_backend *be, const zse_act *x, const zse_weight *w, float eps,
                    int64_t rows, int64_t dim, zse_act *out);
    /* y[t][0:w.rows] = W · x[t][0:w.cols] for `rows` rows of x (n_tokens or n_out) */
    void (*matmul)(zse_backend *be, const zse_weight *w, const zse_act *x, int64_t rows,
                   zse_act *y);
    /* y[t] += bias for `rows` rows (bias: f32 vector of y's width) */
    void (*add_bias)(zse_backend *be, zse_act *y, const zse_weight *bias, int64_t rows);
    /* rotate q [n_tokens][n_heads*head_dim] and k [n_tokens][n_kv_heads*head_dim] by each
     * token's position (rotate-half / NeoX pairing, as Hugging Face models use) */
    void (*rope)(zse_backend *be, zse_act *q, zse_act *k, int n_heads, int n_kv_heads,
                 int head_dim);
    /* write this batch's k and v rows into the cache at their slots for `layer`; a token
     * whose slot is negative (or past the pool) is not stored */
    void (*kv_store)(zse_backend *be, zse_kv *kv, int layer, const zse_act *k,
                     const zse_act *v);
    /* out[t] = softmax(q[t]·K^T * scale over the token's visible cache positions) · V,
     * causal by position, windowed when sliding_window > 0, GQA by head groups */
    void (*attention)(zse_backend *be, const zse_kv *kv, int layer, const zse_act *q,
                      const zse_attn_params *p, zse_act *out);
    /* out[t][i] = silu(gate[t][i]) * up[t][i] */
    void (*silu_mul)(zse_backend *be, const zse_act *gate, const zse_act *up, int64_t rows,
                     int64_t dim, zse_act *out);
    /* x += y (rows x dim) */
    void (*add)(zse_backend *be, zse_act *x, const zse_act *y, int64_t rows, int64_t dim);
    /* out[i] = x[out_rows[i]] for the batch's n_out rows (logits only where needed) */
    void (*gather_out_rows)(zse_backend *be, const zse_act *x, int64_t dim, zse_act *out);
    /* wait for queued work (CUDA); a no-op on CPU */
    int (*sync)(zse_backend *be);
    /* out[r] = the lowest index of the largest value of row r of x (rows x cols), into host
     * memory, after the queued work: greedy sampling without moving logits to the host */
    int (*argmax_rows)(zse_backend *be, const zse_act *x, int64_t rows, int64_t cols, int32_t *out);
    /* what this backend holds now (call it between steps) */
    void (*memory)(zse_backend *be, zse_backend_memory *out);

    /* ---- recorded steps (CUDA graphs); all three NULL where a backend has none ----
     * A step of a few tokens is mostly launch overhead on a GPU. The backend records the ops
     * of a step shape (rows, logit rows, block-table width, context bucket, same model and
     * cache) the second time it sees it and replays the recording from then on; the step's
     * arrays are read from device memory, so one recording serves every step of its shape.
     * step_rows: the rows to pad a step of n tokens to, so that nearby sizes share a
     * recording (n when padding is not worth it). The model pads with tokens that change
     * nothing: no KV slot, their own logit rows after the real ones. */
    int (*step_rows)(zse_backend *be, int n_tokens);
    /* after begin_batch: ZSE_STEP_DONE when a recording was launched (issue no ops),
     * ZSE_STEP_ISSUE to issue the ops (recorded when the backend chose to), -1 on failure */
    int (*step_begin)(zse_backend *be, const void *model, const void *kv);
    /* after the ops that step_begin asked for: ZSE_STEP_DONE; ZSE_STEP_ISSUE when recording
     * failed and the ops, which then ran nowhere, must be issued again (the backend runs
     * that shape eagerly from then on); -1 on failure */
    int (*step_end)(zse_backend *be);

    /* several weights over the same x in one call, with the epilogues a layer needs:
     * y_i[t] = W_i · x[t] (+ bias_i), or y_i[t] += that when accumulate (the residual add),
     * for `rows` rows; at most 3 weights of x's width. NULL where a backend has nothing better
     * than matmul, add_bias and add one by one (which give the same numbers). */
    void (*matmul_multi)(zse_backend *be, const zse_act *x, int64_t rows, const zse_matmul_out *outs,
                         int n_outs, bool accumulate);
    /* a table that only embed reads (one row per token; an untied embedding): the backend
     * may leave it in the file's mapping and move each step's rows instead (CUDA: no VRAM
     * for it). NULL: weight_load. Freed with weight_free. */
    zse_weight *(*weight_load_lookup)(zse_backend *be, const zse_tensor_info *t);
    /* rope on q and k, then kv_store of k and v for `layer`, as one op (the same numbers).
     * NULL: rope then kv_store. */
    void (*rope_kv_store)(zse_backend *be, zse_act *q, zse_act *k, const zse_act *v, zse_kv *kv, int layer,
                          int n_heads, int n_kv_heads, int head_dim);
    /* out[r] = a token drawn from row r of the logits x (rows x cols; x is overwritten) by
     * p[r], into host memory, after the queued work: temperature, top-k, top-p and min-p
     * where the logits are. The same distribution as the host sampler (sampler.c), not the
     * same token for the same u. NULL: the caller samples on the host. */
    int (*sample_rows)(zse_backend *be, zse_act *x, int64_t rows, int64_t cols, const zse_sample_row *p,
                       int32_t *out);

    /* ---- mixture of experts (every backend implements these) ----
     * A MoE layer's MLP is: route (the router's logits -> each token's k experts and their
     * weights, the (token, expert) pairs sorted by expert), gather (each pair's input row,
     * in that order), moe_matmul (every pair through its expert's weight: one call over all
     * the step's experts, each expert's pairs a contiguous segment), silu_mul on the pairs'
     * rows, moe_matmul again, combine (each token's k outputs weighted and added to x).
     * A route lives until the next route into the same zse_moe_route. */
    /* a layer's experts (weights stay valid while the zse_file stays open) */
    zse_experts *(*experts_load)(zse_backend *be, const zse_expert_bank *bank);
    void (*experts_free)(zse_backend *be, zse_experts *ex);
    /* routing state for steps of up to max_rows tokens */
    zse_moe_route *(*moe_route_new)(zse_backend *be, int64_t max_rows, const zse_moe_params *p);
    void (*moe_route_free)(zse_backend *be, zse_moe_route *r);
    /* rows tokens by their router logits [rows][n_experts]: p = softmax(logits) in f32; the
     * k largest p (ties to the lower expert); weights p_j, or p_j / sum of the k when
     * renormalize; the rows * k pairs then sorted by expert (by token within an expert) */
    void (*moe_route)(zse_backend *be, zse_moe_route *r, const zse_act *logits, int64_t rows);
    /* the experts the last route picked, ascending, into host memory after the queued work
     * (experts[n_experts]); returns how many. For whoever must place experts before they run. */
    int (*moe_route_experts)(zse_backend *be, const zse_moe_route *r, int32_t *experts);
    /* xs[i] = x[token of pair i] for the route's pairs (rows * k) */
    void (*moe_gather)(zse_backend *be, const zse_moe_route *r, const zse_act *x, zse_act *xs);
    /* the grouped expert matmul: outs[o].ys[i] = W_e · xs[i] for every pair i, W_e the part
     * outs[o].part (ZSE_EXPERT_GATE / UP / DOWN) of pair i's expert e. Up to
     * ZSE_MOE_OUTS_MAX parts of one shape over the same xs in one call (gate and up: the
     * GPU reads and quantizes xs once and runs both in one launch). */
    void (*moe_matmul)(zse_backend *be, const zse_moe_route *r, const zse_experts *ex, const zse_act *xs,
                       const zse_moe_out *outs, int n_outs);
    /* x[t] += sum over t's k pairs, in ascending expert order, of weight · ys[pair], plus
     * shared[t] scaled by sigmoid(shared_gate[t][0]) (shared NULL: none; shared_gate NULL:
     * unscaled), summed as transformers does: (experts + shared), then the residual */
    void (*moe_combine)(zse_backend *be, const zse_moe_route *r, const zse_act *ys, const zse_act *shared,
                        const zse_act *shared_gate, zse_act *x);

    /* optional: in each listed row of the logits x (cols wide), -inf for every token its
     * mask leaves out (and for every column past words * 32), so argmax_rows / sample_rows
     * pick only allowed tokens where the logits are. NULL: constrained rows go to the host. */
    int (*mask_rows)(zse_backend *be, zse_act *x, int64_t cols, const zse_row_masks *m);

    /* ---- weights kept in host memory (src/model/offload.c: experts from host memory, layers
     * streamed through the device); all NULL where a backend has none ----
     * Two queues run side by side: the compute queue (every op above) and a copy queue that
     * moves weights from pinned host memory into the slots of a slab. Marks order them:
     * mark(q) returns the number of the point queue q has reached (never decreasing);
     * wait_mark(q, m) makes queue q wait until the other queue has passed its mark m (m < 0:
     * nothing to wait for). A weight in a slot is read by the compute queue only after a wait
     * for the copy that filled it, and a slot is refilled only after the compute queue's
     * mark of its last use (slab_fetch's `after`). The CPU backend implements them so the
     * model's offload path runs in the unit tests: its copy queue is lazy — a copy lands
     * when the compute queue waits for it — so a missing wait shows as wrong numbers. The
     * engine offloads on the CPU (whose weights are used in place from the mapping) only when a
     * test knob asks (ZSE_EXPERT_CACHE, ZSE_STREAM_LAYERS). */
    /* pins host memory [p, p + bytes) for copies (registered in place, or copied into pinned
     * memory: host_pinned counts it); p stays valid while the pin lives */
    zse_pinned *(*host_pin)(zse_backend *be, const void *p, size_t bytes);
    void (*host_unpin)(zse_backend *be, zse_pinned *h);
    /* n_slots device slots of slot_bytes each (a multiple of 256: weights start 256-aligned) */
    zse_slab *(*slab_new)(zse_backend *be, size_t slot_bytes, int n_slots);
    void (*slab_free)(zse_backend *be, zse_slab *s);
    /* copy queue: bytes [off, off + n) of h into slot `slot` of s from its start, once the
     * compute queue has passed its mark `after` (the slot's last use; -1: none) */
    void (*slab_fetch)(zse_backend *be, zse_slab *s, int slot, const zse_pinned *h, uint64_t off, size_t n,
                       int64_t after);
    int64_t (*mark)(zse_backend *be, int queue);
    void (*wait_mark)(zse_backend *be, int queue, int64_t mark);
    /* a weight whose packed bytes lie in slot `slot` of s from byte `at` (a streamed layer's
     * matrix; vectors, which some backends convert at load, are refused); weight_free frees it */
    zse_weight *(*weight_in_slab)(zse_backend *be, const zse_tensor_info *t, const zse_slab *s, int slot,
                                  uint64_t at);
    /* a layer's experts whose bytes stay in host memory: none is on the device until
     * experts_map places it; experts_free frees it */
    zse_experts *(*experts_host)(zse_backend *be, const zse_expert_bank *bank);
    /* where the layer's experts are for the moe_matmul calls that follow (compute queue):
     * expert e in slot slot_of[e] of s (its range from the slot's start), or nowhere (-1):
     * moe_matmul then leaves the rows of that expert's pairs as they are */
    void (*experts_map)(zse_backend *be, zse_experts *ex, const zse_slab *s, const int32_t *slot_of);
    /* the last route's layout into host memory, after the queued work: seg[n_experts + 1]
     * (expert e's pairs are [seg[e], seg[e + 1])) and token_of[rows * k] (each pair's token) */
    int (*moe_route_read)(zse_backend *be, const zse_moe_route *r, int32_t *seg, int32_t *token_of);
    /* a[rows[i]] = src[i] (a's width) for i < n, on the compute queue in order with the ops
     * around it; src may be reused once it returns */
    int (*act_write_rows)(zse_backend *be, zse_act *a, const float *src, const int32_t *rows, int64_t n);
    /* ---- LoRA adapters (all NULL where a backend has none: adapters are then refused) ----
     * The engine keeps adapters in host memory and copies the one a sequence needs into a
     * free slot; a step's zse_batch says each sequence's slot, so one step carries
     * sequences of many adapters and of none, over one shared base matmul. */
    zse_lora_pool *(*lora_pool_new)(zse_backend *be, const zse_lora_shape *s);
    void (*lora_pool_free)(zse_backend *be, zse_lora_pool *p);
    /* host memory a slot is loaded from (CUDA: pinned, so the copy runs asynchronously);
     * NULL with an error when out of memory */
    void *(*lora_host_alloc)(zse_backend *be, size_t bytes);
    void (*lora_host_free)(zse_backend *be, void *p);
    /* starts copying an image of `bytes` (<= slot_bytes) into slot; the image must stay as it
     * is until lora_slot_ready says 1. The copy never waits for a step, nor a step for it. */
    int (*lora_slot_load)(zse_backend *be, zse_lora_pool *p, int slot, const void *image, size_t bytes);
    /* 1 when the slot's last load has landed, 0 while it is still copying, -1 on failure */
    int (*lora_slot_ready)(zse_backend *be, zse_lora_pool *p, int slot);
    /* For the batch's rows t < rows whose sequence has an adapter slot s that adapts
     * outs[i].module of `layer`: outs[i].y[t] += scale · B·(A·x[t]) (A, B of slot s);
     * other rows are left alone. x is the input the projections share (q/k/v: one x; gate and
     * up: one x); at most 3 outs. A row's result does not depend on the other rows. */
    void (*lora_apply)(zse_backend *be, const zse_lora_pool *p, int layer, const zse_act *x, int64_t rows,
                       const zse_lora_out *outs, int n_outs);
    /* Optional (NULL: the caller calls lora_apply after the matmul). lora_apply's delta, with
     * the same arguments, announced before the matmul_multi over x and rows that writes every
     * outs[i].y: the backend applies it as part of that call, folded into the matmul's launch
     * where a kernel can (CUDA: one row on the 4-bit GEMV, whose store adds it) and right
     * after the matmul otherwise. Returns 1 when it takes the delta on; 0 when the caller
     * must call lora_apply itself. The next op must be that matmul_multi. */
    int (*lora_with_next_matmul)(zse_backend *be, const zse_lora_pool *p, int layer, const zse_act *x, int64_t rows,
                                 const zse_lora_out *outs, int n_outs);
} zse_backend_ops;

enum {
    ZSE_STEP_ISSUE = 0,
    ZSE_STEP_DONE = 1,
    ZSE_STEP_PAD_MAX = 64,      /* step_rows never pads past this many rows */
};

struct zse_backend {
    const zse_backend_ops *ops;
    void *impl;
};

/* What `zse hardware` reports of a GPU */
typedef struct {
    char name[256];
    int cc_major, cc_minor;         /* compute capability */
    int sm_count;
    uint64_t total_bytes;
    uint64_t free_bytes;            /* valid when free_known */
    bool free_known;
    int cuda_driver_version;        /* the CUDA version the driver supports, e.g. 13000 */
    int cuda_runtime_version;       /* the CUDA runtime zse was built with */
} zse_gpu_info;

/* the GPUs this zse can use (0 without CUDA or without a device) and their facts */
int zse_backend_gpu_count(void);
int zse_backend_gpu_info(int index, zse_gpu_info *out);
/* why there is none: built without CUDA, no driver, no device */
const char *zse_backend_gpu_absence(void);

/* "cpu", "cuda", "cuda:N"; threads for the CPU backend (0 = physical cores) */
zse_backend *zse_backend_create(const char *device, int threads);
void zse_backend_destroy(zse_backend *be);
bool zse_backend_cuda_available(void);

/* the CPU backend (src/backend/cpu) */
zse_backend *zse_cpu_backend_create(int threads);
#ifdef ZSE_HAVE_CUDA
/* the CUDA backend (src/backend/cuda, extern "C") */
zse_backend *zse_cuda_backend_create(int device_index);
int zse_cuda_device_count(void);
int zse_cuda_device_info(int index, zse_gpu_info *out);
const char *zse_cuda_absence(void);
#endif

#endif
