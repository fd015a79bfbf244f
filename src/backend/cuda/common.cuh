/* common.cuh — what the CUDA sources of this folder share: error recording, launch checks,
 * the scheme traits that decode one 16-byte unit of a packed row, the sm_80+ building blocks
 * (cp.async, mma.sync, ldmatrix) and whether the tensor-core paths may run. Internal to
 * src/backend/cuda; the C surface is cuda_kernels.h. */
#ifndef ZSE_CUDA_COMMON_CUH
#define ZSE_CUDA_COMMON_CUH

#include "backend/cuda/cuda_kernels.h"

/* the C headers of zse carry no extern "C" guards of their own */
extern "C" {
#include "quant/quant.h"
}

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

/* records a message for zse_cuda_last_error(); returns -1 */
int zse_cuda_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* after a launch: a launch error (bad configuration, no kernel image for this GPU) */
#define ZSE_CUDA_LAUNCHED(what)                                                         \
    do {                                                                                \
        cudaError_t e_ = cudaGetLastError();                                            \
        if (e_ != cudaSuccess)                                                          \
            return zse_cuda_fail("%s: launch failed: %s", what, cudaGetErrorString(e_)); \
    } while (0)

__host__ __device__ static inline int64_t zse_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* the sum of v over the warp's 32 lanes, in every lane */
__device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* a / b for non-negative a, b > 0, through 32-bit division when both fit (every index
 * of a decode step does): a 64-bit division is a subroutine of ~70 instructions */
__device__ __forceinline__ int64_t div_idx(int64_t a, int64_t b)
{
    return ((uint64_t)a | (uint64_t)b) >> 32 == 0 ? (int64_t)((uint32_t)a / (uint32_t)b) : a / b;
}

/* the scale group of element k: a shift when the group size is a power of two (every
 * recipe's), else a 32-bit division. The plain int64 `k / group_size` compiles to a 64-bit
 * division subroutine that cost the GEMVs more instructions than their math. Columns stay
 * under 2^32, so k fits the 32-bit path. */
struct group_of {
    int shift;
    uint32_t size;
    __device__ __forceinline__ int64_t operator()(int64_t k) const
    {
        return shift >= 0 ? k >> shift : (int64_t)((uint32_t)k / size);
    }
};

__device__ __forceinline__ group_of group_div(int group_size)
{
    group_of g;
    g.shift = group_size > 0 && (group_size & (group_size - 1)) == 0 ? __ffs(group_size) - 1 : -1;
    g.size = (uint32_t)group_size;
    return g;
}

/* 16 bytes through the non-coherent path without allocating in L1: weights stream once,
 * and L1 stays for the activations that every warp re-reads. */
__device__ __forceinline__ uint4 ld_stream16(const void *p)
{
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

/* byte j (0..3) of v as an exact float, through the 2^23 exponent trick: 0x4B0000bb is
 * 2^23 + bb, so one byte permute and one subtract replace a slow int-to-float convert. */
__device__ __forceinline__ float byte_as_float_plus_2p23(uint32_t v, int j)
{
    return __uint_as_float(__byte_perm(v, 0x4B000000u, 0x7650u | (uint32_t)j));
}

/* Scheme traits. A 16-byte unit of a row holds E elements. It is decoded in P pieces of NV
 * raw values (before the group/row scale); piece p's values f[0..3] sit at elements
 * off0(p).., f[4..7] at off1(p)..  (NV == 4: only off0). */
/* x for the int4 dp4a GEMV, 32 values a chunk: two int8 codes a value, x ~ d*h + dl*l with
 * d = amax/127 and dl = d/254 (x keeps ~15 bits). One definition for the GEMV's own
 * quantizing kernel (matmul.cu) and the ops that hand x over quantized (ops.cu). */
__device__ __forceinline__ void q8_codes(float v, float d, float dl, float &h, float &l)
{
    h = d > 0.f ? fminf(fmaxf(rintf(v / d), -127.f), 127.f) : 0.f;
    const float r = fmaf(-h, d, v);
    l = dl > 0.f ? fminf(fmaxf(rintf(r / dl), -127.f), 127.f) : 0.f;
}

template <int S> struct scheme_traits;

template <> struct scheme_traits<ZSE_SCHEME_F32> {
    static constexpr int E = 4, P = 1, NV = 4;
    __device__ static int off0(int) { return 0; }
    __device__ static int off1(int) { return 4; }
    __device__ static void piece(const uint4 &w, int, const float *, float *f)
    {
        f[0] = __uint_as_float(w.x); f[1] = __uint_as_float(w.y);
        f[2] = __uint_as_float(w.z); f[3] = __uint_as_float(w.w);
    }
};

template <> struct scheme_traits<ZSE_SCHEME_F16> {
    static constexpr int E = 8, P = 1, NV = 8;
    __device__ static int off0(int) { return 0; }
    __device__ static int off1(int) { return 4; }
    __device__ static void piece(const uint4 &w, int, const float *, float *f)
    {
        const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            __half2 h = *reinterpret_cast<const __half2 *>(&u[i]);
            float2 v = __half22float2(h);
            f[2 * i] = v.x;
            f[2 * i + 1] = v.y;
        }
    }
};

