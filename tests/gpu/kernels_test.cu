/* kernels_test — the CUDA kernels against a CPU reference, then their speed.
 *
 *   kernels_test            correctness: every scheme through GEMV and GEMM on odd shapes
 *                           (rows/cols not multiples of the tiles, groups 32/64/128, batch
 *                           1..64), embed, the elementwise ops, RoPE, KV store and paged
 *                           attention (f16 and int8, GQA, sliding window, split-K decode),
 *                           MoE routing, the grouped expert matmul (every path, and experts the
 *                           table places nowhere left alone) and combine
 *   kernels_test matmul lora   only the named checks (matmul embed elementwise producers
 *                              rope sample attention moe lora)
 *   kernels_test --bench    GB/s of each matmul path on Qwen2.5-7B shapes, the device copy
 *                           bandwidth it is measured against, and attention timings
 *   kernels_test --bench int4 int4s   only the matmuls of the named schemes
 *   kernels_test --bench lora         only the LoRA delta's launches (separate and folded)
 *
 * Packed weights are built here from random codes following docs/FORMAT.md (so this
 * program needs nothing but the kernels); the reference dequantizes them in double.
 * Output ends "N passed, N failed"; exit 1 on any failure. */
#include "kernels_test.cuh"

const char *scheme_names[8] = {"f32", "f16", "bf16", "int8", "int4", "int4s", "nf4", "int8g"};
const float nf4_values[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982434654236f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

int passed, failed;

/* ---- random numbers (xorshift; a fresh seed per check) ---- */
uint64_t rng = 0x9E3779B97F4A7C15ull;
uint32_t rnd_u32(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}
float rnd_uniform(float lo, float hi) { return lo + (hi - lo) * (rnd_u32() / 4294967296.0f); }

uint16_t f2h(float f) { __half_raw r = __half(__float2half_rn(f)); return r.x; }
float h2f(uint16_t u) { __half_raw r; r.x = u; return __half2float(__half(r)); }
uint16_t f2bf(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}
float bf2f(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }


int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

void pack_random(packed &p, int scheme, int64_t rows, int64_t cols, int group)
{
    p.scheme = scheme;
    p.rows = rows;
    p.cols = cols;
    p.group = group;
    p.groups = 0;
    bool four = scheme == Q4 || scheme == Q4S || scheme == NF4;
    if (four) {
        int64_t cp = round_up(cols, group);
        p.row_bytes = cp / 2;
        p.groups = cp / group;
    } else if (scheme == Q8) {
        p.row_bytes = round_up(cols, 32);
    } else if (scheme == Q8G) {
        p.row_bytes = round_up(cols, group);
        p.groups = p.row_bytes / group;
    } else {
        int es = scheme == F32 ? 4 : 2;
        p.row_bytes = round_up(cols * es, 16);     /* the loader's re-pitch */
    }
    size_t qs_bytes = (size_t)(rows * p.row_bytes);
    p.off_scales = (size_t)round_up((int64_t)qs_bytes, 256);
    size_t sc_bytes = four || scheme == Q8G ? (size_t)(rows * p.groups * 2) : scheme == Q8 ? (size_t)rows * 4 : 0;
    p.off_mins = (size_t)round_up((int64_t)(p.off_scales + sc_bytes), 256);
    size_t total = p.off_mins + (scheme == Q4 ? sc_bytes : 0);
    p.bytes.assign(total, 0);
    uint8_t *q = p.bytes.data();
    for (int64_t r = 0; r < rows; r++) {
        uint8_t *row = q + r * p.row_bytes;
        for (int64_t k = 0; k < cols; k++) {
            if (four) {
                uint8_t v = rnd_u32() & 15;
                int64_t c = k / 32, j = k % 32;
                row[c * 16 + (j & 15)] |= (uint8_t)(j < 16 ? v : v << 4);
            } else if (scheme == Q8 || scheme == Q8G) { /* int8g (GGUF Q8_0) may hold -128 */
                row[k] = (uint8_t)(int8_t)((int)(rnd_u32() % (scheme == Q8G ? 256 : 255)) - (scheme == Q8G ? 128 : 127));
            } else if (scheme == F32) {
                float f = rnd_uniform(-1.f, 1.f);
                memcpy(row + 4 * k, &f, 4);
            } else {
                uint16_t u = scheme == F16 ? f2h(rnd_uniform(-1.f, 1.f)) : f2bf(rnd_uniform(-1.f, 1.f));
                memcpy(row + 2 * k, &u, 2);
            }
        }
    }
    if (four) {
        uint16_t *s = (uint16_t *)(q + p.off_scales), *m = (uint16_t *)(q + p.off_mins);
        for (int64_t i = 0; i < rows * p.groups; i++) {
            s[i] = f2h(rnd_uniform(0.005f, 0.05f));
            if (scheme == Q4)
                m[i] = f2h(rnd_uniform(-0.4f, 0.f));
        }
    } else if (scheme == Q8) {
        float *s = (float *)(q + p.off_scales);
        for (int64_t r = 0; r < rows; r++)
            s[r] = rnd_uniform(0.001f, 0.01f);
    } else if (scheme == Q8G) {
        uint16_t *s = (uint16_t *)(q + p.off_scales);
        for (int64_t i = 0; i < rows * p.groups; i++)
            s[i] = f2h(rnd_uniform(0.001f, 0.01f));
    }
    CU(cudaMalloc(&p.dev, total));
    CU(cudaMemcpy(p.dev, q, total, cudaMemcpyHostToDevice));
    uint8_t *d = (uint8_t *)p.dev;
    p.w.scheme = scheme;
    p.w.rows = rows;
    p.w.cols = cols;
    p.w.group_size = group;
    p.w.qs = d;
    p.w.scales = (four || scheme == Q8 || scheme == Q8G) ? d + p.off_scales : NULL;
    p.w.mins = scheme == Q4 ? d + p.off_mins : NULL;
    p.w.row_bytes = p.row_bytes;
    p.w.groups = p.groups;
}

double ref_weight(const packed &p, int64_t r, int64_t k)
{
    const uint8_t *row = p.bytes.data() + r * p.row_bytes;
    switch (p.scheme) {
    case F32: { float f; memcpy(&f, row + 4 * k, 4); return f; }
    case F16: { uint16_t u; memcpy(&u, row + 2 * k, 2); return h2f(u); }
    case BF16: { uint16_t u; memcpy(&u, row + 2 * k, 2); return bf2f(u); }
    case Q8: return (double)(int8_t)row[k] * ((const float *)(p.bytes.data() + p.off_scales))[r];
    case Q8G: return (double)(int8_t)row[k] * h2f(((const uint16_t *)(p.bytes.data() + p.off_scales))[r * p.groups + k / p.group]);
    default: break;
    }
    int64_t c = k / 32, j = k % 32;
    uint8_t byte = row[c * 16 + (j & 15)];
    int v = j < 16 ? byte & 15 : byte >> 4;
    int64_t g = k / p.group;
    double s = h2f(((const uint16_t *)(p.bytes.data() + p.off_scales))[r * p.groups + g]);
    if (p.scheme == Q4)
        return v * s + h2f(((const uint16_t *)(p.bytes.data() + p.off_mins))[r * p.groups + g]);
    if (p.scheme == Q4S)
        return (v - 8) * s;
    return nf4_values[v] * s;
}

size_t packed_bytes(const packed &p) { return p.bytes.size(); }

std::vector<float> rand_vec(size_t n, float lo, float hi)
{
    std::vector<float> v(n);
    for (auto &f : v)
        f = rnd_uniform(lo, hi);
    return v;
}

/* ---- activations: f32 [n][pitch] ---- */
int64_t pitch_of(int64_t cols) { return round_up(cols, 4); }

float *dev_floats(const std::vector<float> &h)
{
    float *d;
    CU(cudaMalloc(&d, h.size() * 4 + 16));
    CU(cudaMemcpy(d, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
    return d;
}

std::vector<float> host_floats(const float *d, size_t n)
{
    std::vector<float> h(n);
    CU(cudaDeviceSynchronize());
    CU(cudaMemcpy(h.data(), d, n * 4, cudaMemcpyDeviceToHost));
    return h;
}

/* ||a - b|| / ||b|| over the used entries; NaN (an unwritten poisoned output) fails */
double rel_err(const std::vector<double> &ref, const std::vector<float> &got)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        if (!std::isfinite(got[i]))
            return INFINITY;
        num += (got[i] - ref[i]) * (got[i] - ref[i]);
        den += ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

void poison(float *d, size_t n) { CU(cudaMemset(d, 0xFF, n * 4)); }  /* NaN */

cublasHandle_t cublas;
void *scratch;
extern const size_t scratch_bytes;
const size_t scratch_bytes = (size_t)256 << 20;

float time_ms(cudaStream_t st, int iters, void (*fn)(void *), void *arg)
{
    cudaEvent_t a, b;
    CU(cudaEventCreate(&a));
    CU(cudaEventCreate(&b));
    for (int i = 0; i < 3; i++)
        fn(arg);
    std::vector<float> t;
    for (int i = 0; i < iters; i++) {
        CU(cudaEventRecord(a, st));
        fn(arg);
        CU(cudaEventRecord(b, st));
        CU(cudaEventSynchronize(b));
        float ms;
        CU(cudaEventElapsedTime(&ms, a, b));
        t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return t[t.size() / 2];
}

/* per call, when `reps` calls run back to back (as a decode step issues them): the launch
 * gaps shrink to what the GPU itself needs between kernels */
float time_stream_ms(int reps, void (*fn)(void *), void *arg)
{
    cudaEvent_t a, b;
    CU(cudaEventCreate(&a));
    CU(cudaEventCreate(&b));
    fn(arg);
    std::vector<float> t;
    for (int i = 0; i < 5; i++) {
        CU(cudaEventRecord(a, 0));
        for (int r = 0; r < reps; r++)
            fn(arg);
        CU(cudaEventRecord(b, 0));
        CU(cudaEventSynchronize(b));
        float ms;
        CU(cudaEventElapsedTime(&ms, a, b));
        t.push_back(ms / reps);
    }
    std::sort(t.begin(), t.end());
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return t[t.size() / 2];
}

/* the checks, in the order they run; `kernels_test NAME...` runs the named ones only */
static const struct {
    const char *name;
    void (*run)(void);
} sections[] = {
    {"matmul", test_matmul},         {"embed", test_embed},     {"elementwise", test_elementwise},
    {"producers", test_prep_producers}, {"rope", test_rope_kv_store}, {"sample", test_sample},
    {"attention", test_attention},   {"moe", test_moe},         {"lora", test_lora},
};
static const int n_sections = (int)(sizeof sections / sizeof sections[0]);

static bool section_named(const char *name)
{
    for (int i = 0; i < n_sections; i++)
        if (strcmp(sections[i].name, name) == 0)
            return true;
    return false;
}

static bool section_wanted(const char *name, int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], name) == 0)
            return true;
    return argc <= 1;
}

int main(int argc, char **argv)
{
    bool do_bench = argc > 1 && strcmp(argv[1], "--bench") == 0;
    for (int i = 1; !do_bench && i < argc; i++)
        if (!section_named(argv[i])) { /* before the device: a typo is not a skip */
            fprintf(stderr, "kernels_test: no check named '%s'; the checks are:", argv[i]);
            for (int k = 0; k < n_sections; k++)
                fprintf(stderr, " %s", sections[k].name);
            fprintf(stderr, " (or --bench [SCHEME...|lora])\n");
            return 2;
        }
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        printf("no CUDA device: skipped\n");
        return 77;
    }
    cudaDeviceProp prop;
    CU(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s (compute capability %d.%d), %d SMs, %.0f MB L2; code built for sm_%d\n", prop.name, prop.major,
           prop.minor, prop.multiProcessorCount, prop.l2CacheSize / 1e6, zse_cuda_code_arch());
    if (cublasCreate(&cublas) != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "cuBLAS did not initialize\n");
        return 2;
    }
    CU(cudaMalloc(&scratch, scratch_bytes));
    if (do_bench) {
        bench(argc, argv);
        return 0;
    }
    for (int i = 0; i < n_sections; i++)
        if (section_wanted(sections[i].name, argc, argv)) {
            sections[i].run();
            printf("%s done: %d passed, %d failed\n", sections[i].name, passed, failed);
        }
    CU(cudaDeviceSynchronize());
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
