/* backend.cu — zse_backend_ops for CUDA: device memory for activations, weights and the
 * paged KV cache, the per-step batch arrays, and each op as a launch of the kernels in
 * matmul.cu / ops.cu on one stream.
 *
 * Ops queue work and return; a failure (a launch error, a bad argument) is kept as the
 * backend's first error, later ops are skipped, and sync() reports it.
 *
 * Loading: each tensor goes mmap -> pinned staging buffer -> cudaMemcpyAsync, through a
 * ring of staging buffers so that the CPU fills one (with several threads) while the copy
 * engine drains another; pageable memory never feeds a copy on this path. */
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
     * next op only: check_launch and every other write forget it (prep_forget); the matmul
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

    /* device bytes held by weights, KV caches, activations and LoRA slots (memory accounting) */
    uint64_t weight_bytes, kv_bytes, act_bytes, lora_bytes;

    /* recorded steps (CUDA graphs). They hold device pointers of buffers, weights and
     * caches, so every allocation or free drops them all (drop_graphs). */
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

static cuda_impl *impl_of(zse_backend *be) { return (cuda_impl *)be->impl; }

/* ---- errors --------------------------------------------------------------------- */

static void set_error(cuda_impl *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_error(cuda_impl *c, const char *fmt, ...)
{
    /* while recording nothing runs: the ops are issued again eagerly, and fail there */
    if (c->recording >= 0) {
        c->record_broken = true;
        return;
    }
    if (c->failed)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
    c->failed = true;
}

static void prep_forget(cuda_impl *c) { c->prep_x = NULL; }

/* record a failing kernel launcher's message; any launch ends a hand-off of x */
static void check_launch(cuda_impl *c, int rc)
{
    prep_forget(c);
    if (rc != 0)
        set_error(c, "%s", zse_cuda_last_error());
}

static int cuda_call(cudaError_t e, const char *what)
{
    if (e != cudaSuccess)
        return zse_fail("cuda: %s: %s", what, cudaGetErrorString(e));
    return 0;
}

/* The driver reserves local memory for every thread the GPU can hold at the per-thread stack
 * limit, 1 KiB by default: 195 MiB of the process's VRAM on an H200 (measured). zse's kernels
 * use at most 32 bytes of stack (ptxas -v), so the limit starts low; the driver raises it by
 * itself for a kernel (cuBLAS's) that needs more. A device that refuses keeps its default,
 * which costs memory, not correctness. */
static void trim_stack_reservation(void)
{
    if (cudaDeviceSetLimit(cudaLimitStackSize, 256) != cudaSuccess)
        cudaGetLastError();
}

/* the compute stream, at the device's highest priority: where the GEMM path dequantizes the
 * next slab of W on a second stream (matmul.cu, default priority) while cuBLAS multiplies
 * the current one, the block scheduler then starts cuBLAS's blocks first as slots free up,
 * and the dequantization fills what is left instead of holding cuBLAS back */
static int create_compute_stream(cudaStream_t *st)
{
    int least = 0, greatest = 0;
    if (cudaDeviceGetStreamPriorityRange(&least, &greatest) != cudaSuccess) {
        cudaGetLastError();
        greatest = 0;
    }
    return cuda_call(cudaStreamCreateWithPriority(st, cudaStreamNonBlocking, greatest), "creating a stream");
}

/* ---- growable device / pinned buffers ------------------------------------------------ */

static void drop_graphs(cuda_impl *c);

static int ensure_device(cuda_impl *c, void **p, size_t *cap, size_t need, const char *what)
{
    if (*cap >= need)
        return 0;
    if (c->recording >= 0)     /* a recording must not free what it already captured */
        return zse_fail("cuda: %s grows while a step is recorded", what);
    drop_graphs(c);
    /* kernels queued earlier may still read the old buffer */
    if (cuda_call(cudaStreamSynchronize(c->stream), what) != 0)
        return -1;
    cudaFree(*p);
    *p = NULL;
    *cap = 0;
    if (cuda_call(cudaMalloc(p, need), what) != 0)
        return -1;
    *cap = need;
    return 0;
}

static int ensure_pinned(cuda_impl *c, uint8_t **p, size_t *cap, size_t need, const char *what)
{
    if (*cap >= need)
        return 0;
    if (cuda_call(cudaStreamSynchronize(c->stream), what) != 0)
        return -1;
    cudaFreeHost(*p);
    *p = NULL;
    *cap = 0;
    if (cuda_call(cudaHostAlloc((void **)p, need, cudaHostAllocDefault), what) != 0)
        return -1;
    *cap = need;
    return 0;
}

/* ---- activations ------------------------------------------------------------------ */

static zse_act *cuda_act_new(zse_backend *be, int64_t rows, int64_t cols)
{
    cuda_impl *c = impl_of(be);
    if (rows < 1 || cols < 1) {
        zse_fail("cuda act_new: bad shape %lld x %lld", (long long)rows, (long long)cols);
        return NULL;
    }
    zse_act *a = (zse_act *)zse_calloc(1, sizeof *a);
    if (!a)
        return NULL;
    a->rows = rows;
    a->cols = cols;
    a->pitch = (cols + ACT_PITCH_ALIGN - 1) / ACT_PITCH_ALIGN * ACT_PITCH_ALIGN;
    size_t bytes;
    if (!zse_mul_ok((size_t)rows, (size_t)a->pitch * sizeof(float), &bytes) ||
        cuda_call(cudaMalloc((void **)&a->d, bytes), "allocating an activation buffer") != 0) {
        zse_error_prefix("cuda act_new %lld x %lld: ", (long long)rows, (long long)cols);
        free(a);
        return NULL;
    }
    /* the padding is read (and masked) by 16-byte loads: keep it defined. On the compute
     * stream, which does not wait for the legacy default stream. */
    if (cuda_call(cudaMemsetAsync(a->d, 0, bytes, c->stream), "clearing an activation buffer") != 0) {
        cudaFree(a->d);
        free(a);
        return NULL;
    }
    c->act_bytes += bytes;
    return a;
}

static void cuda_act_free(zse_backend *be, zse_act *a)
{
    if (!a)
        return;
    drop_graphs(impl_of(be));
    impl_of(be)->act_bytes -= (uint64_t)a->rows * (uint64_t)a->pitch * sizeof(float);
    cudaFree(a->d);
    free(a);
}

static int cuda_act_write(zse_backend *be, zse_act *a, const float *src, int64_t rows)
{
    cuda_impl *c = impl_of(be);
    if (rows < 0 || rows > a->rows)
        return zse_fail("cuda act_write: %lld rows into a buffer of %lld", (long long)rows, (long long)a->rows);
    const size_t row = (size_t)a->cols * sizeof(float), bytes = row * (size_t)rows;
    if (rows == 0)
        return 0;
    prep_forget(c);
    if (ensure_pinned(c, &c->bounce, &c->bounce_cap, bytes, "act_write staging") != 0)
        return -1;
    memcpy(c->bounce, src, bytes);
    if (cuda_call(cudaMemcpy2DAsync(a->d, (size_t)a->pitch * sizeof(float), c->bounce, row, row,
                                    (size_t)rows, cudaMemcpyHostToDevice, c->stream),
                  "act_write") != 0)
        return -1;
    return cuda_call(cudaStreamSynchronize(c->stream), "act_write");
}

static int cuda_act_read(zse_backend *be, const zse_act *a, float *dst, int64_t rows)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return zse_fail("%s", c->err);
    if (rows < 0 || rows > a->rows)
        return zse_fail("cuda act_read: %lld rows from a buffer of %lld", (long long)rows, (long long)a->rows);
    const size_t row = (size_t)a->cols * sizeof(float), bytes = row * (size_t)rows;
    if (rows == 0)
        return 0;
    if (ensure_pinned(c, &c->bounce, &c->bounce_cap, bytes, "act_read staging") != 0)
        return -1;
    if (cuda_call(cudaMemcpy2DAsync(c->bounce, row, a->d, (size_t)a->pitch * sizeof(float), row,
                                    (size_t)rows, cudaMemcpyDeviceToHost, c->stream),
                  "act_read") != 0 ||
        cuda_call(cudaStreamSynchronize(c->stream), "act_read") != 0)
        return -1;
    memcpy(dst, c->bounce, bytes);
    return 0;
}

/* ---- weights ------------------------------------------------------------------------ */

/* The device image of a tensor: the file bytes as they are, except plain rows whose byte
 * length is not a multiple of 16, which get a 16-byte pitch with zero padding. */
typedef struct {
    const uint8_t *src;
    size_t src_row, dev_row;    /* equal when not re-pitched */
    size_t dev_bytes;
} image;

/* copy dev image bytes [off, off + n) into dst */
static void image_fill(const image *im, size_t off, size_t n, uint8_t *dst)
{
    if (im->src_row == im->dev_row) {
        memcpy(dst, im->src + off, n);
        return;
    }
    while (n > 0) {
        const size_t r = off / im->dev_row, in = off % im->dev_row;
        const size_t take = n < im->dev_row - in ? n : im->dev_row - in;
        const size_t real = in < im->src_row ? (im->src_row - in < take ? im->src_row - in : take) : 0;
        if (real)
            memcpy(dst, im->src + r * im->src_row + in, real);
        memset(dst + real, 0, take - real);
        dst += take;
        off += take;
        n -= take;
    }
}

/* One thread copies page-cache memory at ~9 GB/s (measured on the H100 machine), a fifth
 * of what a pinned copy moves: the staging buffer is filled by several threads at once,
 * each taking a 4 KiB-aligned share. */
typedef struct {
    const image *im;
    size_t off, n;
    uint8_t *dst;
} fill_job;

static void fill_share(void *arg, int ith, int nth)
{
    const fill_job *j = (const fill_job *)arg;
    size_t share = (j->n + (size_t)nth - 1) / (size_t)nth;
    share = (share + 4095) & ~(size_t)4095;
    const size_t begin = (size_t)ith * share;
    if (begin >= j->n)
        return;
    const size_t len = j->n - begin < share ? j->n - begin : share;
    image_fill(j->im, j->off + begin, len, j->dst + begin);
}

enum { FILL_THREADS_MAX = 8, FILL_PARALLEL_MIN = 1 << 20 };

/* the ring: fill a pinned buffer while earlier ones are still being copied */
static int upload(cuda_impl *c, const image *im, void *dev)
{
    if (!c->fill_pool && im->dev_bytes >= FILL_PARALLEL_MIN) {
        int n = zse_physical_cores();
        n = n < 1 ? 1 : n > FILL_THREADS_MAX ? FILL_THREADS_MAX : n;
        c->fill_pool = zse_pool_create(n);     /* NULL: fill on this thread alone */
    }
    for (size_t off = 0; off < im->dev_bytes; off += STAGE_BYTES) {
        const size_t n = im->dev_bytes - off < (size_t)STAGE_BYTES ? im->dev_bytes - off : (size_t)STAGE_BYTES;
        const int i = c->stage_next;
        c->stage_next = (i + 1) % STAGE_COUNT;
        if (cuda_call(cudaEventSynchronize(c->stage_done[i]), "waiting for a staging buffer") != 0)
            return -1;
        fill_job job = {im, off, n, c->stage[i]};
        if (c->fill_pool && n >= FILL_PARALLEL_MIN)
            zse_pool_run(c->fill_pool, fill_share, &job);
        else
            image_fill(im, off, n, c->stage[i]);
        if (cuda_call(cudaMemcpyAsync((uint8_t *)dev + off, c->stage[i], n, cudaMemcpyHostToDevice,
                                      c->copy_stream),
                      "copying a weight to the GPU") != 0 ||
            cuda_call(cudaEventRecord(c->stage_done[i], c->copy_stream), "recording a copy") != 0)
            return -1;
    }
    return 0;
}

/* the kernels' view of a packed tensor whose planes start at base */
static void describe_planes(zse_cuda_weight *cw, const zse_qshape *q, const zse_qplanes *pl, const uint8_t *base,
                            int64_t row_bytes)
{
    const bool plain = zse_scheme_layout(q->scheme) == ZSE_LAYOUT_PLAIN;
    cw->scheme = q->scheme;
    cw->rows = q->rows;
    cw->cols = q->cols;
    cw->group_size = q->group_size;
    cw->qs = base + pl->qs;
    cw->row_bytes = row_bytes;
    cw->scales = plain ? NULL : base + pl->scales;
    cw->mins = q->scheme == ZSE_SCHEME_Q4 ? base + pl->mins : NULL;
    cw->groups = pl->groups;
}

/* the packed bytes of a tensor whose shape and scheme make sense and fit what is stored; 0
 * (and an error naming it) otherwise */
static size_t checked_tensor_bytes(const zse_tensor_info *t)
{
    const zse_qshape *q = &t->q;
    if (q->rows < 1 || q->cols < 1 || q->scheme < 0 || q->scheme >= ZSE_SCHEME_COUNT) {
        zse_fail("cuda: tensor %s has a bad shape or scheme", t->name);
        return 0;
    }
    const size_t bytes = zse_qshape_bytes(q);
    if (bytes == 0 || bytes > t->size) {
        zse_fail("cuda: tensor %s: %llu bytes stored, %zu expected", t->name, (unsigned long long)t->size, bytes);
        return 0;
    }
    return bytes;
}

