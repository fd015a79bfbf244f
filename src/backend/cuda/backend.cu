/* backend.cu — zse_backend_ops for CUDA: device memory for activations, weights and the
 * paged KV cache, the per-step batch arrays, and each op as a launch of the kernels of
 * cuda_kernels.h on one stream.
 *
 * Ops queue work and return; a failure (a launch error, a bad argument) is kept as the
 * backend's first error, later ops are skipped, and sync() reports it.
 *
 * The backend is split by what it does; the pieces share backend_internal.cuh:
 *   backend.cu          errors, growable buffers, activations, create/destroy, the ops table
 *   backend_weights.cu  weight loading through the pinned ring, lookup tables, the KV pool
 *   backend_step.cu     the per-step batch arrays and recorded steps (CUDA graphs)
 *   backend_ops.cu      the per-layer ops and the per-row token ops (argmax, sampling, masks)
 *   backend_moe.cu      mixture of experts: expert banks and routing
 *   backend_offload.cu  weights in host memory: pins, slabs, marks, streamed experts
 *   backend_lora.cu     LoRA adapter slots */
#include "backend/cuda/backend_internal.cuh"

/* ---- errors --------------------------------------------------------------------- */

void be_set_error(cuda_impl *c, const char *fmt, ...)
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

void be_prep_forget(cuda_impl *c) { c->prep_x = NULL; }

/* record a failing kernel launcher's message; any launch ends a hand-off of x */
void be_check_launch(cuda_impl *c, int rc)
{
    be_prep_forget(c);
    if (rc != 0)
        be_set_error(c, "%s", zse_cuda_last_error());
}

int be_cuda_call(cudaError_t e, const char *what)
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
    return be_cuda_call(cudaStreamCreateWithPriority(st, cudaStreamNonBlocking, greatest), "creating a stream");
}

/* ---- growable device / pinned buffers ------------------------------------------------ */

int be_ensure_device(cuda_impl *c, void **p, size_t *cap, size_t need, const char *what)
{
    if (*cap >= need)
        return 0;
    if (c->recording >= 0)     /* a recording must not free what it already captured */
        return zse_fail("cuda: %s grows while a step is recorded", what);
    be_drop_graphs(c);
    /* kernels queued earlier may still read the old buffer */
    if (be_cuda_call(cudaStreamSynchronize(c->stream), what) != 0)
        return -1;
    cudaFree(*p);
    *p = NULL;
    *cap = 0;
    if (be_cuda_call(cudaMalloc(p, need), what) != 0)
        return -1;
    *cap = need;
    return 0;
}

int be_ensure_pinned(cuda_impl *c, uint8_t **p, size_t *cap, size_t need, const char *what)
{
    if (*cap >= need)
        return 0;
    if (be_cuda_call(cudaStreamSynchronize(c->stream), what) != 0)
        return -1;
    cudaFreeHost(*p);
    *p = NULL;
    *cap = 0;
    if (be_cuda_call(cudaHostAlloc((void **)p, need, cudaHostAllocDefault), what) != 0)
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
        be_cuda_call(cudaMalloc((void **)&a->d, bytes), "allocating an activation buffer") != 0) {
        zse_error_prefix("cuda act_new %lld x %lld: ", (long long)rows, (long long)cols);
        free(a);
        return NULL;
    }
    /* the padding is read (and masked) by 16-byte loads: keep it defined. On the compute
     * stream, which does not wait for the legacy default stream. */
    if (be_cuda_call(cudaMemsetAsync(a->d, 0, bytes, c->stream), "clearing an activation buffer") != 0) {
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
    be_drop_graphs(impl_of(be));
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
    be_prep_forget(c);
    if (be_ensure_pinned(c, &c->bounce, &c->bounce_cap, bytes, "act_write staging") != 0)
        return -1;
    memcpy(c->bounce, src, bytes);
    if (be_cuda_call(cudaMemcpy2DAsync(a->d, (size_t)a->pitch * sizeof(float), c->bounce, row, row,
                                       (size_t)rows, cudaMemcpyHostToDevice, c->stream),
                     "act_write") != 0)
        return -1;
    return be_cuda_call(cudaStreamSynchronize(c->stream), "act_write");
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
    if (be_ensure_pinned(c, &c->bounce, &c->bounce_cap, bytes, "act_read staging") != 0)
        return -1;
    if (be_cuda_call(cudaMemcpy2DAsync(c->bounce, row, a->d, (size_t)a->pitch * sizeof(float), row,
                                       (size_t)rows, cudaMemcpyDeviceToHost, c->stream),
                     "act_read") != 0 ||
        be_cuda_call(cudaStreamSynchronize(c->stream), "act_read") != 0)
        return -1;
    memcpy(dst, c->bounce, bytes);
    return 0;
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
        be_drop_graphs(c);
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
    cuda_lora_with_next_matmul,
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
    int rc = be_cuda_call(cudaSetDevice(device_index), "selecting the device");
    if (rc == 0 && zse_cuda_code_arch() < 0) /* a build without code for this GPU: say so now */
        rc = zse_fail("%s", zse_cuda_last_error());
    if (rc == 0)
        trim_stack_reservation();
    if (rc == 0)
        rc = create_compute_stream(&c->stream);
    if (rc == 0)
        rc = be_cuda_call(cudaStreamCreateWithFlags(&c->copy_stream, cudaStreamNonBlocking), "creating a stream");
    if (rc == 0)
        rc = be_cuda_call(cudaEventCreateWithFlags(&c->batch_copied, cudaEventDisableTiming), "creating an event");
    for (int i = 0; rc == 0 && i < STAGE_COUNT; i++) {
        rc = be_cuda_call(cudaHostAlloc((void **)&c->stage[i], STAGE_BYTES, cudaHostAllocWriteCombined), "allocating pinned staging memory");
        if (rc == 0)
            rc = be_cuda_call(cudaEventCreateWithFlags(&c->stage_done[i], cudaEventDisableTiming), "creating an event");
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
