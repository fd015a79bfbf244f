/* kernels_test's shared part: the checks' counters and macros, random numbers, packed
 * weights built on the host after docs/FORMAT.md with their double-precision reference,
 * device buffers, the timers of the benchmarks, and each file's entry points.
 *
 *   kernels_test.cu            these helpers and main()
 *   kernels_test_matmul.cu     matmul (every scheme and path), embed, elementwise, producers
 *   kernels_test_attention.cu  RoPE, KV store, paged attention, sampling
 *   kernels_test_moe.cu        routing, the grouped expert matmul, combine
 *   kernels_test_lora.cu       LoRA deltas (separate and folded into the GEMV), their benches
 *   kernels_test_bench.cu      --bench: matmul GB/s, attention, a 7B decode step */
#pragma once

#include "backend/cuda/cuda_kernels.h"

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

/* scheme ids, as src/quant/quant.h numbers them (written to files: never renumbered) */
enum { F32 = 0, F16 = 1, BF16 = 2, Q8 = 3, Q4 = 4, Q4S = 5, NF4 = 6, Q8G = 7 };
extern const char *scheme_names[8];
extern const float nf4_values[16];

extern int passed, failed;

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        if (cond) {                                                          \
            passed++;                                                        \
        } else {                                                             \
            failed++;                                                        \
            fprintf(stderr, "%s:%d: FAILED %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                    \
            fprintf(stderr, "\n");                                           \
        }                                                                    \
    } while (0)

#define CU(call)                                                                          \
    do {                                                                                  \
        cudaError_t e_ = (call);                                                          \
        if (e_ != cudaSuccess) {                                                          \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
            exit(2);                                                                      \
        }                                                                                 \
    } while (0)

#define LAUNCH(call)                                                                      \
    do {                                                                                  \
        if ((call) != 0) {                                                                \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, zse_cuda_last_error()); \
            exit(2);                                                                      \
        }                                                                                 \
    } while (0)

/* ---- random numbers (xorshift; a fresh seed per check) ---- */
extern uint64_t rng;
uint32_t rnd_u32(void);
float rnd_uniform(float lo, float hi);
uint16_t f2h(float f);
float h2f(uint16_t u);
uint16_t f2bf(float f);
float bf2f(uint16_t b);

/* ---- a packed weight on the host and the device ---- */
struct packed {
    int scheme, group;
    int64_t rows, cols, row_bytes, groups;
    std::vector<uint8_t> bytes;
    size_t off_scales, off_mins;
    void *dev;
    zse_cuda_weight w;
};

int64_t round_up(int64_t a, int64_t b);
void pack_random(packed &p, int scheme, int64_t rows, int64_t cols, int group);
double ref_weight(const packed &p, int64_t r, int64_t k); /* W[r][k] dequantized in double */
size_t packed_bytes(const packed &p);
std::vector<float> rand_vec(size_t n, float lo = -2.f, float hi = 2.f);

/* ---- activations: f32 [n][pitch] ---- */
int64_t pitch_of(int64_t cols);
float *dev_floats(const std::vector<float> &h);
std::vector<float> host_floats(const float *d, size_t n);
double rel_err(const std::vector<double> &ref, const std::vector<float> &got);
void poison(float *d, size_t n); /* NaN */

/* the cuBLAS handle and scratch every check shares (main sets them up) */
extern cublasHandle_t cublas;
extern void *scratch;
extern const size_t scratch_bytes;

/* ---- timers of the benchmarks ---- */
float time_ms(cudaStream_t st, int iters, void (*fn)(void *), void *arg);
float time_stream_ms(int reps, void (*fn)(void *), void *arg);

/* ---- each file's entry points ---- */
void test_matmul(void);
void test_embed(void);
void test_elementwise(void);
void test_prep_producers(void);
void test_rope_kv_store(void);
void test_sample(void);
void test_attention(void);
void test_moe(void);
void test_lora(void);
void bench(int argc, char **argv);
void bench_lora(void);
void bench_lora_fold(void);