static zse_weight *cuda_weight_load(zse_backend *be, const zse_tensor_info *t)
{
    cuda_impl *c = impl_of(be);
    const zse_qshape *q = &t->q;
    const size_t bytes = checked_tensor_bytes(t);
    if (bytes == 0)
        return NULL;
    zse_qplanes pl;
    zse_qshape_planes(q, &pl);
    zse_weight *w = (zse_weight *)zse_calloc(1, sizeof *w);
    if (!w)
        return NULL;
    image im = {(const uint8_t *)t->data, pl.row_bytes, pl.row_bytes, bytes};
    const bool plain = zse_scheme_layout(q->scheme) == ZSE_LAYOUT_PLAIN;
    if (plain && pl.row_bytes % 16) {
        im.dev_row = (pl.row_bytes + 15) / 16 * 16;
        im.dev_bytes = im.dev_row * (size_t)q->rows;
    } else if (pl.qs % 16 || pl.row_bytes % 16) {
        zse_fail("cuda: tensor %s: packed rows are not 16-byte aligned (row %zu bytes at %zu); "
                 "re-convert the model with this version of zse", t->name, pl.row_bytes, pl.qs);
        free(w);
        return NULL;
    }
    if (cuda_call(cudaSetDevice(c->device), "selecting the device") != 0 ||
        cuda_call(cudaMalloc(&w->dev, im.dev_bytes), "allocating a weight") != 0 ||
        upload(c, &im, w->dev) != 0) {
        zse_error_prefix("loading %s: ", t->name);
        cudaFree(w->dev);
        free(w);
        return NULL;
    }
    describe_planes(&w->w, q, &pl, (const uint8_t *)w->dev, (int64_t)im.dev_row);
    c->q4_loaded = c->q4_loaded || q->scheme == ZSE_SCHEME_Q4 || q->scheme == ZSE_SCHEME_Q4S;
    /* the compute stream must see the upload before the first use */
    if (cuda_call(cudaStreamSynchronize(c->copy_stream), "finishing a weight copy") != 0) {
        cudaFree(w->dev);
        free(w);
        return NULL;
    }
    if (q->rows == 1) {
        /* norms and biases: keep an f32 vector beside the packed row */
        int32_t *zero_id = NULL;
        int rc = cuda_call(cudaMalloc((void **)&w->vec, (size_t)((q->cols + 3) & ~3) * sizeof(float)), "allocating a vector");
        if (rc == 0)
            rc = cuda_call(cudaMalloc((void **)&zero_id, sizeof(int32_t)), "allocating a vector");
        if (rc == 0)
            rc = cuda_call(cudaMemsetAsync(zero_id, 0, sizeof(int32_t), c->stream), "vector");
        if (rc == 0 && zse_cuda_embed(&w->w, zero_id, 1, w->vec, q->cols, c->stream) != 0)
            rc = zse_fail("%s", zse_cuda_last_error());
        if (rc == 0)
            rc = cuda_call(cudaStreamSynchronize(c->stream), "vector");
        cudaFree(zero_id);
        if (rc != 0) {
            zse_error_prefix("loading %s: ", t->name);
            cudaFree(w->vec);
            cudaFree(w->dev);
            free(w);
            return NULL;
        }
        w->bytes += (size_t)((q->cols + 3) & ~3) * sizeof(float);
    }
    w->bytes += im.dev_bytes;
    c->weight_bytes += w->bytes;
    return w;
}

static size_t round16(size_t n) { return (n + 15) / 16 * 16; }

/* Where n gathered rows of a lookup table sit in the batch image: [n][qs row padded to 16
 * bytes] (the embed kernel loads 16 at a time), then [n][scales], then [n][mins], each plane
 * from a 16-byte boundary; returns the bytes of all three. */
typedef struct {
    size_t qs_pitch, scales, mins;      /* the qs row pitch; the planes' offsets */
} lookup_layout;

static size_t lookup_layout_of(const zse_weight *w, size_t n, lookup_layout *l)
{
    l->qs_pitch = round16(w->qs_row);
    l->scales = n * l->qs_pitch;
    l->mins = l->scales + round16(n * w->scale_row);
    return l->mins + round16(n * w->min_row);
}

static zse_weight *cuda_weight_load(zse_backend *be, const zse_tensor_info *t);

/* An embedding table is read one row per token: VRAM would hold the whole table (545 MB for
 * a 7B model at int8) to serve a few KB a step. It stays in the file's mapping instead. */
static zse_weight *cuda_weight_load_lookup(zse_backend *be, const zse_tensor_info *t)
{
    cuda_impl *c = impl_of(be);
    const zse_qshape *q = &t->q;
    int slot = 0;
    while (slot < MAX_LOOKUPS && c->lookups[slot])
        slot++;
    if (q->rows < 2 || slot == MAX_LOOKUPS)
        return cuda_weight_load(be, t);
    if (checked_tensor_bytes(t) == 0)
        return NULL;
    zse_qplanes pl;
    zse_qshape_planes(q, &pl);
    zse_weight *w = (zse_weight *)zse_calloc(1, sizeof *w);
    if (!w)
        return NULL;
    const bool plain = zse_scheme_layout(q->scheme) == ZSE_LAYOUT_PLAIN;
    w->host = true;
    describe_planes(&w->w, q, &pl, (const uint8_t *)t->data, (int64_t)pl.row_bytes);
    w->qs_row = pl.row_bytes;
    w->scale_row = plain ? 0 : q->scheme == ZSE_SCHEME_Q8 ? sizeof(float) : (size_t)pl.groups * 2;
    w->min_row = q->scheme == ZSE_SCHEME_Q4 ? (size_t)pl.groups * 2 : 0;
    drop_graphs(c); /* the batch image's layout changes */
    c->lookups[slot] = w;
    return w;
}

static void cuda_weight_free(zse_backend *be, zse_weight *w)
{
    if (!w)
        return;
    drop_graphs(impl_of(be));
    for (int i = 0; i < MAX_LOOKUPS; i++)
        if (impl_of(be)->lookups[i] == w)
            impl_of(be)->lookups[i] = NULL;
    impl_of(be)->weight_bytes -= w->bytes;
    cudaFree(w->vec);
    cudaFree(w->dev);
    free(w);
}

/* ---- KV cache ----------------------------------------------------------------------- */

static zse_kv *cuda_kv_new(zse_backend *be, const zse_kv_shape *s)
{
    cuda_impl *c = impl_of(be);
    if (s->n_layers < 1 || s->n_blocks < 1 || s->block_size < 1 || s->n_kv_heads < 1 ||
        s->head_dim < 1) {
        zse_fail("cuda kv_new: bad shape");
        return NULL;
    }
    const bool int8 = s->store == ZSE_KV_STORE_INT8;
    const size_t slots = (size_t)s->n_blocks * (size_t)s->block_size;
    size_t elems, pool_bytes, scale_bytes = 0, layer_bytes, total;
    if (!zse_mul_ok(slots, (size_t)s->n_kv_heads * (size_t)s->head_dim, &elems)) {
        zse_fail("cuda kv_new: the cache size overflows");
        return NULL;
    }
    pool_bytes = (elems * (int8 ? 1 : 2) + 255) & ~(size_t)255;
    if (int8)
        scale_bytes = (slots * (size_t)s->n_kv_heads * sizeof(float) + 255) & ~(size_t)255;
    layer_bytes = 2 * (pool_bytes + scale_bytes);
    if (!zse_mul_ok(layer_bytes, (size_t)s->n_layers, &total)) {
        zse_fail("cuda kv_new: the cache size overflows");
        return NULL;
    }
    zse_kv *kv = (zse_kv *)zse_calloc(1, sizeof *kv);
    if (!kv)
        return NULL;
    kv->shape = *s;
    kv->layers = (zse_cuda_kv_layer *)zse_calloc((size_t)s->n_layers, sizeof *kv->layers);
    if (!kv->layers || cuda_call(cudaMalloc(&kv->pool, total), "allocating the KV cache") != 0) {
        zse_error_prefix("cuda kv_new (%zu MiB): ", total >> 20);
        free(kv->layers);
        free(kv);
        return NULL;
    }
    /* zeros, not garbage: attention reads slot 0 with weight 0 for holes in a block table */
    if (cuda_call(cudaMemsetAsync(kv->pool, 0, total, c->stream), "clearing the KV cache") != 0) {
        cudaFree(kv->pool);
        free(kv->layers);
        free(kv);
        return NULL;
    }
    uint8_t *p = (uint8_t *)kv->pool;
    for (int l = 0; l < s->n_layers; l++) {
        zse_cuda_kv_layer *L = &kv->layers[l];
        L->k = p;
        L->v = p + pool_bytes;
        p += 2 * pool_bytes;
        if (int8) {
            L->kscale = (float *)p;
            L->vscale = (float *)(p + scale_bytes);
            p += 2 * scale_bytes;
        }
        L->int8 = int8;
        L->block_size = s->block_size;
        L->n_kv_heads = s->n_kv_heads;
        L->head_dim = s->head_dim;
        L->n_slots = (int64_t)slots;
    }
    kv->bytes = total;
    c->kv_bytes += total;
    return kv;
}

static void cuda_kv_free(zse_backend *be, zse_kv *kv)
{
    if (!kv)
        return;
    drop_graphs(impl_of(be));
    impl_of(be)->kv_bytes -= kv->bytes;
    cudaFree(kv->pool);
    free(kv->layers);
    free(kv);
}

/* ---- per step ------------------------------------------------------------------------ */

/* the plane row r of a table into dst, or zeros where r is not a row of it */
static void copy_row_or_zero(uint8_t *dst, const void *plane, bool ok, size_t r, size_t bytes)
{
    if (ok)
        memcpy(dst, (const uint8_t *)plane + r * bytes, bytes);
    else
        memset(dst, 0, bytes);
}

/* rows ids[0..n) of a lookup table into dst, laid out as lookup_layout_of says; an id
 * outside the table is a zero row */
static void gather_lookup_rows(const zse_weight *w, const int32_t *ids, size_t n, uint8_t *dst)
{
    lookup_layout l;
    lookup_layout_of(w, n, &l);
    for (size_t t = 0; t < n; t++) {
        const bool ok = ids[t] >= 0 && ids[t] < w->w.rows;
        const size_t r = ok ? (size_t)ids[t] : 0;
        uint8_t *qs = dst + t * l.qs_pitch;
        copy_row_or_zero(qs, w->w.qs, ok, r, w->qs_row);
        memset(qs + w->qs_row, 0, l.qs_pitch - w->qs_row);
        if (w->scale_row)
            copy_row_or_zero(dst + l.scales + t * w->scale_row, w->w.scales, ok, r, w->scale_row);
        if (w->min_row)
            copy_row_or_zero(dst + l.mins + t * w->min_row, w->w.mins, ok, r, w->min_row);
    }
}

static int pow2_at_least(int v, int floor)
{
    int p = floor;
    while (p < v && p < (1 << 29))
        p <<= 1;
    return p;
}

