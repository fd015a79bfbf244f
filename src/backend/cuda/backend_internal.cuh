/* backend_internal.cuh — what the pieces of the CUDA backend (backend*.cu; backend.cu lists
 * them) share: the backend's structs, its limits, and the functions one piece defines and
 * another calls. be_ names are helpers shared between pieces; cuda_ names are the
 * zse_backend_ops entries that backend.cu's table points at. Internal to src/backend/cuda. */
#ifndef ZSE_CUDA_BACKEND_INTERNAL_CUH
#define ZSE_CUDA_BACKEND_INTERNAL_CUH

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <jansson.h>

#include "backend/cuda/common.cuh"

extern "C" {
#include "backend/backend.h"
#include "util/util.h"
}

#include <cublas_v2.h>

extern "C" int zse_cuda_set_nf4(const float values[16]);

enum {
    STAGE_COUNT = 4,                    /* staging buffers in the ring */
    STAGE_BYTES = 16 << 20,             /* 16 MiB each */
    GRAPH_SLOTS = 96,                   /* recorded step shapes kept (least recently used go) */
    MARK_RING = 256,                    /* events per queue behind mark / wait_mark */
    GRAPH_MAX_TOKENS = ZSE_STEP_PAD_MAX,/* larger steps are not launch-bound: never recorded */
    GRAPH_EXACT_ROWS = 8,               /* steps up to this many rows are recorded as they are */
    GRAPH_ROW_STEP = 8,                 /* larger ones are padded to a multiple of this */
    MIN_CTX_BUCKET = 64,                /* context buckets: powers of two from here */
    MIN_TABLE_PITCH = 4,                /* block-table widths: powers of two from here */
    ACT_PITCH_ALIGN = 4,                /* floats: 16-byte rows for float4 loads */
};

struct zse_act {
    float *d;
    int64_t rows, cols, pitch;
};

struct zse_weight {
    zse_cuda_weight w;  /* device planes; for a lookup table, the planes in the file's mapping */
    void *dev;          /* the packed tensor (possibly re-pitched) */
    float *vec;         /* rows == 1 tensors (norms, biases): the f32 vector */
    size_t bytes;       /* device bytes of both (memory accounting) */
    /* a lookup table (weight_load_lookup) stays in the mapping: each step's rows are gathered
     * on the host into the batch image and copied with it */
    bool host;
    size_t qs_row, scale_row, min_row;  /* bytes of one row of each plane */
};

struct zse_kv {
    zse_kv_shape shape;
    size_t bytes;
    void *pool;
    zse_cuda_kv_layer *layers;
};

enum { MAX_LOOKUPS = 4 };

/* the current step's arrays on the device, packed in one allocation at offsets that depend
 * only on n_tokens and the table pitch (a recorded step reads them where they were) */
typedef struct {
    int32_t *tokens, *positions, *seq_of, *slots, *block_table, *out_rows;
    int32_t *iota;                      /* 0 .. n_tokens - 1: row t of a gathered table */
    int32_t *adapter_of;                /* [n_tokens] each row's LoRA slot (-1: none) */
    uint32_t lora_modules;              /* the projections the step's adapters adapt */
    uint8_t *lookup_rows[MAX_LOOKUPS];  /* the step's rows of each lookup table */
    int n_tokens, n_out;
    bool extra_seqs;    /* more sequences than tokens: the table outgrew its usual place */
    int max_ctx;        /* a power of two >= every visible length: it sizes attention's split */
    int max_blocks;     /* the block table's pitch, a power of two >= the batch's widest row */
} dev_batch;

/* what a recorded step depends on beyond the device arrays' contents */
typedef struct {
    const void *model, *kv;
    int n_tokens, n_out, max_blocks, max_ctx;
    uint32_t lora_modules;      /* which LoRA launches the step issues (not which adapters) */
} step_shape;

typedef struct {
    bool live;
    bool eager_only;            /* recording failed once: this shape always runs eagerly */
    step_shape shape;
    cudaGraphExec_t exec;       /* NULL until recorded (the first sight runs eagerly) */
    uint64_t last_used;
} step_graph;