template <> struct scheme_traits<ZSE_SCHEME_BF16> {
    static constexpr int E = 8, P = 1, NV = 8;
    __device__ static int off0(int) { return 0; }
    __device__ static int off1(int) { return 4; }
    __device__ static void piece(const uint4 &w, int, const float *, float *f)
    {
        const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            f[2 * i] = __uint_as_float(u[i] << 16);
            f[2 * i + 1] = __uint_as_float(u[i] & 0xFFFF0000u);
        }
    }
};

/* int8: unit = 16 elements in order; piece p = words 2p, 2p+1 = elements 8p..8p+7 */
template <> struct scheme_traits<ZSE_SCHEME_Q8> {
    static constexpr int E = 16, P = 2, NV = 8;
    __device__ static int off0(int p) { return 8 * p; }
    __device__ static int off1(int p) { return 8 * p + 4; }
    __device__ static void piece(const uint4 &w, int p, const float *, float *f)
    {
        /* flip the sign bits: the byte becomes q + 128, decoded exactly, then shifted back */
        const uint32_t a = (p == 0 ? w.x : w.z) ^ 0x80808080u;
        const uint32_t b = (p == 0 ? w.y : w.w) ^ 0x80808080u;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            f[j] = byte_as_float_plus_2p23(a, j) - 8388736.0f;
            f[4 + j] = byte_as_float_plus_2p23(b, j) - 8388736.0f;
        }
    }
};

/* int8g (GGUF Q8_0): the same bytes as int8, with an f16 scale per group instead of a row's */
template <> struct scheme_traits<ZSE_SCHEME_Q8G> : scheme_traits<ZSE_SCHEME_Q8> {};

/* 4-bit chunk: byte j holds element j (low nibble) and j + 16 (high). Piece p = word p:
 * low nibbles are elements 4p..4p+3, high nibbles 16+4p..16+4p+3. */
__device__ __forceinline__ uint32_t q4_word(const uint4 &w, int p)
{
    return p == 0 ? w.x : p == 1 ? w.y : p == 2 ? w.z : w.w;
}

template <> struct scheme_traits<ZSE_SCHEME_Q4> {
    static constexpr int E = 32, P = 4, NV = 8;
    __device__ static int off0(int p) { return 4 * p; }
    __device__ static int off1(int p) { return 16 + 4 * p; }
    /* raw q in 0..15; w = q * scale + min */
    __device__ static void piece(const uint4 &w, int p, const float *, float *f)
    {
        const uint32_t v = q4_word(w, p);
        const uint32_t lo = v & 0x0F0F0F0Fu, hi = (v >> 4) & 0x0F0F0F0Fu;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            f[j] = byte_as_float_plus_2p23(lo, j) - 8388608.0f;
            f[4 + j] = byte_as_float_plus_2p23(hi, j) - 8388608.0f;
        }
    }
};