static int cuda_begin_batch(zse_backend *be, const zse_batch *b)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return zse_fail("%s", c->err);
    if (b->n_tokens < 1 || b->n_seqs < 1 || b->max_blocks_per_seq < 1 || b->n_out < 0 ||
        b->n_out > b->n_tokens)
        return zse_fail("cuda begin_batch: bad batch (%d tokens, %d seqs, %d out)", b->n_tokens,
                        b->n_seqs, b->n_out);
    /* layout: tokens, positions, seq_of, slots and out_rows at multiples of n_tokens, then
     * the block table, its pitch widened to a power of two (unused entries -1) */
    const size_t nt = (size_t)b->n_tokens, ns = (size_t)b->n_seqs;
    const int pitch = pow2_at_least(b->max_blocks_per_seq, MIN_TABLE_PITCH);
    const size_t table_rows = ns > nt ? ns : nt;
    const size_t tbl = table_rows * (size_t)pitch;
    /* then 0..n-1, each row's LoRA slot, and from a 16-byte boundary the rows of each lookup
     * table */
    const size_t ints = (5 * nt + tbl + 2 * nt + 3) / 4 * 4;
    size_t lookup_bytes = 0;
    lookup_layout l;
    for (int i = 0; i < MAX_LOOKUPS; i++)
        if (c->lookups[i])
            lookup_bytes += lookup_layout_of(c->lookups[i], nt, &l);
    const size_t need = ints + (lookup_bytes + 3) / 4;
    if (c->batch_cap < need) {
        size_t cap = need * 2, bytes = cap * sizeof(int32_t);
        if (cuda_call(cudaStreamSynchronize(c->stream), "begin_batch") != 0)
            return -1;
        drop_graphs(c);
        cudaFreeHost(c->batch_host);
        cudaFree(c->batch_dev);
        c->batch_host = c->batch_dev = NULL;
        c->batch_cap = 0;
        if (cuda_call(cudaHostAlloc((void **)&c->batch_host, bytes, cudaHostAllocDefault), "begin_batch") != 0 ||
            cuda_call(cudaMalloc((void **)&c->batch_dev, bytes), "begin_batch") != 0)
            return -1;
        c->batch_cap = cap;
    }
    /* the previous step's copy must be done before its pinned image is overwritten */
    if (cuda_call(cudaEventSynchronize(c->batch_copied), "begin_batch") != 0)
        return -1;
    int max_ctx = 0;
    for (size_t i = 0; i < ns; i++)
        if (b->seq_lens[i] > max_ctx)
            max_ctx = b->seq_lens[i];
    for (size_t t = 0; t < nt; t++) {
        if (b->seq_of[t] < 0 || b->seq_of[t] >= b->n_seqs || b->positions[t] < 0)
            return zse_fail("cuda begin_batch: token %zu has a bad sequence or position", t);
        if (b->positions[t] + 1 > max_ctx)
            max_ctx = b->positions[t] + 1;
    }
    for (int i = 0; i < b->n_out; i++)
        if (b->out_rows[i] < 0 || b->out_rows[i] >= b->n_tokens)
            return zse_fail("cuda begin_batch: out row %d outside the batch", b->out_rows[i]);
    int32_t *h = c->batch_host;
    memcpy(h, b->tokens, nt * 4);
    memcpy(h + nt, b->positions, nt * 4);
    memcpy(h + 2 * nt, b->seq_of, nt * 4);
    memcpy(h + 3 * nt, b->slots, nt * 4);
    if (b->n_out)
        memcpy(h + 4 * nt, b->out_rows, (size_t)b->n_out * 4);
    int32_t *table = h + 5 * nt;
    for (size_t s = 0; s < table_rows; s++) {
        int32_t *row = table + s * (size_t)pitch;
        int have = s < ns ? b->max_blocks_per_seq : 0;
        if (have)
            memcpy(row, b->block_table + s * (size_t)b->max_blocks_per_seq, (size_t)have * 4);
        for (int k = have; k < pitch; k++)
            row[k] = -1;
    }
    int32_t *iota = h + 5 * nt + tbl;
    for (size_t t = 0; t < nt; t++)
        iota[t] = (int32_t)t;
    const bool lora = b->adapter_of_seq && b->lora_modules;
    int32_t *adapter_of = iota + nt;
    for (size_t t = 0; t < nt; t++)
        adapter_of[t] = lora ? b->adapter_of_seq[b->seq_of[t]] : -1;
    uint8_t *lk = (uint8_t *)(h + ints);
    for (int i = 0; i < MAX_LOOKUPS; i++) {
        const zse_weight *w = c->lookups[i];
        c->b.lookup_rows[i] = NULL;
        if (!w)
            continue;
        c->b.lookup_rows[i] = (uint8_t *)c->batch_dev + (lk - (uint8_t *)h);
        gather_lookup_rows(w, b->tokens, nt, lk);
        lk += lookup_layout_of(w, nt, &l);
    }
    if (cuda_call(cudaMemcpyAsync(c->batch_dev, h, need * 4, cudaMemcpyHostToDevice, c->stream), "begin_batch") != 0 ||
        cuda_call(cudaEventRecord(c->batch_copied, c->stream), "begin_batch") != 0)
        return -1;
    int32_t *d = c->batch_dev;
    c->b.tokens = d;
    c->b.positions = d + nt;
    c->b.seq_of = d + 2 * nt;
    c->b.slots = d + 3 * nt;
    c->b.out_rows = d + 4 * nt;
    c->b.block_table = d + 5 * nt;
    c->b.iota = d + 5 * nt + tbl;
    c->b.adapter_of = d + 6 * nt + tbl;
    c->b.lora_modules = lora ? b->lora_modules : 0;
    c->b.n_tokens = b->n_tokens;
    c->b.n_out = b->n_out;
    c->b.extra_seqs = ns > nt;
    c->b.max_ctx = pow2_at_least(max_ctx, MIN_CTX_BUCKET);
    c->b.max_blocks = pitch;
    return 0;
}

static int cuda_rope_init(zse_backend *be, const float *inv_freq, int n_freq, float mscale)
{
    cuda_impl *c = impl_of(be);
    if (n_freq < 1)
        return zse_fail("cuda rope_init: %d frequencies", n_freq);
    drop_graphs(c);
    cudaFree(c->inv_freq);
    c->inv_freq = NULL;
    if (cuda_call(cudaMalloc((void **)&c->inv_freq, (size_t)n_freq * sizeof(float)), "rope_init") != 0 ||
        cuda_call(cudaMemcpy(c->inv_freq, inv_freq, (size_t)n_freq * sizeof(float), cudaMemcpyHostToDevice), "rope_init") != 0)
        return -1;
    c->n_freq = n_freq;
    c->mscale = mscale;
    return 0;
}

/* ---- ops ------------------------------------------------------------------------------ */

static void cuda_embed(zse_backend *be, const zse_weight *table, zse_act *out)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (out->cols < table->w.cols || out->rows < c->b.n_tokens)
        return set_error(c, "cuda embed: output %lld x %lld is too small", (long long)out->rows, (long long)out->cols);
    if (table->host) {
        /* this step's rows came with the batch: a table of n_tokens rows read in order */
        int i = 0;
        while (i < MAX_LOOKUPS && c->lookups[i] != table)
            i++;
        if (i == MAX_LOOKUPS || !c->b.lookup_rows[i])
            return set_error(c, "cuda embed: the lookup table is not registered");
        lookup_layout l;
        lookup_layout_of(table, (size_t)c->b.n_tokens, &l);
        zse_cuda_weight v = table->w;
        uint8_t *base = c->b.lookup_rows[i];
        v.rows = c->b.n_tokens;
        v.qs = base;
        v.row_bytes = (int64_t)l.qs_pitch;
        v.scales = table->scale_row ? base + l.scales : NULL;
        v.mins = table->min_row ? base + l.mins : NULL;
        check_launch(c, zse_cuda_embed(&v, c->b.iota, c->b.n_tokens, out->d, out->pitch, c->stream));
        return;
    }
    check_launch(c, zse_cuda_embed(&table->w, c->b.tokens, c->b.n_tokens, out->d, out->pitch, c->stream));
}

/* where an op writing `rows` of `cols` puts them as the 4-bit matmul after it reads them
 * (zse_cuda_xprep_kind: quantized or f16 by the rows): the matmul scratch, grown to what that
 * needs (the GEMV's own reservation for Q8, so the matmul after it does not move it). 1
 * placed; 0 not (no 4-bit weight loaded, rows past the tensor-core ones, or a step being
 * recorded, which cannot grow the scratch: the op runs plain); -1 on an error */
static int prep_place(cuda_impl *c, int64_t rows, int64_t cols, zse_cuda_xprep *xp)
{
    const int kind = c->q4_loaded ? zse_cuda_xprep_kind(rows) : ZSE_CUDA_XPREP_NONE;
    if (kind == ZSE_CUDA_XPREP_NONE)
        return 0;
    const size_t need = zse_cuda_xprep_bytes(rows, cols, kind);
    if (need > c->scratch_cap && c->recording >= 0)
        return 0;
    if (ensure_device(c, &c->scratch, &c->scratch_cap, need, "matmul scratch") != 0)
        return -1;
    zse_cuda_xprep_at(c->scratch, rows, cols, kind, xp);
    return 1;
}

/* the end of an op that was asked to prepare x: rc from its zse_cuda_*_prep launcher (1 x
 * prepared, 0 the plain op ran, -1 an error) */
static void prep_done(cuda_impl *c, int rc, const zse_cuda_xprep *xp, const float *x, int64_t rows, int64_t cols)
{
    check_launch(c, rc < 0 ? -1 : 0);
    if (rc != 1)
        return;
    c->prep_x = x;
    c->prep_rows = rows;
    c->prep_cols = cols;
    c->prep_kind = xp->kind;
    c->prep_scratch = c->scratch;
}

/* the kind x (rows of cols) was left in by the last op, still in place; NONE otherwise */
static int prep_of(const cuda_impl *c, const zse_act *x, int64_t rows, int64_t cols)
{
    const bool held = c->prep_x && c->prep_x == x->d && c->prep_rows == rows && c->prep_cols == cols &&
                      c->prep_scratch == c->scratch;
    return held ? c->prep_kind : ZSE_CUDA_XPREP_NONE;
}

static void cuda_rmsnorm(zse_backend *be, const zse_act *x, const zse_weight *w, float eps,
                         int64_t rows, int64_t dim, zse_act *out)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (!w->vec || w->w.cols != dim)
        return set_error(c, "cuda rmsnorm: weight is not a vector of %lld", (long long)dim);
    /* rows of `dim` inside rows of cols (per-head norm) need contiguous rows */
    int64_t xp = x->pitch, op = out->pitch;
    if (dim != x->cols || dim != out->cols) {
        if (x->pitch != x->cols || out->pitch != out->cols || rows * dim > x->rows * x->cols ||
            rows * dim > out->rows * out->cols)
            return set_error(c, "cuda rmsnorm: %lld rows of %lld do not tile a %lld-wide buffer",
                             (long long)rows, (long long)dim, (long long)x->cols);
        xp = op = dim;
    } else if (rows > x->rows || rows > out->rows) {
        return set_error(c, "cuda rmsnorm: %lld rows in a buffer of %lld", (long long)rows, (long long)x->rows);
    }
    zse_cuda_xprep prep;
    const int placed = dim == x->cols && dim == out->cols ? prep_place(c, rows, dim, &prep) : 0;
    if (placed < 0)
        return set_error(c, "%s", zse_error_message());
    if (placed)
        return prep_done(c, zse_cuda_rmsnorm_prep(x->d, xp, w->vec, eps, rows, dim, out->d, op, &prep, c->stream),
                         &prep, out->d, rows, dim);
    check_launch(c, zse_cuda_rmsnorm(x->d, xp, w->vec, eps, rows, dim, out->d, op, c->stream));
}

static void cuda_matmul(zse_backend *be, const zse_weight *w, const zse_act *x, int64_t rows, zse_act *y)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (w->host)
        return set_error(c, "cuda matmul: a lookup table (weight_load_lookup) is not on the device");
    if (x->cols < w->w.cols || y->cols < w->w.rows || rows > x->rows || rows > y->rows || rows < 1)
        return set_error(c, "cuda matmul: %lld x %lld weight with x %lld x %lld, y %lld x %lld",
                         (long long)w->w.rows, (long long)w->w.cols, (long long)x->rows,
                         (long long)x->cols, (long long)y->rows, (long long)y->cols);
    zse_cuda_multi mm;
    memset(&mm, 0, sizeof mm);
    mm.count = 1;
    mm.w[0] = w->w;
    mm.y[0] = y->d;
    mm.ypitch[0] = y->pitch;
    const size_t need = zse_cuda_matmul_multi_scratch_bytes(&mm, rows);
    if (ensure_device(c, &c->scratch, &c->scratch_cap, need, "matmul scratch") != 0)
        return set_error(c, "%s", zse_error_message());
    mm.x_ready = prep_of(c, x, rows, w->w.cols);
    check_launch(c, zse_cuda_matmul_multi(&mm, x->d, x->pitch, rows, c->cublas, c->scratch, c->scratch_cap,
                                          c->stream));
}

static void cuda_matmul_multi(zse_backend *be, const zse_act *x, int64_t rows, const zse_matmul_out *outs,
                              int n_outs, bool accumulate)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (n_outs < 1 || n_outs > ZSE_CUDA_MULTI_MAX || rows < 1 || rows > x->rows)
        return set_error(c, "cuda matmul_multi: %d weights over %lld rows", n_outs, (long long)rows);
    zse_cuda_multi mm;
    memset(&mm, 0, sizeof mm);
    mm.count = n_outs;
    mm.accumulate = accumulate;
    for (int i = 0; i < n_outs; i++) {
        const zse_cuda_weight *w = &outs[i].w->w;
        const zse_act *y = outs[i].y;
        const zse_weight *b = outs[i].bias;
        if (outs[i].w->host)
            return set_error(c, "cuda matmul_multi: a lookup table is not on the device");
        if (x->cols < w->cols || y->cols < w->rows || rows > y->rows || y->d == x->d)
            return set_error(c, "cuda matmul_multi: %lld x %lld weight with x %lld x %lld, y %lld x %lld",
                             (long long)w->rows, (long long)w->cols, (long long)x->rows, (long long)x->cols,
                             (long long)y->rows, (long long)y->cols);
        if (b && (!b->vec || b->w.cols != w->rows))
            return set_error(c, "cuda matmul_multi: a bias of %lld for %lld rows", (long long)b->w.cols,
                             (long long)w->rows);
        mm.w[i] = *w;
        mm.y[i] = y->d;
        mm.ypitch[i] = y->pitch;
        mm.bias[i] = b ? b->vec : NULL;
    }
    const size_t need = zse_cuda_matmul_multi_scratch_bytes(&mm, rows);
    if (ensure_device(c, &c->scratch, &c->scratch_cap, need, "matmul scratch") != 0)
        return set_error(c, "%s", zse_error_message());
    mm.x_ready = prep_of(c, x, rows, mm.w[0].cols);
    check_launch(c, zse_cuda_matmul_multi(&mm, x->d, x->pitch, rows, c->cublas, c->scratch, c->scratch_cap, c->stream));
}