typedef struct {
    int device;
    cudaStream_t stream, copy_stream;
    cublasHandle_t cublas;
    char err[ZSE_ERROR_MAX];
    bool failed;

    /* staging ring for loads */
    uint8_t *stage[STAGE_COUNT];
    cudaEvent_t stage_done[STAGE_COUNT];
    int stage_next;
    zse_pool *fill_pool;        /* threads that fill a staging buffer together */

    /* batch arrays: pinned host image + device copy */
    int32_t *batch_host, *batch_dev;
    size_t batch_cap;           /* int32 entries */
    cudaEvent_t batch_copied;
    dev_batch b;

    /* lookup tables kept in host memory (embeddings): their rows travel with the batch */
    zse_weight *lookups[MAX_LOOKUPS];

    /* pinned bounce buffer for act_read/act_write */
    uint8_t *bounce;
    size_t bounce_cap;
    /* token masks of a step (mask_rows): their own pinned and device buffers, since the ids
     * that argmax_rows / sample_rows read back go through the bounce buffer meanwhile */
    uint8_t *mask_host;
    size_t mask_host_cap;
    void *mask_dev;
    size_t mask_dev_cap;

    /* GEMM scratch (x in f16 + a dequantized slab) and attention partials */
    void *scratch;
    size_t scratch_cap;
    void *att_work;
    size_t att_work_cap;

    /* x left in the scratch as the 4-bit matmul reads it (quantized, or f16 for tensor
     * cores: zse_cuda_xprep) by the op that wrote it (RMSNorm, SiLU·mul), valid for the very
     * next op only: be_check_launch and every other write forget it (be_prep_forget); the matmul
     * that reads prep_x with prep_rows rows of prep_cols skips its own converting launch.
     * Only done once a 4-bit weight is loaded. */
    bool q4_loaded;
    const float *prep_x;
    int64_t prep_rows, prep_cols;
    int prep_kind;
    void *prep_scratch;

    float *inv_freq;
    int n_freq;
    float mscale;

    /* the LoRA delta announced for the next matmul_multi (cuda_lora_with_next_matmul), which
     * takes it (cuda_lora_take) */
    struct {
        bool armed;
        zse_lora_pool *pool;
        int layer;
        const float *x;
        int64_t rows;
        zse_lora_out outs[3];
        int n_outs;
    } lora_next;

    /* device bytes held by weights, KV caches, activations and LoRA slots (memory accounting) */
    uint64_t weight_bytes, kv_bytes, act_bytes, lora_bytes;

    /* recorded steps (CUDA graphs). They hold device pointers of buffers, weights and
     * caches, so every allocation or free drops them all (be_drop_graphs). */
    bool graphs_on;             /* ZSE_CUDA_GRAPHS=0 turns them off */

    /* weights in host memory (host_pin ... act_write_rows). Marks: mark n of queue q is
     * event marks[q][n % MARK_RING] recorded on that queue's stream (compute: stream, copy:
     * copy_stream); waited[q] is the other queue's latest mark q has waited for. A wait for a
     * mark whose event was recorded again since waits for the later point: later, never wrong. */
    cudaEvent_t marks[2][MARK_RING];
    bool marks_made;
    int64_t n_marks[2], waited[2];
    uint64_t slab_bytes, pinned_bytes;
    uint8_t *upload;            /* act_write_rows' pinned image; upload_done: its copy has read it */
    size_t upload_cap;
    cudaEvent_t upload_done;
    bool upload_pending;
    step_graph graphs[GRAPH_SLOTS];
    uint64_t graph_clock;
    int recording;              /* the slot being recorded, -1 when none */
    bool record_broken;         /* an op failed while recording */
    uint64_t graphs_recorded, graph_replays;
} cuda_impl;

static inline cuda_impl *impl_of(zse_backend *be) { return (cuda_impl *)be->impl; }

/* ---- weights (backend_weights.cu) ---------------------------------------------------- */

/* The device image of a tensor: the file bytes as they are, except plain rows whose byte
 * length is not a multiple of 16, which get a 16-byte pitch with zero padding. */
typedef struct {
    const uint8_t *src;
    size_t src_row, dev_row;    /* equal when not re-pitched */
    size_t dev_bytes;
} image;

/* One thread copies page-cache memory at ~9 GB/s (measured on the H100 machine), a fifth
 * of what a pinned copy moves: the staging buffer is filled by several threads at once,
 * each taking a 4 KiB-aligned share. */
typedef struct {
    const image *im;
    size_t off, n;
    uint8_t *dst;
} fill_job;

enum { FILL_THREADS_MAX = 8, FILL_PARALLEL_MIN = 1 << 20 };

/* Where n gathered rows of a lookup table sit in the batch image: [n][qs row padded to 16
 * bytes] (the embed kernel loads 16 at a time), then [n][scales], then [n][mins], each plane
 * from a 16-byte boundary; returns the bytes of all three. */