template <> struct scheme_traits<ZSE_SCHEME_Q4S> {
    static constexpr int E = 32, P = 4, NV = 8;
    __device__ static int off0(int p) { return 4 * p; }
    __device__ static int off1(int p) { return 16 + 4 * p; }
    /* q - 8 in -8..7; w = (q - 8) * scale */
    __device__ static void piece(const uint4 &w, int p, const float *, float *f)
    {
        const uint32_t v = q4_word(w, p);
        const uint32_t lo = v & 0x0F0F0F0Fu, hi = (v >> 4) & 0x0F0F0F0Fu;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            f[j] = byte_as_float_plus_2p23(lo, j) - 8388616.0f;
            f[4 + j] = byte_as_float_plus_2p23(hi, j) - 8388616.0f;
        }
    }
};

template <> struct scheme_traits<ZSE_SCHEME_NF4> {
    static constexpr int E = 32, P = 4, NV = 8;
    __device__ static int off0(int p) { return 4 * p; }
    __device__ static int off1(int p) { return 16 + 4 * p; }
    /* table: the 16 code values in shared memory (16 words, 16 banks: never a conflict) */
    __device__ static void piece(const uint4 &w, int p, const float *table, float *f)
    {
        const uint32_t v = q4_word(w, p);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            f[j] = table[(v >> (8 * j)) & 0xF];
            f[4 + j] = table[(v >> (8 * j + 4)) & 0xF];
        }
    }
};

/* does this scheme carry a group scale (4-bit, int8g) / a min (Q4) / a row scale (Q8)? */
template <int S> struct scheme_scales {
    static constexpr bool group = S == ZSE_SCHEME_Q4 || S == ZSE_SCHEME_Q4S || S == ZSE_SCHEME_NF4 ||
                                  S == ZSE_SCHEME_Q8G;
    static constexpr bool min = S == ZSE_SCHEME_Q4;
    static constexpr bool row = S == ZSE_SCHEME_Q8;
};

/* run f.template operator()<S>() for the weight's scheme */
#define ZSE_CUDA_SCHEME_SWITCH(scheme, CALL)                 \
    switch (scheme) {                                        \
    case ZSE_SCHEME_F32: { constexpr int S_ = ZSE_SCHEME_F32; CALL; } break;   \
    case ZSE_SCHEME_F16: { constexpr int S_ = ZSE_SCHEME_F16; CALL; } break;   \
    case ZSE_SCHEME_BF16: { constexpr int S_ = ZSE_SCHEME_BF16; CALL; } break; \
    case ZSE_SCHEME_Q8: { constexpr int S_ = ZSE_SCHEME_Q8; CALL; } break;     \
    case ZSE_SCHEME_Q4: { constexpr int S_ = ZSE_SCHEME_Q4; CALL; } break;     \
    case ZSE_SCHEME_Q4S: { constexpr int S_ = ZSE_SCHEME_Q4S; CALL; } break;   \
    case ZSE_SCHEME_NF4: { constexpr int S_ = ZSE_SCHEME_NF4; CALL; } break;   \
    case ZSE_SCHEME_Q8G: { constexpr int S_ = ZSE_SCHEME_Q8G; CALL; } break;   \
    default: return zse_cuda_fail("cuda: unknown weight scheme %d", (int)(scheme)); \
    }

/* the tensor-core paths (int4 matmul, prefill attention) may run: an sm_80+ GPU and
 * ZSE_CUDA_NO_MMA unset or 0 (asked once; matmul.cu) */
bool zse_cuda_mma_usable(void);

/* ---- block reductions (ops.cu, sample.cu) ----------------------------------------------- */

/* every thread of the block gets the sum of v over the block (inline: one definition for every
 * file that includes this) */