static void cuda_add_bias(zse_backend *be, zse_act *y, const zse_weight *bias, int64_t rows)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (!bias->vec || bias->w.cols > y->cols || rows > y->rows)
        return set_error(c, "cuda add_bias: bias of %lld for a %lld-wide buffer", (long long)bias->w.cols, (long long)y->cols);
    check_launch(c, zse_cuda_add_bias(y->d, y->pitch, bias->vec, rows, bias->w.cols, c->stream));
}

static void cuda_rope(zse_backend *be, zse_act *q, zse_act *k, int n_heads, int n_kv_heads, int head_dim)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (!c->inv_freq || c->n_freq < head_dim / 2)
        return set_error(c, "cuda rope: rope_init was not called for head_dim %d", head_dim);
    if ((int64_t)n_heads * head_dim > q->cols || (int64_t)n_kv_heads * head_dim > k->cols)
        return set_error(c, "cuda rope: heads do not fit the q/k buffers");
    check_launch(c, zse_cuda_rope(q->d, q->pitch, c->b.n_tokens, n_heads, head_dim, c->b.positions, c->inv_freq, c->mscale, c->stream));
    check_launch(c, zse_cuda_rope(k->d, k->pitch, c->b.n_tokens, n_kv_heads, head_dim, c->b.positions, c->inv_freq, c->mscale, c->stream));
}

static void cuda_kv_store(zse_backend *be, zse_kv *kv, int layer, const zse_act *k, const zse_act *v)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (layer < 0 || layer >= kv->shape.n_layers)
        return set_error(c, "cuda kv_store: layer %d of %d", layer, kv->shape.n_layers);
    const int64_t w = (int64_t)kv->shape.n_kv_heads * kv->shape.head_dim;
    if (k->cols < w || v->cols < w)
        return set_error(c, "cuda kv_store: k/v rows narrower than %lld", (long long)w);
    check_launch(c, zse_cuda_kv_store(&kv->layers[layer], k->d, k->pitch, v->d, v->pitch,
                                      c->b.slots, c->b.n_tokens, c->stream));
}

static void cuda_rope_kv_store(zse_backend *be, zse_act *q, zse_act *k, const zse_act *v, zse_kv *kv, int layer,
                               int n_heads, int n_kv_heads, int head_dim)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (!c->inv_freq || c->n_freq < head_dim / 2)
        return set_error(c, "cuda rope: rope_init was not called for head_dim %d", head_dim);
    if (layer < 0 || layer >= kv->shape.n_layers || n_kv_heads != kv->shape.n_kv_heads ||
        head_dim != kv->shape.head_dim)
        return set_error(c, "cuda rope_kv_store: layer %d or heads do not match the cache", layer);
    const int64_t w = (int64_t)n_kv_heads * head_dim;
    if ((int64_t)n_heads * head_dim > q->cols || k->cols < w || v->cols < w)
        return set_error(c, "cuda rope_kv_store: heads do not fit the q/k/v buffers");
    check_launch(c, zse_cuda_rope_kv_store(&kv->layers[layer], q->d, q->pitch, k->d, k->pitch, v->d, v->pitch,
                                           c->b.slots, c->b.n_tokens, n_heads, c->b.positions, c->inv_freq,
                                           c->mscale, c->stream));
}

static void cuda_attention(zse_backend *be, const zse_kv *kv, int layer, const zse_act *q,
                           const zse_attn_params *p, zse_act *out)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (layer < 0 || layer >= kv->shape.n_layers || p->n_kv_heads != kv->shape.n_kv_heads ||
        p->head_dim != kv->shape.head_dim)
        return set_error(c, "cuda attention: parameters do not match the cache");
    const size_t need = zse_cuda_attention_work_bytes(c->b.n_tokens, p->n_heads, p->head_dim);
    if (ensure_device(c, &c->att_work, &c->att_work_cap, need, "attention work") != 0)
        return set_error(c, "%s", zse_error_message());
    zse_cuda_attn a;
    a.n_heads = p->n_heads;
    a.n_kv_heads = p->n_kv_heads;
    a.head_dim = p->head_dim;
    a.scale = p->scale;
    a.window = p->sliding_window;
    a.seq_of = c->b.seq_of;
    a.pos = c->b.positions;
    a.block_table = c->b.block_table;
    a.max_blocks = c->b.max_blocks;
    check_launch(c, zse_cuda_attention(&kv->layers[layer], &a, q->d, q->pitch, c->b.n_tokens,
                                       c->b.max_ctx, out->d, out->pitch, c->att_work,
                                       c->att_work_cap, c->stream));
}

static void cuda_silu_mul(zse_backend *be, const zse_act *gate, const zse_act *up, int64_t rows,
                          int64_t dim, zse_act *out)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (dim > gate->cols || dim > up->cols || dim > out->cols || rows > out->rows)
        return set_error(c, "cuda silu_mul: shapes do not match");
    zse_cuda_xprep prep;
    const int placed = dim == out->cols ? prep_place(c, rows, dim, &prep) : 0;
    if (placed < 0)
        return set_error(c, "%s", zse_error_message());
    if (placed)
        return prep_done(c,
                         zse_cuda_silu_mul_prep(gate->d, gate->pitch, up->d, up->pitch, rows, dim, out->d, out->pitch,
                                                &prep, c->stream),
                         &prep, out->d, rows, dim);
    check_launch(c, zse_cuda_silu_mul(gate->d, gate->pitch, up->d, up->pitch, rows, dim, out->d, out->pitch, c->stream));
}

static void cuda_add(zse_backend *be, zse_act *x, const zse_act *y, int64_t rows, int64_t dim)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (dim > x->cols || dim > y->cols || rows > x->rows || rows > y->rows)
        return set_error(c, "cuda add: shapes do not match");
    check_launch(c, zse_cuda_add(x->d, x->pitch, y->d, y->pitch, rows, dim, c->stream));
}

static void cuda_gather_out_rows(zse_backend *be, const zse_act *x, int64_t dim, zse_act *out)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (dim > x->cols || dim > out->cols || c->b.n_out > out->rows)
        return set_error(c, "cuda gather_out_rows: shapes do not match");
    check_launch(c, zse_cuda_gather_rows(x->d, x->pitch, c->b.out_rows, c->b.n_out, dim, out->d, out->pitch, c->stream));
}

static int cuda_sync(zse_backend *be)
{
    cuda_impl *c = impl_of(be);
    cudaError_t e = cudaStreamSynchronize(c->stream);
    if (e != cudaSuccess)
        set_error(c, "cuda: a kernel failed: %s", cudaGetErrorString(e));
    if (c->failed)
        return zse_fail("%s", c->err);
    return 0;
}

/* ---- recorded steps (CUDA graphs) ------------------------------------------------------
 * A decode step of a 7B model is some 700 launches of a few microseconds each: launched one
 * by one they cost as much as the work. A recording replays them as one launch. What may
 * vary between replays lives in device memory (the step's arrays, the cache, the
 * activations); what is baked into a recording is its step_shape, and the pointers of the
 * buffers, which is why any free drops every recording. */

static void drop_graphs(cuda_impl *c)
{
    for (int i = 0; i < GRAPH_SLOTS; i++) {
        if (c->graphs[i].exec)
            cudaGraphExecDestroy(c->graphs[i].exec); /* one in flight is freed when it ends */
        memset(&c->graphs[i], 0, sizeof c->graphs[i]);
    }
}

static bool same_shape(const step_shape *a, const step_shape *b)
{
    return a->model == b->model && a->kv == b->kv && a->n_tokens == b->n_tokens && a->n_out == b->n_out &&
           a->max_blocks == b->max_blocks && a->max_ctx == b->max_ctx && a->lora_modules == b->lora_modules;
}

/* the slot of this shape, or a fresh one (the least recently used when all are taken) */
static int graph_slot(cuda_impl *c, const step_shape *s, bool *found)
{
    int victim = 0;
    for (int i = 0; i < GRAPH_SLOTS; i++) {
        step_graph *g = &c->graphs[i];
        if (g->live && same_shape(&g->shape, s)) {
            *found = true;
            return i;
        }
        if (!g->live || (c->graphs[victim].live && g->last_used < c->graphs[victim].last_used))
            victim = i;
    }
    step_graph *g = &c->graphs[victim];
    if (g->exec)
        cudaGraphExecDestroy(g->exec);
    memset(g, 0, sizeof *g);
    g->live = true;
    g->shape = *s;
    *found = false;
    return victim;
}

static int launch_graph(cuda_impl *c, step_graph *g)
{
    cudaError_t e = cudaGraphLaunch(g->exec, c->stream);
    if (e != cudaSuccess) {
        set_error(c, "cuda: launching a recorded step: %s", cudaGetErrorString(e));
        return zse_fail("%s", c->err);
    }
    c->graph_replays++;
    return ZSE_STEP_DONE;
}

static int cuda_step_rows(zse_backend *be, int n_tokens)
{
    cuda_impl *c = impl_of(be);
    if (!c->graphs_on || n_tokens <= GRAPH_EXACT_ROWS || n_tokens > GRAPH_MAX_TOKENS)
        return n_tokens;
    return (n_tokens + GRAPH_ROW_STEP - 1) / GRAPH_ROW_STEP * GRAPH_ROW_STEP;
}

static int cuda_step_begin(zse_backend *be, const void *model, const void *kv)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return zse_fail("%s", c->err);
    /* a table of more rows than tokens would move what follows it: such a step runs eagerly */
    if (!c->graphs_on || c->b.n_tokens > GRAPH_MAX_TOKENS || c->b.extra_seqs)
        return ZSE_STEP_ISSUE;
    step_shape s = {model, kv, c->b.n_tokens, c->b.n_out, c->b.max_blocks, c->b.max_ctx, c->b.lora_modules};
    bool found;
    const int i = graph_slot(c, &s, &found);
    step_graph *g = &c->graphs[i];
    g->last_used = ++c->graph_clock;
    if (g->exec)
        return launch_graph(c, g);
    /* the first sight runs eagerly: it also grows every scratch buffer the shape needs, which
     * a recording cannot do */
    if (!found || g->eager_only)
        return ZSE_STEP_ISSUE;
    cudaError_t e = cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal);
    if (e != cudaSuccess) {
        cudaGetLastError();
        g->eager_only = true;
        zse_log(ZSE_LOG_DEBUG, "cuda: cannot record a step (%s); running it eagerly", cudaGetErrorString(e));
        return ZSE_STEP_ISSUE;
    }
    c->recording = i;
    c->record_broken = false;
    return ZSE_STEP_ISSUE;
}

static int cuda_step_end(zse_backend *be)
{
    cuda_impl *c = impl_of(be);
    if (c->recording < 0)
        return c->failed ? zse_fail("%s", c->err) : ZSE_STEP_DONE;
    step_graph *g = &c->graphs[c->recording];
    c->recording = -1;
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    cudaError_t e = cudaStreamEndCapture(c->stream, &graph);
    if (e == cudaSuccess && !c->record_broken)
        e = cudaGraphInstantiate(&exec, graph, 0);
    if (graph)
        cudaGraphDestroy(graph);
    if (e != cudaSuccess || c->record_broken) {
        zse_log(ZSE_LOG_INFO, "cuda: a step of %d tokens could not be recorded (%s); it runs eagerly",
                g->shape.n_tokens, e != cudaSuccess ? cudaGetErrorString(e) : "an op failed while recording");
        cudaGetLastError();
        if (exec)
            cudaGraphExecDestroy(exec);
        g->eager_only = true;
        return ZSE_STEP_ISSUE;
    }
    g->exec = exec;
    c->graphs_recorded++;
    return launch_graph(c, g);
}

/* ---- create / destroy ------------------------------------------------------------------ */

static void cuda_destroy(zse_backend *be)
{
    if (!be)
        return;
    cuda_impl *c = impl_of(be);
    if (c) {
        cudaSetDevice(c->device);
        if (c->stream)
            cudaStreamSynchronize(c->stream);
        if (c->copy_stream)
            cudaStreamSynchronize(c->copy_stream);
        drop_graphs(c);
        zse_pool_free(c->fill_pool);
        for (int i = 0; i < STAGE_COUNT; i++) {
            cudaFreeHost(c->stage[i]);
            if (c->stage_done[i])
                cudaEventDestroy(c->stage_done[i]);
        }
        if (c->batch_copied)
            cudaEventDestroy(c->batch_copied);
        for (int q = 0; c->marks_made && q < 2; q++)
            for (int i = 0; i < MARK_RING; i++)
                cudaEventDestroy(c->marks[q][i]);
        if (c->upload_done)
            cudaEventDestroy(c->upload_done);
        cudaFreeHost(c->upload);
        cudaFreeHost(c->batch_host);
        cudaFreeHost(c->bounce);
        cudaFreeHost(c->mask_host);
        cudaFree(c->mask_dev);
        cudaFree(c->batch_dev);
        cudaFree(c->scratch);
        cudaFree(c->att_work);
        cudaFree(c->inv_freq);
        if (c->cublas)
            cublasDestroy(c->cublas);
        if (c->stream)
            cudaStreamDestroy(c->stream);
        if (c->copy_stream)
            cudaStreamDestroy(c->copy_stream);
        free(c);
    }
    free(be);
}