typedef struct {
    size_t qs_pitch, scales, mins;      /* the qs row pitch; the planes' offsets */
} lookup_layout;

/* ---- mixture of experts (backend_moe.cu) ---------------------------------------------- */

struct zse_experts {
    int count;
    void *dev;                      /* the bank's bytes (NULL when they stay in host memory) */
    const uint8_t **base;           /* device [count]: expert e's range */
    zse_cuda_experts part[ZSE_EXPERT_PARTS];
    size_t bytes;
    /* experts_host: the table's pinned image, written by experts_map and copied on the
     * compute stream (map_done: that copy has read it) */
    const uint8_t **shadow;
    cudaEvent_t map_done;
    bool map_pending;
};

struct zse_moe_route {
    zse_moe_params p;
    int64_t max_rows, rows;
    void *mem;
    zse_cuda_moe d;
    size_t bytes;
};

/* ---- backend.cu -------------------------------------------------------------------------- */

void be_set_error(cuda_impl *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void be_prep_forget(cuda_impl *c);
void be_check_launch(cuda_impl *c, int rc);
int be_cuda_call(cudaError_t e, const char *what);
int be_ensure_device(cuda_impl *c, void **p, size_t *cap, size_t need, const char *what);
int be_ensure_pinned(cuda_impl *c, uint8_t **p, size_t *cap, size_t need, const char *what);

/* ---- backend_weights.cu ------------------------------------------------------------------ */

void be_image_fill(const image *im, size_t off, size_t n, uint8_t *dst);
void be_fill_share(void *arg, int ith, int nth);
int be_upload(cuda_impl *c, const image *im, void *dev);
void be_describe_planes(zse_cuda_weight *cw, const zse_qshape *q, const zse_qplanes *pl, const uint8_t *base,
                        int64_t row_bytes);
size_t be_checked_tensor_bytes(const zse_tensor_info *t);
zse_weight *cuda_weight_load(zse_backend *be, const zse_tensor_info *t);
size_t be_lookup_layout_of(const zse_weight *w, size_t n, lookup_layout *l);
zse_weight *cuda_weight_load_lookup(zse_backend *be, const zse_tensor_info *t);
void cuda_weight_free(zse_backend *be, zse_weight *w);
zse_kv *cuda_kv_new(zse_backend *be, const zse_kv_shape *s);
void cuda_kv_free(zse_backend *be, zse_kv *kv);

/* ---- backend_step.cu --------------------------------------------------------------------- */

int cuda_begin_batch(zse_backend *be, const zse_batch *b);
int cuda_rope_init(zse_backend *be, const float *inv_freq, int n_freq, float mscale);
void be_drop_graphs(cuda_impl *c);
int cuda_step_rows(zse_backend *be, int n_tokens);
int cuda_step_begin(zse_backend *be, const void *model, const void *kv);
int cuda_step_end(zse_backend *be);

/* ---- backend_ops.cu ---------------------------------------------------------------------- */

void cuda_embed(zse_backend *be, const zse_weight *table, zse_act *out);
void cuda_rmsnorm(zse_backend *be, const zse_act *x, const zse_weight *w, float eps,
                  int64_t rows, int64_t dim, zse_act *out);
void cuda_matmul(zse_backend *be, const zse_weight *w, const zse_act *x, int64_t rows, zse_act *y);
void cuda_matmul_multi(zse_backend *be, const zse_act *x, int64_t rows, const zse_matmul_out *outs,
                       int n_outs, bool accumulate);
void cuda_add_bias(zse_backend *be, zse_act *y, const zse_weight *bias, int64_t rows);
void cuda_rope(zse_backend *be, zse_act *q, zse_act *k, int n_heads, int n_kv_heads, int head_dim);
void cuda_kv_store(zse_backend *be, zse_kv *kv, int layer, const zse_act *k, const zse_act *v);
void cuda_rope_kv_store(zse_backend *be, zse_act *q, zse_act *k, const zse_act *v, zse_kv *kv, int layer,
                        int n_heads, int n_kv_heads, int head_dim);
void cuda_attention(zse_backend *be, const zse_kv *kv, int layer, const zse_act *q,
                    const zse_attn_params *p, zse_act *out);
void cuda_silu_mul(zse_backend *be, const zse_act *gate, const zse_act *up, int64_t rows,
                   int64_t dim, zse_act *out);
void cuda_add(zse_backend *be, zse_act *x, const zse_act *y, int64_t rows, int64_t dim);
void cuda_gather_out_rows(zse_backend *be, const zse_act *x, int64_t dim, zse_act *out);
int cuda_sync(zse_backend *be);
int cuda_argmax_rows(zse_backend *be, const zse_act *x, int64_t rows, int64_t cols, int32_t *out);
int cuda_sample_rows(zse_backend *be, zse_act *x, int64_t rows, int64_t cols, const zse_sample_row *p,
                     int32_t *out);
int cuda_mask_rows(zse_backend *be, zse_act *x, int64_t cols, const zse_row_masks *m);

/* ---- backend_moe.cu ---------------------------------------------------------------------- */

void cuda_experts_free(zse_backend *be, zse_experts *ex);
int be_describe_experts(zse_experts *ex, const zse_expert_bank *bank);
zse_experts *cuda_experts_load(zse_backend *be, const zse_expert_bank *bank);
void cuda_moe_route_free(zse_backend *be, zse_moe_route *r);
zse_moe_route *cuda_moe_route_new(zse_backend *be, int64_t max_rows, const zse_moe_params *p);
void cuda_moe_route(zse_backend *be, zse_moe_route *r, const zse_act *logits, int64_t rows);
int cuda_moe_route_experts(zse_backend *be, const zse_moe_route *r, int32_t *experts);
void cuda_moe_gather(zse_backend *be, const zse_moe_route *r, const zse_act *x, zse_act *xs);
void cuda_moe_matmul(zse_backend *be, const zse_moe_route *r, const zse_experts *ex, const zse_act *xs,
                     const zse_moe_out *outs, int n_outs);
void cuda_moe_combine(zse_backend *be, const zse_moe_route *r, const zse_act *ys, const zse_act *shared,
                      const zse_act *shared_gate, zse_act *x);

/* ---- backend_offload.cu ------------------------------------------------------------------ */

zse_pinned *cuda_host_pin(zse_backend *be, const void *p, size_t bytes);
void cuda_host_unpin(zse_backend *be, zse_pinned *h);
zse_slab *cuda_slab_new(zse_backend *be, size_t slot_bytes, int n_slots);
void cuda_slab_free(zse_backend *be, zse_slab *s);
int64_t cuda_mark(zse_backend *be, int queue);
void cuda_wait_mark(zse_backend *be, int queue, int64_t mark);
void cuda_slab_fetch(zse_backend *be, zse_slab *s, int slot, const zse_pinned *h, uint64_t off, size_t n,
                     int64_t after);
zse_weight *cuda_weight_in_slab(zse_backend *be, const zse_tensor_info *t, const zse_slab *s, int slot,
                                uint64_t at);
zse_experts *cuda_experts_host(zse_backend *be, const zse_expert_bank *bank);
void cuda_experts_map(zse_backend *be, zse_experts *ex, const zse_slab *s, const int32_t *slot_of);
int cuda_moe_route_read(zse_backend *be, const zse_moe_route *r, int32_t *seg, int32_t *token_of);
int cuda_act_write_rows(zse_backend *be, zse_act *a, const float *src, const int32_t *rows, int64_t n);
void cuda_memory(zse_backend *be, zse_backend_memory *out);

/* ---- backend_lora.cu --------------------------------------------------------------------- */

void cuda_lora_pool_free(zse_backend *be, zse_lora_pool *p);
zse_lora_pool *cuda_lora_pool_new(zse_backend *be, const zse_lora_shape *s);
void *cuda_lora_host_alloc(zse_backend *be, size_t bytes);
void cuda_lora_host_free(zse_backend *be, void *p);
int cuda_lora_slot_load(zse_backend *be, zse_lora_pool *p, int slot, const void *image, size_t bytes);
int cuda_lora_slot_ready(zse_backend *be, zse_lora_pool *p, int slot);
void cuda_lora_apply(zse_backend *be, const zse_lora_pool *pc, int layer, const zse_act *x, int64_t rows,
                     const zse_lora_out *outs, int n_outs);
int cuda_lora_with_next_matmul(zse_backend *be, const zse_lora_pool *pc, int layer, const zse_act *x, int64_t rows,
                               const zse_lora_out *outs, int n_outs);
/* the LoRA delta announced for the matmul that follows, and where it lies (NULL: none);
 * cuda_matmul_multi takes it (-1 on an error it has reported) */
int cuda_lora_take(cuda_impl *c, const zse_act *x, int64_t rows, zse_cuda_lora *l, float **scratch, size_t *bytes);

#endif