__device__ inline float block_sum(float v)
{
    __shared__ float part[32];
    v = warp_sum(v);
    if ((threadIdx.x & 31) == 0)
        part[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        v = warp_sum(threadIdx.x < blockDim.x / 32 ? part[threadIdx.x] : 0.f);
        if (threadIdx.x == 0)
            part[0] = v;
    }
    __syncthreads();
    v = part[0];
    __syncthreads();
    return v;
}

/* ---- sm_80+ building blocks: cp.async, mma.sync m16n8k16 (f16 -> f32), ldmatrix ---------- */

__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool ok)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(ok ? 16 : 0));
#else
    *reinterpret_cast<uint4 *>(dst) = ok ? *reinterpret_cast<const uint4 *>(src) : make_uint4(0, 0, 0, 0);
#endif
}

/* 4 bytes (an int8 KV row's scale), through L1 */
__device__ __forceinline__ void cp_async4(void *dst, const void *src)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(src));
#else
    *reinterpret_cast<uint32_t *>(dst) = *reinterpret_cast<const uint32_t *>(src);
#endif
}

/* the same for W, asking L2 to fetch the whole 128-byte line: a stage takes 32 bytes of a
 * row and the next three stages the rest, which then come from L2 (H200: 1-10% faster,
 * most at 8 rows and on the 152064-row head) */
__device__ __forceinline__ void cp_async16_l2line(void *dst, const void *src, bool ok)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(ok ? 16 : 0));
#else
    cp_async16(dst, src, ok);
#endif
}

__device__ __forceinline__ void cp_async_commit(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

/* wait until at most N of this thread's copy groups are still in flight */
template <int N> __device__ __forceinline__ void cp_async_wait(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    (void)d; (void)a; (void)b0; (void)b1;
    __trap();
#endif
}

/* four (x4) or two (x2) 8x8 f16 matrices from shared memory, each lane passing the address
 * of one 16-byte matrix row (lanes 8i..8i+7: matrix i); TRANS transposes each matrix */
template <bool TRANS = false> __device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void *p)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    if constexpr (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
#else
    (void)p;
    r[0] = r[1] = r[2] = r[3] = 0;
#endif
}

__device__ __forceinline__ void ldsm_x2(uint32_t &r0, uint32_t &r1, const void *p)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(a));
#else
    (void)p;
    r0 = r1 = 0;
#endif
}

/* Programmatic dependent launch (sm_90 on). A decode step is ~14 small kernels a layer, each
 * of which used to start only once the one before had drained: its launch and the ramp of
 * its first blocks were dead time. Launched through zse_launch, a kernel may start while its
 * predecessor runs; it must then call pdl_enter() before it reads anything an earlier kernel
 * wrote or writes anything an earlier kernel reads: griddepcontrol.wait returns once the
 * predecessor has finished and its writes are visible. Every kernel of this folder calls it
 * first thing, before any early return (a kernel whose threads all skipped the wait could
 * finish before its predecessor, and the kernel after it would no longer be ordered after
 * both), except that the int4 GEMV loads its first weight units - constant data - before
 * waiting. pdl_enter also lets the next kernel launch; its blocks take free slots and wait
 * in turn. Without the launch attribute (older GPUs, ZSE_CUDA_NO_PDL=1, plain <<<>>>
 * launches) both instructions do nothing. */
__device__ __forceinline__ void pdl_enter(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/* whether launches may overlap their predecessor: compute capability 9.0 or newer and
 * ZSE_CUDA_NO_PDL unset (or "0"); asked once */
bool zse_cuda_pdl_usable(void);

/* kernel<<<grid, block, smem, st>>>(args...), overlapping the kernel before it where the
 * device allows (see pdl_enter); a launch error is left for ZSE_CUDA_LAUNCHED */
template <typename... P, typename... A>
static inline void zse_launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t st,
                              A &&...args)
{
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = st;
    cfg.attrs = attr;
    cfg.numAttrs = zse_cuda_pdl_usable() ? 1 : 0;
    (void)cudaLaunchKernelEx(&cfg, kernel, static_cast<A &&>(args)...);
}

#endif