/* rows x cols of x hold the logits a per-row token op reads; its message otherwise */
static int check_logit_rows(cuda_impl *c, const char *op, const zse_act *x, int64_t rows, int64_t cols)
{
    if (c->failed)
        return zse_fail("%s", c->err);
    if (rows < 0 || rows > x->rows || cols > x->cols)
        return zse_fail("cuda %s: %lld x %lld of a %lld x %lld buffer", op, (long long)rows, (long long)cols,
                        (long long)x->rows, (long long)x->cols);
    return 0;
}

/* the step's token ids, left by a kernel at the attention workspace's start, to the host
 * through the pinned bounce buffer, after the queued work */
static int read_ids(cuda_impl *c, const char *op, int64_t rows, int32_t *out)
{
    const size_t bytes = (size_t)rows * sizeof(int32_t);
    if (cuda_call(cudaMemcpyAsync(c->bounce, c->att_work, bytes, cudaMemcpyDeviceToHost, c->stream), op) != 0 ||
        cuda_call(cudaStreamSynchronize(c->stream), op) != 0)
        return -1;
    memcpy(out, c->bounce, bytes);
    return 0;
}

static int cuda_argmax_rows(zse_backend *be, const zse_act *x, int64_t rows, int64_t cols, int32_t *out)
{
    cuda_impl *c = impl_of(be);
    prep_forget(c);
    if (check_logit_rows(c, "argmax_rows", x, rows, cols) != 0)
        return -1;
    if (rows == 0)
        return 0;
    /* the ids go to the attention workspace's start (free between steps) */
    const size_t bytes = (size_t)rows * sizeof(int32_t);
    if (ensure_device(c, &c->att_work, &c->att_work_cap, bytes, "argmax_rows") != 0 ||
        ensure_pinned(c, &c->bounce, &c->bounce_cap, bytes, "argmax_rows") != 0)
        return -1;
    if (zse_cuda_argmax_rows(x->d, x->pitch, rows, cols, (int32_t *)c->att_work, c->stream) != 0)
        return zse_fail("%s", zse_cuda_last_error());
    return read_ids(c, "argmax_rows", rows, out);
}

static int cuda_sample_rows(zse_backend *be, zse_act *x, int64_t rows, int64_t cols, const zse_sample_row *p,
                            int32_t *out)
{
    cuda_impl *c = impl_of(be);
    prep_forget(c);   /* the rows are overwritten */
    if (check_logit_rows(c, "sample_rows", x, rows, cols) != 0)
        return -1;
    if (rows == 0)
        return 0;
    /* the attention workspace: ids, then from 256 bytes on the parameters; the pinned
     * bounce buffer likewise */
    const size_t ids = ((size_t)rows * sizeof(int32_t) + 255) & ~(size_t)255, prm = (size_t)rows * sizeof(zse_cuda_sample);
    if (ensure_device(c, &c->att_work, &c->att_work_cap, ids + prm, "sample_rows") != 0 ||
        ensure_pinned(c, &c->bounce, &c->bounce_cap, ids + prm, "sample_rows") != 0)
        return -1;
    zse_cuda_sample *hp = (zse_cuda_sample *)(c->bounce + ids);
    for (int64_t r = 0; r < rows; r++) {
        hp[r].temperature = p[r].temperature;
        hp[r].top_p = p[r].top_p;
        hp[r].min_p = p[r].min_p;
        hp[r].u = p[r].u;
        hp[r].top_k = p[r].top_k;
    }
    uint8_t *dev = (uint8_t *)c->att_work;
    if (cuda_call(cudaMemcpyAsync(dev + ids, hp, prm, cudaMemcpyHostToDevice, c->stream), "sample_rows") != 0)
        return -1;
    if (zse_cuda_sample_rows(x->d, x->pitch, rows, cols, (const zse_cuda_sample *)(dev + ids), (int32_t *)dev,
                             c->stream) != 0)
        return zse_fail("%s", zse_cuda_last_error());
    return read_ids(c, "sample_rows", rows, out);
}

static int cuda_mask_rows(zse_backend *be, zse_act *x, int64_t cols, const zse_row_masks *m)
{
    cuda_impl *c = impl_of(be);
    prep_forget(c);   /* the rows change */
    if (check_logit_rows(c, "mask_rows", x, x->rows, cols) != 0)
        return -1;
    if (m->n == 0)
        return 0;
    for (int i = 0; i < m->n; i++)
        if (m->rows[i] < 0 || m->rows[i] >= x->rows)
            return zse_fail("cuda mask_rows: row %d of a %lld-row buffer", m->rows[i], (long long)x->rows);
    /* the row list, then from 256 bytes on the masks */
    const size_t rows = ((size_t)m->n * sizeof(int32_t) + 255) & ~(size_t)255,
                 bits = (size_t)m->n * (size_t)m->words * sizeof(uint32_t);
    if (ensure_device(c, &c->mask_dev, &c->mask_dev_cap, rows + bits, "mask_rows") != 0 ||
        ensure_pinned(c, &c->mask_host, &c->mask_host_cap, rows + bits, "mask_rows") != 0)
        return -1;
    /* the previous step's upload is done (its ids were read back after it, synchronously) */
    memcpy(c->mask_host, m->rows, (size_t)m->n * sizeof(int32_t));
    memcpy(c->mask_host + rows, m->bits, bits);
    uint8_t *dev = (uint8_t *)c->mask_dev;
    if (cuda_call(cudaMemcpyAsync(dev, c->mask_host, rows + bits, cudaMemcpyHostToDevice, c->stream), "mask_rows") != 0)
        return -1;
    if (zse_cuda_mask_rows(x->d, x->pitch, cols, (const int32_t *)dev, m->n, (const uint32_t *)(dev + rows), m->words,
                           c->stream) != 0)
        return zse_fail("%s", zse_cuda_last_error());
    return 0;
}

/* ---- mixture of experts ------------------------------------------------------------------
 * A layer's expert bank is one device allocation holding the file's bytes of the bank as
 * they are (count * stride: every expert at its file offset from the bank's start, so a part
 * lies where the bank says), and a device table of each expert's start: the grouped kernels
 * find expert e through it, so a cache that keeps experts in slots elsewhere only rewrites
 * the table. */

static_assert(ZSE_MAX_EXPERTS_USED <= ZSE_CUDA_MOE_K_MAX && ZSE_MAX_EXPERTS <= ZSE_CUDA_MOE_E_MAX,
              "the routing kernel holds a token's experts in a warp and every expert's count in shared memory");

/* backend_test links no format code: the parts' names for messages are here */
static const char *const part_names[ZSE_EXPERT_PARTS] = {"gate", "up", "down"};

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

static void cuda_experts_free(zse_backend *be, zse_experts *ex)
{
    if (!ex)
        return;
    cuda_impl *c = impl_of(be);
    drop_graphs(c);
    if (ex->map_pending)
        cudaEventSynchronize(ex->map_done);
    if (ex->map_done)
        cudaEventDestroy(ex->map_done);
    c->weight_bytes -= ex->bytes;
    cudaFree(ex->dev);
    cudaFree(ex->base);
    cudaFreeHost(ex->shadow);
    free(ex);
}

/* the kernels' view of each part of a bank's experts (the table comes later); 0 / -1 */
static int describe_experts(zse_experts *ex, const zse_expert_bank *bank)
{
    ex->count = bank->count;
    for (int p = 0; p < ZSE_EXPERT_PARTS; p++) {
        const zse_expert_part *ep = &bank->part[p];
        zse_qplanes pl;
        zse_qshape_planes(&ep->q, &pl);
        zse_cuda_experts *ce = &ex->part[p];
        const bool plain = zse_scheme_layout(ep->q.scheme) == ZSE_LAYOUT_PLAIN;
        ce->w.scheme = ep->q.scheme;
        ce->w.rows = ep->q.rows;
        ce->w.cols = ep->q.cols;
        ce->w.group_size = ep->q.group_size;
        ce->w.row_bytes = (int64_t)pl.row_bytes;
        ce->w.groups = pl.groups;
        ce->qs_off = (int64_t)(ep->at + pl.qs);
        ce->scales_off = plain ? -1 : (int64_t)(ep->at + pl.scales);
        ce->mins_off = ep->q.scheme == ZSE_SCHEME_Q4 ? (int64_t)(ep->at + pl.mins) : -1;
        /* the kernels read 16 bytes at a time: rows must be whole 16-byte units (plain rows
         * are not re-pitched here, unlike dense tensors, so an expert keeps the file's layout) */
        if (pl.row_bytes % 16 || ce->qs_off % 16)
            return zse_fail("cuda: layer %d's expert %s rows are %zu bytes, not a multiple of 16; the GPU reads "
                            "experts as stored: convert with --quant int8, int4 or f32 (or a width that gives "
                            "16-byte rows)", bank->layer, part_names[p], pl.row_bytes);
    }
    return 0;
}

static zse_experts *cuda_experts_load(zse_backend *be, const zse_expert_bank *bank)
{
    cuda_impl *c = impl_of(be);
    zse_experts *ex = (zse_experts *)zse_calloc(1, sizeof *ex);
    if (!ex)
        return NULL;
    if (describe_experts(ex, bank) != 0) {
        free(ex);
        return NULL;
    }
    const size_t span = (size_t)bank->stride * (size_t)(bank->count - 1) + (size_t)bank->size;
    image im = {bank->data, (size_t)bank->stride, (size_t)bank->stride, span};
    const uint8_t **host_base = (const uint8_t **)zse_malloc((size_t)bank->count * sizeof *host_base);
    int rc = host_base ? 0 : -1;
    if (rc == 0)
        rc = cuda_call(cudaSetDevice(c->device), "selecting the device");
    if (rc == 0)
        rc = cuda_call(cudaMalloc(&ex->dev, span), "allocating experts");
    if (rc == 0)
        rc = cuda_call(cudaMalloc((void **)&ex->base, (size_t)bank->count * sizeof *ex->base), "allocating experts");
    if (rc == 0)
        rc = upload(c, &im, ex->dev);
    if (rc == 0) {
        for (int e = 0; e < bank->count; e++)
            host_base[e] = (const uint8_t *)ex->dev + (size_t)e * (size_t)bank->stride;
        rc = cuda_call(cudaMemcpy(ex->base, host_base, (size_t)bank->count * sizeof *host_base, cudaMemcpyHostToDevice),
                       "copying the expert table");
    }
    if (rc == 0)
        rc = cuda_call(cudaStreamSynchronize(c->copy_stream), "finishing an expert copy");
    free(host_base);
    if (rc != 0) {
        zse_error_prefix("loading the experts of layer %d: ", bank->layer);
        cudaFree(ex->dev);
        cudaFree(ex->base);
        free(ex);
        return NULL;
    }
    for (int p = 0; p < ZSE_EXPERT_PARTS; p++)
        ex->part[p].base = ex->base;
    c->q4_loaded = c->q4_loaded || bank->part[0].q.scheme == ZSE_SCHEME_Q4 || bank->part[0].q.scheme == ZSE_SCHEME_Q4S;
    ex->bytes = span + (size_t)bank->count * sizeof *ex->base;
    c->weight_bytes += ex->bytes;
    drop_graphs(c);
    return ex;
}

static void cuda_moe_route_free(zse_backend *be, zse_moe_route *r)
{
    if (!r)
        return;
    drop_graphs(impl_of(be));
    impl_of(be)->act_bytes -= r->bytes;
    cudaFree(r->mem);
    free(r);
}

static zse_moe_route *cuda_moe_route_new(zse_backend *be, int64_t max_rows, const zse_moe_params *p)
{
    cuda_impl *c = impl_of(be);
    if (max_rows < 1 || max_rows > 65535 || p->n_experts < 1 || p->n_experts > ZSE_MAX_EXPERTS || p->k < 1 ||
        p->k > p->n_experts || p->k > ZSE_MAX_EXPERTS_USED) {
        zse_fail("cuda: moe routing of %lld tokens to %d of %d experts is not possible", (long long)max_rows, p->k,
                 p->n_experts);
        return NULL;
    }
    zse_moe_route *r = (zse_moe_route *)zse_calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->p = *p;
    r->max_rows = max_rows;
    r->bytes = zse_cuda_moe_bytes(max_rows, p->n_experts, p->k);
    if (cuda_call(cudaMalloc(&r->mem, r->bytes), "allocating a routing") != 0 ||
        cuda_call(cudaMemsetAsync(r->mem, 0, r->bytes, c->stream), "clearing a routing") != 0) {
        cudaFree(r->mem);
        free(r);
        return NULL;
    }
    zse_cuda_moe_at(r->mem, max_rows, p->n_experts, p->k, p->renormalize, &r->d);
    c->act_bytes += r->bytes;
    drop_graphs(c);
    return r;
}

static void cuda_moe_route(zse_backend *be, zse_moe_route *r, const zse_act *logits, int64_t rows)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (rows < 1 || rows > r->max_rows || rows > logits->rows || logits->cols < r->p.n_experts)
        return set_error(c, "cuda moe_route: %lld tokens for a routing of %lld, logits %lld x %lld", (long long)rows,
                         (long long)r->max_rows, (long long)logits->rows, (long long)logits->cols);
    r->rows = rows;
    check_launch(c, zse_cuda_moe_route(&r->d, logits->d, logits->pitch, rows, c->stream));
}

static int cuda_moe_route_experts(zse_backend *be, const zse_moe_route *r, int32_t *experts)
{
    cuda_impl *c = impl_of(be);
    prep_forget(c);
    const size_t bytes = ((size_t)r->p.n_experts + 1) * sizeof(int32_t);
    if (c->failed)
        return zse_fail("%s", c->err);
    if (ensure_pinned(c, &c->bounce, &c->bounce_cap, bytes, "moe_route_experts") != 0 ||
        cuda_call(cudaMemcpyAsync(c->bounce, r->d.active, bytes, cudaMemcpyDeviceToHost, c->stream), "moe_route_experts") != 0 ||
        cuda_call(cudaStreamSynchronize(c->stream), "moe_route_experts") != 0)
        return -1;
    const int32_t *a = (const int32_t *)c->bounce;
    const int n = a[r->p.n_experts];
    if (n < 0 || n > r->p.n_experts)
        return zse_fail("cuda moe_route_experts: %d active experts of %d", n, r->p.n_experts);
    memcpy(experts, a, (size_t)n * sizeof *experts);
    return n;
}

static void cuda_moe_gather(zse_backend *be, const zse_moe_route *r, const zse_act *x, zse_act *xs)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    const int64_t pairs = r->rows * r->p.k, dim = x->cols < xs->cols ? x->cols : xs->cols;
    if (r->rows < 1 || pairs > xs->rows)
        return set_error(c, "cuda moe_gather: %lld pairs into a buffer of %lld", (long long)pairs, (long long)xs->rows);
    check_launch(c, zse_cuda_gather_rows(x->d, x->pitch, r->d.token_of, pairs, dim, xs->d, xs->pitch, c->stream));
}

static void cuda_moe_matmul(zse_backend *be, const zse_moe_route *r, const zse_experts *ex, const zse_act *xs,
                            const zse_moe_out *outs, int n_outs)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (n_outs < 1 || n_outs > ZSE_MOE_OUTS_MAX || ex->count != r->p.n_experts)
        return set_error(c, "cuda moe_matmul: %d parts of %d experts for a routing over %d", n_outs, ex->count,
                         r->p.n_experts);
    zse_cuda_moe_parts P;
    memset(&P, 0, sizeof P);
    P.n = n_outs;
    P.ypitch = outs[0].ys->pitch;
    const int64_t pairs = r->rows * r->p.k;
    for (int o = 0; o < n_outs; o++) {
        const int part = outs[o].part;
        const zse_act *ys = outs[o].ys;
        if (part < 0 || part >= ZSE_EXPERT_PARTS)
            return set_error(c, "cuda moe_matmul: part %d", part);
        const zse_cuda_experts *ce = &ex->part[part];
        if (r->rows < 1 || pairs > xs->rows || pairs > ys->rows || ce->w.cols > xs->cols || ce->w.rows > ys->cols ||
            ys->pitch != P.ypitch)
            return set_error(c, "cuda moe_matmul: %lld x %lld experts with x %lld x %lld, y %lld x %lld for %lld pairs",
                             (long long)ce->w.rows, (long long)ce->w.cols, (long long)xs->rows, (long long)xs->cols,
                             (long long)ys->rows, (long long)ys->cols, (long long)pairs);
        P.ex[o] = *ce;
        P.ys[o] = ys->d;
    }
    const size_t need = zse_cuda_moe_matmul_scratch_bytes(&P.ex[0], r->rows, r->p.k);
    if (need && ensure_device(c, &c->scratch, &c->scratch_cap, need, "moe matmul scratch") != 0)
        return set_error(c, "%s", zse_error_message());
    check_launch(c, zse_cuda_moe_matmul(&r->d, r->rows, &P, xs->d, xs->pitch, c->scratch, c->scratch_cap, c->stream));
}

static void cuda_moe_combine(zse_backend *be, const zse_moe_route *r, const zse_act *ys, const zse_act *shared,
                             const zse_act *shared_gate, zse_act *x)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    const int64_t dim = x->cols;
    if (r->rows < 1 || r->rows > x->rows || r->rows * r->p.k > ys->rows || ys->cols < dim ||
        (shared && (shared->cols < dim || shared->rows < r->rows)) || (shared_gate && shared_gate->rows < r->rows))
        return set_error(c, "cuda moe_combine: the routing and the buffers do not match");
    check_launch(c, zse_cuda_moe_combine(&r->d, r->rows, ys->d, ys->pitch, shared ? shared->d : NULL,
                                         shared ? shared->pitch : 0, shared_gate ? shared_gate->d : NULL,
                                         shared_gate ? shared_gate->pitch : 0, x->d, x->pitch, dim, c->stream));
}

/* ---- weights in host memory ---------------------------------------------------------------
 * src/model/offload.c keeps a MoE model's experts, or a dense model's streamed layers, in
 * pinned host memory and moves them into slab slots on the copy stream while the compute
 * stream runs; marks (events) order the two. Nothing here is recorded into a CUDA graph: the
 * model runs such steps eagerly (llama.c says why). */

struct zse_pinned {
    const uint8_t *src;         /* where copies read the bytes: in place, or the pinned copy */
    void *registered;           /* the page-aligned range registered with the driver, or NULL */
    uint8_t *copy;              /* a pinned copy where registering failed, or NULL */
    size_t bytes;               /* of the range pinned */
    size_t counted;             /* bytes pinned (memory accounting) */
};

struct zse_slab {
    uint8_t *dev;
    size_t slot_bytes;
    int n_slots;
};

static zse_pool *fill_pool_of(cuda_impl *c)
{
    if (!c->fill_pool) {
        int n = zse_physical_cores();
        n = n < 1 ? 1 : n > FILL_THREADS_MAX ? FILL_THREADS_MAX : n;
        c->fill_pool = zse_pool_create(n); /* NULL: fill on this thread alone */
    }
    return c->fill_pool;
}

/* Registered in place (read-only: the mapping is PROT_READ) where the driver can, so the
 * file's page-cache pages are what the copy engine reads and nothing is duplicated; else a
 * pinned copy (twice the host memory for those bytes). ZSE_CUDA_PIN_COPY=1 takes the copy
 * to compare the two. */
static zse_pinned *cuda_host_pin(zse_backend *be, const void *p, size_t bytes)
{
    cuda_impl *c = impl_of(be);
    zse_pinned *h = (zse_pinned *)zse_calloc(1, sizeof *h);
    if (!h || cuda_call(cudaSetDevice(c->device), "selecting the device") != 0) {
        free(h);
        return NULL;
    }
    h->bytes = bytes;
    const long pg = sysconf(_SC_PAGESIZE);
    const uintptr_t page = pg > 0 ? (uintptr_t)pg : 4096;
    const uintptr_t start = (uintptr_t)p & ~(page - 1), end = ((uintptr_t)p + bytes + page - 1) & ~(page - 1);
    int read_only = 0;
    if (cudaDeviceGetAttribute(&read_only, cudaDevAttrHostRegisterReadOnlySupported, c->device) != cudaSuccess)
        read_only = 0;
    const char *force_copy = getenv("ZSE_CUDA_PIN_COPY");
    if (read_only && !(force_copy && strcmp(force_copy, "1") == 0)) {
        cudaError_t e = cudaHostRegister((void *)start, end - start, cudaHostRegisterReadOnly);
        if (e == cudaSuccess) {
            h->registered = (void *)start;
            h->src = (const uint8_t *)p;
            h->counted = end - start;
        } else {
            cudaGetLastError();
            zse_log(ZSE_LOG_INFO, "cuda: cannot register %zu MiB of the mapping (%s); copying it into pinned memory",
                    bytes >> 20, cudaGetErrorString(e));
        }
    }
    if (!h->registered) {
        if (cuda_call(cudaHostAlloc((void **)&h->copy, bytes ? bytes : 1, cudaHostAllocDefault),
                      "allocating pinned host memory") != 0) {
            free(h);
            return NULL;
        }
        image im = {(const uint8_t *)p, bytes, bytes, bytes};
        fill_job job = {&im, 0, bytes, h->copy};
        zse_pool *pool = bytes >= FILL_PARALLEL_MIN ? fill_pool_of(c) : NULL;
        if (pool)
            zse_pool_run(pool, fill_share, &job);
        else
            image_fill(&im, 0, bytes, h->copy);
        h->src = h->copy;
        h->counted = bytes;
    }
    c->pinned_bytes += h->counted;
    return h;
}

static void cuda_host_unpin(zse_backend *be, zse_pinned *h)
{
    if (!h)
        return;
    cuda_impl *c = impl_of(be);
    cudaStreamSynchronize(c->copy_stream); /* no copy may still read it */
    if (h->registered)
        cudaHostUnregister(h->registered);
    cudaFreeHost(h->copy);
    c->pinned_bytes -= h->counted;
    free(h);
}

static zse_slab *cuda_slab_new(zse_backend *be, size_t slot_bytes, int n_slots)
{
    cuda_impl *c = impl_of(be);
    size_t bytes;
    if (n_slots < 1 || slot_bytes == 0 || slot_bytes % 256 || !zse_mul_ok(slot_bytes, (size_t)n_slots, &bytes)) {
        zse_fail("cuda: a slab of %d slots of %zu bytes is not possible (slots are multiples of 256 bytes)", n_slots,
                 slot_bytes);
        return NULL;
    }
    zse_slab *s = (zse_slab *)zse_calloc(1, sizeof *s);
    if (!s)
        return NULL;
    if (cuda_call(cudaSetDevice(c->device), "selecting the device") != 0 ||
        cuda_call(cudaMalloc((void **)&s->dev, bytes), "allocating a slab") != 0) {
        zse_error_prefix("cuda: %d slots of %zu MiB: ", n_slots, slot_bytes >> 20);
        free(s);
        return NULL;
    }
    s->slot_bytes = slot_bytes;
    s->n_slots = n_slots;
    c->slab_bytes += bytes;
    return s;
}

static void cuda_slab_free(zse_backend *be, zse_slab *s)
{
    if (!s)
        return;
    cuda_impl *c = impl_of(be);
    cudaStreamSynchronize(c->stream);
    cudaStreamSynchronize(c->copy_stream);
    drop_graphs(c);
    c->slab_bytes -= s->slot_bytes * (size_t)s->n_slots;
    cudaFree(s->dev);
    free(s);
}

static int make_marks(cuda_impl *c)
{
    if (c->marks_made)
        return 0;
    for (int q = 0; q < 2; q++)
        for (int i = 0; i < MARK_RING; i++)
            if (cuda_call(cudaEventCreateWithFlags(&c->marks[q][i], cudaEventDisableTiming), "creating an event") != 0) {
                for (int k = 0; k < q * MARK_RING + i; k++)
                    cudaEventDestroy(c->marks[k / MARK_RING][k % MARK_RING]);
                return -1;
            }
    c->marks_made = true;
    return 0;
}

static cudaStream_t queue_stream(cuda_impl *c, int queue) { return queue == ZSE_QUEUE_COPY ? c->copy_stream : c->stream; }

static int64_t cuda_mark(zse_backend *be, int queue)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return -1;
    if (queue != ZSE_QUEUE_COMPUTE && queue != ZSE_QUEUE_COPY) {
        set_error(c, "cuda mark: no queue %d", queue);
        return -1;
    }
    if (c->recording >= 0) {
        set_error(c, "cuda mark: a step with weights in host memory is not recorded");
        return -1;
    }
    if (make_marks(c) != 0) {
        set_error(c, "%s", zse_error_message());
        return -1;
    }
    const int64_t n = c->n_marks[queue];
    cudaError_t e = cudaEventRecord(c->marks[queue][n % MARK_RING], queue_stream(c, queue));
    if (e != cudaSuccess) {
        set_error(c, "cuda mark: %s", cudaGetErrorString(e));
        return -1;
    }
    c->n_marks[queue] = n + 1;
    return n;
}

/* `queue` waits for the other queue's mark m (once: a later wait covers an earlier one) */
static void wait_other(cuda_impl *c, int queue, int64_t m)
{
    const int other = 1 - queue;
    if (m < 0 || c->failed || m <= c->waited[queue])
        return;
    if (!c->marks_made || m >= c->n_marks[other])
        return set_error(c, "cuda wait_mark: mark %lld of queue %d was never made", (long long)m, other);
    cudaError_t e = cudaStreamWaitEvent(queue_stream(c, queue), c->marks[other][m % MARK_RING], 0);
    if (e != cudaSuccess)
        return set_error(c, "cuda wait_mark: %s", cudaGetErrorString(e));
    c->waited[queue] = m;
}

static void cuda_wait_mark(zse_backend *be, int queue, int64_t mark)
{
    cuda_impl *c = impl_of(be);
    if (queue != ZSE_QUEUE_COMPUTE && queue != ZSE_QUEUE_COPY)
        return set_error(c, "cuda wait_mark: no queue %d", queue);
    if (c->recording >= 0)
        return set_error(c, "cuda wait_mark: a step with weights in host memory is not recorded");
    wait_other(c, queue, mark);
}

static void cuda_slab_fetch(zse_backend *be, zse_slab *s, int slot, const zse_pinned *h, uint64_t off, size_t n,
                            int64_t after)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (c->recording >= 0)
        return set_error(c, "cuda slab_fetch: a step with weights in host memory is not recorded");
    if (slot < 0 || slot >= s->n_slots || n > s->slot_bytes || off > h->bytes || n > h->bytes - off)
        return set_error(c, "cuda slab_fetch: %zu bytes from %llu of a pinned %zu into slot %d of %d slots of %zu", n,
                         (unsigned long long)off, h->bytes, slot, s->n_slots, s->slot_bytes);
    wait_other(c, ZSE_QUEUE_COPY, after); /* the slot's last reader is done */
    cudaError_t e = cudaMemcpyAsync(s->dev + (size_t)slot * s->slot_bytes, h->src + off, n, cudaMemcpyHostToDevice,
                                    c->copy_stream);
    if (e != cudaSuccess)
        set_error(c, "cuda slab_fetch: %s", cudaGetErrorString(e));
}

/* a streamed layer's matrix where its layer buffer will hold it: the file's bytes as they
 * are, so rows must already be 16-byte units (no re-pitching) and vectors, which keep an f32
 * copy made at load, are refused */
static zse_weight *cuda_weight_in_slab(zse_backend *be, const zse_tensor_info *t, const zse_slab *s, int slot,
                                       uint64_t at)
{
    cuda_impl *c = impl_of(be);
    const zse_qshape *q = &t->q;
    const size_t bytes = checked_tensor_bytes(t);
    if (bytes == 0)
        return NULL;
    zse_qplanes pl;
    zse_qshape_planes(q, &pl);
    if (q->rows == 1 || pl.qs % 16 || pl.row_bytes % 16 || at % 256) {
        zse_fail("cuda: tensor %s cannot be streamed: a vector, or rows that are not 16-byte units", t->name);
        return NULL;
    }
    if (slot < 0 || slot >= s->n_slots || at > s->slot_bytes || bytes > s->slot_bytes - at) {
        zse_fail("cuda: tensor %s does not fit slot %d of %zu bytes at %llu", t->name, slot, s->slot_bytes,
                 (unsigned long long)at);
        return NULL;
    }
    zse_weight *w = (zse_weight *)zse_calloc(1, sizeof *w);
    if (!w)
        return NULL;
    describe_planes(&w->w, q, &pl, s->dev + (size_t)slot * s->slot_bytes + at, (int64_t)pl.row_bytes);
    c->q4_loaded = c->q4_loaded || q->scheme == ZSE_SCHEME_Q4 || q->scheme == ZSE_SCHEME_Q4S;
    return w; /* bytes 0: the slab counts them */
}

static zse_experts *cuda_experts_host(zse_backend *be, const zse_expert_bank *bank)
{
    cuda_impl *c = impl_of(be);
    zse_experts *ex = (zse_experts *)zse_calloc(1, sizeof *ex);
    if (!ex)
        return NULL;
    const size_t table = (size_t)bank->count * sizeof *ex->base;
    int rc = describe_experts(ex, bank);
    if (rc == 0)
        rc = cuda_call(cudaSetDevice(c->device), "selecting the device");
    if (rc == 0)
        rc = cuda_call(cudaMalloc((void **)&ex->base, table), "allocating an expert table");
    if (rc == 0) /* nowhere until experts_map places them */
        rc = cuda_call(cudaMemset(ex->base, 0, table), "clearing an expert table");
    if (rc == 0)
        rc = cuda_call(cudaHostAlloc((void **)&ex->shadow, table, cudaHostAllocDefault), "allocating an expert table");
    if (rc == 0)
        rc = cuda_call(cudaEventCreateWithFlags(&ex->map_done, cudaEventDisableTiming), "creating an event");
    if (rc != 0) {
        zse_error_prefix("the experts of layer %d: ", bank->layer);
        cudaFree(ex->base);
        cudaFreeHost(ex->shadow);
        free(ex);
        return NULL;
    }
    for (int p = 0; p < ZSE_EXPERT_PARTS; p++)
        ex->part[p].base = ex->base;
    c->q4_loaded = c->q4_loaded || bank->part[0].q.scheme == ZSE_SCHEME_Q4 || bank->part[0].q.scheme == ZSE_SCHEME_Q4S;
    ex->bytes = table;
    c->weight_bytes += ex->bytes;
    drop_graphs(c);
    return ex;
}

static void cuda_experts_map(zse_backend *be, zse_experts *ex, const zse_slab *s, const int32_t *slot_of)
{
    cuda_impl *c = impl_of(be);
    if (c->failed)
        return;
    if (!ex->shadow)
        return set_error(c, "cuda experts_map: these experts were loaded onto the device (experts_load)");
    /* the table's previous copy must have read the image before it changes */
    if (ex->map_pending && cuda_call(cudaEventSynchronize(ex->map_done), "experts_map") != 0)
        return set_error(c, "%s", zse_error_message());
    for (int e = 0; e < ex->count; e++) {
        if (slot_of[e] >= s->n_slots)
            return set_error(c, "cuda experts_map: expert %d in slot %d of %d", e, slot_of[e], s->n_slots);
        ex->shadow[e] = slot_of[e] >= 0 ? s->dev + (size_t)slot_of[e] * s->slot_bytes : NULL;
    }
    cudaError_t err = cudaMemcpyAsync(ex->base, ex->shadow, (size_t)ex->count * sizeof *ex->base,
                                      cudaMemcpyHostToDevice, c->stream);
    if (err == cudaSuccess)
        err = cudaEventRecord(ex->map_done, c->stream);
    if (err != cudaSuccess)
        return set_error(c, "cuda experts_map: %s", cudaGetErrorString(err));
    ex->map_pending = true;
}

static int cuda_moe_route_read(zse_backend *be, const zse_moe_route *r, int32_t *seg, int32_t *token_of)
{
    cuda_impl *c = impl_of(be);
    prep_forget(c);
    if (c->failed)
        return zse_fail("%s", c->err);
    const size_t sb = ((size_t)r->p.n_experts + 1) * sizeof(int32_t), tb = (size_t)(r->rows * r->p.k) * sizeof(int32_t);
    if (ensure_pinned(c, &c->bounce, &c->bounce_cap, sb + tb, "moe_route_read") != 0 ||
        cuda_call(cudaMemcpyAsync(c->bounce, r->d.seg, sb, cudaMemcpyDeviceToHost, c->stream), "moe_route_read") != 0 ||
        cuda_call(cudaMemcpyAsync(c->bounce + sb, r->d.token_of, tb, cudaMemcpyDeviceToHost, c->stream),
                  "moe_route_read") != 0 ||
        cuda_call(cudaStreamSynchronize(c->stream), "moe_route_read") != 0)
        return -1;
    memcpy(seg, c->bounce, sb);
    memcpy(token_of, c->bounce + sb, tb);
    return 0;
}

static int cuda_act_write_rows(zse_backend *be, zse_act *a, const float *src, const int32_t *rows, int64_t n)
{
    cuda_impl *c = impl_of(be);
    prep_forget(c);
    if (c->failed)
        return zse_fail("%s", c->err);
    for (int64_t i = 0; i < n; i++)
        if (rows[i] < 0 || rows[i] >= a->rows)
            return zse_fail("cuda act_write_rows: row %d of an activation of %lld", rows[i], (long long)a->rows);
    if (n == 0)
        return 0;
    const size_t row = (size_t)a->cols * sizeof(float), bytes = row * (size_t)n;
    /* the previous write's copy must have read the image before it changes */
    if (c->upload_pending && cuda_call(cudaEventSynchronize(c->upload_done), "act_write_rows") != 0)
        return -1;
    c->upload_pending = false;
    if (!c->upload_done &&
        cuda_call(cudaEventCreateWithFlags(&c->upload_done, cudaEventDisableTiming), "creating an event") != 0)
        return -1;
    if (ensure_pinned(c, &c->upload, &c->upload_cap, bytes, "act_write_rows") != 0)
        return -1;
    memcpy(c->upload, src, bytes);
    /* one copy per run of consecutive rows (an expert's pairs are one run) */
    for (int64_t i = 0; i < n;) {
        int64_t j = i + 1;
        while (j < n && rows[j] == rows[j - 1] + 1)
            j++;
        if (cuda_call(cudaMemcpy2DAsync(a->d + (int64_t)rows[i] * a->pitch, (size_t)a->pitch * sizeof(float),
                                        c->upload + (size_t)i * row, row, row, (size_t)(j - i), cudaMemcpyHostToDevice,
                                        c->stream),
                      "act_write_rows") != 0)
            return -1;
        i = j;
    }
    if (cuda_call(cudaEventRecord(c->upload_done, c->stream), "act_write_rows") != 0)
        return -1;
    c->upload_pending = true;
    return 0;
}

static void cuda_memory(zse_backend *be, zse_backend_memory *out)
{
    cuda_impl *c = impl_of(be);
    memset(out, 0, sizeof *out);
    out->weights = c->weight_bytes;
    out->kv_cache = c->kv_bytes;
    out->activations = c->act_bytes;
    out->adapters = c->lora_bytes;
    out->workspace = c->scratch_cap + c->att_work_cap + c->batch_cap * sizeof(int32_t);
    out->slabs = c->slab_bytes;
    out->host_pinned = c->pinned_bytes;
    size_t free_b = 0, total_b = 0;
    if (cudaSetDevice(c->device) == cudaSuccess && cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) {
        out->on_device = true;
        out->device_used = total_b - free_b;
        out->device_total = total_b;
    } else {
        cudaGetLastError(); /* reported as "not on a device", not as a failure */
    }
}

/* ---- LoRA adapter slots ---------------------------------------------------------------------
 * One device allocation of n_slots slots. A load is one cudaMemcpyAsync from the engine's
 * pinned host image on the copy stream, after whatever the compute stream has queued (a
 * slot is reloaded only once no sequence uses it, but a step that used its last adapter may
 * still be running); an event says when it landed. The engine lets a sequence use the slot
 * only then, so a step never waits for a copy and a copy never waits for a step's end. */

static_assert(sizeof(zse_cuda_lora_entry) == sizeof(zse_lora_entry) && ZSE_CUDA_LORA_MAX_RANK == ZSE_LORA_MAX_RANK,
              "a slot's table is read by the kernels as zse_cuda_lora_entry");

struct zse_lora_pool {
    zse_lora_shape shape;
    uint8_t *dev;
    cudaEvent_t *landed;        /* [n_slots] recorded after each slot's last copy */
    bool *copying;
    cudaEvent_t queued;         /* the compute stream's work before a copy */
    float *u;                   /* lora_apply's scratch: the shrink's output */
    size_t u_cap;
    int max_rank;               /* the largest rank a slot was loaded with: the shrink's grid */
};

static void cuda_lora_pool_free(zse_backend *be, zse_lora_pool *p)
{
    cuda_impl *c = impl_of(be);
    if (!p)
        return;
    cudaSetDevice(c->device);
    cudaStreamSynchronize(c->copy_stream);
    cudaStreamSynchronize(c->stream);
    drop_graphs(c); /* recordings hold the slots' and the scratch's addresses */
    for (int s = 0; p->landed && s < p->shape.n_slots; s++)
        if (p->landed[s])
            cudaEventDestroy(p->landed[s]);
    if (p->queued)
        cudaEventDestroy(p->queued);
    cudaFree(p->dev);
    cudaFree(p->u);
    if (p->dev)
        c->lora_bytes -= (uint64_t)p->shape.n_slots * p->shape.slot_bytes;
    free(p->landed);
    free(p->copying);
    free(p);
}

static zse_lora_pool *cuda_lora_pool_new(zse_backend *be, const zse_lora_shape *s)
{
    cuda_impl *c = impl_of(be);
    size_t bytes;
    if (s->n_slots < 1 || s->n_layers < 1 || s->slot_bytes % 64 != 0 ||
        s->slot_bytes < (uint64_t)s->n_layers * ZSE_LORA_MODULES * sizeof(zse_lora_entry) ||
        __builtin_mul_overflow((size_t)s->n_slots, (size_t)s->slot_bytes, &bytes)) {
        zse_fail("a LoRA pool of %d slots of %llu bytes is not possible", s->n_slots, (unsigned long long)s->slot_bytes);
        return NULL;
    }
    zse_lora_pool *p = (zse_lora_pool *)zse_calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->shape = *s;
    p->landed = (cudaEvent_t *)zse_calloc((size_t)s->n_slots, sizeof *p->landed);
    p->copying = (bool *)zse_calloc((size_t)s->n_slots, sizeof *p->copying);
    int rc = p->landed && p->copying ? 0 : -1;
    if (rc == 0)
        rc = cuda_call(cudaSetDevice(c->device), "LoRA slots");
    if (rc == 0 && cuda_call(cudaMalloc((void **)&p->dev, bytes), "LoRA slots") == 0) {
        c->lora_bytes += bytes;
        drop_graphs(c);
        /* a slot never loaded adapts nothing: its table is all zero ranks */
        rc = cuda_call(cudaMemsetAsync(p->dev, 0, bytes, c->stream), "LoRA slots") ||
             cuda_call(cudaStreamSynchronize(c->stream), "LoRA slots");
    } else {
        rc = -1;
    }
    for (int i = 0; rc == 0 && i < s->n_slots; i++)
        rc = cuda_call(cudaEventCreateWithFlags(&p->landed[i], cudaEventDisableTiming), "LoRA slots");
    /* the scratch for steps of up to 1,024 rows now: a recorded step cannot grow it */
    if (rc == 0)
        rc = ensure_device(c, (void **)&p->u, &p->u_cap, zse_cuda_lora_scratch_bytes(1024, 3), "LoRA scratch");
    if (rc == 0)
        rc = cuda_call(cudaEventCreateWithFlags(&p->queued, cudaEventDisableTiming), "LoRA slots");
    if (rc != 0) {
        zse_error_prefix("%d LoRA adapter slots of %.1f MiB", s->n_slots, (double)s->slot_bytes / 1048576.0);
        cuda_lora_pool_free(be, p);
        return NULL;
    }
    return p;
}

static void *cuda_lora_host_alloc(zse_backend *be, size_t bytes)
{
    (void)be;
    void *p = NULL;
    if (cudaHostAlloc(&p, bytes ? bytes : 64, cudaHostAllocDefault) != cudaSuccess) {
        cudaGetLastError();
        zse_fail("cannot allocate %.1f MiB of pinned host memory for a LoRA adapter (--max-cpu-loras)",
                 (double)bytes / 1048576.0);
        return NULL;
    }
    return p;
}

static void cuda_lora_host_free(zse_backend *be, void *p)
{
    (void)be;
    cudaFreeHost(p);
}

static int cuda_lora_slot_load(zse_backend *be, zse_lora_pool *p, int slot, const void *image, size_t bytes)
{
    cuda_impl *c = impl_of(be);
    if (slot < 0 || slot >= p->shape.n_slots)
        return zse_fail("LoRA slot %d of %d", slot, p->shape.n_slots);
    if (zse_lora_image_check(&p->shape, image, bytes) != 0)
        return -1;
    /* the shrink's grid covers the largest rank loaded; recordings made with a smaller one
     * would leave the new ranks out, so they go (slots are loaded between steps) */
    int rank = 0;
    for (int i = 0; i < p->shape.n_layers * ZSE_LORA_MODULES; i++) {
        zse_lora_entry e;
        memcpy(&e, (const uint8_t *)image + (size_t)i * sizeof e, sizeof e);
        rank = e.rank > rank ? e.rank : rank;
    }
    if (rank > p->max_rank) {
        if (c->recording >= 0)
            return zse_fail("cuda: a LoRA slot loaded while a step is recorded");
        drop_graphs(c);
        p->max_rank = rank;
    }
    uint8_t *dst = p->dev + (size_t)slot * p->shape.slot_bytes;
    if (cuda_call(cudaSetDevice(c->device), "loading a LoRA slot") != 0 ||
        cuda_call(cudaEventRecord(p->queued, c->stream), "loading a LoRA slot") != 0 ||
        cuda_call(cudaStreamWaitEvent(c->copy_stream, p->queued, 0), "loading a LoRA slot") != 0 ||
        cuda_call(cudaMemcpyAsync(dst, image, bytes, cudaMemcpyHostToDevice, c->copy_stream), "loading a LoRA slot") != 0 ||
        cuda_call(cudaEventRecord(p->landed[slot], c->copy_stream), "loading a LoRA slot") != 0)
        return -1;
    p->copying[slot] = true;
    return 0;
}

static int cuda_lora_slot_ready(zse_backend *be, zse_lora_pool *p, int slot)
{
    (void)be;
    if (slot < 0 || slot >= p->shape.n_slots)
        return zse_fail("LoRA slot %d of %d", slot, p->shape.n_slots);
    if (!p->copying[slot])
        return 1;
    cudaError_t e = cudaEventQuery(p->landed[slot]);
    if (e == cudaErrorNotReady) {
        cudaGetLastError();
        return 0;
    }
    p->copying[slot] = false;
    return e == cudaSuccess ? 1 : zse_fail("cuda: copying a LoRA adapter into slot %d failed: %s", slot,
                                           cudaGetErrorString(e));
}

static void cuda_lora_apply(zse_backend *be, const zse_lora_pool *pc, int layer, const zse_act *x, int64_t rows,
                            const zse_lora_out *outs, int n_outs)
{
    cuda_impl *c = impl_of(be);
    zse_lora_pool *p = (zse_lora_pool *)pc; /* its scratch grows here */
    if (c->failed || !c->b.lora_modules)
        return;
    if (n_outs < 1 || n_outs > 3 || rows < 1 || rows > c->b.n_tokens || rows > x->rows)
        return set_error(c, "cuda lora_apply: %d projections over %lld rows", n_outs, (long long)rows);
    zse_cuda_lora l = {};
    l.slots = p->dev;
    l.slot_bytes = p->shape.slot_bytes;
    l.n_slots = p->shape.n_slots;
    l.n_layers = p->shape.n_layers;
    l.layer = layer;
    l.n_outs = n_outs;
    l.max_rank = p->max_rank > 0 ? p->max_rank : 1;
    for (int i = 0; i < n_outs; i++) {
        const int m = outs[i].module;
        if (m < 0 || m >= ZSE_LORA_MODULES || outs[i].y->rows < rows)
            return set_error(c, "cuda lora_apply: projection %d is not one of the pool's", m);
        l.module[i] = m;
        l.y[i] = outs[i].y->d;
        l.ypitch[i] = outs[i].y->pitch;
        l.in[i] = p->shape.in[m];
        l.out[i] = p->shape.out[m];
    }
    const size_t need = zse_cuda_lora_scratch_bytes(rows, n_outs);
    if (need && ensure_device(c, (void **)&p->u, &p->u_cap, need, "LoRA scratch") != 0)
        return set_error(c, "%s", zse_error_message());
    check_launch(c, zse_cuda_lora_apply(&l, c->b.adapter_of, x->d, x->pitch, rows, p->u, p->u_cap, c->stream));
}

static const zse_backend_ops cuda_ops = {
    "cuda",
    cuda_destroy,
    cuda_act_new,
    cuda_act_free,
    cuda_act_write,
    cuda_act_read,
    cuda_weight_load,
    cuda_weight_free,
    cuda_kv_new,
    cuda_kv_free,
    cuda_begin_batch,
    cuda_rope_init,
    cuda_embed,
    cuda_rmsnorm,
    cuda_matmul,
    cuda_add_bias,
    cuda_rope,
    cuda_kv_store,
    cuda_attention,
    cuda_silu_mul,
    cuda_add,
    cuda_gather_out_rows,
    cuda_sync,
    cuda_argmax_rows,
    cuda_memory,
    cuda_step_rows,
    cuda_step_begin,
    cuda_step_end,
    cuda_matmul_multi,
    cuda_weight_load_lookup,
    cuda_rope_kv_store,
    cuda_sample_rows,
    cuda_experts_load,
    cuda_experts_free,
    cuda_moe_route_new,
    cuda_moe_route_free,
    cuda_moe_route,
    cuda_moe_route_experts,
    cuda_moe_gather,
    cuda_moe_matmul,
    cuda_moe_combine,
    cuda_mask_rows,
    cuda_host_pin,
    cuda_host_unpin,
    cuda_slab_new,
    cuda_slab_free,
    cuda_slab_fetch,
    cuda_mark,
    cuda_wait_mark,
    cuda_weight_in_slab,
    cuda_experts_host,
    cuda_experts_map,
    cuda_moe_route_read,
    cuda_act_write_rows,
    cuda_lora_pool_new,
    cuda_lora_pool_free,
    cuda_lora_host_alloc,
    cuda_lora_host_free,
    cuda_lora_slot_load,
    cuda_lora_slot_ready,
    cuda_lora_apply,
};

extern "C" int zse_cuda_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();     /* no driver / no device: not an error for the caller */
        return 0;
    }
    return n;
}

extern "C" int zse_cuda_device_info(int index, zse_gpu_info *out)
{
    memset(out, 0, sizeof *out);
    cudaDeviceProp p;
    cudaError_t e = cudaGetDeviceProperties(&p, index);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return zse_fail("cuda: device %d: %s", index, cudaGetErrorString(e));
    }
    snprintf(out->name, sizeof out->name, "%s", p.name);
    out->cc_major = p.major;
    out->cc_minor = p.minor;
    out->sm_count = p.multiProcessorCount;
    out->total_bytes = p.totalGlobalMem;
    cudaDriverGetVersion(&out->cuda_driver_version);
    cudaRuntimeGetVersion(&out->cuda_runtime_version);
    /* free memory needs the device's context: made here, left for the process to end */
    size_t free_b = 0, total_b = 0;
    int prev = 0;
    cudaGetDevice(&prev);
    if (cudaSetDevice(index) == cudaSuccess && cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) {
        out->free_bytes = free_b;
        out->total_bytes = total_b;
        out->free_known = true;
    }
    cudaGetLastError();
    cudaSetDevice(prev);
    return 0;
}

extern "C" const char *zse_cuda_absence(void)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    cudaGetLastError();
    return e == cudaSuccess ? "no CUDA device" : cudaGetErrorString(e);
}

extern "C" zse_backend *zse_cuda_backend_create(int device_index)
{
    const int n = zse_cuda_device_count();
    if (device_index < 0 || device_index >= n) {
        zse_fail("cuda: device %d not present (%d CUDA device%s found)", device_index, n, n == 1 ? "" : "s");
        return NULL;
    }
    zse_backend *be = (zse_backend *)zse_calloc(1, sizeof *be);
    cuda_impl *c = (cuda_impl *)zse_calloc(1, sizeof *c);
    if (!be || !c) {
        free(be);
        free(c);
        return NULL;
    }
    be->ops = &cuda_ops;
    be->impl = c;
    c->device = device_index;
    c->recording = -1;
    c->waited[0] = c->waited[1] = -1;
    const char *g = getenv("ZSE_CUDA_GRAPHS");
    c->graphs_on = !(g && strcmp(g, "0") == 0);
    int rc = cuda_call(cudaSetDevice(device_index), "selecting the device");
    if (rc == 0 && zse_cuda_code_arch() < 0) /* a build without code for this GPU: say so now */
        rc = zse_fail("%s", zse_cuda_last_error());
    if (rc == 0)
        trim_stack_reservation();
    if (rc == 0)
        rc = create_compute_stream(&c->stream);
    if (rc == 0)
        rc = cuda_call(cudaStreamCreateWithFlags(&c->copy_stream, cudaStreamNonBlocking), "creating a stream");
    if (rc == 0)
        rc = cuda_call(cudaEventCreateWithFlags(&c->batch_copied, cudaEventDisableTiming), "creating an event");
    for (int i = 0; rc == 0 && i < STAGE_COUNT; i++) {
        rc = cuda_call(cudaHostAlloc((void **)&c->stage[i], STAGE_BYTES, cudaHostAllocWriteCombined), "allocating pinned staging memory");
        if (rc == 0)
            rc = cuda_call(cudaEventCreateWithFlags(&c->stage_done[i], cudaEventDisableTiming), "creating an event");
    }
    if (rc == 0 && cublasCreate(&c->cublas) != CUBLAS_STATUS_SUCCESS)
        rc = zse_fail("cuda: cuBLAS did not initialize");
    if (rc == 0 && cublasSetStream(c->cublas, c->stream) != CUBLAS_STATUS_SUCCESS)
        rc = zse_fail("cuda: cuBLAS did not take the stream");
    if (rc == 0 && zse_cuda_set_nf4(zse_nf4_values) != 0)
        rc = zse_fail("%s", zse_cuda_last_error());
    if (rc != 0) {
        zse_error_prefix("cuda backend on device %d: ", device_index);
        cuda_destroy(be);
        return NULL;
    }
    return be;
}
